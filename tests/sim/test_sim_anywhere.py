"""The simulator works from any folder: a checkout in a private (0700) directory, like a clone in
root's home on Debian, still makes a device whose app answers — the app runs from the mounted
slot as its own user, with the firmware's interpreter and the firmware's copy of sshfwup.app,
never from the checkout (issue 19)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sshfwup.sim.device import cleanup
from sshfwup.sim.host import free_port

REPO = Path(__file__).resolve().parents[2]

# Run by the copied checkout's own sshfwup: build v1, create the device, boot it, ask the app.
SCRIPT = """
import json, sys, urllib.request
from pathlib import Path
import anyio
from sshfwup.sim.device import SimDevice
from sshfwup.sim.machine import SimMachine
from sshfwup.sim.rootfs import build_sample_firmware

base, fwup, ssh_port, app_port = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

async def main() -> None:
    firmware = build_sample_firmware(base / "fw", version="1.0.0")
    device = SimDevice.create(base / "device", firmware=firmware, fwup=fwup, ssh_port=ssh_port, app_port=app_port)
    async with SimMachine.start(device.path) as machine:
        await machine.wait_up(timeout=60)
        def get() -> dict:
            with urllib.request.urlopen(f"http://127.0.0.1:{app_port}/", timeout=10) as r:
                return json.loads(r.read())
        answer = await anyio.to_thread.run_sync(get)
        pid = answer["pid"]
        answer["exe"] = str(Path(f"/proc/{pid}/exe").resolve())
        answer["uid"] = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0]
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\\0")
        answer["pythonpath"] = next((e.decode()[11:] for e in environ if e.startswith(b"PYTHONPATH=")), "")
        print(json.dumps(answer))

anyio.run(main)
"""


def test_a_checkout_the_app_user_cannot_read_makes_a_device_whose_app_answers(tmp_path: Path, fwup: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    os.chmod(home, 0o700)  # as /root is on Debian
    checkout = home / "sshfwup-clone"
    shutil.copytree(REPO / "sshfwup", checkout / "sshfwup", ignore=shutil.ignore_patterns("__pycache__"))
    work = home / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(work), fwup, str(free_port()), str(free_port())],
            capture_output=True, text=True, timeout=240, cwd=checkout, env=env,
        )  # fmt: skip
    finally:
        cleanup(work / "device")
    log = work / "device" / "machine.log"
    assert done.returncode == 0, f"{done.stderr[-3000:]}\n--- machine log:\n{log.read_text()[-3000:] if log.exists() else ''}"
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["version"] == "1.0.0" and answer["slot"] == "a"
    # the app user's own process, the host's python (through the slot's stand-in), nothing from the checkout
    import pwd

    assert int(answer["uid"]) == pwd.getpwnam("sshfwup-app").pw_uid
    assert answer["exe"].startswith(("/usr/bin/python3", "/usr/local/bin/python3"))
    entries = answer["pythonpath"].split(":")
    assert entries[-1].endswith("/root/usr/lib/python3/dist-packages"), entries
    assert all(e.startswith("/run/sshfwup-sim/") for e in entries), entries  # the mounted slot only


def test_without_a_python_the_app_user_can_run_create_stops_at_once_and_says_what_to_install(
    tmp_path: Path, fwup: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sshfwup.sim import appuser
    from sshfwup.sim import device as sim_device

    # A Python that exists but that the app user cannot reach (in a 0700 directory, as a pyenv
    # under /root is): whatever this machine's own interpreters are, none of the candidates works.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    unreachable = private / "python3"
    unreachable.symlink_to(Path(sys.executable).resolve())
    monkeypatch.setattr(appuser, "HOST_INTERPRETERS", ("/nonexistent/bin/python3", str(unreachable)))
    appuser._app_interpreter.cache_clear()
    path = tmp_path / "device"
    with pytest.raises(sim_device.SimError) as failure:
        sim_device.SimDevice.create(path, firmware=Path(__file__), fwup=fwup, ssh_port=free_port(), app_port=free_port())
    message = str(failure.value)
    assert "'sshfwup-app'" in message and "apt-get install python3" in message, message
    assert "/nonexistent/bin/python3: missing" in message, message
    assert f"{unreachable}: " in message and "cannot run it" in message, message
    assert not (path / "disk.img").exists()  # nothing made
