"""No dependency's warning reaches an operator (issue 19): every entry point, run as a user runs it.

cryptography 51 made asyncssh's import print ten "CryptographyDeprecationWarning: DSA is
deprecated" lines ahead of every command's own message. Each entry point calls
``sshfwup.dependency_warnings.silence()``; these tests run each one in a fresh interpreter with
Python's default warning filters and fail naming any warning it printed, so the next upstream
warning is one clear failure (add it to ``SILENCED`` with the reason), not ten message diffs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from cryptography.utils import CryptographyDeprecationWarning

from sshfwup.dependency_warnings import silence
from sshfwup.sim.fleet import ansible_environment, ansible_tool
from sshfwup.sim.host import free_port

from printed_warnings import printed_warnings

SSHFWUP = str(Path(sys.executable).parent / "sshfwup")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "PYTHONDEVMODE")}
    env.update(extra)
    return env


ENTRY_POINTS = {
    "sshfwup --help": [SSHFWUP, "--help"],
    "python -m sshfwup --help": [sys.executable, "-m", "sshfwup", "--help"],
    "serve (bad config)": [SSHFWUP, "serve", "--config", "/nonexistent/sshfwup.toml"],
    "upload (no such file)": [SSHFWUP, "upload", "-p", "1", "root@127.0.0.1", "/nonexistent.fw"],
    "firmware info (no such file)": [SSHFWUP, "firmware", "info", "/nonexistent.fw"],
    "keys --help": [SSHFWUP, "keys", "--help"],
    "sim --help": [SSHFWUP, "sim", "--help"],
    "python -m sshfwup.sim --help": [sys.executable, "-m", "sshfwup.sim", "--help"],
    "python -m sshfwup.demo --help": [sys.executable, "-m", "sshfwup.demo", "--help"],
}


@pytest.mark.parametrize("argv", list(ENTRY_POINTS.values()), ids=list(ENTRY_POINTS))
def test_entry_point_prints_no_warning(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, env=clean_env(), timeout=60, check=False)
    assert result.returncode in (0, 1, 2), result.stdout + result.stderr
    found = printed_warnings(result.stdout + result.stderr)
    assert not found, f"{' '.join(argv)} printed warnings: {found}"


def test_ansible_action_plugin_prints_no_warning(tmp_path: Path) -> None:
    """The collection's action plugins import sshfwup (and so asyncssh) inside ansible-playbook.

    ansible-core 2.19 (the newest for Python 3.11) prints one CryptographyDeprecationWarning of
    its own (ansible/_internal/_ssh/_ssh_agent.py) at start-up, before any collection code runs:
    no collection can filter it, so it is left to ansible-core; everything else counts."""
    import ansible
    closed_port = free_port()
    result = subprocess.run(
        [ansible_tool("ansible"), "all", "-i", "dev1,", "-m", "sshfwup.device.firmware_facts",
         "-e", "ansible_host=127.0.0.1", "-e", f"ansible_port={closed_port}", "-o"],
        stdin=subprocess.DEVNULL,  # ansible refuses a non-blocking stdin (a background job's)
        capture_output=True, text=True, env=ansible_environment(tmp_path, clean_env()), timeout=120, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert "dev1 | UNREACHABLE" in output or "dev1 | FAILED" in output, output  # the plugin ran
    found = printed_warnings(output, upstream=str(Path(ansible.__file__).parent))
    assert not found, f"ansible with the sshfwup collection printed warnings: {found}"


async def test_device_log_has_no_dependency_warning(sim) -> None:  # type: ignore[no-untyped-def]
    """The server's and the machine's output (what a device's journal shows)."""
    log = (sim.device.path / "machine.log").read_text(errors="replace")
    assert "sshfwup" in log, log[-2000:]  # the log is the server's
    found = printed_warnings(log)
    assert not found, f"the device's log has warnings: {found}"


# --- the filter is narrow: only the named category, only from the named dependency ---------------


def _shown(category: type[Warning], module: str) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        silence()
        warnings.warn_explicit("probe", category, filename=f"{module}.py", lineno=1, module=module)
    return bool(caught)


def test_silenced_from_asyncssh() -> None:
    assert not _shown(CryptographyDeprecationWarning, "asyncssh.crypto.misc")


def test_same_category_from_elsewhere_still_shows() -> None:
    assert _shown(CryptographyDeprecationWarning, "sshfwup.host.client")
    assert _shown(CryptographyDeprecationWarning, "asyncsshfoo")


def test_other_warnings_from_asyncssh_still_show() -> None:
    assert _shown(UserWarning, "asyncssh.connection")
    assert _shown(DeprecationWarning, "asyncssh.connection")


def test_the_detector_sees_a_printed_warning() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import warnings; warnings.warn('probe', UserWarning)"],
        capture_output=True, text=True, env=clean_env(), timeout=60, check=False,
    )  # fmt: skip
    assert printed_warnings(result.stderr) == ["UserWarning: probe"], result.stderr
