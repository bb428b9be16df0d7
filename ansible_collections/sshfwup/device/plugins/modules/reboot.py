#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: sshfwup developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: reboot
short_description: Reboot an sshfwup device into the firmware it boots next, and wait for its validation
version_added: "0.1.0"
description:
  - Runs the device's C(reboot) command over SSH from the controller (devices refuse shells)
    and reconnects until the device runs the firmware its boot environment names, validated once
    its application has stayed healthy. A device that falls back to the other slot instead is a
    failure.
  - By default only a device with a pending reboot is rebooted (after a hot swap it runs the new
    application and boots the new firmware at its next reboot; until then it refuses uploads);
    the others are left alone and reported C(changed=false).
  - Connection parameters default to the inventory's C(ansible_host), C(ansible_port),
    C(ansible_user), C(ansible_ssh_private_key_file) and C(ansible_host_key_checking).
author:
  - sshfwup developers (@sshfwup)
extends_documentation_fragment:
  - sshfwup.device.connection
  - sshfwup.device.controller
options:
  pending_only:
    description: Reboot only a device with a pending reboot. V(false) reboots it anyway.
    type: bool
    default: true
  wait:
    description: Wait until the device has booted and validated its firmware.
    type: bool
    default: true
  timeout:
    description: Seconds to wait for the device to come back and validate.
    type: float
    default: 300.0
attributes:
  check_mode:
    support: full
    description: Says whether the device would be rebooted; does not reboot it.
seealso:
  - module: sshfwup.device.firmware_update
"""

EXAMPLES = r"""
- name: Boot the hot-swapped firmware, one device at a time
  sshfwup.device.reboot:
  throttle: 1
"""

RETURN = r"""
from_version:
  description: The firmware version that ran before the reboot.
  returned: always
  type: str
  sample: 1.0.0
to_version:
  description: The firmware version the device boots.
  returned: always
  type: str
  sample: 2.0.0
validated:
  description: The firmware the device booted is validated.
  returned: always
  type: bool
durations:
  description: Seconds spent (total).
  returned: always
  type: dict
  sample: {"total": 4.2}
device_output:
  description: What was seen while the device came back.
  returned: always
  type: list
  elements: str
msg:
  description: One line on what happened.
  returned: always
  type: str
  sample: 2.0.0 booted from slot b and is validated
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.sshfwup.device.plugins.module_utils.args import CONTROLLER_ONLY, REBOOT_ARGS


def main():
    module = AnsibleModule(argument_spec=REBOOT_ARGS, supports_check_mode=True)
    module.fail_json(msg=CONTROLLER_ONLY.format("reboot"))


if __name__ == "__main__":
    main()
