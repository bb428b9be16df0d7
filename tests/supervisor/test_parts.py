"""The supervisor in parts (issue 21): names stay importable where they were, and checking a
configuration needs no supervisor module (no sshfwup.config <-> room circle). Each part's size:
tests/test_layout.py, for every module of the package."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

# What importers used from these modules before their parts moved out.
SUPERVISOR_NAMES = (
    "HEALTH_SOCKET_NAME", "INSTANCE_VARIABLE", "LAST_OUTPUT_LINES", "MARKER_VARIABLE", "AppExit", "AppNotReady",
    "AppSource", "CrashLoopHandler", "Instance", "Listener", "Outage", "Report", "Supervisor", "SupervisorError",
    "SwapFailed", "SwapResult", "bind_listeners", "kill_strays", "marked_processes",
)  # fmt: skip
LISTENERS_NAMES = (
    "AcceptStalled", "Instruction", "Listener", "ListenerError", "ProbeReset", "SocketPath", "accept_probe",
    "accept_queue_length", "attach_reuseport_program", "bind_listeners", "close_listeners", "http_probe",
    "migration_enabled", "open_health_socket", "open_notify_socket", "reuseport_program", "tcp_probe",
)  # fmt: skip


@pytest.mark.parametrize(
    "module, names",
    [("sshfwup.supervisor.supervisor", SUPERVISOR_NAMES), ("sshfwup.supervisor.listeners", LISTENERS_NAMES)],
)
def test_names_stay_importable_where_they_were(module: str, names: tuple[str, ...]) -> None:
    imported = importlib.import_module(module)
    missing = [name for name in names if not hasattr(imported, name)]
    assert missing == []
    assert set(names) - {"Instruction", "SocketPath"} <= set(imported.__all__)


def test_capabilities_are_one_table_for_the_config_and_the_room() -> None:
    from sshfwup import config
    from sshfwup.supervisor import room

    assert room.CAPABILITIES is config.CAPABILITIES
    assert config.CAPABILITIES["CAP_NET_BIND_SERVICE"] == 10


def test_checking_a_configuration_imports_no_supervisor_module() -> None:
    statement = (
        "import sys\n"
        "from sshfwup.config import ConfigError, parse_config\n"
        "app = {'command': ['true'], 'capabilities': ['CAP_NET_RAW']}\n"
        "assert parse_config({'server': {'authorized_keys': ['/k']}, 'app': app}).app.capabilities\n"
        "try:\n"
        "    parse_config({'server': {'authorized_keys': ['/k']}, 'app': {**app, 'capabilities': ['CAP_NOPE']}})\n"
        "except ConfigError as e:\n"
        "    assert 'unknown capability' in str(e)\n"
        "else:\n"
        "    raise AssertionError('an unknown capability passed')\n"
        "print(sorted(m for m in sys.modules if m.startswith('sshfwup.supervisor')))"
    )
    result = subprocess.run([sys.executable, "-c", statement], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"

