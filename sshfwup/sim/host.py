"""The uploader's side of a simulated device: a free loopback port, an SSH key."""

from __future__ import annotations

import os
import random
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


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses right now, below the kernel's ephemeral range.

    A port from the ephemeral range (what binding port 0 gives) can be taken, between now and
    the server's bind, as the local port of some client's outgoing connection — hey's keep-alive
    connections hold theirs for a whole load run, and the server then fails to bind until they
    end. Below that range only listeners take ports. Never the same port twice in one process."""
    low = _ephemeral_low()
    if low <= 2048:  # no room below it: what the kernel gives
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 20000), low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise OSError("no free TCP port on 127.0.0.1 below the ephemeral range")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


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
