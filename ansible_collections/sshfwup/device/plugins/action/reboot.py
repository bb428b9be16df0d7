# -*- coding: utf-8 -*-
# Copyright: sshfwup developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Action plugin for sshfwup.device.reboot: reboots a device from the controller and follows it."""

from __future__ import annotations

from typing import Any

from ansible_collections.sshfwup.device.plugins.module_utils.args import REBOOT_ARGS
from ansible_collections.sshfwup.device.plugins.plugin_utils.device import DeviceAction


class ActionModule(DeviceAction):
    ARGS = REBOOT_ARGS

    def act(self, fleet: Any, address: Any, args: dict[str, Any]) -> dict[str, Any]:
        import anyio

        if self._task.check_mode:  # says whether it would reboot, without rebooting
            status = anyio.run(lambda: fleet.device_status(address))
            would = bool(status.get("pending_reboot")) or not args["pending_only"]
            return {"changed": would, "msg": "would reboot" if would else "no reboot pending; would not reboot"}
        done = anyio.run(lambda: fleet.reboot_device(
            address, pending_only=args["pending_only"], wait=args["wait"], timeout=args["timeout"]))
        return dict(done.to_json())
