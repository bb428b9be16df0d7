"""A compiled meta.conf as data: resources, tasks and their calls, U-Boot envs, MBRs.

fwup stores its configuration *compiled* in the archive: every ``on-init``/``on-finish``/
``on-error``/``on-resource`` body becomes a flat ``funlist`` and a task's requirements a flat
``reqlist`` (argc, then the name and argc-1 arguments, repeated). ``${VAR}`` references are kept
as written; fwup expands them when it applies the archive. Offsets and counts are in 512-byte
blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .conf import ConfOption, ConfSection, parse_conf
from .errors import FirmwareError

BLOCK_SIZE = 512


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


# --- parsing ---------------------------------------------------------------------------------


def _flat_calls(values: Sequence[str], where: str) -> tuple[Call, ...]:
    """fwup's flat funlist/reqlist: argc, then the name and argc-1 arguments, repeated."""
    calls: list[Call] = []
    i = 0
    while i < len(values):
        try:
            argc = int(values[i], 0)
        except ValueError:
            raise FirmwareError(f"meta.conf: {where}: expected an argument count, found {values[i]!r}") from None
        if argc < 1 or i + 1 + argc > len(values):
            raise FirmwareError(f"meta.conf: {where}: argument count {argc} runs past the list")
        calls.append(Call(values[i + 1], tuple(values[i + 2 : i + 1 + argc])))
        i += 1 + argc
    return tuple(calls)


def _int(value: Any, where: str) -> int:
    try:
        return int(str(value), 0)
    except ValueError:
        raise FirmwareError(f"meta.conf: {where}: expected an integer, found {value!r}") from None


def _str(value: str | tuple[str, ...] | None, where: str) -> str | None:
    if isinstance(value, tuple):
        raise FirmwareError(f"meta.conf: {where}: expected a single value, found a list")
    return value


def _funlist(section: ConfSection | None, where: str) -> tuple[Call, ...]:
    if section is None:
        return ()
    value = section.option("funlist")
    if value is None:
        return ()
    return _flat_calls(value if isinstance(value, tuple) else (value,), where)


def _event(task: ConfSection, event: str) -> tuple[Call, ...]:
    """The calls of a task's ``on-init``/``on-finish``/``on-error`` section (the first, if several)."""
    sections = task.sections(event)
    return _funlist(sections[0] if sections else None, f'task "{task.title or ""}" {event}')


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
            raise FirmwareError(f"meta.conf: {where} lacks length or blake2b-256")
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
        tasks[name] = Task(
            name=name,
            requirements=_flat_calls(reqlist if isinstance(reqlist, tuple) else (), f'task "{name}" reqlist'),
            on_init=_event(sec, "on-init"),
            on_resource={
                r.title or "": _funlist(r, f'task "{name}" on-resource "{r.title}"')
                for r in sec.sections("on-resource")
            },
            on_finish=_event(sec, "on-finish"),
            on_error=_event(sec, "on-error"),
            require_unmounted_destination=sec.option("require-unmounted-destination") == "true",
        )
    return MetaConf(root, meta, require, resources, tasks, envs, mbrs)
