"""The compiled meta.conf of the simulated device's firmware, written without fwup.

The simulator and the host tools build ``.fw`` files without running ``fwup -c``: this writes
what ``fwup -c -f deploy/fwup.conf`` makes for the sim layout (:mod:`sshfwup.sim.layout`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .conf import ConfWriter
from .errors import FirmwareError
from .metaconf import BLOCK_SIZE, Call

if TYPE_CHECKING:  # pragma: no cover - typing only
    from sshfwup.sim.layout import Layout

# Nerves-style names the sim's firmware records in the U-Boot environment. Partition 2 of the
# sim layout (p3) is the application data partition, mounted at /data on the device.
SIM_DEVPATH = "/dev/mmcblk0"
SIM_APP_DEVPATH = "/dev/mmcblk0p3"
SIM_APP_FSTYPE = "ext4"
SIM_APP_TARGET = "/data"
UBOOT_ENV_NAME = "uboot-env"
MBR_NAME = "mbr"
ROOTFS_RESOURCE = "rootfs.img"


class _MetaConfWriter(ConfWriter):
    """A :class:`ConfWriter` that also writes fwup's flat funlist/reqlist of calls."""

    def calls(self, key: str, calls: Iterable[Call]) -> None:
        flat: list[str] = []
        for call in calls:
            flat += [str(len(call.args) + 1), call.name, *call.args]
        # the reqlist's requirement names are quoted by fwup (they hold '-'): quote_value does that
        self.list_opt(key, flat)

    def event(self, name: str, calls: Iterable[Call], *, title: str | None = None) -> None:
        """A section that holds only a funlist: ``on-init``, ``on-finish``, ``on-resource "NAME"``."""
        self.open(name, title)
        self.calls("funlist", calls)
        self.close()


def _setenv(name: str, value: str) -> Call:
    return Call("uboot_setenv", (UBOOT_ENV_NAME, name, value))


def compile_meta_conf(
    layout: "Layout",
    *,
    version: str,
    rootfs_length: int,
    rootfs_blake2b: str,
    product: str | None = None,
    description: str = "",
    author: str = "",
    vcs_identifier: str = "",
    misc: str = "",
    platform: str | None = None,
    architecture: str | None = None,
) -> str:
    """The meta.conf that ``fwup -c -f deploy/fwup.conf`` makes for the sim layout.

    Tasks: ``complete`` (factory image: MBR, fresh env, rootfs A), ``upgrade.a``/``upgrade.b``
    (write the inactive slot, switch the env in on-finish only), and the refusals
    ``upgrade.unvalidated``, ``upgrade.unexpected``, ``upgrade.wrongplatform``.
    """
    product = layout.product if product is None else product
    platform = layout.platform if platform is None else platform
    architecture = layout.architecture if architecture is None else architecture
    slot_bytes = layout.rootfs_count * BLOCK_SIZE
    if rootfs_length > slot_bytes:
        raise FirmwareError(
            f"root filesystem is {rootfs_length} bytes but a slot holds {slot_bytes} bytes "
            f"({layout.rootfs_count} blocks)"
        )
    if not re.fullmatch(r"[0-9a-f]{64}", rootfs_blake2b):
        raise FirmwareError(f"rootfs blake2b-256 must be 64 lowercase hex digits, got {rootfs_blake2b!r}")
    offsets = {"a": layout.rootfs_a_offset, "b": layout.rootfs_b_offset}
    count = layout.rootfs_count
    app_last = layout.app_offset + layout.app_count - 1
    metadata = {
        "product": product,
        "description": description,
        "version": version,
        "platform": platform,
        "architecture": architecture,
        "author": author,
        "vcs_identifier": vcs_identifier,
        "misc": misc,
    }

    def slot_metadata(slot: str) -> list[Call]:
        calls = [
            _setenv(f"{slot}.nerves_fw_application_part0_devpath", SIM_APP_DEVPATH),
            _setenv(f"{slot}.nerves_fw_application_part0_fstype", SIM_APP_FSTYPE),
            _setenv(f"{slot}.nerves_fw_application_part0_target", SIM_APP_TARGET),
        ]
        calls += [_setenv(f"{slot}.nerves_fw_{key}", value) for key, value in metadata.items()]
        calls.append(_setenv(f"{slot}.nerves_fw_uuid", "${FWUP_META_UUID}"))
        return calls

    w = _MetaConfWriter()
    for key in ("product", "description", "version", "author", "platform", "architecture"):
        if metadata[key]:
            w.opt(f"meta-{key}", metadata[key])
    if vcs_identifier:
        w.opt("meta-vcs-identifier", vcs_identifier)
    if misc:
        w.opt("meta-misc", misc)
    w.opt("require-fwup-version", "1.0.0")

    w.open("file-resource", ROOTFS_RESOURCE)
    w.opt("length", rootfs_length)
    w.opt("blake2b-256", rootfs_blake2b)
    w.close()

    w.open("mbr", MBR_NAME)
    for index, (offset, blocks, expand) in enumerate(
        [(offsets["a"], count, False), (offsets["b"], count, False), (layout.app_offset, layout.app_count, True)]
    ):
        w.open("partition", str(index))
        w.opt("block-offset", offset)
        w.opt("block-count", blocks)
        w.opt("type", 0x83)
        if expand:
            w.opt("expand", True)
        w.close()
    w.close()

    # complete: what the factory writes (and what the simulator provisions a device with)
    w.open("task", "complete")
    w.opt("require-unmounted-destination", True)
    w.event(
        "on-init",
        [
            Call("mbr_write", (MBR_NAME,)),
            Call("uboot_clearenv", (UBOOT_ENV_NAME,)),
            _setenv("nerves_serial_number", "${NERVES_SERIAL_NUMBER}"),
            _setenv("nerves_fw_active", "a"),
            _setenv("nerves_fw_autovalidate", "1"),
            _setenv("nerves_fw_validated", "1"),
            _setenv("nerves_fw_booted", "0"),
            _setenv("upgrade_available", "0"),
            _setenv("bootcount", "0"),
            _setenv("bootlimit", "3"),
            _setenv("nerves_fw_devpath", SIM_DEVPATH),
            *slot_metadata("a"),
        ],
    )
    w.event(
        "on-finish",
        [
            Call("raw_memset", (str(offsets["b"]), "256", "0xff")),
            Call("raw_memset", (str(layout.app_offset), "256", "0xff")),
            Call("raw_memset", (str(app_last), "1", "0xff")),
        ],
    )
    w.event("on-resource", [Call("raw_write", (str(offsets["a"]),))], title=ROOTFS_RESOURCE)
    w.close()

    for new, old in (("a", "b"), ("b", "a")):
        w.open("task", f"upgrade.{new}")
        w.calls(
            "reqlist",
            [
                Call("require-uboot-variable", (UBOOT_ENV_NAME, "nerves_fw_active", old)),
                Call("require-uboot-variable", (UBOOT_ENV_NAME, "nerves_fw_validated", "1")),
                Call("require-uboot-variable", (UBOOT_ENV_NAME, f"{old}.nerves_fw_platform", platform)),
                Call("require-uboot-variable", (UBOOT_ENV_NAME, f"{old}.nerves_fw_architecture", architecture)),
                Call("require-partition-offset", ("0", str(offsets["a"]))),
                Call("require-partition-offset", ("1", str(offsets["b"]))),
            ],
        )
        w.event(
            "on-init",
            [
                Call("info", (f"Upgrading partition {new.upper()}",)),
                Call("uboot_unsetenv", (UBOOT_ENV_NAME, f"{new}.nerves_fw_version")),
                Call("uboot_unsetenv", (UBOOT_ENV_NAME, f"{new}.nerves_fw_platform")),
                Call("uboot_unsetenv", (UBOOT_ENV_NAME, f"{new}.nerves_fw_architecture")),
                Call("uboot_unsetenv", (UBOOT_ENV_NAME, f"{new}.nerves_fw_uuid")),
                Call("trim", (str(offsets[new]), str(count))),
            ],
        )
        w.event(
            "on-finish",
            [
                *slot_metadata(new),
                _setenv("nerves_fw_active", new),
                _setenv("nerves_fw_validated", "0"),
                _setenv("nerves_fw_booted", "0"),
                _setenv("upgrade_available", "1"),
                _setenv("bootcount", "0"),
            ],
        )
        w.open("on-resource", ROOTFS_RESOURCE)
        w.opt("delta-source-raw-offset", offsets[old])
        w.opt("delta-source-raw-count", count)
        w.calls("funlist", [Call("raw_write", (str(offsets[new]),))])
        w.close()
        w.close()

    refusals = [
        ("upgrade.unvalidated", [Call("require-uboot-variable", (UBOOT_ENV_NAME, "nerves_fw_validated", "0"))],
         "Please validate the running firmware before upgrading it again."),
        ("upgrade.unexpected",
         [Call("require-uboot-variable", (UBOOT_ENV_NAME, "a.nerves_fw_platform", platform)),
          Call("require-uboot-variable", (UBOOT_ENV_NAME, "a.nerves_fw_architecture", architecture))],
         "Please check the media being upgraded. It doesn't look like either the A or B partitions are active."),
        ("upgrade.wrongplatform", [], f"Expecting platform={platform} and architecture={architecture}"),
    ]
    for name, reqs, message in refusals:
        w.open("task", name)
        if reqs:
            w.calls("reqlist", reqs)
        w.event("on-init", [Call("error", (message,))])
        w.close()

    w.open("uboot-environment", UBOOT_ENV_NAME)
    w.opt("block-offset", layout.uboot_env_offset)
    w.opt("block-count", layout.uboot_env_count)
    w.close()
    return w.text()

