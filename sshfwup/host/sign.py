"""Sign ``.fw`` archives: [meta.conf.ed25519], meta.conf, data/<name>...

Every resource is checked against its file-resource in meta.conf (length and blake2b-256) as
it is copied, each entry keeps its timestamp, and the archive appears at its path only when
complete (temp file + rename). Archives themselves are made by ``fwup -c``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from sshfwup.system.fsutil import atomic_file
from sshfwup.firmware.archive import DATA_PREFIX, META_CONF_NAME, SIGNATURE_NAME, checked_resource, read_head
from sshfwup.firmware.keys import as_private_key
from sshfwup.firmware.zipstream import OUT_CHUNK, ZipStream
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


def sign_firmware(src: str | os.PathLike[str], dst: str | os.PathLike[str], private_key: Any) -> Path:
    """Copy ``src`` to ``dst`` with a signature over its meta.conf (replacing an old one).
    Every resource is verified on the way; nothing is extracted to disk."""
    key = as_private_key(private_key)

    def write(f: BinaryIO) -> None:
        with Path(src).open("rb") as inp:
            stream = ZipStream(inp.read)
            info = read_head(stream, source=str(src))
            zw = ZipWriter(f)
            zw.add(SIGNATURE_NAME, [key.sign(info.meta_conf)], mtime=info.meta_mtime)
            zw.add(META_CONF_NAME, [info.meta_conf], mtime=info.meta_mtime)
            while (entry := stream.next_entry()) is not None:
                resource = entry.name.removeprefix(DATA_PREFIX)
                zw.add(entry.name, checked_resource(info, resource, stream.read_data(entry)), mtime=entry.mtime)
            zw.finish()

    return _write_atomically(Path(dst), write)


