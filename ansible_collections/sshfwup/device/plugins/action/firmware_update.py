# -*- coding: utf-8 -*-
# Copyright: sshfwup developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Action plugin for sshfwup.device.firmware_update: runs on the controller (see the module's docs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ansible_collections.sshfwup.device.plugins.module_utils.args import FIRMWARE_UPDATE_ARGS
from ansible_collections.sshfwup.device.plugins.plugin_utils.device import DeviceAction


def _path(value: Any) -> Path | None:
    return Path(value) if value else None


class ActionModule(DeviceAction):
    ARGS = FIRMWARE_UPDATE_ARGS

    def act(self, fleet: Any, address: Any, args: dict[str, Any]) -> dict[str, Any]:
        import anyio

        firmware = Path(args["firmware"])
        problem = fleet.check_request(
            firmware, port=address.port, identities=address.identities, timeout=args["timeout"],
            releases=_path(args["releases"]), delta_from=_path(args["delta_from"]), known_hosts=address.known_hosts,
        )  # fmt: skip
        if problem:
            return {"failed": True, "changed": False, "msg": problem}
        done = anyio.run(
            lambda: fleet.update_device(
                address, firmware, releases=_path(args["releases"]), delta_from=_path(args["delta_from"]),
                wait=args["wait"], timeout=args["timeout"], allow_reboot=args["allow_reboot"],
                check=bool(self._task.check_mode),
            )  # fmt: skip
        )
        return dict(done.to_json())

    def changed_despite(self, error: Any) -> bool:
        return bool(error.result is not None and error.result.bytes_sent)  # bytes reached the device
