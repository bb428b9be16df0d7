"""Write and sign ``.fw`` archives: [meta.conf.ed25519], meta.conf, data/<name>...

Every resource is checked against its file-resource in meta.conf (length and blake2b-256) as
it is written, and the archive appears at its path only when complete (temp file + rename).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from ..fsutil import atomic_file
from .archive import (
    DATA_PREFIX,
    META_CONF_NAME,
    SIGNATURE_NAME,
    checked_resource,
    firmware_uuid,
    read_head,
)
from .errors import FirmwareError
from .keys import as_private_key
from .metaconf import parse_meta_conf
from .zipstream import OUT_CHUNK, ZipStream
from .zipwrite import ZipWriter

log = logging.getLogger(__name__)


def _file_chunks(path: Path, size: int = OUT_CHUNK) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(size):
            yield chunk


def _write_atomically(out: Path, write: Callable[[BinaryIO], None]) -> Path:
    with atomic_file(Path(out), mode=0o644) as f:
        write(f)
    return Path(out)


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
    signature = as_private_key(signing_key).sign(meta_bytes) if signing_key is not None else None

    def write(f: BinaryIO) -> None:
        zw = ZipWriter(f)
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
    key = as_private_key(private_key)

    def write(f: BinaryIO) -> None:
        with Path(src).open("rb") as inp:
            stream = ZipStream(inp.read)
            info = read_head(stream, source=str(src))
            zw = ZipWriter(f)
            zw.add(SIGNATURE_NAME, [key.sign(info.meta_conf)])
            zw.add(META_CONF_NAME, [info.meta_conf])
            while (entry := stream.next_entry()) is not None:
                resource = entry.name.removeprefix(DATA_PREFIX)
                zw.add(entry.name, checked_resource(info, resource, stream.read_data(entry)))
            zw.finish()

    return _write_atomically(Path(dst), write)


