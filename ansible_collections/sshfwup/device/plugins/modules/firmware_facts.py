#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: sshfwup developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: firmware_facts
short_description: What an sshfwup device runs (its C(status --json)), from the controller
version_added: "0.1.0"
description:
  - Runs C(status --json) on a device running C(sshfwup serve) and returns it as the fact
    C(sshfwup) - running slot, versions and uuids per slot, validation, pending reboot, the
    application's version and pid, the last update.
  - Runs on the controller through its action plugin (devices refuse shells).
  - Connection parameters default to the inventory's C(ansible_host), C(ansible_port),
    C(ansible_user), C(ansible_ssh_private_key_file) and C(ansible_host_key_checking).
author:
  - sshfwup developers (@sshfwup)
extends_documentation_fragment:
  - sshfwup.device.connection
  - sshfwup.device.controller
options:
  timeout:
    description: Seconds to wait for the answer.
    type: float
    default: 30.0
attributes:
  check_mode:
    support: full
    description: Reads only; runs the same in check mode.
  facts:
    support: full
    description: Sets the fact C(sshfwup).
seealso:
  - module: sshfwup.device.firmware_update
"""

EXAMPLES = r"""
- name: Read what each device runs
  sshfwup.device.firmware_facts:

- name: Show it
  ansible.builtin.debug:
    msg: "{{ inventory_hostname }} runs {{ sshfwup.boot.slots[sshfwup.running_root].version }}"
"""

RETURN = r"""
status:
  description: The device's C(status --json) answer.
  returned: success
  type: dict
  sample: {"running_root": "a", "active": "a", "validated": true, "pending_reboot": false}
ansible_facts:
  description: Facts set on the host.
  returned: success
  type: complex
  contains:
    sshfwup:
      description: The same C(status --json) answer.
      type: dict
      returned: success
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.sshfwup.device.plugins.module_utils.args import CONTROLLER_ONLY, FIRMWARE_FACTS_ARGS


def main():
    module = AnsibleModule(argument_spec=FIRMWARE_FACTS_ARGS, supports_check_mode=True)
    module.fail_json(msg=CONTROLLER_ONLY.format("firmware_facts"))


if __name__ == "__main__":
    main()
