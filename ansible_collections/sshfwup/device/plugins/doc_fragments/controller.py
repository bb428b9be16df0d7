# -*- coding: utf-8 -*-
# Copyright: sshfwup developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The attributes every sshfwup.device module shares: it runs on the controller, shows no diff."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    DOCUMENTATION = r"""
attributes:
  diff_mode:
    support: none
    description: No diff is shown.
  action:
    support: full
    description: Runs on the controller as an action plugin.
  platform:
    support: full
    platforms: posix
    description: The controller needs the C(sshfwup) Python package; the device runs C(sshfwup serve).
"""
