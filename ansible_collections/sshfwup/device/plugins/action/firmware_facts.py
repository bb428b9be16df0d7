# -*- coding: utf-8 -*-
# Copyright: sshfwup developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Action plugin for sshfwup.device.firmware_facts: the device's ``status --json``, from the controller."""

from __future__ import annotations

from typing import Any

from ansible_collections.sshfwup.device.plugins.module_utils.args import FIRMWARE_FACTS_ARGS
from ansible_collections.sshfwup.device.plugins.plugin_utils.device import DeviceAction


class ActionModule(DeviceAction):
    ARGS = FIRMWARE_FACTS_ARGS

    def act(self, fleet: Any, address: Any, args: dict[str, Any]) -> dict[str, Any]:
        import anyio

        status = anyio.run(lambda: fleet.device_status(address, args["timeout"]))
        return {"changed": False, "status": status, "ansible_facts": {"sshfwup": status}}
