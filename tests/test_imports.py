"""What ``sshfwup serve`` imports: nothing host-side (issue 13, a lean device).

``sshfwup serve`` runs beside the application on boards with 256 MiB of RAM and slow CPUs, where
every imported module costs start-up time and resident memory on every boot. The host tooling
(upload client, progress display, firmware build/sign/delta, the simulator, test and Ansible
tooling) must stay unimported. Measured with ``python -X importtime`` in a fresh interpreter, which
lists every module the statement imported, however indirectly.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

# What `sshfwup serve` loads before it serves anything: the console script's module, then
# cli._serve's own imports (see sshfwup/cli.py). That is the supervisor, the process that lives
# all the time; the SSH front (`serve --front`, its child) adds what FRONT_IMPORTS does.
SERVE_IMPORTS = "import sshfwup.cli, sshfwup.config, sshfwup.daemon, sshfwup.supervisor.logring"
FRONT_IMPORTS = "import sshfwup.cli, sshfwup.config, sshfwup.ssh.front"

# Never in the supervisor: the SSH stack and what parses a client's or an image's bytes (they
# are the front's), and OpenSSL's libcrypto through hashlib/secrets (~4 MiB of a process meant
# to stay small).
SUPERVISOR_DENIED = (
    r"asyncssh(\..*)?", r"cryptography(\..*)?", r"sshfwup\.ssh\.(server|front|sftp|scp|gate|commands)",
    r"sshfwup\.update\.(pipeline|update|fwup|holdback|intake)", r"sshfwup\.firmware\.(inspect|archive|zipstream)",
    r"_hashlib|secrets|hmac",
)

# Module name patterns (full names, re.fullmatch) that `serve` must not import.
DENIED = (
    r"sshfwup\.sim(\..*)?",  # the simulated device and its host helpers
    r"sshfwup\.vm(\..*)?",  # the QEMU device: image build and QEMU runner, host side
    r"sshfwup\.host(\..*)?",  # the build machine and the operator: upload, fleet, firmware build/sign/diff/delta, demo
    r"sshfwup\.firmware\.(keys|conf|delta_source)",  # signatures, fwup's conf syntax: host-side or first upload only
    r"tqdm(\..*)?",
    r"hypothesis(\..*)?",
    r"pytest(\..*)?|_pytest(\..*)?",
    r"ansible(\..*)?|ansible_collections(\..*)?",
    # tests/ssh/test_clients.py's client and its dependencies (not bcrypt: asyncssh imports it when present)
    r"paramiko(\..*)?|invoke(\..*)?|nacl(\..*)?",
    r"uvloop(\..*)?",  # optional: only when configured, never at import
    r"multiprocessing(\..*)?|concurrent\.futures\.process",
    r"http\.server|xmlrpc(\..*)?|unittest(\..*)?|doctest|pdb|pydoc",
)

_IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")


def imported_modules(statement: str) -> dict[str, int]:
    """Every module a fresh interpreter imports to run ``statement``: name → cumulative µs."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    modules = {}
    for line in result.stderr.splitlines():
        match = _IMPORT_LINE.match(line)
        if match:
            modules[match.group(4)] = int(match.group(2))
    assert modules, f"no -X importtime output: {result.stderr[-500:]!r}"
    return modules


def denied(modules: dict[str, int]) -> list[str]:
    return sorted(name for name in modules if any(re.fullmatch(pattern, name) for pattern in DENIED))


@pytest.mark.parametrize("statement", [SERVE_IMPORTS, FRONT_IMPORTS], ids=["supervisor", "front"])
def test_serve_imports_nothing_host_side(statement: str) -> None:
    modules = imported_modules(statement)
    assert "anyio" in modules and "sshfwup.config" in modules  # the listing is real
    assert denied(modules) == [], "sshfwup serve imports host-side modules; import them where they are used"


def test_the_supervisor_imports_no_ssh_and_no_openssl_hash() -> None:
    supervisor = imported_modules(SERVE_IMPORTS)
    assert "sshfwup.daemon" in supervisor and "sshfwup.supervisor.front_process" in supervisor
    found = sorted(n for n in supervisor if any(re.fullmatch(p, n) for p in SUPERVISOR_DENIED))
    assert found == [], f"the supervisor process imports {found}: they belong to the SSH front"
    front = imported_modules(FRONT_IMPORTS)  # the same check sees them where they belong
    assert "asyncssh" in front and "sshfwup.ssh.server" in front and "sshfwup.update.update" in front


@pytest.mark.parametrize(
    "statement, expected",
    [
        ("import sshfwup.host.firmware_build", "sshfwup.host.firmware_build"),
        ("import sshfwup.host.client", "sshfwup.host.progress_display"),
        ("import sshfwup.sim.device", "sshfwup.sim.device"),
    ],
)
def test_the_check_sees_host_side_imports(statement: str, expected: str) -> None:
    """The deny list catches what it is meant to (a check that cannot fail protects nothing)."""
    assert expected in denied(imported_modules(statement))


def test_serve_command_line_help_stays_lean() -> None:
    """``sshfwup serve --help`` through the console script's module: argparse only, no asyncssh."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sshfwup", "serve", "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    names = {m.group(4) for m in map(_IMPORT_LINE.match, result.stderr.splitlines()) if m}
    assert "sshfwup.cli" in names
    assert denied(dict.fromkeys(names, 0)) == []
    assert "asyncssh" not in names
