"""The command line: every option explained, the same names wherever they mean the same, --version."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import pytest

from sshfwup import __version__
from sshfwup.cli import build_parser
from sshfwup.host.firmware import build_parser as build_firmware_parser
from sshfwup.sim.cli import build_parser as build_sim_parser


def commands(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, f"{path} {name}")


def all_commands() -> list[tuple[str, argparse.ArgumentParser]]:
    return [*commands(build_parser(), "sshfwup"), *commands(build_firmware_parser(), "sshfwup"),
            *commands(build_sim_parser(), "sshfwup sim")]  # fmt: skip


def test_every_option_and_argument_is_explained() -> None:
    missing = []
    for path, parser in all_commands():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            if not (action.help or "").strip():
                missing.append(f"{path}: {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_connection_options_are_the_same_everywhere() -> None:
    def options(parser: argparse.ArgumentParser) -> dict[str, tuple[str | None, object]]:
        return {
            "/".join(a.option_strings): (a.help, a.default)
            for a in parser._actions
            if a.dest in ("port", "identity", "known_hosts", "insecure_accept_host_key")
        }

    found = {path: options(p) for path, p in all_commands() if path in ("sshfwup upload", "sshfwup firmware diff")}
    upload, diff = found["sshfwup upload"], found["sshfwup firmware diff"]
    assert upload == diff and set(upload) == {"-p/--port", "-i/--identity", "--known-hosts", "--insecure-accept-host-key"}


def test_output_options_are_named_alike() -> None:
    # one name for "where to write": -o/--output (keys gen keeps --out as an alias)
    for path, parser in all_commands():
        for action in parser._actions:
            if "--out" in action.option_strings:
                assert "--output" in action.option_strings and "-o" in action.option_strings, path


@pytest.mark.parametrize("argv", [["--version"], ["sim", "--version"]])
def test_version(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "sshfwup", *argv], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout == f"sshfwup {__version__}\n", result


def test_upload_help_reads_like_a_manual() -> None:
    result = subprocess.run([sys.executable, "-m", "sshfwup", "upload", "--help"], capture_output=True, text=True,
                            timeout=30)  # fmt: skip
    text = result.stdout
    assert result.returncode == 0
    assert "-p PORT, --port PORT  the device's SSH port (default: 22)" in text, text
    assert "exit status:" in text and "255  the connection failed" in text
    assert "--wait, --no-wait" in text and "--timeout SECONDS" in text
