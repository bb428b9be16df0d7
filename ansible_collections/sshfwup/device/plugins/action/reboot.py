# -*- coding: utf-8 -*-
# Copyright: sshfwup developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Action plugin for sshfwup.device.reboot: reboots a device from the controller and follows it."""

from __future__ import annotations

from typing import Any

from ansible.plugins.action import ActionBase

from ansible_collections.sshfwup.device.plugins.module_utils.args import REBOOT_ARGS
from ansible_collections.sshfwup.device.plugins.plugin_utils.device import device_address, require_fleet


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _supports_check_mode = True
    _supports_async = False

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        result = super().run(tmp, task_vars)
        del tmp
        _validation, args = self.validate_argument_spec(argument_spec=REBOOT_ARGS)
        fleet = require_fleet()
        import anyio

        address = device_address(args, task_vars or {}, self._templar)
        if not 0 < address.port < 65536 or not args["timeout"] > 0:
            result.update(failed=True, msg=f"port {address.port} / timeout {args['timeout']:g}: out of range")
            return result
        try:
            if self._task.check_mode:  # says whether it would reboot, without rebooting
                status = anyio.run(lambda: fleet.device_status(address))
                would = bool(status.get("pending_reboot")) or not args["pending_only"]
                result.update(changed=would, msg="would reboot" if would else "no reboot pending; would not reboot")
                return result
            done = anyio.run(lambda: fleet.reboot_device(
                address, pending_only=args["pending_only"], wait=args["wait"], timeout=args["timeout"]))
        except fleet.FleetError as e:
            if e.result is not None:
                result.update(e.result.to_json())
            result.update(changed=bool(e.result and e.result.changed), msg=str(e))
            result["unreachable" if isinstance(e, fleet.DeviceUnreachable) else "failed"] = True
            return result
        result.update(done.to_json())
        return result
