"""authorized_keys options as sshd reads them (sshfwup/ssh/authkeys.py), without a network.

The same options through real OpenSSH clients: tests/ssh/test_server.py (authorized_keys section).
"""

from __future__ import annotations

import calendar
import time
from pathlib import Path

import asyncssh
import pytest

from sshfwup.ssh.authkeys import UPLOAD_ONLY, AuthorizedKeys, SessionRequest, parse_expiry, resolve_session

NOW = calendar.timegm((2030, 6, 15, 12, 0, 0, 0, 0, 0))


@pytest.fixture(scope="module")
def keys() -> list[asyncssh.SSHKey]:
    """Public keys, as the server sees them."""
    return [asyncssh.generate_private_key("ssh-ed25519").convert_to_public() for _ in range(3)]


def line(key: asyncssh.SSHKey, options: str = "") -> str:
    public = key.export_public_key().decode().strip()
    return f"{options} {public}".strip()


def authorized(*lines: str) -> AuthorizedKeys:
    ak = AuthorizedKeys(clock=lambda: NOW)
    ak.add_text("\n".join(lines) + "\n", "authorized_keys")
    return ak


def test_expiry_time_formats() -> None:
    assert parse_expiry("20300615Z") == calendar.timegm((2030, 6, 15, 0, 0, 0))
    assert parse_expiry("203006151230Z") == calendar.timegm((2030, 6, 15, 12, 30, 0))
    assert parse_expiry("20300615123045Z") == calendar.timegm((2030, 6, 15, 12, 30, 45))
    assert parse_expiry("20300615") == time.mktime((2030, 6, 15, 0, 0, 0, 0, 0, -1))  # local time
    for bad in ("2030061", "20301315", "20300632", "203006151260", "tomorrow", "20300615X"):
        with pytest.raises(ValueError, match="expiry-time"):
            parse_expiry(bad)


def test_plain_key_and_where_it_came_from(keys: list[asyncssh.SSHKey]) -> None:
    ak = authorized("# comment", "", line(keys[0]))
    assert ak.validate(keys[0], "", "127.0.0.1") == {}
    assert ak.last is not None and ak.last.where == "authorized_keys:3" and ak.last.command is None
    assert ak.last.fingerprint == keys[0].get_fingerprint() and not ak.last.certificate
    assert ak.validate(keys[1], "", "127.0.0.1") is None and ak.last is None


@pytest.mark.parametrize(
    ("options", "accepted"),
    [
        ('expiry-time="20000101"', False),
        ('expiry-time="20300615115959Z"', False),  # one second before NOW
        ('expiry-time="20300615120001Z"', True),
        ('expiry-time="not-a-date"', False),
        ('from="10.0.0.0/8"', False),
        ('from="127.0.0.0/8,!127.0.0.2"', True),
        ('from="*.example.com"', False),  # no reverse DNS: names never match
        ("verify-required", False),  # cannot be enforced: never accepted
        ("no-such-option", False),
        ("Command=\"status\"", False),  # option names are exact (sshd: case-insensitive)
        ('restrict,command="status",no-pty,no-port-forwarding,permitopen="a:1",environment="A=b"', True),
        ('restrict,pty,port-forwarding,agent-forwarding,X11-forwarding,user-rc,tunnel="1"', True),
    ],
)
def test_options(keys: list[asyncssh.SSHKey], options: str, accepted: bool) -> None:
    ak = authorized(line(keys[0], options))
    seen = ak.validate(keys[0], "", "127.0.0.1")
    assert (seen is not None) is accepted
    if seen is not None:  # sshfwup enforces these itself: asyncssh must not act on them
        assert "command" not in seen and "environment" not in seen
        assert ak.last is not None and ak.last.command == ("status" if "command" in options else None)


def test_each_line_stands_alone_and_the_first_passing_line_counts(keys: list[asyncssh.SSHKey]) -> None:
    ak = authorized(
        "ssh-ed25519 AAAAnot-base64 broken",
        line(keys[0], 'expiry-time="20000101",command="reboot"'),
        'command="unbalanced ' + line(keys[1]),
        line(keys[0], 'command="status"'),
        line(keys[1]),
    )
    assert ak.validate(keys[0], "", "127.0.0.1") is not None
    assert ak.last is not None and ak.last.command == "status" and ak.last.where == "authorized_keys:4"
    assert ak.validate(keys[1], "", "127.0.0.1") == {}


def test_missing_file_is_no_key(tmp_path: Path, keys: list[asyncssh.SSHKey]) -> None:
    ak = AuthorizedKeys()
    ak.add_file(tmp_path / "absent")
    assert ak.validate(keys[0], "", "127.0.0.1") is None


def test_cert_authority_and_principals(keys: list[asyncssh.SSHKey]) -> None:
    ca = keys[2]
    ak = authorized(line(ca, 'cert-authority,principals="alice,ops-*"'))
    assert ak.validate(ca, "", "127.0.0.1", ["alice"], ca=True) is not None
    assert ak.last is not None and ak.last.certificate and ak.last.principals == ("alice",)
    assert "certificate for alice signed by CA" in ak.last.describe()
    assert ak.validate(ca, "", "127.0.0.1", ["ops-7"], ca=True) is not None
    assert ak.validate(ca, "", "127.0.0.1", ["bob"], ca=True) is None
    assert ak.validate(ca, "", "127.0.0.1") is None  # a CA line is not a user key
    assert authorized(line(ca)).validate(ca, "", "127.0.0.1", ["alice"], ca=True) is None  # not a CA line
    assert ak.validate_x509(object(), "", "127.0.0.1") == (None, None)


UP, SFTP, SHELL = SessionRequest("subsystem", "fwup"), SessionRequest("subsystem", "sftp"), SessionRequest("shell")
SCP, STATUS = SessionRequest("exec", "scp -t /fwup"), SessionRequest("exec", "status")


@pytest.mark.parametrize(
    ("forced", "asked", "runs"),
    [
        (None, UP, UP),
        (None, SessionRequest("exec", "anything"), SessionRequest("exec", "anything")),
        ("status", SHELL, STATUS),
        ("status", STATUS, STATUS),
        ("status", SessionRequest("exec", "  status "), STATUS),
        ("status --json", SessionRequest("exec", "status --json"), SessionRequest("exec", "status --json")),
        ("status", SessionRequest("exec", "status --json"), None),
        ("status", UP, None),
        ("status", SFTP, None),
        ("status", SCP, None),
        ("status", SessionRequest("exec", "reboot"), None),
        (UPLOAD_ONLY, UP, UP),
        (UPLOAD_ONLY, SFTP, SFTP),
        (UPLOAD_ONLY, SCP, SCP),
        (UPLOAD_ONLY, SHELL, UP),
        (UPLOAD_ONLY, SessionRequest("exec", "fwup"), UP),
        (UPLOAD_ONLY, STATUS, None),
        (UPLOAD_ONLY, SessionRequest("subsystem", "other"), None),
    ],
)
def test_forced_commands(forced: str | None, asked: SessionRequest, runs: SessionRequest | None) -> None:
    result = resolve_session(forced, asked)
    if runs is None:
        assert isinstance(result, str) and "this key may only" in result and str(asked) in result
    else:
        assert result == runs
