"""The server configuration of a simulated device (``D/sshfwup.toml``): what its ``sshfwup serve``
is given (ports, paths, the slots' loop devices, fwup, the app), merged with the device's
overrides and checked before it is written."""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sshfwup.sim.device_parts import DeviceParts
from sshfwup.sim.errors import SimError
from sshfwup.sim.layout import SLOTS
from sshfwup.sim.machine_procs import MARKER_ENV
from sshfwup.sim.owner import OWNER_ENV
from sshfwup.sim.rootfs import INTERPRETER, SITE_PACKAGES
from sshfwup.sim.toml_write import dumps as toml_dumps
from sshfwup.system.fsutil import write_atomically


__all__ = ["base_config", "deep_merge", "write_checked"]


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, tables merged key by key (``extra`` wins)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def base_config(device: DeviceParts) -> dict[str, Any]:
    """The configuration a device's server is started with, before the device's overrides."""
    loops = device.loops()
    slots = {
        slot: loops[slot].name if slot in loops else str(device.run_dir / f"slot-{slot}.not-attached")
        for slot in SLOTS
    }
    return {
        "server": {
            "listen": "127.0.0.1",
            "port": device.ssh_port,
            "host_key": str(device.server_data_dir / "ssh_host_ed25519_key"),
            "authorized_keys": [str(device.server_data_dir / "authorized_keys")],
            "data_dir": str(device.server_data_dir),
            "run_dir": str(device.run_dir),
            "lock_file": str(device.run_dir / "update.lock"),
            "login_timeout": 10,
        },
        "fwup": {"path": device.fwup, "devpath": str(device.disk)},
        "device": {
            "fw_env_config": str(device.fw_env_config),
            "root_mount": str(device.root_dir),
            "slots": slots,
            "reboot_command": [sys.executable, "-m", "sshfwup.sim", "reboot", str(device.path)],
        },
        "app": {
            # The firmware's own interpreter and its copy of sshfwup.app (sim/rootfs.py), from
            # the tree the app runs from: never the checkout or its venv, which the app's
            # user may not reach (a clone in a 0700 home).
            "command": ["{root}" + INTERPRETER, "{app_dir}/app.py"],
            "env": {"PYTHONPATH": "{root}" + SITE_PACKAGES},
            "app_dir": "/srv/app",
            "sockets": [f"http=tcp:127.0.0.1:{device.app_port}"],
            "ready": "notify",
            "ready_timeout": 10,
            "drain_timeout": 5,
            "observe": 2,
            # the machine finds every process it started by this marker (see MARKER_ENV);
            # the owner lets a later run tell whether they are stale (see OWNER_ENV)
            "pass_env": [MARKER_ENV, OWNER_ENV],
        },
    }

def write_checked(config_path: Path, document: Mapping[str, Any]) -> None:
    """Write ``document`` as TOML to ``config_path`` if sshfwup accepts it; SimError if not."""
    from sshfwup.config import ConfigError, parse_config

    text = toml_dumps(document)
    try:
        parse_config(tomllib.loads(text), source=config_path)
    except ConfigError as e:
        raise SimError(f"the server configuration would be invalid: {e}") from None
    write_atomically(config_path, text)
