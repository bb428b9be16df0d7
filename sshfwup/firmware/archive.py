"""fwup's ``.fw`` archive, read as a stream: signature, meta.conf, uuid, verified resources.

A ``.fw`` file is a ZIP archive. An optional ``meta.conf.ed25519`` (a 64-byte raw ed25519
signature over the exact meta.conf bytes) comes first, then ``meta.conf`` (fwup's *compiled*
configuration), then one ``data/<resource>`` entry per file resource. fwup reads the archive
from stdin without seeking, so this does too (:class:`~sshfwup.firmware.zipstream.ZipStream`).

Facts this module relies on (checked against fwup's source and real fwup 1.16 output):

- meta-uuid = blake2b-256(fwup's namespace UUID bytes + meta.conf bytes), first 16 bytes, with
  the version nibble of byte 6 set to 5.
- meta-creation-date is the meta.conf entry's modification time (fwup >= 1.2), unless
  meta.conf itself carries one (older archives).
- Resource hashes are blake2b-256, checked while the data streams.

Archives are written by fwup (``fwup -c``, signed by ``fwup -S``: :mod:`sshfwup.host.firmware_sign`);
what ``fwup -m`` prints, the host asks fwup for. On the build machine a resource is read from a
file on disk with the standard library's :mod:`zipfile`, which seeks straight to it
(:func:`iter_resource`); the stream reader is what the device needs, before fwup sees a byte.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ArchiveInputError, FirmwareError
from .keys import as_public_key, signature_matches
from .metaconf import MetaConf, parse_meta_conf
from .zipstream import OUT_CHUNK, FirmwareEntry, ZipStream

SIGNATURE_NAME = "meta.conf.ed25519"
META_CONF_NAME = "meta.conf"
DATA_PREFIX = "data/"
SIGNATURE_LEN = 64
META_CONF_MAX = 50000  # fwup refuses a meta.conf of this size or larger

_FWUP_NAMESPACE = bytes.fromhex("2053dffbd51e4310b93b956da89f9f34")


def firmware_uuid(meta_conf: bytes) -> str:
    """fwup's meta-uuid of an archive: a function of the exact meta.conf bytes only."""
    digest = hashlib.blake2b(_FWUP_NAMESPACE + meta_conf, digest_size=32).digest()
    raw = bytearray(digest[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50  # "version 5"; fwup leaves the variant bits alone
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


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
    meta_mtime: int | None = None  # meta.conf's entry timestamp (fwup -m's creation date)

    @property
    def version(self) -> str:
        return self.meta.meta.get("version", "")

    @property
    def platform(self) -> str:
        return self.meta.meta.get("platform", "")

    @property
    def architecture(self) -> str:
        return self.meta.meta.get("architecture", "")


# --- reading -----------------------------------------------------------------------------------


def read_head(
    stream: ZipStream, *, public_keys: Sequence[Any] = (), source: str = "the archive"
) -> FirmwareInfo:
    """Read the signature (if any) and meta.conf from the start of an archive stream.

    With ``public_keys`` the archive must be signed by one of them. The stream is left at the
    first resource entry.
    """
    entry = stream.next_entry()
    if entry is None:
        raise FirmwareError("not a firmware archive: it has no entries")
    signature: bytes | None = None
    if entry.name == SIGNATURE_NAME:
        signature = stream.read_all(entry, SIGNATURE_LEN)
        if len(signature) != SIGNATURE_LEN:
            raise FirmwareError(f"corrupt firmware archive: its signature is {len(signature)} bytes, not 64")
        entry = stream.next_entry()
        if entry is None:
            raise FirmwareError("corrupt firmware archive: it holds only a signature")
    if entry.name != META_CONF_NAME:
        raise FirmwareError(f"not a firmware archive: it starts with {entry.name}, not meta.conf")
    try:
        meta_conf = stream.read_all(entry, META_CONF_MAX)
    except ArchiveInputError:
        raise
    except FirmwareError as e:
        # fwup reads what it can of meta.conf and then complains about its size
        raise FirmwareError(str(e)) from None
    if not 10 <= len(meta_conf) < META_CONF_MAX:
        raise FirmwareError(f"corrupt firmware archive: meta.conf is {len(meta_conf)} bytes")
    keys = [as_public_key(k) for k in public_keys]
    if keys:
        if signature is None:
            raise FirmwareError("the firmware is not signed, and a signature is required")
        if not any(signature_matches(k, signature, meta_conf) for k in keys):
            raise FirmwareError("the firmware's signature does not match any trusted public key")
    try:
        text = meta_conf.decode("utf-8")
    except UnicodeDecodeError:
        raise FirmwareError("corrupt firmware archive: meta.conf is not UTF-8 text") from None
    meta = parse_meta_conf(text)
    fw_uuid = firmware_uuid(meta_conf)
    if meta.meta.get("uuid", fw_uuid) != fw_uuid:
        raise FirmwareError("corrupt firmware archive: meta.conf sets its own meta-uuid")
    created = meta.meta.get("creation-date") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.mtime or 0))
    return FirmwareInfo(source, signature, meta_conf, meta, fw_uuid, created, meta_mtime=entry.mtime)


def _open_source(source: str | os.PathLike[str] | BinaryIO) -> tuple[BinaryIO, str, bool]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            return path.open("rb"), str(path), True
        except OSError as e:
            raise FirmwareError(f"{path}: cannot open: {e.strerror}") from None
    return source, getattr(source, "name", "<stream>"), False


def checked_resource(info: FirmwareInfo, name: str, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Pass a resource's chunks through, then check its length and blake2b-256 against meta.conf."""
    resource = info.meta.resources.get(name)
    if resource is None:
        raise FirmwareError(f"corrupt firmware archive: data/{name} has no file-resource in meta.conf")
    hasher = hashlib.blake2b(digest_size=32)
    length = 0
    for chunk in chunks:
        hasher.update(chunk)
        length += len(chunk)
        yield chunk
    if length != resource.length:
        raise FirmwareError(
            f"corrupt firmware archive: {name} is {length} bytes, meta.conf says {resource.length}",
        )
    if hasher.hexdigest() != resource.blake2b_256:
        raise FirmwareError(f"corrupt firmware archive: {name} does not match its blake2b-256 in meta.conf")


def read_entries(stream: ZipStream, info: FirmwareInfo, *, check: bool = True) -> FirmwareInfo:
    """Read the rest of an archive after :func:`read_head`: every entry's CRC and, with
    ``check``, every resource's length and blake2b-256 (what ``fwup -V`` checks)."""
    seen: set[str] = set()
    while (entry := stream.next_entry()) is not None:
        if not entry.name.startswith(DATA_PREFIX):
            raise FirmwareError(f"corrupt firmware archive: unexpected entry {entry.name}")
        resource = entry.name.removeprefix(DATA_PREFIX)
        if resource in seen:
            raise FirmwareError(f"corrupt firmware archive: {entry.name} appears twice")
        seen.add(resource)
        chunks = stream.read_data(entry)
        for _ in checked_resource(info, resource, chunks) if check else chunks:
            pass
    if check:
        missing = [r for r in info.meta.resources if r not in seen]
        if missing:
            raise FirmwareError(f"corrupt firmware archive: data/{missing[0]} is missing")
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
        raise type(e)(f"{name}: {e}") from None
    finally:
        if owned:
            stream_in.close()


def iter_resource(path: str | os.PathLike[str], name: str) -> Iterator[bytes]:
    """Stream one resource's decompressed data from a file on disk; its length and blake2b-256
    are checked at the end (a FirmwareError then means the chunks already yielded must not be
    trusted). meta.conf is read as fwup reads it, from the front; the resource through the
    archive's central directory (:mod:`zipfile`), without reading the entries before it."""
    import zipfile  # host-side only: the device reads streams
    import zlib

    path = Path(path)
    with path.open("rb") as f:
        info = read_head(ZipStream(f.read), source=str(path))
    try:
        with zipfile.ZipFile(path) as archive:
            try:
                member = archive.getinfo(DATA_PREFIX + name)
            except KeyError:
                raise FirmwareError(f"{path}: has no resource {name}") from None
            with archive.open(member) as data:
                yield from checked_resource(info, name, iter(lambda: data.read(OUT_CHUNK), b""))
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise FirmwareError(f"{path}: corrupt firmware archive: {e}") from None


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

