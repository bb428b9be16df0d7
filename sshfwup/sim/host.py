"""The uploader's side of a simulated device: a free loopback port, an SSH key."""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KeyPair", "free_port", "ssh_keygen"]


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
