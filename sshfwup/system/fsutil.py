"""Whole files or nothing: the one way sshfwup writes a file that must survive a crash."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_file", "write_atomically"]


@contextmanager
def atomic_file(path: Path, *, mode: int = 0o644, overwrite: bool = True, durable: bool = True) -> Iterator[BinaryIO]:
    """Write to a temporary file next to ``path``; on success it becomes ``path`` in one step.

    The temporary file is created 0600 (mkstemp) and gets ``mode`` only once written, so a
    private key is never readable by others, not even for a moment. ``overwrite=False`` links
    instead of renaming: it fails with FileExistsError if ``path`` exists, with no window in which
    another file could be replaced. ``durable`` also fsyncs the directory, so that the rename
    itself survives a power loss (the journal needs that; a status file does not).
    """
    import tempfile  # here, not at module level: serve need not import it at start-up

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), mode)
            if durable:
                os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
        if durable:
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_atomically(
    path: Path, data: bytes | str, *, mode: int = 0o644, overwrite: bool = True, durable: bool = True
) -> Path:
    with atomic_file(path, mode=mode, overwrite=overwrite, durable=durable) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)
