"""The ``fwup-ops`` contract: every boot-state change is a task of the system's own ops archive.

Some systems have no boot variables at all: a Raspberry Pi with tryboot chooses the slot from
``autoboot.txt`` and a one-shot ``tryboot`` restart, and the system ships an ops archive
(``/usr/share/fwup/ops.fw``, built from its ``fwup-ops.conf``) whose tasks rewrite that file.
Nerves.Runtime changes the boot state only by running those tasks
(``fwup -a -i ops.fw -t TASK -d DISK -q -U --enable-trim``); this backend does the same and writes
no boot variable of its own — only sshfwup's slot marks (``<slot>.sshfwup_state``).

What it reads, and from where:

- the running slot: the mount table (``[device] root_mount``/``slots``), never the environment;
- the slot that boots by default: the ops archive's status task (``[boot] status_task``), whose
  ``info()`` line names it (``a`` or ``b``);
- a pending one-shot trial: the reboot parameter fwup's ``reboot_param()`` wrote
  (``[boot] reboot_param_path``; ``0 tryboot`` asks the firmware to boot the other slot once);
- ``nerves_fw_validated`` only where the system's own tasks keep it.

How sshfwup's operations map to tasks (``{slot}`` in a task name is the slot the change is
about, ``{running}`` the running slot: a system whose variants select themselves by
``require-path-at-offset("/", ...)`` needs neither):

- validate / a proven revert to the running slot → ``validate_task`` for the running slot;
- a proven revert to the other slot → ``revert_task``;
- an unproven revert (a trial) → ``tryboot_task``: the slot boots once, kept only if validated;
- prevent → ``prevent_revert_task``, then sshfwup's mark.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from .bootenv import BootEnv, BootEnvError, BootState, other_slot
from .contract import BootContract

log = logging.getLogger(__name__)

__all__ = [
    "FWUP_DEFAULT_REBOOT_PARAM_PATHS",
    "FwupOps",
    "OpsSettings",
    "OpsTaskError",
    "ops_contract",
    "task_name_problem",
]

#: where fwup's reboot_param() writes without --reboot-param-path (fwup 1.16's src/functions.c)
FWUP_DEFAULT_REBOOT_PARAM_PATHS = (Path("/run/systemd/reboot-param"), Path("/run/reboot-param"))
NO_STATUS_WARNING = (
    "[boot] status_task is empty: sshfwup cannot ask the system which slot boots by default and "
    "assumes the running one does"
)
_PLACEHOLDERS = ("{slot}", "{running}")


class OpsTaskError(BootEnvError):
    """A task of the ops archive could not run or failed (a BootEnvError: every caller of the
    seam already handles that one)."""


def task_name_problem(name: str) -> str | None:
    """What is wrong with a ``[boot] *_task`` value, or None."""
    if any(c.isspace() for c in name):
        return f"{name!r} contains white space"
    rest = name
    for token in _PLACEHOLDERS:
        rest = rest.replace(token, "")
    if "{" in rest or "}" in rest:
        return f"{name!r}: the only placeholders are {{slot}} and {{running}}"
    return None


@dataclass(frozen=True)
class OpsSettings:
    """How to run the system's ops archive: ``[boot]`` and ``[fwup]`` of the configuration."""

    fwup: str
    archive: Path
    device: Path
    reboot_param_path: Path | None  # None: fwup's own default (FWUP_DEFAULT_REBOOT_PARAM_PATHS)
    status_task: str = "status"
    validate_task: str = "validate"
    revert_task: str = "revert"
    tryboot_task: str = "tryboot"
    prevent_revert_task: str = "prevent-revert"
    timeout: float = 30.0

    @classmethod
    def from_config(cls, config: Any) -> "OpsSettings":
        boot = config.boot
        return cls(
            fwup=config.fwup.path,
            archive=Path(boot.ops_archive),
            device=Path(boot.ops_device) if boot.ops_device else Path(config.fwup.devpath),
            reboot_param_path=Path(boot.reboot_param_path) if boot.reboot_param_path else None,
            status_task=boot.status_task,
            validate_task=boot.validate_task,
            revert_task=boot.revert_task,
            tryboot_task=boot.tryboot_task,
            prevent_revert_task=boot.prevent_revert_task,
            timeout=boot.ops_timeout,
        )

    def reboot_param_paths(self) -> tuple[Path, ...]:
        return (self.reboot_param_path,) if self.reboot_param_path else FWUP_DEFAULT_REBOOT_PARAM_PATHS


@dataclass(frozen=True)
class SystemView:
    """What the system (not the environment) says at one moment."""

    running: str | None  # from the mount table
    default: str | None  # what boots without a tryboot: the status task's answer
    tryboot_pending: bool  # the reboot parameter asks for a one-shot trial of the other slot


class FwupOps(BootContract):
    name = "fwup-ops"
    #: the one variable read, and only where the system's own tasks keep it
    boot_keys = ("nerves_fw_validated",)

    def __init__(
        self, env: BootEnv, *, health_gated: bool = False, settings: OpsSettings,
        running: Callable[[], str | None],
    ) -> None:  # fmt: skip
        super().__init__(env, health_gated=health_gated)
        self.settings = settings
        self._running = running
        self._last = SystemView(None, None, False)

    # --- reading ------------------------------------------------------------------------------

    async def state(self) -> BootState:
        env = await self.env.read()
        running = self._running()
        default = await self._status() if self.settings.status_task else None
        self._last = SystemView(running, default, self._tryboot_pending())
        return self.interpret(env)

    def interpret(self, env: Mapping[str, str]) -> BootState:
        """The boot state from ``env`` and the system facts last read (``state`` reads them)."""
        view = self._last
        default = view.default or view.running
        flag = env.get("nerves_fw_validated")
        if default is None:
            active, validated, trial = None, flag != "0", False
        elif view.tryboot_pending:
            # the next restart boots the other slot once: a trial until it validates
            active, validated, trial = other_slot(default), False, True
        elif view.running is not None and view.running != default:
            if flag == "1":  # a proven revert waits for the restart
                active, validated, trial = default, True, False
            else:  # this boot is the trial: the next ordinary restart goes back to the default
                active, validated, trial = view.running, False, True
        else:
            active, validated, trial = default, flag != "0", False
        warnings = () if self.settings.status_task else (NO_STATUS_WARNING,)
        return BootState(active, validated, BootState.slot_infos(env), dict(env), trial=trial,
                         contract=self.name, warnings=warnings)  # fmt: skip

    def _tryboot_pending(self) -> bool:
        for path in self.settings.reboot_param_paths():
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            return "tryboot" in text.split()
        return False

    async def _status(self) -> str:
        lines = await self._run(self.settings.status_task, slot=None, what="read which slot boots by default")
        for line in reversed(lines):
            if line in ("a", "b"):
                return line
        raise OpsTaskError(
            f"the ops archive's status task ({self.settings.status_task}) named no slot "
            f"(it said: {' | '.join(lines) or 'nothing'}); nothing was changed"
        )

    # --- changing -----------------------------------------------------------------------------

    def revert_values(self, env: Mapping[str, str], slot: str, *, proven: bool) -> dict[str, str | None]:
        """None: this contract writes no boot variable itself; its ops tasks do."""
        return {}

    async def validate(self) -> None:
        running = self._require_running("validate")
        await self._run(self.settings.validate_task, slot=running, what=f"validate the firmware in slot {running}")

    async def revert_to(self, slot: str, *, proven: bool = True, also: Mapping[str, str | None] | None = None) -> None:
        running = self._require_running(f"revert to slot {slot}")
        if slot == running:
            # the running firmware is the one to keep (it runs, so proven or not it needs no
            # trial): it boots by default and no tryboot stays pending
            await self._run(self.settings.validate_task, slot=slot, what=f"keep slot {slot} booting")
        elif proven:
            await self._run(self.settings.revert_task, slot=slot, what=f"revert to slot {slot}")
        else:
            if not self.settings.tryboot_task:
                raise OpsTaskError(
                    f"cannot boot slot {slot} on trial: [boot] tryboot_task is empty (the system has no such "
                    f"task); nothing was changed"
                )
            await self._run(self.settings.tryboot_task, slot=slot, what=f"boot slot {slot} once on trial")
        if also:  # sshfwup's own marks, after the system's task said yes
            await self.env.write(also)

    async def prevent(self, slot: str, state: str) -> None:
        if self.settings.prevent_revert_task:
            await self._run(self.settings.prevent_revert_task, slot=slot, what=f"prevent reverts to slot {slot}")
        await self.mark_slot(slot, state)

    def fwup_args(self) -> tuple[str, ...]:
        path = self.settings.reboot_param_path
        return ("--reboot-param-path", str(path)) if path else ()

    # --- running the ops archive ----------------------------------------------------------------

    def _require_running(self, what: str) -> str:
        running = self._running()
        if running is None:
            raise OpsTaskError(f"cannot {what}: neither slot is mounted as the root filesystem; nothing was changed")
        return running

    def task(self, template: str, slot: str | None) -> str:
        running = self._running() or ""
        return template.replace("{slot}", slot or running).replace("{running}", running)

    async def _run(self, template: str, *, slot: str | None, what: str) -> list[str]:
        """Run one task; its ``fwup:`` lines. OpsTaskError says what changed."""
        s = self.settings
        task = self.task(template, slot)
        if not s.archive.is_file():
            raise OpsTaskError(f"cannot {what}: the ops archive {s.archive} is missing ([boot] ops_archive); "
                               f"nothing was changed")  # fmt: skip
        argv = [s.fwup, "-a", "-i", str(s.archive), "-t", task, "-d", str(s.device), "-q", "-U", "--enable-trim",
                *self.fwup_args()]  # fmt: skip
        try:
            with anyio.fail_after(s.timeout):
                result = await anyio.run_process(argv, check=False)
        except TimeoutError:
            raise OpsTaskError(f"cannot {what}: fwup -t {task} did not finish within {s.timeout:g} s and was "
                               f"stopped; the boot state may be partly changed (status shows it now)") from None
        except OSError as e:
            raise OpsTaskError(f"cannot {what}: cannot run {s.fwup}: {e.strerror}; nothing was changed") from None
        out = _fwup_lines(result.stdout) + _fwup_lines(result.stderr)
        if result.returncode != 0:
            # Every writing variant starts with info() (the convention the upgrade tasks keep too):
            # an error that is fwup's only word came before anything was written.
            said = " | ".join(out) or f"exit status {result.returncode}"
            changed = ("nothing was changed" if len(out) <= 1
                       else "the boot state may be partly changed (status shows it now)")  # fmt: skip
            raise OpsTaskError(f"cannot {what}: fwup -t {task} of {s.archive.name} failed: {said}; {changed}")
        level = logging.DEBUG if slot is None else logging.INFO  # the status query runs at every read
        log.log(level, "ops archive: %s (fwup -t %s)%s", what, task, f": {' | '.join(out)}" if out else "")
        return out


def _fwup_lines(data: bytes) -> list[str]:
    lines = []
    for raw in data.decode("utf-8", errors="replace").splitlines():
        line = raw.strip()
        if "ignoring --enable-trim" in line:  # fwup's note when the disk is an image file
            continue
        if line.startswith("fwup: "):
            lines.append(line.removeprefix("fwup: ").strip())
        elif line and not line.startswith(("Success", "Elapsed")) and "%" not in line:
            lines.append(line)
    return lines


def ops_contract(env: BootEnv, *, health_gated: bool, config: Any) -> FwupOps:
    """The backend for a configuration: its ops settings and the mount table's running slot."""
    from .slots import running_root

    settings = OpsSettings.from_config(config)
    device = config.device
    return FwupOps(env, health_gated=health_gated, settings=settings,
                   running=lambda: running_root(device.root_mount, device.slots))  # fmt: skip

