"""fwup's ``.fw`` archives: read by streaming, compile meta.conf, write, sign and verify.

A ``.fw`` file is a ZIP archive. An optional ``meta.conf.ed25519`` (a 64-byte raw ed25519
signature over the exact meta.conf bytes) comes first, then ``meta.conf`` (fwup's *compiled*
configuration, a libconfuse subset), then one ``data/<resource>`` entry per file resource.
fwup reads the archive as a stream (from stdin), never seeking, so everything here parses the
local headers front to back as well: entries may carry their sizes in the local header or
(like fwup's own archives) in a data descriptor after deflated data.

Facts this module relies on (checked against fwup's source and real fwup 1.16 output):

- meta-uuid = blake2b-256(fwup's namespace UUID bytes + meta.conf bytes), first 16 bytes, with
  the version nibble of byte 6 set to 5.
- meta-creation-date is the meta.conf entry's modification time (fwup >= 1.2), unless
  meta.conf itself carries one (older archives).
- Resource hashes are blake2b-256, checked while the data streams.
- fwup's key files are base64 (padded, no newline) of the raw 32-byte public key and of the
  64-byte libsodium secret key (32-byte seed followed by the public key).
- A U-Boot environment block is a little-endian CRC32 of the rest of the block, then
  ``name=value\\0`` pairs sorted by name, a final ``\\0``, and 0xff fill.

Every error is a :class:`FirmwareError`: ``str(error)`` is written for an operator,
``error.fwup_message`` is what the real fwup prints in the same situation (the fwup stand-in
reports that, so tests hold against both).
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import io
import itertools
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:  # pragma: no cover - typing only; keeps the fwup stand-in's start-up light
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from sshfwup.sim.layout import Layout

log = logging.getLogger(__name__)

__all__ = [
    "ArchiveInputError",
    "Call",
    "ConfCall",
    "ConfOption",
    "ConfSection",
    "FileResource",
    "FirmwareEntry",
    "FirmwareError",
    "FirmwareInfo",
    "Mbr",
    "MetaConf",
    "Partition",
    "Task",
    "UBootEnvError",
    "UBootEnvironment",
    "ZipEntry",
    "ZipStream",
    "compile_meta_conf",
    "encode_mbr",
    "expand_variables",
    "extract_resource",
    "firmware_uuid",
    "format_conf",
    "format_metadata",
    "format_size",
    "generate_keypair",
    "iter_resource",
    "load_private_key",
    "load_public_key",
    "mbr_partition_offsets",
    "parse_conf",
    "parse_meta_conf",
    "parse_uboot_env",
    "quote_value",
    "read_entries",
    "read_firmware",
    "read_head",
    "sign_firmware",
    "verify_signature",
    "write_firmware",
    "write_uboot_env",
]

SIGNATURE_NAME = "meta.conf.ed25519"
META_CONF_NAME = "meta.conf"
DATA_PREFIX = "data/"
SIGNATURE_LEN = 64
META_CONF_MAX = 50000  # fwup refuses a meta.conf of this size or larger
BLOCK_SIZE = 512

_FWUP_NAMESPACE = bytes.fromhex("2053dffbd51e4310b93b956da89f9f34")
_IN_CHUNK = 256 * 1024  # compressed bytes read per step
_OUT_CHUNK = 1024 * 1024  # most decompressed bytes handed out per step: bounds memory


class FirmwareError(Exception):
    """A firmware archive is unreadable, corrupt, unsigned, or cannot be built.

    ``str(e)`` is for an operator; ``e.fwup_message`` is fwup's own wording for the problem.
    """

    def __init__(self, message: str, *, fwup_message: str | None = None) -> None:
        super().__init__(message)
        self.fwup_message = fwup_message or message


class ArchiveInputError(FirmwareError):
    """The bytes could not be read at all (framing broken, stdin closed early)."""


class UBootEnvError(FirmwareError):
    """A U-Boot environment block is invalid or the variables do not fit."""


# --- uuid, quoting ---------------------------------------------------------------------------


def firmware_uuid(meta_conf: bytes) -> str:
    """fwup's meta-uuid of an archive: a function of the exact meta.conf bytes only."""
    digest = hashlib.blake2b(_FWUP_NAMESPACE + meta_conf, digest_size=32).digest()
    raw = bytearray(digest[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50  # "version 5"; fwup leaves the variant bits alone
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_BARE = re.compile(r"[A-Za-z0-9_.]+")


def quote_value(value: str) -> str:
    """A value as fwup prints it in meta.conf and ``fwup -m``: bare if ``[A-Za-z0-9_.]+``."""
    if _BARE.fullmatch(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def format_metadata(metadata: Mapping[str, str]) -> str:
    """``fwup -m`` output for metadata keyed without the ``meta-`` prefix."""
    return "".join(f"meta-{key}={quote_value(value)}\n" for key, value in metadata.items())


_VARIABLE = re.compile(r"\\\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_variables(text: str, env: Mapping[str, str]) -> str:
    """Expand ``${NAME}`` and ``${NAME:-default}`` like fwup; ``\\$`` is a literal dollar."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "\\$":
            return "$"
        value = env.get(m.group(1), "")
        if m.group(2) is not None and not value:
            return m.group(2)
        return value

    return _VARIABLE.sub(sub, text)


# --- the libconfuse subset ------------------------------------------------------------------


@dataclass(frozen=True)
class ConfOption:
    name: str
    value: str | tuple[str, ...]  # a list option (``{a,b}``) is a tuple


@dataclass(frozen=True)
class ConfCall:
    """``name(arg, ...)``: only in fwup's *source* syntax (compiled meta.conf has none)."""

    name: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class ConfSection:
    name: str
    title: str | None
    items: tuple["ConfOption | ConfCall | ConfSection", ...]

    def option(self, name: str) -> str | tuple[str, ...] | None:
        for item in self.items:
            if isinstance(item, ConfOption) and item.name == name:
                return item.value
        return None

    def sections(self, name: str) -> list["ConfSection"]:
        return [item for item in self.items if isinstance(item, ConfSection) and item.name == name]


_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*|//[^\n]*|/\*.*?\*/)
  | (?P<dq>"(?:[^"\\]|\\.)*")
  | (?P<sq>'(?:[^'\\]|\\.)*')
  | (?P<punct>[{}=,()])
  | (?P<word>(?:\$\{[^}\n]*\}|[^\s{}=,()"'\#])+)
    """,
    re.VERBOSE | re.DOTALL,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "'": "'", "\\": "\\"}


def _unescape(body: str) -> str:
    # "\$" stays as written so that expand_variables() can still tell a literal dollar apart
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), body, flags=re.DOTALL)


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens: list[tuple[str, str, int]] = []
    pos, line = 0, 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise FirmwareError(f"meta.conf line {line}: cannot parse {text[pos:pos + 20]!r}",
                                fwup_message="Unexpected error parsing meta.conf")
        kind = m.lastgroup or ""
        value = m.group(0)
        if kind == "dq":
            tokens.append(("str", _unescape(value[1:-1]), line))
        elif kind == "sq":
            tokens.append(("str", value[1:-1], line))
        elif kind == "word":
            tokens.append(("str", value, line))
        elif kind == "punct":
            tokens.append((value, value, line))
        line += value.count("\n")
        pos = m.end()
    return tokens


class _ConfParser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0

    def fail(self, message: str) -> FirmwareError:
        line = self.tokens[min(self.pos, len(self.tokens) - 1)][2] if self.tokens else 1
        return FirmwareError(f"meta.conf line {line}: {message}", fwup_message="Unexpected error parsing meta.conf")

    def peek(self) -> str | None:
        return self.tokens[self.pos][0] if self.pos < len(self.tokens) else None

    def take(self, kind: str) -> str:
        if self.peek() != kind:
            found = self.tokens[self.pos][1] if self.pos < len(self.tokens) else "end of file"
            raise self.fail(f"expected {kind!r}, found {found!r}")
        value = self.tokens[self.pos][1]
        self.pos += 1
        return value

    def items(self, *, nested: bool) -> tuple[ConfOption | ConfCall | ConfSection, ...]:
        items: list[ConfOption | ConfCall | ConfSection] = []
        while True:
            kind = self.peek()
            if kind is None:
                if nested:
                    raise self.fail("missing '}'")
                return tuple(items)
            if kind == "}" and nested:
                return tuple(items)
            name = self.take("str")
            kind = self.peek()
            if kind == "=":
                self.pos += 1
                if self.peek() == "{":
                    self.pos += 1
                    items.append(ConfOption(name, self.values("}")))
                else:
                    items.append(ConfOption(name, self.take("str")))
            elif kind == "(":
                self.pos += 1
                items.append(ConfCall(name, self.values(")")))
            else:
                title = self.take("str") if kind == "str" else None
                self.take("{")
                body = self.items(nested=True)
                self.take("}")
                items.append(ConfSection(name, title, body))

    def values(self, closing: str) -> tuple[str, ...]:
        out: list[str] = []
        if self.peek() == closing:
            self.pos += 1
            return ()
        while True:
            out.append(self.take("str"))
            if self.peek() == ",":
                self.pos += 1
                continue
            self.take(closing)
            return tuple(out)


def parse_conf(text: str) -> ConfSection:
    """Parse fwup's libconfuse dialect (compiled meta.conf, and the source syntax's shape)."""
    parser = _ConfParser(text)
    return ConfSection("", None, parser.items(nested=False))


def format_conf(section: ConfSection) -> str:
    """Print a parsed tree the way fwup prints a compiled meta.conf (round-trips fwup's bytes)."""
    lines: list[str] = []

    def emit(items: Iterable[ConfOption | ConfCall | ConfSection]) -> None:
        for item in items:
            if isinstance(item, ConfSection):
                lines.append(f'{item.name} "{item.title}" {{' if item.title is not None else f"{item.name} {{")
                emit(item.items)
                lines.append("}")
            elif isinstance(item, ConfOption) and isinstance(item.value, tuple):
                lines.append(f"{item.name}={{{','.join(quote_value(v) for v in item.value)}}}")
            elif isinstance(item, ConfOption):
                lines.append(f"{item.name}={quote_value(item.value)}")
            else:
                lines.append(f"{item.name}({', '.join(quote_value(v) for v in item.args)})")

    emit(section.items)
    return "\n".join(lines) + "\n"


# --- meta.conf as data -----------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One function call or requirement: ``raw_write(4096)`` is ``Call("raw_write", ("4096",))``."""

    name: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class FileResource:
    name: str
    length: int
    blake2b_256: str


@dataclass(frozen=True)
class Task:
    name: str
    requirements: tuple[Call, ...] = ()
    on_init: tuple[Call, ...] = ()
    on_resource: Mapping[str, tuple[Call, ...]] = field(default_factory=dict)
    on_finish: tuple[Call, ...] = ()
    on_error: tuple[Call, ...] = ()
    require_unmounted_destination: bool = False


@dataclass(frozen=True)
class UBootEnvironment:
    name: str
    block_offset: int
    block_count: int

    @property
    def byte_offset(self) -> int:
        return self.block_offset * BLOCK_SIZE

    @property
    def size(self) -> int:
        return self.block_count * BLOCK_SIZE


@dataclass(frozen=True)
class Partition:
    index: int
    block_offset: int
    block_count: int
    type: int
    boot: bool = False
    expand: bool = False


@dataclass(frozen=True)
class Mbr:
    name: str
    partitions: tuple[Partition, ...]


@dataclass(frozen=True)
class MetaConf:
    root: ConfSection
    meta: Mapping[str, str]  # meta-* without the prefix, in file order
    require_fwup_version: str | None
    resources: Mapping[str, FileResource]
    tasks: Mapping[str, Task]  # in file order: the order fwup tries them in
    uboot_env: Mapping[str, UBootEnvironment]
    mbrs: Mapping[str, Mbr]


def _flat_calls(values: Sequence[str], where: str) -> tuple[Call, ...]:
    """fwup's flat funlist/reqlist: argc, then the name and argc-1 arguments, repeated."""
    calls: list[Call] = []
    i = 0
    while i < len(values):
        try:
            argc = int(values[i], 0)
        except ValueError:
            raise FirmwareError(f"meta.conf: {where}: expected an argument count, found {values[i]!r}",
                                fwup_message="Unexpected argc value in funlist") from None
        if argc < 1 or i + 1 + argc > len(values):
            raise FirmwareError(f"meta.conf: {where}: argument count {argc} runs past the list",
                                fwup_message="Unexpected argc value in funlist")
        calls.append(Call(values[i + 1], tuple(values[i + 2 : i + 1 + argc])))
        i += 1 + argc
    return tuple(calls)


def _int(value: Any, where: str) -> int:
    try:
        return int(str(value), 0)
    except ValueError:
        raise FirmwareError(f"meta.conf: {where}: expected an integer, found {value!r}",
                            fwup_message="Unexpected error parsing meta.conf") from None


def _str(value: str | tuple[str, ...] | None, where: str) -> str | None:
    if isinstance(value, tuple):
        raise FirmwareError(f"meta.conf: {where}: expected a single value, found a list",
                            fwup_message="Unexpected error parsing meta.conf")
    return value


def _funlist(section: ConfSection | None, where: str) -> tuple[Call, ...]:
    if section is None:
        return ()
    value = section.option("funlist")
    if value is None:
        return ()
    return _flat_calls(value if isinstance(value, tuple) else (value,), where)


def parse_meta_conf(text: str) -> MetaConf:
    """Parse a compiled meta.conf (``unzip -p FILE.fw meta.conf``). ``${VAR}`` stay unexpanded."""
    root = parse_conf(text)
    meta: dict[str, str] = {}
    require: str | None = None
    for item in root.items:
        if isinstance(item, ConfOption) and item.name.startswith("meta-"):
            meta[item.name.removeprefix("meta-")] = _str(item.value, item.name) or ""
        elif isinstance(item, ConfOption) and item.name == "require-fwup-version":
            require = _str(item.value, item.name)
    resources: dict[str, FileResource] = {}
    for sec in root.sections("file-resource"):
        name = sec.title or ""
        where = f'file-resource "{name}"'
        length = sec.option("length")
        digest = _str(sec.option("blake2b-256"), where)
        if length is None or not digest:
            raise FirmwareError(f"meta.conf: {where} lacks length or blake2b-256",
                                fwup_message=f"invalid blake2b-256 hash for '{name}'")
        resources[name] = FileResource(name, _int(length, where), digest.lower())
    envs: dict[str, UBootEnvironment] = {}
    for sec in root.sections("uboot-environment"):
        where = f'uboot-environment "{sec.title}"'
        envs[sec.title or ""] = UBootEnvironment(
            sec.title or "", _int(sec.option("block-offset"), where), _int(sec.option("block-count"), where)
        )
    mbrs: dict[str, Mbr] = {}
    for sec in root.sections("mbr"):
        parts = []
        for p in sec.sections("partition"):
            where = f'mbr "{sec.title}" partition "{p.title}"'
            parts.append(
                Partition(
                    index=_int(p.title, where),
                    block_offset=_int(p.option("block-offset") or 0, where),
                    block_count=_int(p.option("block-count") or 0, where),
                    type=_int(p.option("type") or 0, where),
                    boot=p.option("boot") == "true",
                    expand=p.option("expand") == "true",
                )
            )
        mbrs[sec.title or ""] = Mbr(sec.title or "", tuple(parts))
    tasks: dict[str, Task] = {}
    for sec in root.sections("task"):
        name = sec.title or ""
        reqlist = sec.option("reqlist")
        on_init = sec.sections("on-init")
        on_finish = sec.sections("on-finish")
        on_error = sec.sections("on-error")
        tasks[name] = Task(
            name=name,
            requirements=_flat_calls(reqlist if isinstance(reqlist, tuple) else (), f'task "{name}" reqlist'),
            on_init=_funlist(on_init[0] if on_init else None, f'task "{name}" on-init'),
            on_resource={
                r.title or "": _funlist(r, f'task "{name}" on-resource "{r.title}"')
                for r in sec.sections("on-resource")
            },
            on_finish=_funlist(on_finish[0] if on_finish else None, f'task "{name}" on-finish'),
            on_error=_funlist(on_error[0] if on_error else None, f'task "{name}" on-error'),
            require_unmounted_destination=sec.option("require-unmounted-destination") == "true",
        )
    return MetaConf(root, meta, require, resources, tasks, envs, mbrs)


# --- compiling meta.conf for the simulated device's layout ----------------------------------

# Nerves-style names the sim's firmware records in the U-Boot environment. Partition 2 of the
# sim layout (p3) is the application data partition, mounted at /data on the device.
SIM_DEVPATH = "/dev/mmcblk0"
SIM_APP_DEVPATH = "/dev/mmcblk0p3"
SIM_APP_FSTYPE = "ext4"
SIM_APP_TARGET = "/data"
UBOOT_ENV_NAME = "uboot-env"
MBR_NAME = "mbr"
ROOTFS_RESOURCE = "rootfs.img"


class _ConfWriter:
    """Writes meta.conf the way fwup prints it: no indentation, ``key=value``, quoted titles."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    @staticmethod
    def value(v: str | int | bool) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        return quote_value(v)

    def opt(self, key: str, v: str | int | bool) -> None:
        self.lines.append(f"{key}={self.value(v)}")

    def calls(self, key: str, calls: Iterable[Call]) -> None:
        flat: list[str] = []
        for call in calls:
            flat += [str(len(call.args) + 1), call.name, *call.args]
        # the reqlist's requirement names are quoted by fwup (they hold '-'): quote_value does that
        self.lines.append(f"{key}={{{','.join(self.value(v) for v in flat)}}}")

    def open(self, name: str, title: str | None = None) -> None:
        self.lines.append(f'{name} "{title}" {{' if title is not None else f"{name} {{")

    def close(self) -> None:
        self.lines.append("}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


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

    w = _ConfWriter()
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
    w.open("on-init")
    w.calls(
        "funlist",
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
    w.close()
    w.open("on-finish")
    w.calls(
        "funlist",
        [
            Call("raw_memset", (str(offsets["b"]), "256", "0xff")),
            Call("raw_memset", (str(layout.app_offset), "256", "0xff")),
            Call("raw_memset", (str(app_last), "1", "0xff")),
        ],
    )
    w.close()
    w.open("on-resource", ROOTFS_RESOURCE)
    w.calls("funlist", [Call("raw_write", (str(offsets["a"]),))])
    w.close()
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
        w.open("on-init")
        w.calls(
            "funlist",
            [
                Call("info", (f"Upgrading partition {new.upper()}",)),
                Call("uboot_unsetenv", (UBOOT_ENV_NAME, f"{new}.nerves_fw_version")),
                Call("uboot_unsetenv", (UBOOT_ENV_NAME, f"{new}.nerves_fw_platform")),
                Call("uboot_unsetenv", (UBOOT_ENV_NAME, f"{new}.nerves_fw_architecture")),
                Call("uboot_unsetenv", (UBOOT_ENV_NAME, f"{new}.nerves_fw_uuid")),
                Call("trim", (str(offsets[new]), str(count))),
            ],
        )
        w.close()
        w.open("on-finish")
        w.calls(
            "funlist",
            [
                *slot_metadata(new),
                _setenv("nerves_fw_active", new),
                _setenv("nerves_fw_validated", "0"),
                _setenv("nerves_fw_booted", "0"),
                _setenv("upgrade_available", "1"),
                _setenv("bootcount", "0"),
            ],
        )
        w.close()
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
        w.open("on-init")
        w.calls("funlist", [Call("error", (message,))])
        w.close()
        w.close()

    w.open("uboot-environment", UBOOT_ENV_NAME)
    w.opt("block-offset", layout.uboot_env_offset)
    w.opt("block-count", layout.uboot_env_count)
    w.close()
    return w.text()


# --- reading a ZIP archive as a stream --------------------------------------------------------

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_LOCAL_SIG = 0x04034B50
_CENTRAL_SIG = 0x02014B50
_EOCD_SIG = 0x06054B50
_DESCRIPTOR_SIG = 0x08074B50


@dataclass(frozen=True)
class ZipEntry:
    """A local file header: where an entry starts and what it says about itself."""

    name: str
    method: int
    flags: int
    crc32: int
    compressed_size: int | None  # None: given by the data descriptor after the data
    size: int | None
    mtime: int | None  # seconds since the epoch (UT extra field, else DOS time read as UTC)
    header_offset: int
    data_offset: int
    zip64: bool = False

    @property
    def has_descriptor(self) -> bool:
        return bool(self.flags & 0x08)


@dataclass(frozen=True)
class FirmwareEntry:
    """An entry as read: its real sizes and CRC, and where its data starts in the archive."""

    name: str
    compressed_size: int
    size: int
    crc32: int
    data_offset: int


def _dos_time(date: int, tm: int) -> int | None:
    fields = (1980 + (date >> 9), (date >> 5) & 0x0F, date & 0x1F, tm >> 11, (tm >> 5) & 0x3F, (tm & 0x1F) * 2)
    if not (1 <= fields[1] <= 12 and 1 <= fields[2] <= 31):
        return None
    return calendar.timegm(fields)


def _zlib_code(e: zlib.error) -> int:
    m = re.search(r"Error (-?\d+)", str(e))
    return int(m.group(1)) if m else -3


class ZipStream:
    """Read ZIP local entries front to back from ``read(n)`` (a file, a pipe, framed stdin).

    Never seeks and never holds more than one decompression step in memory. Stops at the
    central directory. Every entry's CRC and sizes are checked as its data ends.
    """

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._source = read
        self._pending = b""
        self._position = 0  # bytes of the archive consumed so far
        self._current: ZipEntry | None = None
        self._reading = False
        self._finished = False
        self.entries: list[FirmwareEntry] = []

    @property
    def position(self) -> int:
        return self._position

    # -- raw bytes --
    def _take(self, n: int) -> bytes:
        if self._pending:
            data, self._pending = self._pending[:n], self._pending[n:]
        else:
            data = self._source(n)
        self._position += len(data)
        return data

    def _exact(self, n: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            data = self._take(n - got)
            if not data:
                break
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def _unread(self, data: bytes) -> None:
        if data:
            self._pending = data + self._pending
            self._position -= len(data)

    # -- entries --
    def next_entry(self) -> ZipEntry | None:
        """The next local entry, or None at the central directory (the end of the data)."""
        if self._reading:
            raise RuntimeError("the previous entry's data was not read to its end")
        if self._current is not None:
            self.skip(self._current)
        if self._finished:
            return None
        start = self._position
        sig = self._exact(4)
        if len(sig) < 4:
            if start == 0:
                raise FirmwareError("not a firmware archive: the input is empty",
                                    fwup_message="Unrecognized archive format")
            raise FirmwareError(
                f"truncated firmware archive: it ends at byte {start}, before its central directory",
                fwup_message="Truncated ZIP file header",
            )
        (value,) = struct.unpack("<I", sig)
        if value in (_CENTRAL_SIG, _EOCD_SIG):
            if start == 0:
                raise FirmwareError("not a firmware archive: the ZIP archive is empty",
                                    fwup_message="Unrecognized archive format")
            self._finished = True
            return None
        if value != _LOCAL_SIG:
            if start == 0:
                raise FirmwareError("not a firmware archive: it does not start with a ZIP header",
                                    fwup_message="Unrecognized archive format")
            raise FirmwareError(f"corrupt firmware archive: no ZIP header at byte {start}",
                                fwup_message="Damaged ZIP archive")
        head = sig + self._exact(_LOCAL.size - 4)
        if len(head) < _LOCAL.size:
            raise FirmwareError(f"truncated firmware archive: it ends inside the ZIP header at byte {start}",
                                fwup_message="Truncated ZIP file header")
        _, _, flags, method, tm, date, crc, csize, usize, nlen, xlen = _LOCAL.unpack(head)
        raw_name = self._exact(nlen)
        extra = self._exact(xlen)
        if len(raw_name) < nlen or len(extra) < xlen:
            raise FirmwareError(f"truncated firmware archive: it ends inside the ZIP header at byte {start}",
                                fwup_message="Truncated ZIP file header")
        name = raw_name.decode("utf-8", errors="replace")
        mtime, zip64 = _dos_time(date, tm), False
        i = 0
        while i + 4 <= len(extra):
            tag, size = struct.unpack_from("<HH", extra, i)
            body = extra[i + 4 : i + 4 + size]
            if tag == 0x5455 and len(body) >= 5 and body[0] & 1:  # UT: extended timestamp
                (mtime,) = struct.unpack_from("<i", body, 1)
            elif tag == 0x0001:  # zip64 sizes
                zip64 = True
                fields = list(struct.unpack_from(f"<{len(body) // 8}Q", body))
                if usize == 0xFFFFFFFF and fields:
                    usize = fields.pop(0)
                if csize == 0xFFFFFFFF and fields:
                    csize = fields.pop(0)
            i += 4 + size
        if flags & 0x01:
            raise FirmwareError(f"unsupported firmware archive: {name} is encrypted",
                                fwup_message="Encrypted file is unsupported")
        if method not in (0, 8):
            raise FirmwareError(f"unsupported firmware archive: {name} uses ZIP compression method {method}",
                                fwup_message=f"Unsupported ZIP compression method ({method})")
        descriptor = bool(flags & 0x08)
        if descriptor and method == 0:
            raise FirmwareError(f"unsupported firmware archive: {name} is stored without sizes in its header",
                                fwup_message="Unsupported ZIP entry: stored data with a data descriptor")
        entry = ZipEntry(
            name=name,
            method=method,
            flags=flags,
            crc32=crc,
            compressed_size=None if descriptor else csize,
            size=None if descriptor else usize,
            mtime=mtime,
            header_offset=start,
            data_offset=self._position,
            zip64=zip64,
        )
        self._current = entry
        return entry

    def read_data(self, entry: ZipEntry, chunk_size: int = _OUT_CHUNK) -> Iterator[bytes]:
        """The entry's decompressed data in chunks; CRC and sizes are checked at its end.

        Read it to the end (or call :meth:`skip`): the stream cannot go on from the middle.
        """
        if entry is not self._current:
            raise RuntimeError(f"{entry.name} is not the current entry")
        self._current = None
        self._reading = True
        crc = 0
        size = 0
        consumed = 0
        name = entry.name
        if entry.method == 0:
            assert entry.compressed_size is not None
            left = entry.compressed_size
            while left:
                data = self._take(min(left, chunk_size))
                if not data:
                    raise FirmwareError(f"truncated firmware archive: it ends inside {name}",
                                        fwup_message="Truncated ZIP file data")
                left -= len(data)
                consumed += len(data)
                crc = zlib.crc32(data, crc)
                size += len(data)
                yield data
        else:
            inflater = zlib.decompressobj(-15)
            limit = entry.compressed_size
            while not inflater.eof:
                if inflater.unconsumed_tail:
                    data = inflater.unconsumed_tail
                else:
                    want = _IN_CHUNK if limit is None else min(_IN_CHUNK, limit - consumed)
                    if want <= 0:
                        raise FirmwareError(f"corrupt firmware archive: {name}'s compressed data is longer than "
                                            "its header says", fwup_message="ZIP decompression failed (-5)")
                    data = self._take(want)
                    if not data:
                        raise FirmwareError(f"truncated firmware archive: it ends inside {name}",
                                            fwup_message="ZIP decompression failed (-5)")
                    consumed += len(data)
                try:
                    out = inflater.decompress(data, chunk_size)
                except zlib.error as e:
                    raise FirmwareError(f"corrupt firmware archive: {name} does not decompress ({e})",
                                        fwup_message=f"ZIP decompression failed ({_zlib_code(e)})") from None
                if out:
                    crc = zlib.crc32(out, crc)
                    size += len(out)
                    yield out
            leftover = inflater.unused_data
            self._unread(leftover)
            consumed -= len(leftover)
        if entry.has_descriptor:
            expected_crc, expected_csize, expected_size = self._descriptor(entry)
        else:
            expected_crc, expected_csize, expected_size = entry.crc32, entry.compressed_size, entry.size
        if consumed != expected_csize or size != expected_size:
            raise FirmwareError(
                f"corrupt firmware archive: {name} is {size} bytes ({consumed} compressed), "
                f"its ZIP header says {expected_size} ({expected_csize} compressed)",
                fwup_message="ZIP compressed data is wrong size",
            )
        if crc != expected_crc:
            raise FirmwareError(f"corrupt firmware archive: {name} fails its CRC check", fwup_message="ZIP bad CRC")
        self.entries.append(FirmwareEntry(name, consumed, size, crc, entry.data_offset))
        self._reading = False

    def _descriptor(self, entry: ZipEntry) -> tuple[int, int, int]:
        width = 8 if entry.zip64 else 4
        first = self._exact(4)
        if len(first) == 4 and struct.unpack("<I", first)[0] == _DESCRIPTOR_SIG:
            first = self._exact(4)
        rest = self._exact(2 * width)
        if len(first) < 4 or len(rest) < 2 * width:
            raise FirmwareError(f"truncated firmware archive: it ends inside {entry.name}'s data descriptor",
                                fwup_message="Truncated ZIP file data")
        (crc,) = struct.unpack("<I", first)
        csize, usize = struct.unpack("<QQ" if width == 8 else "<II", rest)
        return crc, csize, usize

    def skip(self, entry: ZipEntry) -> None:
        """Consume an entry's data without keeping it (still checking its CRC)."""
        for _ in self.read_data(entry):
            pass

    def read_all(self, entry: ZipEntry, limit: int) -> bytes:
        """A small entry's whole data; more than ``limit`` bytes is an error."""
        buf = io.BytesIO()
        for chunk in self.read_data(entry, chunk_size=limit + 1):
            buf.write(chunk)
            if buf.tell() > limit:
                self._reading = False
                raise FirmwareError(f"corrupt firmware archive: {entry.name} is larger than {limit} bytes",
                                    fwup_message=f"Unexpected {entry.name} size: {buf.tell()}")
        return buf.getvalue()


# --- the archive's head: signature + meta.conf ----------------------------------------------


@dataclass(frozen=True)
class FirmwareInfo:
    """What a ``.fw`` holds: signature, meta.conf (bytes and parsed), uuid, entries."""

    source: str
    signature: bytes | None
    meta_conf: bytes
    meta: MetaConf
    uuid: str
    creation_date: str
    entries: tuple[FirmwareEntry, ...] = ()

    @property
    def metadata(self) -> dict[str, str]:
        """``fwup -m``'s fields (without ``meta-``): meta.conf's plus creation-date and uuid.

        fwup 1.16 also prints a ``meta-nickname`` derived from the uuid with a word list;
        that one is left out.
        """
        meta = self.meta.meta
        out = {k: meta[k] for k in ("product", "description", "version", "author", "platform", "architecture")
               if k in meta}
        out |= {k: meta[k] for k in ("vcs-identifier", "misc") if k in meta}
        out["creation-date"] = self.creation_date
        if "fwup-version" in meta:
            out["fwup-version"] = meta["fwup-version"]
        out["uuid"] = self.uuid
        return out

    @property
    def version(self) -> str:
        return self.meta.meta.get("version", "")

    @property
    def platform(self) -> str:
        return self.meta.meta.get("platform", "")

    @property
    def architecture(self) -> str:
        return self.meta.meta.get("architecture", "")


def read_head(
    stream: ZipStream, *, public_keys: Sequence[Any] = (), source: str = "the archive"
) -> FirmwareInfo:
    """Read the signature (if any) and meta.conf from the start of an archive stream.

    With ``public_keys`` the archive must be signed by one of them. The stream is left at the
    first resource entry.
    """
    entry = stream.next_entry()
    if entry is None:
        raise FirmwareError("not a firmware archive: it has no entries",
                            fwup_message="Unrecognized archive format")
    signature: bytes | None = None
    if entry.name == SIGNATURE_NAME:
        signature = stream.read_all(entry, SIGNATURE_LEN)
        if len(signature) != SIGNATURE_LEN:
            raise FirmwareError(f"corrupt firmware archive: its signature is {len(signature)} bytes, not 64",
                                fwup_message=f"Unexpected meta.conf.ed25519 size: {len(signature)}")
        entry = stream.next_entry()
        if entry is None:
            raise FirmwareError("corrupt firmware archive: it holds only a signature",
                                fwup_message="Expecting more than meta.conf.ed25519 in archive")
    if entry.name != META_CONF_NAME:
        raise FirmwareError(f"not a firmware archive: it starts with {entry.name}, not meta.conf",
                            fwup_message=f"Expecting meta.conf to be at the beginning of {source}")
    try:
        meta_conf = stream.read_all(entry, META_CONF_MAX)
    except ArchiveInputError:
        raise
    except FirmwareError as e:
        # fwup reads what it can of meta.conf and then complains about its size
        raise FirmwareError(str(e), fwup_message="Unexpected meta.conf size: 0") from None
    if not 10 <= len(meta_conf) < META_CONF_MAX:
        raise FirmwareError(f"corrupt firmware archive: meta.conf is {len(meta_conf)} bytes",
                            fwup_message=f"Unexpected meta.conf size: {len(meta_conf)}")
    keys = [_public_key(k) for k in public_keys]
    if keys:
        if signature is None:
            raise FirmwareError("the firmware is not signed, and a signature is required",
                                fwup_message="Expecting signed firmware archive.")
        if not any(_verify(k, signature, meta_conf) for k in keys):
            raise FirmwareError("the firmware's signature does not match any trusted public key",
                                fwup_message="Firmware archive's meta.conf fails digital signature verification.")
    try:
        text = meta_conf.decode("utf-8")
    except UnicodeDecodeError:
        raise FirmwareError("corrupt firmware archive: meta.conf is not UTF-8 text",
                            fwup_message="Unexpected error parsing meta.conf") from None
    meta = parse_meta_conf(text)
    fw_uuid = firmware_uuid(meta_conf)
    if meta.meta.get("uuid", fw_uuid) != fw_uuid:
        raise FirmwareError("corrupt firmware archive: meta.conf sets its own meta-uuid",
                            fwup_message="meta.conf isn't allowed to change 'meta-uuid' or '$FWUP_META_UUID'")
    created = meta.meta.get("creation-date") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.mtime or 0))
    return FirmwareInfo(source, signature, meta_conf, meta, fw_uuid, created)


def _open_source(source: str | os.PathLike[str] | BinaryIO) -> tuple[BinaryIO, str, bool]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            return path.open("rb"), str(path), True
        except OSError as e:
            raise FirmwareError(f"{path}: cannot open: {e.strerror}") from None
    return source, getattr(source, "name", "<stream>"), False


def _checked_resource(info: FirmwareInfo, name: str, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Pass a resource's chunks through, then check its length and blake2b-256 against meta.conf."""
    resource = info.meta.resources.get(name)
    if resource is None:
        raise FirmwareError(f"corrupt firmware archive: data/{name} has no file-resource in meta.conf",
                            fwup_message=f"Can't find file-resource for {name}")
    hasher = hashlib.blake2b(digest_size=32)
    length = 0
    for chunk in chunks:
        hasher.update(chunk)
        length += len(chunk)
        yield chunk
    if length != resource.length:
        raise FirmwareError(
            f"corrupt firmware archive: {name} is {length} bytes, meta.conf says {resource.length}",
            fwup_message=f"Length mismatch for {name}",
        )
    if hasher.hexdigest() != resource.blake2b_256:
        raise FirmwareError(f"corrupt firmware archive: {name} does not match its blake2b-256 in meta.conf",
                            fwup_message=f"Detected blake2b digest mismatch for {name}")


def read_entries(stream: ZipStream, info: FirmwareInfo, *, check: bool = True) -> FirmwareInfo:
    """Read the rest of an archive after :func:`read_head`: every entry's CRC and, with
    ``check``, every resource's length and blake2b-256 (what ``fwup -V`` checks)."""
    seen: set[str] = set()
    while (entry := stream.next_entry()) is not None:
        if not entry.name.startswith(DATA_PREFIX):
            raise FirmwareError(f"corrupt firmware archive: unexpected entry {entry.name}",
                                fwup_message=f"Unexpected file in archive: {entry.name}")
        resource = entry.name.removeprefix(DATA_PREFIX)
        if resource in seen:
            raise FirmwareError(f"corrupt firmware archive: {entry.name} appears twice",
                                fwup_message=f"Processing {resource} twice. Archive is corrupt.")
        seen.add(resource)
        chunks = stream.read_data(entry)
        for _ in _checked_resource(info, resource, chunks) if check else chunks:
            pass
    if check:
        missing = [r for r in info.meta.resources if r not in seen]
        if missing:
            raise FirmwareError(f"corrupt firmware archive: data/{missing[0]} is missing",
                                fwup_message=f"Resource {missing[0]} not found in archive")
    return replace(info, entries=tuple(stream.entries))


def read_firmware(
    source: str | os.PathLike[str] | BinaryIO, *, public_keys: Sequence[Any] = (), check: bool = True
) -> FirmwareInfo:
    """Read a whole ``.fw`` front to back without extracting anything: signature, meta.conf,
    uuid, entries. Every entry's CRC is checked, and with ``check`` every resource's length
    and blake2b-256 too (like ``fwup -V``). ``public_keys``: require a signature by one."""
    stream_in, name, owned = _open_source(source)
    try:
        stream = ZipStream(stream_in.read)
        return read_entries(stream, read_head(stream, public_keys=public_keys, source=name), check=check)
    except FirmwareError as e:
        raise type(e)(f"{name}: {e}", fwup_message=e.fwup_message) from None
    finally:
        if owned:
            stream_in.close()


def iter_resource(path: str | os.PathLike[str], name: str) -> Iterator[bytes]:
    """Stream one resource's decompressed data; its length and blake2b-256 are checked at the
    end (a FirmwareError then means the chunks already yielded must not be trusted)."""
    with Path(path).open("rb") as f:
        stream = ZipStream(f.read)
        info = read_head(stream, source=str(path))
        while (entry := stream.next_entry()) is not None:
            if entry.name == DATA_PREFIX + name:
                yield from _checked_resource(info, name, stream.read_data(entry))
                return
    raise FirmwareError(f"{path}: has no resource {name}", fwup_message=f"Resource {name} not found in archive")


def extract_resource(path: str | os.PathLike[str], name: str, dest: str | os.PathLike[str]) -> Path:
    """Write one verified resource to ``dest`` (removed again if verification fails)."""
    dest = Path(dest)
    try:
        with dest.open("wb") as out:
            for chunk in iter_resource(path, name):
                out.write(chunk)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest


# --- keys and signatures ---------------------------------------------------------------------


def _b64_or_raw(data: bytes, size: int) -> bytes | None:
    try:
        decoded = base64.b64decode(data.strip(), validate=True)
        if len(decoded) == size:
            return decoded
    except ValueError:
        pass
    return data if len(data) == size else None  # fwup before 1.0 wrote raw key bytes


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """A ``fwup-key.pub`` (base64 of the raw 32-byte ed25519 key) → the 32 raw bytes."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise FirmwareError(f"{path}: cannot read public key: {e.strerror}",
                            fwup_message=f"Error reading public key from file '{path}'") from None
    key = _b64_or_raw(data, 32)
    if key is None:
        raise FirmwareError(f"{path}: not an fwup public key (expected base64 of 32 bytes)",
                            fwup_message=f"Error reading public key from file '{path}'")
    return key


def load_private_key(path: str | os.PathLike[str]) -> bytes:
    """A ``fwup-key.priv`` (base64 of seed + public key, 64 bytes) → the 64 raw bytes."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise FirmwareError(f"{path}: cannot read private key: {e.strerror}",
                            fwup_message=f"Error reading signing key from file '{path}'") from None
    key = _b64_or_raw(data, 64)
    if key is None:
        raise FirmwareError(f"{path}: not an fwup private key (expected base64 of 64 bytes)",
                            fwup_message=f"Error reading signing key from file '{path}'")
    _private_key(key)  # checks that the public half belongs to the seed
    return key


def generate_keypair() -> tuple[str, str]:
    """New signing keys in fwup's file formats: (``fwup-key.priv`` text, ``fwup-key.pub`` text)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    seed = private.private_bytes_raw()
    public = private.public_key().public_bytes_raw()
    return base64.b64encode(seed + public).decode("ascii"), base64.b64encode(public).decode("ascii")


def _private_key(key: Any) -> "Ed25519PrivateKey":
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if isinstance(key, Ed25519PrivateKey):
        return key
    if isinstance(key, (str, os.PathLike)):
        key = load_private_key(key)
    if not isinstance(key, (bytes, bytearray)) or len(key) not in (32, 64):
        raise FirmwareError("a signing key must be a key file, 32 seed bytes or 64 fwup key bytes")
    private = Ed25519PrivateKey.from_private_bytes(bytes(key[:32]))
    if len(key) == 64 and private.public_key().public_bytes_raw() != bytes(key[32:]):
        raise FirmwareError("corrupt signing key: its public half does not belong to its seed")
    return private


def _public_key(key: Any) -> "Ed25519PublicKey":
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, (str, os.PathLike)):
        key = load_public_key(key)
    if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
        raise FirmwareError("a public key must be a key file or 32 raw bytes")
    return Ed25519PublicKey.from_public_bytes(bytes(key))


def _verify(key: "Ed25519PublicKey", signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def verify_signature(info: FirmwareInfo, public_key: Any) -> bool:
    """True if the archive's meta.conf carries a valid signature by ``public_key``."""
    if info.signature is None:
        return False
    return _verify(_public_key(public_key), info.signature, info.meta_conf)


# --- writing archives --------------------------------------------------------------------------

_DEFAULT_MTIME = 315532800  # 1980-01-01T00:00:00Z, the earliest time a ZIP header can hold


def _archive_mtime() -> int:
    """Deterministic timestamp: $SOURCE_DATE_EPOCH if set, else 1980-01-01."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "")
    return max(int(value), _DEFAULT_MTIME) if value.isdigit() else _DEFAULT_MTIME


def _deflate_level(sample: bytes) -> int:
    """zlib's default level, or 0 (stored deflate blocks) for data that does not compress, such
    as a squashfs: deflating it again costs ~10x the time for nothing. Judged on the first MiB."""
    if len(sample) >= 4096 and len(zlib.compress(sample, 6)) > 0.95 * len(sample):
        return 0
    return 6


class _ZipWriter:
    """Writes entries the way fwup does: deflate, data descriptors, Unix mode 0644."""

    def __init__(self, out: BinaryIO, mtime: int) -> None:
        self.out = out
        self.mtime = mtime
        t = time.gmtime(mtime)
        self.dos_time = (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2)
        self.dos_date = ((t.tm_year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday
        self.central: list[bytes] = []
        self.count = 0

    def add(self, name: str, chunks: Iterable[bytes]) -> tuple[int, str]:
        """Add one entry; returns its (length, blake2b-256 hex) for checking against meta.conf."""
        raw_name = name.encode("utf-8")
        extra = struct.pack("<HHBi", 0x5455, 5, 1, self.mtime)
        offset = self.out.tell()
        self.out.write(
            _LOCAL.pack(_LOCAL_SIG, 20, 0x08, 8, self.dos_time, self.dos_date, 0, 0, 0, len(raw_name), len(extra))
        )
        self.out.write(raw_name + extra)
        chunks = iter(chunks)
        head = bytearray()
        for chunk in chunks:
            head += chunk
            if len(head) >= _OUT_CHUNK:
                break
        deflater = zlib.compressobj(_deflate_level(bytes(head[:_OUT_CHUNK])), zlib.DEFLATED, -15)
        hasher = hashlib.blake2b(digest_size=32)
        crc = size = csize = 0
        for chunk in itertools.chain([bytes(head)], chunks):
            crc = zlib.crc32(chunk, crc)
            hasher.update(chunk)
            size += len(chunk)
            data = deflater.compress(chunk)
            csize += len(data)
            self.out.write(data)
        data = deflater.flush()
        csize += len(data)
        self.out.write(data)
        if max(size, csize, offset) >= 0xFFFFFFFF:
            raise FirmwareError(f"{name} is too large for a ZIP archive without zip64 (4 GiB)")
        self.out.write(struct.pack("<IIII", _DESCRIPTOR_SIG, crc, csize, size))
        self.central.append(
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                _CENTRAL_SIG, 0x0314, 20, 0x08, 8, self.dos_time, self.dos_date, crc, csize, size,
                len(raw_name), len(extra), 0, 0, 0, 0o100644 << 16, offset,
            )
            + raw_name
            + extra
        )
        self.count += 1
        return size, hasher.hexdigest()

    def finish(self) -> None:
        start = self.out.tell()
        for record in self.central:
            self.out.write(record)
        size = self.out.tell() - start
        self.out.write(struct.pack("<IHHHHIIH", _EOCD_SIG, 0, 0, self.count, self.count, size, start, 0))


def _file_chunks(path: Path, size: int = _OUT_CHUNK) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(size):
            yield chunk


def _write_atomically(out: Path, write: Callable[[BinaryIO], None]) -> Path:
    import tempfile  # not at module level: the fwup stand-in imports this module and never writes archives

    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w+b") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def write_firmware(
    out: str | os.PathLike[str],
    meta_conf: str | bytes,
    resources: Mapping[str, str | os.PathLike[str]],
    *,
    signing_key: Any = None,
) -> Path:
    """Write a ``.fw``: [meta.conf.ed25519], meta.conf, data/<name>... (deflated, fixed times).

    Every resource must match its file-resource in meta.conf (length and blake2b-256), and
    every file-resource needs a file. ``signing_key``: a ``fwup-key.priv`` path, raw key bytes
    or an Ed25519PrivateKey.
    """
    meta_bytes = meta_conf.encode("utf-8") if isinstance(meta_conf, str) else bytes(meta_conf)
    meta = parse_meta_conf(meta_bytes.decode("utf-8"))
    missing = [name for name in meta.resources if name not in resources]
    extra = [name for name in resources if name not in meta.resources]
    if missing or extra:
        raise FirmwareError(
            "resources do not match meta.conf: "
            + "; ".join([f"no file for {n}" for n in missing] + [f"{n} is not a file-resource" for n in extra])
        )
    signature = _private_key(signing_key).sign(meta_bytes) if signing_key is not None else None

    def write(f: BinaryIO) -> None:
        zw = _ZipWriter(f, _archive_mtime())
        if signature is not None:
            zw.add(SIGNATURE_NAME, [signature])
        zw.add(META_CONF_NAME, [meta_bytes])
        for name, path in resources.items():
            length, digest = zw.add(DATA_PREFIX + name, _file_chunks(Path(path)))
            expected = meta.resources[name]
            if (length, digest) != (expected.length, expected.blake2b_256):
                raise FirmwareError(f"{path}: does not match file-resource {name} in meta.conf "
                                    f"({length} bytes, blake2b-256 {digest})")
        zw.finish()

    try:
        written = _write_atomically(Path(out), write)
    except OSError as e:
        raise FirmwareError(f"{out}: cannot write: {e.strerror}") from None
    log.debug("wrote %s (uuid %s, %s)", written, firmware_uuid(meta_bytes), "signed" if signature else "unsigned")
    return written


def sign_firmware(src: str | os.PathLike[str], dst: str | os.PathLike[str], private_key: Any) -> Path:
    """Copy ``src`` to ``dst`` with a signature over its meta.conf (replacing an old one).
    Every resource is verified on the way; nothing is extracted to disk."""
    key = _private_key(private_key)

    def write(f: BinaryIO) -> None:
        with Path(src).open("rb") as inp:
            stream = ZipStream(inp.read)
            info = read_head(stream, source=str(src))
            zw = _ZipWriter(f, _archive_mtime())
            zw.add(SIGNATURE_NAME, [key.sign(info.meta_conf)])
            zw.add(META_CONF_NAME, [info.meta_conf])
            while (entry := stream.next_entry()) is not None:
                resource = entry.name.removeprefix(DATA_PREFIX)
                zw.add(entry.name, _checked_resource(info, resource, stream.read_data(entry)))
            zw.finish()

    return _write_atomically(Path(dst), write)


# --- U-Boot environment blocks and the MBR ---------------------------------------------------


def write_uboot_env(block_size: int, env: Mapping[str, str]) -> bytes:
    """A U-Boot environment block: CRC32 (LE), sorted ``name=value\\0`` pairs, ``\\0``, 0xff fill."""
    body = bytearray()
    for name in sorted(env, key=lambda n: n.encode("utf-8")):
        value = env[name]
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise UBootEnvError(f"U-Boot variable {name!r} cannot be stored (empty, '=' or NUL)")
        body += f"{name}={value}".encode("utf-8") + b"\0"
    body += b"\0"
    if 4 + len(body) > block_size - 1:
        raise UBootEnvError(f"U-Boot environment needs {4 + len(body)} bytes; the block holds {block_size}",
                            fwup_message="Not enough room in U-boot environment")
    data = bytes(body) + b"\xff" * (block_size - 4 - len(body))
    return struct.pack("<I", zlib.crc32(data)) + data


def parse_uboot_env(block: bytes) -> dict[str, str]:
    """The variables of a U-Boot environment block; UBootEnvError if its CRC32 does not match."""
    if len(block) < 5:
        raise UBootEnvError(f"U-Boot environment block is only {len(block)} bytes")
    (expected,) = struct.unpack_from("<I", block)
    actual = zlib.crc32(block[4:])
    if expected != actual:
        raise UBootEnvError(
            f"U-Boot environment CRC32 mismatch (expected 0x{expected:08x}; got 0x{actual:08x})",
            fwup_message=f"U-boot environment CRC32 mismatch (expected 0x{expected:08x}; got 0x{actual:08x})",
        )
    env: dict[str, str] = {}
    pos = 4
    while pos < len(block) and block[pos] != 0:
        end = block.find(b"\0", pos)
        if end < 0:
            raise UBootEnvError("invalid U-Boot environment: a variable is not terminated",
                                fwup_message="Invalid U-boot environment")
        name, sep, value = block[pos:end].partition(b"=")
        if not sep:
            raise UBootEnvError(f"invalid U-Boot environment: {name!r} has no '='",
                                fwup_message="Invalid U-boot environment")
        env[name.decode("utf-8", errors="replace")] = value.decode("utf-8", errors="replace")
        pos = end + 1
    return env


def _chs(lba: int) -> bytes:
    heads, sectors = 255, 63
    cylinder = lba // (heads * sectors)
    if cylinder > 1023:
        return bytes((254, 255, 255))
    head = (lba // sectors) % heads
    sector = lba % sectors + 1
    return bytes((head, ((cylinder >> 2) & 0xC0) | sector, cylinder & 0xFF))


def encode_mbr(mbr: Mbr, *, device_blocks: int | None = None) -> bytes:
    """A 512-byte MBR for ``mbr`` (empty boot code). An ``expand`` partition grows to the end of
    a device of ``device_blocks`` blocks."""
    sector = bytearray(BLOCK_SIZE)
    for p in mbr.partitions:
        if not 0 <= p.index < 4:
            raise FirmwareError(f'mbr "{mbr.name}": partition {p.index} is not 0..3')
        count = p.block_count
        if p.expand and device_blocks is not None and device_blocks - p.block_offset > count:
            count = device_blocks - p.block_offset
        last = p.block_offset + count - 1 if count else p.block_offset
        sector[446 + 16 * p.index : 446 + 16 * (p.index + 1)] = (
            bytes((0x80 if p.boot else 0,)) + _chs(p.block_offset) + bytes((p.type,)) + _chs(last)
            + struct.pack("<II", p.block_offset, count)
        )
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def mbr_partition_offsets(sector: bytes) -> list[int] | None:
    """First block of each of the 4 primary partitions, or None if ``sector`` is no MBR."""
    if len(sector) < BLOCK_SIZE or sector[510:512] != b"\x55\xaa":
        return None
    return [struct.unpack_from("<I", sector, 446 + 16 * i + 8)[0] for i in range(4)]


def format_size(n: int) -> str:
    """Byte counts the way fwup's progress line shows them (``2.12 KB``, ``176.21 KB``)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
