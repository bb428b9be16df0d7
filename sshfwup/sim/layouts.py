"""Example layouts on the simulated device: ``sshfwup sim create --layout NAME|DIR``.

A layout is a directory like those in ``deploy/examples/``: its ``fwup.conf`` (the firmware the
device is flashed with and updated by), an optional ``ops.conf`` (the system's ops archive, for
``[boot] contract = "fwup-ops"``) and its ``sshfwup.toml``, whose ``[boot]`` section (the contract
and its task names) the simulated device's server gets. The disk's offsets come from the built
firmware itself (its ``meta.conf``: the U-Boot environment, where ``complete`` writes the root
filesystem, the MBR's partitions), so the device's loop devices sit where that fwup.conf writes.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sshfwup.firmware.errors import FirmwareError
from sshfwup.firmware.metaconf import MetaConf, parse_meta_conf
from sshfwup.sim.errors import ProvisionError
from sshfwup.sim.layout import Layout
from sshfwup.sim.tryboot import REBOOT_PARAM

log = logging.getLogger(__name__)

__all__ = ["EXAMPLES", "ExampleLayout", "build_ops_archive", "find_layout", "layout_of_firmware", "ops_overrides",
           "placeholder_variables"]  # fmt: skip

#: deploy/examples/ of the checkout this sshfwup runs from
EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"
OPS_ARCHIVE = "ops.fw"  # in the device directory
# the [boot] keys that name paths on a real device: the simulator sets its own
_DEVICE_PATHS = ("ops_archive", "ops_device", "reboot_param_path")


@dataclass(frozen=True)
class ExampleLayout:
    name: str
    fwup_conf: Path | None
    ops_conf: Path | None = None
    boot: Mapping[str, Any] = field(default_factory=dict)  # sshfwup.toml's [boot], device paths left out


def find_layout(spec: str | Path) -> ExampleLayout:
    """A layout directory, or the name of one in deploy/examples/."""
    path = Path(spec)
    if not path.is_dir():
        named = EXAMPLES / str(spec)
        if os.sep in str(spec) or not named.is_dir():
            known = ", ".join(sorted(conf.parent.name for conf in EXAMPLES.glob("*/fwup.conf"))) or "none"
            raise ProvisionError(f"layout {spec!r}: no such directory, nor a layout in {EXAMPLES} (known: {known})")
        path = named
    path = path.resolve()
    conf = path / "fwup.conf"
    if not conf.is_file():
        raise ProvisionError(f"layout {path}: no fwup.conf in it")
    ops = path / "ops.conf"
    boot: dict[str, Any] = {}
    toml = path / "sshfwup.toml"
    if toml.is_file():
        try:
            section = tomllib.loads(toml.read_text()).get("boot", {})
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ProvisionError(f"layout {path}: sshfwup.toml is unreadable: {e}") from None
        boot = {k: v for k, v in section.items() if k not in _DEVICE_PATHS}
    return ExampleLayout(path.name, conf, ops if ops.is_file() else None, boot)


def placeholder_variables(conf: Path, work: Path) -> dict[str, str]:
    """Files a layout's fwup.conf takes from the build (a bootloader, a kernel on the FAT
    partition) that the simulator has no real one of: a small placeholder each, as environment
    variables for ``fwup -c``. The root filesystem and files that exist beside the conf are kept."""
    text = conf.read_text()
    defaults = dict(re.findall(r'^\s*define\((\w+),\s*"([^"$]*)"\)', text, re.M))
    out: dict[str, str] = {}
    for var in sorted(set(re.findall(r"host-path\s*=\s*\$\{(\w+)\}", text))):
        if var == "ROOTFS" or var in os.environ:
            continue
        default = defaults.get(var, var)
        if (conf.parent / default).exists():
            continue
        work.mkdir(parents=True, exist_ok=True)
        placeholder = work / f"{var.lower()}.placeholder"
        placeholder.write_bytes(f"{var}: a placeholder the simulator needs no real one of\n".encode())
        out[var] = str(placeholder)
    return out


def build_ops_archive(fwup: str, ops_conf: Path, out: Path) -> Path:
    """``fwup -c -f ops.conf -o out``: the system's ops archive."""
    proc = subprocess.run([fwup, "-c", "-f", str(ops_conf), "-o", str(out)], capture_output=True, timeout=60,
                          check=False)  # fmt: skip
    if proc.returncode != 0:
        said = (proc.stdout + proc.stderr).decode(errors="replace").strip()
        raise ProvisionError(f"cannot build the ops archive from {ops_conf}: {said}")
    return out


def _meta_conf(firmware: Path) -> MetaConf:
    try:
        with zipfile.ZipFile(firmware) as z:
            return parse_meta_conf(z.read("meta.conf").decode())
    except (OSError, KeyError, zipfile.BadZipFile, ValueError, FirmwareError) as e:
        raise ProvisionError(f"{firmware}: cannot read its meta.conf: {e}") from None


def layout_of_firmware(firmware: Path) -> Layout:
    """The simulated disk for a firmware: where its ``complete`` task writes the root filesystem
    (slot a), the MBR partition there and the one after it (slot b, same size), the partition
    after that (app data), and its U-Boot environment."""
    meta = _meta_conf(firmware)
    complete = meta.tasks.get("complete")
    envs = list(meta.uboot_env.values())
    mbrs = list(meta.mbrs.values())
    if complete is None or not envs or not mbrs:
        raise ProvisionError(f"{firmware}: the simulator needs a complete task, a uboot-environment and an mbr")
    a = next((int(call.args[0]) for res, calls in complete.on_resource.items() if "rootfs" in res
              for call in calls if call.name == "raw_write" and call.args), None)  # fmt: skip
    by_offset = {p.block_offset: p for p in mbrs[0].partitions}
    if a is None or a not in by_offset:
        raise ProvisionError(f"{firmware}: its complete task writes no root filesystem to an MBR partition")
    count = by_offset[a].block_count
    b, app = by_offset.get(a + count), by_offset.get(a + 2 * count)
    if b is None or b.block_count != count or app is None:
        raise ProvisionError(f"{firmware}: the simulator needs rootfs B right after A (same size) and the app "
                             f"data partition right after B")  # fmt: skip
    return Layout(uboot_env_offset=envs[0].block_offset, uboot_env_count=envs[0].block_count, rootfs_a_offset=a,
                  rootfs_count=count, app_count=app.block_count,
                  platform=meta.meta.get("platform", Layout.platform),
                  architecture=meta.meta.get("architecture", Layout.architecture),
                  product=meta.meta.get("product", Layout.product))  # fmt: skip


def ops_overrides(device_dir: Path, disk: Path, boot: Mapping[str, Any]) -> dict[str, Any]:
    """``[boot]`` for a simulated fwup-ops device: its ops archive, its disk, and the reboot
    parameter inside the device directory (never the host's /run/systemd/reboot-param)."""
    out = dict(boot)
    out.setdefault("ops_archive", str(device_dir / OPS_ARCHIVE))
    out["ops_device"] = str(disk)
    out["reboot_param_path"] = str(device_dir / REBOOT_PARAM)
    return out
