# -*- coding: utf-8 -*-
# Copyright: sshfwup developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The connection options every sshfwup.device module takes (module_utils/args.py CONNECTION_ARGS)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    DOCUMENTATION = r"""
options:
  host:
    description: The device's address. Default C(ansible_host), else the inventory hostname.
    type: str
  port:
    description: The device's SSH port. Default C(ansible_port), else 22.
    type: int
  user:
    description: The SSH user. Default C(ansible_user).
    type: str
  key:
    description: Private key file whose public half is in the device's authorized_keys. Default C(ansible_ssh_private_key_file).
    type: path
  known_hosts:
    description: known_hosts file holding the device's host key. Default C(~/.ssh/known_hosts).
    type: path
  host_key_checking:
    description:
      - Check the device's host key against O(known_hosts). V(false) accepts any key (first
        contact on a network you trust). Default C(ansible_host_key_checking), else V(true).
    type: bool
"""
