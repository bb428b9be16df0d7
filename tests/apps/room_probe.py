"""A test app that reports the room it runs in (tests/supervisor/test_room.py), then serves until SIGTERM.

Writes ``$PROBE_REPORT`` (JSON): ids, groups, capability sets, no_new_privs, cgroup, its
environment, which secret files it could read, whether it could open a raw socket, what euid a setuid-root program got; and the pid
of a grandchild it detached (new session, empty environment) that just sleeps — the kind of
process a marker in the environment cannot find again. Then READY=1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from sshfwup.app import notify_ready


def _status() -> dict[str, str]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _readable(path: str) -> bool | str:
    try:
        with open(path, "rb") as f:
            f.read(1)
        return True
    except PermissionError:
        return False
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror}"


def _raw_socket() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
        return True
    except PermissionError:
        return False


def _setuid_euid() -> int | None:
    """The effective uid a setuid-root program gets when the app runs it (no_new_privs: ours)."""
    program = os.environ.get("PROBE_SUID")
    if not program:
        return None
    import subprocess

    return int(subprocess.run([program, "-u"], capture_output=True, text=True, check=True).stdout)


def _detach_grandchild() -> int:
    """Double fork + setsid + empty environment: only a cgroup still holds it."""
    read, write = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.write(write, str(os.getpid()).encode())
            os.execve("/bin/sleep", ["sleep", "300"], {})
        os._exit(0)
    os.close(write)
    pid = int(os.read(read, 32))
    os.wait()
    return pid


def main() -> None:
    status = _status()
    report = {
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "groups": sorted(os.getgroups()),
        "cap_bnd": int(status["CapBnd"], 16),
        "cap_eff": int(status["CapEff"], 16),
        "cap_amb": int(status["CapAmb"], 16),
        "no_new_privs": int(status["NoNewPrivs"]),
        "cgroup": Path("/proc/self/cgroup").read_text(),
        "env": dict(os.environ),
        "readable": {p: _readable(p) for p in sys.argv[1:]},
        "raw_socket": _raw_socket(),
        "setuid_euid": _setuid_euid(),
        "grandchild": _detach_grandchild(),
    }
    Path(os.environ["PROBE_REPORT"]).write_text(json.dumps(report))
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    notify_ready()
    while not stop:
        time.sleep(0.05)


if __name__ == "__main__":
    main()
