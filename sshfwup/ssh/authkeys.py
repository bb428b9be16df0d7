"""authorized_keys as sshd reads it, and what each option means on this device.

asyncssh parses the lines and matches ``from=`` (addresses and CIDR; no reverse DNS, like sshd
with ``UseDNS no``), ``cert-authority`` and ``principals=`` (OpenSSH user certificates: validity
period, principals, ``source-address``, and its ``force-command`` through
``get_certificate_option``). It accepts any other option name silently and enforces neither
``expiry-time`` nor ``command``. This module adds what sshd does on top (``man sshd``,
AUTHORIZED_KEYS FILE FORMAT):

- each line stands alone: a broken line is skipped with a warning, the others still work;
- a line with an option this server does not know, or cannot enforce (``verify-required``),
  never authenticates anyone (sshd refuses such lines too);
- ``expiry-time="YYYYMMDD[HHMM[SS]][Z]"``: the line stops working at that time (local time
  unless ``Z``);
- several lines for one key: the first whose options all pass is the one that counts;
- ``command="X"`` restricts the key to X (:func:`resolve_session`): a device command, or
  ``fwup`` for uploads only. A request for anything else is refused (sshd would run X
  instead, and an uploader would take X's exit status 0 for a successful update). A user
  certificate's ``force-command`` is applied by asyncssh before sshfwup sees the request, so
  it keeps sshd's meaning: it runs instead of whatever was asked.

Forwarding, ptys, agent and X11 are refused for every key, so ``restrict``, the ``no-*``
options, ``permitopen``/``permitlisten`` and ``tunnel`` change nothing here; ``pty``,
``port-forwarding`` and friends cannot grant what the server never allows. docs/security.md has
the table.
"""

from __future__ import annotations

import calendar
import logging
import re
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import asyncssh

log = logging.getLogger(__name__)

__all__ = [
    "UPLOAD_ONLY",
    "AuthorizedKeys",
    "KeyMatch",
    "SessionRequest",
    "parse_expiry",
    "resolve_session",
]

#: ``command="fwup"``: the key may upload firmware (ssh -s fwup, scp, sftp) and nothing else.
UPLOAD_ONLY = "fwup"

# Every option sshd knows (OpenSSH 9.x). Those with no effect here are accepted and harmless.
_ENFORCED = frozenset({"command", "from", "expiry-time", "cert-authority", "principals", "no-touch-required"})
_NO_EFFECT = frozenset({
    "restrict", "no-agent-forwarding", "no-port-forwarding", "no-pty", "no-user-rc", "no-X11-forwarding",
    "agent-forwarding", "port-forwarding", "pty", "user-rc", "X11-forwarding", "permitopen", "permitlisten",
    "tunnel", "environment",
})  # fmt: skip
_UNSUPPORTED = frozenset({"verify-required"})  # FIDO user verification: asyncssh cannot check it
_OURS = frozenset({"command", "environment"})  # options asyncssh must not act on
_EXPIRY = re.compile(r"^(\d{4})(\d{2})(\d{2})(?:(\d{2})(\d{2})(\d{2})?)?(Z?)$")


def parse_expiry(text: str) -> float:
    """``expiry-time`` as a POSIX time; ValueError when malformed. Local time unless ``Z``."""
    m = _EXPIRY.match(text)
    if not m:
        raise ValueError(f"expiry-time {text!r} is not YYYYMMDD[HHMM[SS]][Z]")
    year, month, day, hour, minute, second, utc = m.groups()
    fields = (int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0))
    try:
        time.strptime(" ".join(map(str, fields)), "%Y %m %d %H %M %S")  # range checks
    except ValueError:
        raise ValueError(f"expiry-time {text!r} is not a valid date") from None
    stamp = (*fields, 0, 0, -1)
    return float(calendar.timegm(stamp)) if utc else time.mktime(stamp)


@dataclass(frozen=True)
class KeyMatch:
    """The authorized_keys line that let a key (or a certificate's CA) in."""

    where: str  # "path:line"
    fingerprint: str  # the key's, or the CA's for a certificate
    certificate: bool
    principals: tuple[str, ...]
    options: Mapping[str, object]

    @property
    def command(self) -> str | None:
        value = self.options.get("command")
        return value if isinstance(value, str) else None

    def describe(self) -> str:
        if self.certificate:
            return f"certificate for {','.join(self.principals) or '(any principal)'} signed by CA {self.fingerprint}"
        return f"key {self.fingerprint}"


class _Line:
    def __init__(self, where: str, text: str) -> None:
        self.where = where
        self.keys = asyncssh.SSHAuthorizedKeys(text)  # ValueError if it holds nothing usable


class AuthorizedKeys(asyncssh.SSHAuthorizedKeys):
    """What asyncssh consults for keys and certificate authorities, line by line.

    ``last`` is the match of the most recent check: asyncssh checks the key again right before
    it verifies the signature, so after a successful login it is the key that logged in.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self._lines: list[_Line] = []
        self._clock = clock
        self.last: KeyMatch | None = None

    def add_file(self, path: Path) -> None:
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            log.warning("authorized_keys file %s does not exist", path)
            return
        except OSError as e:
            log.error("cannot read authorized_keys %s: %s", path, e.strerror)
            return
        self.add_text(text, str(path))

    def add_text(self, text: str, source: str) -> None:
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                self._lines.append(_Line(f"{source}:{number}", line))
            except (ValueError, asyncssh.KeyImportError) as e:
                log.warning("%s:%d: skipped: %s", source, number, e)

    def validate(
        self,
        key: asyncssh.SSHKey,
        client_host: str,
        client_addr: str,
        cert_principals: Sequence[str] | None = None,
        ca: bool = False,
    ) -> Mapping[str, object] | None:
        self.last = None
        for line in self._lines:
            options = line.keys.validate(key, client_host, client_addr, cert_principals, ca=ca)
            if options is None:
                continue
            problem = self._problem(options)
            if problem:
                log.warning("%s matches %s but %s: not accepted", line.where, key.get_fingerprint(), problem)
                continue
            self.last = KeyMatch(line.where, key.get_fingerprint(), ca, tuple(cert_principals or ()), options)
            # asyncssh would apply command= itself, sshd's way: run it whatever the client asked,
            # so the request would be lost. sshfwup enforces it (resolve_session) instead;
            # environment= is ignored, as by sshd without PermitUserEnvironment.
            return {name: value for name, value in options.items() if name not in _OURS}
        return None

    def validate_x509(self, cert: Any, client_host: str, client_addr: str) -> tuple[None, None]:
        return None, None  # X.509 certificates: not supported (OpenSSH does not use them)

    def _problem(self, options: Mapping[str, object]) -> str | None:
        for name in options:
            if name in _UNSUPPORTED:
                return f"option {name} cannot be enforced by this server"
            if name not in _ENFORCED and name not in _NO_EFFECT:
                return f"option {name!r} is unknown"
        for text in options.get("expiry-time", ()) or ():
            try:
                expiry = parse_expiry(str(text))
            except ValueError as e:
                return str(e)
            if self._clock() >= expiry:
                return f"it expired at {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(expiry))}"
        command = options.get("command")
        if command is not None and not isinstance(command, str):
            return "command= is given more than once"
        return None


# --- what a restricted key may run -------------------------------------------------------------


@dataclass(frozen=True)
class SessionRequest:
    """What a client asked a session to run."""

    kind: Literal["shell", "exec", "subsystem"]
    name: str = ""  # the command line, or the subsystem's name

    def __str__(self) -> str:
        return {"shell": "a shell", "exec": f"`{self.name}`", "subsystem": f"the {self.name} subsystem"}[self.kind]

    @property
    def uploads(self) -> bool:
        if self.kind == "subsystem":
            return self.name in ("fwup", "sftp")
        return self.kind == "exec" and self.name.startswith("scp ")


def _argv(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:
        return [text]


def resolve_session(forced: str | None, asked: SessionRequest) -> SessionRequest | str:
    """What runs for ``asked`` when the key's forced command is ``forced``: a SessionRequest, or
    the refusal (a message for the client).

    Like sshd, a forced command runs instead of a shell. Unlike sshd, which runs it whatever was
    asked, any *other* request is refused: ``ssh -s fwup`` with a ``status``-only key must not
    print the status and exit 0 (an uploader would take that for a successful update).
    """
    if forced is None:
        return asked
    if forced == UPLOAD_ONLY:
        if asked.uploads:
            return asked
        if asked.kind == "shell" or (asked.kind == "exec" and asked.name.strip() == UPLOAD_ONLY):
            # `cat app.fw | ssh HOST` with an upload key; or a certificate's force-command=fwup,
            # which asyncssh turns every request into
            return SessionRequest("subsystem", "fwup")
        return f"this key may only upload firmware (authorized_keys command=\"{forced}\"); {asked} refused"
    if asked.kind == "shell" or (asked.kind == "exec" and _argv(asked.name) == _argv(forced)):
        return SessionRequest("exec", forced)
    return f"this key may only run `{forced}` (authorized_keys command=); {asked} refused"
