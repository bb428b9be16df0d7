"""Delta firmware: ``sshfwup firmware delta OLD.fw NEW.fw -o patch.fw``, and the patch to send a device.

fwup applies a VCDIFF (xdelta3) patch to a resource natively (fwup's README, "Delta firmware
updates"): when a resource's entry in the archive has another size than meta.conf says, and the
task's ``on-resource`` names where the old contents are (``delta-source-raw-offset``/``-count``:
the running slot; ``deploy/fwup.conf`` has them), fwup decodes the entry against those bytes and
checks the blake2b-256 of the *decoded* bytes against meta.conf. So a patch is NEW with its root
filesystem resource replaced by ``xdelta3 -A -S -s OLD NEW``: meta.conf verbatim (NEW's uuid and
signature stay valid), everything else from NEW. The first resource entry's local header names
the firmware the patch applies to (:mod:`sshfwup.firmware.delta_source`), so a device refuses a patch for
another firmware before fwup writes a byte.

:func:`plan_upload` is what an uploader calls: given what the device runs (its uuid, from
``status --json``) and a directory of released ``.fw`` files, it picks the one the device runs,
makes the patch (or reuses a cached one) and says what to send.

Host-side only (needs ``xdelta3``, Debian package ``xdelta3``): ``sshfwup serve`` never imports it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sshfwup.system.fsutil import atomic_file
from sshfwup.firmware.archive import (
    DATA_PREFIX,
    META_CONF_NAME,
    SIGNATURE_NAME,
    FirmwareInfo,
    checked_resource,
    extract_resource,
    read_firmware,
    read_head,
)
from sshfwup.firmware.errors import FirmwareError
from sshfwup.firmware.zipstream import ZipStream
from sshfwup.firmware.delta_source import (
    DELTA_SOURCE_ID,
    DeltaSource,
    decode_delta_source,
    encode_delta_source,
)

log = logging.getLogger(__name__)

__all__ = [
    "DeltaError",
    "FirmwareHeadInfo",
    "Patch",
    "UploadPlan",
    "default_cache_dir",
    "find_xdelta3",
    "firmware_files",
    "make_patch",
    "plan_upload",
    "read_head_info",
]

_CHUNK = 1024 * 1024
_MIN_SOURCE_WINDOW = 64 << 20  # xdelta3's default -B; a larger source gets a window that holds it whole
_DEFLATE_LEVEL = 6  # zlib's default
WORTH_IT = 0.9  # a patch at least this large relative to the full image is not worth sending


class DeltaError(FirmwareError):
    """A patch cannot be made (or used); the message says why and what to do instead."""


def find_xdelta3(xdelta3: str | None = None) -> str:
    found = shutil.which(xdelta3 or "xdelta3")
    if found is None:
        raise DeltaError(f"{xdelta3 or 'xdelta3'} not found: install xdelta3 (Debian: apt-get install xdelta3)")
    return found


# --- what a .fw says it is, from its first bytes ---------------------------------------------------


@dataclass(frozen=True)
class FirmwareHeadInfo:
    """A ``.fw``'s identity, read from its head only (cheap): uuid, version, signature, and the
    source firmware if it is a delta patch."""

    path: Path
    uuid: str
    version: str
    platform: str
    architecture: str
    signature: bytes | None
    delta_source: DeltaSource | None


def read_head_info(path: Path) -> FirmwareHeadInfo:
    """Read meta.conf and the first resource's local header of ``path``."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            stream = ZipStream(f.read)
            info = read_head(stream, source=str(path))
            first = stream.next_entry()
    except OSError as e:
        raise DeltaError(f"{path}: cannot read: {e.strerror}") from None
    except FirmwareError as e:
        raise DeltaError(f"{path}: {e}") from None
    field = first.extra_field(DELTA_SOURCE_ID) if first is not None else None
    try:
        source = decode_delta_source(field) if field is not None else None
    except FirmwareError as e:
        raise DeltaError(f"{path}: {e}") from None
    return FirmwareHeadInfo(path, info.uuid, info.version, info.platform, info.architecture, info.signature, source)


def _full_firmware(path: Path, what: str) -> FirmwareInfo:
    """Read and verify a whole (non-delta) ``.fw``."""
    path = Path(path)
    if not path.is_file():
        raise DeltaError(f"{path}: no such file ({what})")
    head = read_head_info(path)
    if head.delta_source is not None:
        raise DeltaError(
            f"{path} is itself a delta patch (for {head.delta_source}); give the full .fw files as {what}"
        )
    try:
        return read_firmware(path)
    except FirmwareError as e:
        raise DeltaError(str(e)) from None


# --- making a patch ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    """A delta ``.fw`` that was written (or found in the cache)."""

    path: Path
    size: int  # the patch file
    full_size: int  # NEW.fw, what would be sent without the patch
    resource: str  # the patched resource
    source: DeltaSource  # the firmware it applies to (OLD)
    target: DeltaSource  # the firmware it installs (NEW: uuid, version)

    @property
    def ratio(self) -> float:
        return self.size / self.full_size if self.full_size else 0.0

    def summary(self) -> str:
        return (
            f"{self.path}: delta patch {self.source.version} → {self.target.version}: {_size(self.size)} instead of "
            f"{_size(self.full_size)} ({self.ratio:.2%} of the full firmware); it applies only to a device running "
            f"{self.source}"
        )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _delta_source_settings(info: FirmwareInfo, resource: str) -> bool:
    """Does NEW's meta.conf tell fwup where the old contents of ``resource`` are, in some task?"""
    for task in info.meta.root.sections("task"):
        for handler in task.sections("on-resource"):
            if handler.title != resource:
                continue
            raw = handler.option("delta-source-raw-offset") is not None and handler.option("delta-source-raw-count")
            fat = handler.option("delta-source-fat-offset") is not None and handler.option("delta-source-fat-path")
            if raw or fat:
                return True
    return False


def _choose_resource(old: FirmwareInfo, new: FirmwareInfo, name: str | None) -> str:
    from .firmware_image import RootfsError, choose_rootfs_resource

    try:
        chosen = choose_rootfs_resource(new, name)
    except RootfsError as e:
        raise DeltaError(str(e)) from None
    if chosen not in old.meta.resources:
        raise DeltaError(f"{old.source} has no resource {chosen!r} to make a patch against")
    return chosen


def _xdelta3(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise DeltaError(f"xdelta3 failed to {what}: {detail[-1] if detail else f'exit status {result.returncode}'}")


def _decoded_blake2b(xdelta3: str, source: Path, patch: Path) -> str:
    """blake2b-256 of what fwup will decode: ``xdelta3 -d -s SOURCE PATCH`` to a pipe."""
    hasher = hashlib.blake2b(digest_size=32)
    with subprocess.Popen([xdelta3, "-d", "-c", "-s", str(source), str(patch)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:  # fmt: skip
        assert proc.stdout is not None
        while chunk := proc.stdout.read(_CHUNK):
            hasher.update(chunk)
        stderr = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
    if proc.returncode != 0:
        raise DeltaError(f"the patch just made does not decode: {stderr or f'xdelta3 exit status {proc.returncode}'}")
    return hasher.hexdigest()


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def make_patch(old_fw: Path, new_fw: Path, out: Path, *, resource: str | None = None,
               xdelta3: str | None = None) -> Patch:  # fmt: skip
    """Write ``out``: NEW with its root filesystem resource (or ``resource``) as an xdelta3
    patch against OLD's. Both files are verified first; the patch is decoded once more before
    it is written, and must give NEW's resource exactly."""
    xdelta = find_xdelta3(xdelta3)
    old = _full_firmware(Path(old_fw), "OLD (the firmware the device runs)")
    new = _full_firmware(Path(new_fw), "NEW (the firmware to install)")
    if old.uuid == new.uuid:
        raise DeltaError(f"{old_fw} and {new_fw} are the same firmware (uuid {new.uuid}): there is nothing to patch")
    if (old.platform, old.architecture) != (new.platform, new.architecture):
        raise DeltaError(
            f"{new_fw} is for {new.platform}/{new.architecture} but {old_fw} for {old.platform}/{old.architecture}: "
            "a device refuses firmware for another platform"
        )
    name = _choose_resource(old, new, resource)
    if not _delta_source_settings(new, name):
        raise DeltaError(
            f"{new_fw}'s fwup.conf does not say where a device finds the old {name} (no delta-source-raw-offset/"
            f"-count in any task's on-resource {name}): fwup would refuse the patch. Add them to the upgrade tasks "
            "(see deploy/fwup.conf) and build NEW again"
        )
    expected = new.meta.resources[name]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".sshfwup-delta-", dir=out.parent) as tmp:
        old_res = extract_resource(old_fw, name, Path(tmp) / "old")
        new_res = extract_resource(new_fw, name, Path(tmp) / "new")
        vcdiff = Path(tmp) / "patch"
        window = max(_MIN_SOURCE_WINDOW, old_res.stat().st_size)
        _xdelta3([xdelta, "-e", "-A", "-S", "-f", "-B", str(window), "-s", str(old_res), str(new_res), str(vcdiff)],
                 f"make a patch from {old_fw} to {new_fw}")  # fmt: skip
        if vcdiff.stat().st_size == expected.length:
            # fwup tells a patch from a whole resource by its size alone
            raise DeltaError(f"the patch for {name} is exactly as large as {name} itself; send {new_fw} whole")
        if _decoded_blake2b(xdelta, old_res, vcdiff) != expected.blake2b_256:
            raise DeltaError(f"the patch for {name} does not reproduce {new_fw}'s {name} (xdelta3 bug?)")
        new_res.unlink()
        source = DeltaSource(old.uuid, old.version)
        _write_patch(Path(new_fw), out, name, vcdiff, source)
    patch = Patch(out, out.stat().st_size, Path(new_fw).stat().st_size, name, source, DeltaSource(new.uuid, new.version))
    log.debug("%s", patch.summary())  # the callers say it (firmware delta, diff, upload)
    return patch


_DOS_EPOCH = 315532800  # 1980-01-01, the earliest time a ZIP header holds
_EXTENDED_TIMESTAMP_ID = 0x5455  # the "UT" extra field: the mtime fwup reads, in UTC


def _zip_entry(name: str, mtime: int | None, extra: Sequence[tuple[int, bytes]] = (), size: int = 0) -> zipfile.ZipInfo:
    """A deflated entry as fwup writes them: Unix mode 0644 and an extended timestamp (fwup -m's
    creation date is meta.conf's), then ``extra`` fields (readers skip ids they do not know).
    ``size``: the data's length when known, so that zipfile writes zip64 sizes where needed."""
    when = _DOS_EPOCH if mtime is None else max(mtime, _DOS_EPOCH)
    entry = zipfile.ZipInfo(name, date_time=time.gmtime(when)[:6])
    entry.compress_type = zipfile.ZIP_DEFLATED
    entry.external_attr = 0o100644 << 16
    entry.file_size = size
    fields = struct.pack("<HHBi", _EXTENDED_TIMESTAMP_ID, 5, 1, when)
    for field_id, data in extra:
        fields += struct.pack("<HH", field_id, len(data)) + data
    if len(fields) > 0xFFFF:
        raise DeltaError(f"{name}: its ZIP extra fields are {len(fields)} bytes, more than 65535")
    entry.extra = fields
    return entry


def _copy(chunks: Iterable[bytes], out: BinaryIO) -> None:
    for chunk in chunks:
        out.write(chunk)


def _write_patch(new_fw: Path, out: Path, name: str, vcdiff: Path, source: DeltaSource) -> None:
    """NEW's entries in NEW's order; ``name``'s data replaced by ``vcdiff``; the source field on
    the first resource entry.

    Written with the standard library's zipfile to a seekable file, which puts every entry's CRC
    and sizes in its local header (no data descriptors): fwup reads the archive as a stream and
    takes an entry whose local header gives a size other than meta.conf's for a delta patch.
    meta.conf and its signature are NEW's bytes verbatim, so NEW's uuid and signature hold."""
    field = encode_delta_source(source)
    with new_fw.open("rb") as inp:
        info = read_head(ZipStream(inp.read), source=str(new_fw))
    with atomic_file(out, mode=0o644, durable=False) as f, zipfile.ZipFile(new_fw) as src, \
            zipfile.ZipFile(f, "w", compresslevel=_DEFLATE_LEVEL) as patch:  # fmt: skip
        if info.signature is not None:
            patch.writestr(_zip_entry(SIGNATURE_NAME, info.meta_mtime), info.signature)
        patch.writestr(_zip_entry(META_CONF_NAME, info.meta_mtime), info.meta_conf)
        resources = sorted((i for i in src.infolist() if i.filename.startswith(DATA_PREFIX)),
                           key=lambda i: i.header_offset)  # fmt: skip
        for index, item in enumerate(resources):
            resource = item.filename.removeprefix(DATA_PREFIX)
            extra = [field] if index == 0 else []
            if resource == name:
                entry = _zip_entry(item.filename, _entry_mtime(item), extra, vcdiff.stat().st_size)
                with patch.open(entry, "w") as dst:
                    _copy(_file_chunks(vcdiff), dst)
            else:
                entry = _zip_entry(item.filename, _entry_mtime(item), extra, item.file_size)
                with src.open(item) as data, patch.open(entry, "w") as dst:
                    _copy(checked_resource(info, resource, iter(lambda: data.read(_CHUNK), b"")), dst)


def _entry_mtime(item: zipfile.ZipInfo) -> int | None:
    """An entry's extended timestamp (UTC), if it has one; fwup writes none on resources."""
    extra = item.extra
    while len(extra) >= 4:
        field_id, length = struct.unpack_from("<HH", extra)
        if field_id == _EXTENDED_TIMESTAMP_ID and length >= 5 and extra[4] & 1:
            return struct.unpack_from("<i", extra, 5)[0]
        extra = extra[4 + length :]
    return None


# --- what to send a device ----------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where patches are kept for reuse: ``$XDG_CACHE_HOME/sshfwup/deltas`` (``~/.cache/…``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sshfwup" / "deltas"


def firmware_files(directory: Path) -> list[Path]:
    """The ``.fw`` files directly in ``directory``, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DeltaError(f"{directory}: not a directory (expected the released .fw files)")
    return sorted(p for p in directory.glob("*.fw") if p.is_file())


@dataclass(frozen=True)
class UploadPlan:
    """What to send: the patch, or the full image and why."""

    file: Path
    delta: bool
    full_size: int
    size: int
    message: str  # for the person uploading
    source: Path | None = None  # the .fw the device runs (when one was found)
    cached: bool = False  # the patch was reused from the cache


def _cache_name(source_uuid: str, new: FirmwareHeadInfo) -> str:
    signed = hashlib.sha256(new.signature).hexdigest()[:16] if new.signature else "unsigned"
    return f"{source_uuid}--{new.uuid}--{signed}.fw"


def _cached_patch(path: Path, source_uuid: str, new: FirmwareHeadInfo) -> bool:
    """A cached patch is reused only if it still says what its name says and reads cleanly."""
    if not path.is_file():
        return False
    try:
        head = read_head_info(path)
        if head.delta_source is None or head.delta_source.uuid != source_uuid or head.uuid != new.uuid:
            return False
        if head.signature != new.signature:
            return False
        with path.open("rb") as f:  # every entry's CRC
            stream = ZipStream(f.read)
            read_head(stream, source=str(path))
            while (entry := stream.next_entry()) is not None:
                stream.skip(entry)
    except FirmwareError as e:
        log.warning("ignoring the cached patch %s: %s", path, e)
        return False
    return True


def plan_upload(new_fw: Path, running_uuid: str | None, fw_dir: Path, *, cache_dir: Path | None = None,
                xdelta3: str | None = None) -> UploadPlan:  # fmt: skip
    """What to send a device that runs the firmware ``running_uuid`` to install ``new_fw``.

    Looks in ``fw_dir`` for the ``.fw`` whose uuid is ``running_uuid``; makes the patch from it
    to ``new_fw`` (or reuses the one in ``cache_dir``, default :func:`default_cache_dir`). Falls
    back to ``new_fw`` whole, with a message saying why, when the device's firmware is unknown or
    not in ``fw_dir``, or the patch would not be clearly smaller. Raises :class:`DeltaError`
    only for a ``new_fw`` or ``fw_dir`` that cannot be used at all.
    """
    new_fw = Path(new_fw)
    new = read_head_info(new_fw)
    if new.delta_source is not None:
        raise DeltaError(f"{new_fw} is a delta patch (for {new.delta_source}); give the full .fw to install")
    full_size = new_fw.stat().st_size
    candidates = firmware_files(fw_dir)

    def full(message: str, source: Path | None = None) -> UploadPlan:
        log.debug("%s", message)  # returned: the caller says it, once
        return UploadPlan(new_fw, False, full_size, full_size, message, source)

    if not running_uuid:
        return full(f"the device does not say which firmware it runs (no uuid); sending {new_fw.name} whole")
    if running_uuid == new.uuid:
        return full(f"the device already runs {new.version} (uuid {new.uuid}); sending {new_fw.name} changes nothing")
    match: Path | None = None
    for candidate in candidates:
        try:
            head = read_head_info(candidate)
        except DeltaError as e:
            log.warning("skipping %s", e)
            continue
        if head.uuid == running_uuid and head.delta_source is None:
            match = candidate
            break
    if match is None:
        return full(
            f"no .fw in {fw_dir} is the firmware the device runs (uuid {running_uuid}); sending {new_fw.name} whole "
            f"({_size(full_size)})"
        )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    cached = cache / _cache_name(running_uuid, new)
    reused = _cached_patch(cached, running_uuid, new)
    if not reused:
        try:
            make_patch(match, new_fw, cached, xdelta3=xdelta3)
        except DeltaError as e:
            return full(f"no patch from {match.name}: {e}; sending {new_fw.name} whole", match)
    size = cached.stat().st_size
    if size >= WORTH_IT * full_size:
        return full(f"the patch from {match.name} is {_size(size)}, not much smaller than {new_fw.name} "
                    f"({_size(full_size)}); sending it whole", match)  # fmt: skip
    source = read_head_info(match)
    message = (
        f"sending a delta patch {source.version} → {new.version}: {_size(size)} instead of {_size(full_size)} "
        f"({size / full_size:.2%}){' (cached)' if reused else ''}"
    )
    log.debug("%s", message)  # returned: the caller says it, once
    return UploadPlan(cached, True, full_size, size, message, match, reused)
