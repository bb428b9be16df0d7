"""The uploader's side of a simulated device: a free loopback port, an SSH key."""

from __future__ import annotations

import os
import socket
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KeyPair", "free_port", "ssh_keygen", "zip_payload"]


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path

    @property
    def public_line(self) -> str:
        return self.public.read_text().strip()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ssh_keygen(path: Path, *, comment: str | None = None) -> KeyPair:
    """An ed25519 key pair from OpenSSH's ssh-keygen at ``path`` (+ ``.pub``), made if missing."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment or path.name, "-f", str(path)], check=True
        )
    return KeyPair(path, Path(f"{path}.pub"))


def zip_payload(path: Path, size: int) -> Path:
    """A zip archive of about ``size`` bytes (one stored entry of incompressible data: one random
    MiB, repeated): shaped like a ``.fw`` as far as the server checks (it must start and end like
    a zip archive), for transport tests and benchmarks whose fwup is a sink."""
    block = os.urandom(1 << 20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("data/payload", "w", force_zip64=size >= 0xFFFFFFFF) as entry:
            left = max(size - 200, 0)
            while left:
                n = min(left, len(block))
                entry.write(block[:n])
                left -= n
    return path
