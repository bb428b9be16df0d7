# -*- coding: utf-8 -*-
# Copyright: sshfwup developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Action plugin for sshfwup.device.firmware_update: runs on the controller (see the module's docs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ansible.plugins.action import ActionBase

from ansible_collections.sshfwup.device.plugins.module_utils.args import FIRMWARE_UPDATE_ARGS
from ansible_collections.sshfwup.device.plugins.plugin_utils.device import device_address, require_fleet


def _path(value: Any) -> Path | None:
    return Path(value) if value else None


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _supports_check_mode = True
    _supports_async = False

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        result = super().run(tmp, task_vars)
        del tmp
        _validation, args = self.validate_argument_spec(argument_spec=FIRMWARE_UPDATE_ARGS)
        fleet = require_fleet()
        import anyio

        address = device_address(args, task_vars or {}, self._templar)
        firmware = Path(args["firmware"])
        problem = fleet.check_request(
            firmware, port=address.port, identities=address.identities, timeout=args["timeout"],
            releases=_path(args["releases"]), delta_from=_path(args["delta_from"]), known_hosts=address.known_hosts,
        )  # fmt: skip
        if problem:
            result.update(failed=True, changed=False, msg=problem)
            return result
        check = bool(self._task.check_mode)
        try:
            done = anyio.run(
                lambda: fleet.update_device(
                    address, firmware, releases=_path(args["releases"]), delta_from=_path(args["delta_from"]),
                    wait=args["wait"], timeout=args["timeout"], allow_reboot=args["allow_reboot"], check=check,
                )  # fmt: skip
            )
        except fleet.FleetError as e:
            if e.result is not None:
                result.update(e.result.to_json())
            result.update(changed=bool(e.result and e.result.bytes_sent), msg=str(e))
            # unreachable, not failed: Ansible counts a result that says both as failed
            result["unreachable" if isinstance(e, fleet.DeviceUnreachable) else "failed"] = True
            return result
        result.update(done.to_json())
        return result
