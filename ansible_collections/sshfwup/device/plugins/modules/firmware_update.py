#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: sshfwup developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: firmware_update
short_description: Update an sshfwup device's firmware (hot swap or reboot), from the controller
version_added: "0.1.0"
description:
  - Streams a C(.fw) firmware to a device running C(sshfwup serve), the way
    C(sshfwup upload) does, and reports what the device did - a hot swap of the application
    (no refused connection, reboot pending) or a reboot into the new firmware.
  - Runs on the controller through its action plugin and speaks sshfwup's SSH protocol to the
    device; nothing is copied to the device (devices refuse shells).
  - Asks the device what it runs first (C(status --json)). A device already running that
    firmware (or hot-swapped into it and waiting for its reboot) is left alone and reported
    C(changed=false); the device itself also answers "already running" to a repeated upload.
  - Predicts the verdict as C(sshfwup firmware diff --running) does, from the release the device
    runs (found by uuid in O(releases)); check mode reports the prediction and sends nothing.
  - Fails before sending anything when the device would refuse the upload (an update in
    progress, a reboot pending into other firmware, firmware not validated yet).
  - Connection parameters default to the inventory's C(ansible_host), C(ansible_port),
    C(ansible_user), C(ansible_ssh_private_key_file) and C(ansible_host_key_checking).
  - Needs the C(sshfwup) Python package where ansible-playbook runs (C(pip install 'sshfwup[fleet]')).
author:
  - sshfwup developers (@sshfwup)
extends_documentation_fragment:
  - sshfwup.device.connection
  - sshfwup.device.controller
options:
  firmware:
    description: The C(.fw) file on the controller.
    type: path
    required: true
  releases:
    description:
      - Directory of released C(.fw) files; the one the device runs (same uuid) is compared with
        O(firmware) to predict a hot swap or a reboot. Default O(delta_from), else the directory
        of O(firmware). Without a match the prediction is C(unknown).
    type: path
  delta_from:
    description:
      - Directory of released C(.fw) files; sends a delta patch from the firmware the device runs
        (C(sshfwup upload --delta-from)), or the whole file when none matches.
    type: path
  wait:
    description:
      - Wait for the outcome. After a reboot verdict, reconnect until the device has booted the
        new firmware and validated it (a fallback is a failure); then read the state back.
    type: bool
    default: true
  timeout:
    description: Seconds to wait for a rebooting device to come back and validate.
    type: float
    default: 300.0
  allow_reboot:
    description:
      - V(false) fails before sending anything unless the prediction is a hot swap (a prediction
        of C(unknown) fails too, since a hot swap could not be proved).
    type: bool
    default: true
attributes:
  check_mode:
    support: full
    description: Predicts the verdict (hot, reboot, unchanged, unknown) and sends nothing.
notes:
  - A hot swap leaves the device waiting for a reboot (it refuses further uploads until then);
    a second run reports it C(changed=false) with RV(reboot_pending=true).
seealso:
  - module: sshfwup.device.firmware_facts
"""

EXAMPLES = r"""
- name: Update to the new build, hot swap or reboot, and wait for validation
  sshfwup.device.firmware_update:
    firmware: build/app-2.1.0.fw
    releases: releases/

- name: Zero-downtime only (fail instead of rebooting)
  sshfwup.device.firmware_update:
    firmware: build/app-2.1.0.fw
    releases: releases/
    allow_reboot: false

- name: Send a delta patch from whatever the device runs
  sshfwup.device.firmware_update:
    firmware: build/app-2.1.0.fw
    delta_from: releases/
  register: update

- name: Predict only
  sshfwup.device.firmware_update:
    firmware: build/app-2.1.0.fw
  check_mode: true
  register: prediction
"""

RETURN = r"""
verdict:
  description: What happened (in check mode, what would) - C(hot), C(reboot), C(unchanged) or C(unknown).
  returned: always
  type: str
  sample: hot
predicted:
  description: The prediction made before uploading (same values as RV(verdict)).
  returned: always
  type: str
  sample: hot
hot:
  description: The application was (would be) swapped without a reboot.
  returned: always
  type: bool
reboot:
  description: The device rebooted (would reboot) into the new firmware.
  returned: always
  type: bool
from_version:
  description: The firmware version the device ran before.
  returned: always
  type: str
  sample: 1.0.0
to_version:
  description: The version of O(firmware).
  returned: always
  type: str
  sample: 2.0.0
reasons:
  description: Why a reboot is needed, or why the prediction is unknown.
  returned: always
  type: list
  elements: str
reboot_pending:
  description: The device runs the new application and boots the new firmware at its next reboot.
  returned: always
  type: bool
validated:
  description: The device's firmware is validated (read back after the update; null when not read).
  returned: always
  type: bool
bytes_sent:
  description: Bytes uploaded (a delta patch is smaller than the firmware).
  returned: always
  type: int
  sample: 1048576
durations:
  description: Seconds spent - plan (status and prediction), transfer, update (upload and wait), total.
  returned: always
  type: dict
  sample: {"plan": 0.2, "transfer": 0.3, "update": 2.6, "total": 2.8}
device_output:
  description: The device's last lines (fwup's and sshfwup's stage lines).
  returned: always
  type: list
  elements: str
msg:
  description: One line on what happened.
  returned: always
  type: str
  sample: "1.0.0 -> 2.0.0: hot; reboot pending"
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.sshfwup.device.plugins.module_utils.args import CONTROLLER_ONLY, FIRMWARE_UPDATE_ARGS


def main():
    module = AnsibleModule(argument_spec=FIRMWARE_UPDATE_ARGS, supports_check_mode=True)
    module.fail_json(msg=CONTROLLER_ONLY.format("firmware_update"))


if __name__ == "__main__":
    main()
