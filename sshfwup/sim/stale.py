"""Find and remove what killed runs left of their simulated devices.

A device belongs to the process recorded in its runtime directory (``R/owner.json``, written
before anything is attached or mounted; see ``owner.claim``), and everything running under its
machine carries that owner in ``SSHFWUP_SIM_OWNER``. The owner is a pid *and* its start time,
so a reused pid is not mistaken for it. A device is **stale** when its owner is gone: then its
processes are killed, its mounts unmounted (deepest first) and its loop devices detached. A
device whose owner is alive — another test run, a demo, a terminal's ``sshfwup sim run`` — is
never touched, and neither is one without any owner record (made by an older sshfwup, or not a
simulated device we can vouch for): those are only reported.

Where leftovers are looked for: runtime directories under ``/run/sshfwup-sim`` (records and
mounts), loop devices over a ``disk.img`` whose directory is a simulated device's, and
processes carrying the machine marker or the owner variable.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from sshfwup.system import procs
from sshfwup.sim.blockdev import LoopDevice, mounts_under, run_tool, unmount_under
from sshfwup.sim.device import DEVICE_JSON
from sshfwup.sim.errors import SimError
from sshfwup.sim.machine_procs import MACHINE_LOCK, MARKER_ENV, lock_holders
from sshfwup.sim.owner import OWNER_ENV, OWNER_FILE, RUNTIME_BASE, owner_of, remove_runtime_dir, runtime_dir

__all__ = ["Leftovers", "StaleReport", "find_leftovers", "remove_stale"]

log = logging.getLogger(__name__)

# A stale machine gets SIGTERM and this long to power off by itself (it stops its server, whose
# own stop timeout is 10 s) before everything is SIGKILLed.
MACHINE_GRACE = 12.0


@dataclass
class Leftovers:
    """What is left of one simulated device on this machine, and who owns it."""

    device_dir: Path | None  # None: processes of a dead owner whose device is unknown
    owner: procs.ProcessRef | None
    pids: set[int] = field(default_factory=set)
    machine_pids: set[int] = field(default_factory=set)
    mount_points: set[Path] = field(default_factory=set)
    loops: list[LoopDevice] = field(default_factory=list)
    runtime_dir: Path | None = None  # when it exists

    @property
    def in_use(self) -> bool:
        """Anything that holds resources: a process, a mount or a loop device."""
        return bool(self.pids or self.machine_pids or self.mount_points or self.loops)

    @property
    def stale(self) -> bool:
        """Its recorded owner is gone (a device without an owner record is never stale)."""
        return self.owner is not None and not self.owner.alive()

    @property
    def name(self) -> str:
        if self.device_dir is not None:
            return str(self.device_dir)
        return f"(device unknown; owner pid {self.owner.pid if self.owner else '?'})"


@dataclass(frozen=True)
class StaleReport:
    """What :func:`remove_stale` did: one line per thing removed, the devices it left alone
    because they have no owner record, and what it could not remove."""

    removed: tuple[str, ...]
    unowned: tuple[str, ...]
    problems: tuple[str, ...]


def _device_of_runtime(runtime: Path) -> Path:
    return Path("/") / runtime.relative_to(RUNTIME_BASE)


def _runtime_dirs() -> dict[Path, procs.ProcessRef | None]:
    """Runtime directories under RUNTIME_BASE → their recorded owner (None: no record).

    A runtime directory is one with an owner record, or (older ones) one holding ``root`` or
    ``run``; the walk never enters a mount (a mounted root holds a whole filesystem)."""
    found: dict[Path, procs.ProcessRef | None] = {}
    if not RUNTIME_BASE.is_dir():
        return found
    for top, dirs, files in os.walk(RUNTIME_BASE):
        here = Path(top)
        if OWNER_FILE in files or (here != RUNTIME_BASE and {"root", "run"} <= set(dirs)):
            found[here] = owner_of(_device_of_runtime(here))
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not os.path.ismount(here / d)]
    return found


def _sim_loops() -> dict[Path, list[LoopDevice]]:
    """Loop devices over a simulated device's ``disk.img``, by device directory.

    Loop devices are shared by every container on the host while paths are not: another
    container's device may have the very same path (pytest's numbered directories). So a loop
    device counts only if its backing file is *this* file (device and inode match what we see at
    that path). A backing file that was deleted cannot be checked that way: it counts only if our
    own ``/run`` holds the device's owner record."""
    text = run_tool(
        ["losetup", "-J", "-l", "-O", "NAME,OFFSET,SIZELIMIT,RO,BACK-FILE,BACK-INO,BACK-MAJ:MIN"],
        what="listing loop devices",
    )
    found: dict[Path, list[LoopDevice]] = {}
    if not text.strip():
        return found
    for entry in json.loads(text).get("loopdevices", []):
        raw = entry.get("back-file") or ""
        disk = Path(raw.removesuffix(" (deleted)"))
        if disk.name != "disk.img" or not disk.is_absolute():
            continue
        device_dir = disk.parent
        if raw.endswith(" (deleted)"):
            ours = (runtime_dir(device_dir) / OWNER_FILE).exists()
        else:
            try:
                st = os.stat(disk)
                major, minor = (int(n) for n in str(entry.get("back-maj:min", "")).strip().split(":"))
                ino = int(entry.get("back-ino") or -1)
            except (OSError, ValueError):
                continue
            same_file = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) == (major, minor, ino)
            ours = same_file and ((device_dir / DEVICE_JSON).exists() or runtime_dir(device_dir).is_dir())
        if ours:
            found.setdefault(device_dir, []).append(
                LoopDevice(
                    name=entry["name"], back_file=str(disk), offset=int(entry.get("offset") or 0),
                    sizelimit=int(entry.get("sizelimit") or 0), read_only=bool(entry.get("ro")),
                )  # fmt: skip
            )
    return found


def _machine_cmdline_dir(pid: int) -> Path | None:
    """The device directory of a ``python -m sshfwup.sim run D`` process (the machine itself
    carries no machine marker: only what it starts does)."""
    argv = procs.argv(pid)
    for i, arg in enumerate(argv[:-2]):
        # `python -m sshfwup.sim run D`, `sshfwup sim run D`, `python -m sshfwup sim run D`
        if arg in ("sshfwup.sim", "sim") and argv[i + 1] == "run" and not argv[i + 2].startswith("-"):
            where = Path(argv[i + 2])
            if not where.is_absolute():
                try:
                    where = Path(os.readlink(f"/proc/{pid}/cwd")) / where
                except OSError:
                    return None
            return where
    return None


def find_leftovers() -> list[Leftovers]:
    """Every simulated device on this machine that holds something, with its owner."""
    devices: dict[Path, Leftovers] = {}
    orphans: dict[procs.ProcessRef, Leftovers] = {}

    def device(path: Path) -> Leftovers:
        path = Path(os.path.abspath(path))
        if path not in devices:
            runtime = runtime_dir(path)
            devices[path] = Leftovers(path, owner_of(path), runtime_dir=runtime if runtime.is_dir() else None)
        return devices[path]

    for runtime in _runtime_dirs():
        device(_device_of_runtime(runtime))
    for device_dir, loops in _sim_loops().items():
        device(device_dir).loops.extend(loops)
    for pid, variables in procs.processes_with_variables((MARKER_ENV, OWNER_ENV)).items():
        owner = procs.ProcessRef.parse(variables.get(OWNER_ENV, ""))
        where = variables.get(MARKER_ENV) or _machine_cmdline_dir(pid)
        if where:
            leftovers = device(Path(where))
            (leftovers.pids if MARKER_ENV in variables else leftovers.machine_pids).add(pid)
            if leftovers.owner is None:
                leftovers.owner = owner  # the record is gone (R deleted): the process still says
        elif owner is not None:
            orphans.setdefault(owner, Leftovers(None, owner)).pids.add(pid)
    for leftovers in devices.values():
        assert leftovers.device_dir is not None
        if (leftovers.device_dir / MACHINE_LOCK).exists():
            leftovers.machine_pids |= {p for p in lock_holders(leftovers.device_dir / MACHINE_LOCK) if procs.alive(p)}
        leftovers.mount_points |= {m.mount_point for m in mounts_under(leftovers.device_dir)}
        leftovers.mount_points |= {m.mount_point for m in mounts_under(runtime_dir(leftovers.device_dir))}
    return [*devices.values(), *orphans.values()]


def _remove(leftovers: Leftovers) -> tuple[list[str], list[str]]:
    removed: list[str] = []
    problems: list[str] = []
    who = leftovers.owner.pid if leftovers.owner else "?"
    # The machine first, politely: it stops its server and app, unmounts and detaches by itself.
    machines = sorted(leftovers.machine_pids)
    commands = {pid: procs.command_line(pid) for pid in sorted(leftovers.pids | leftovers.machine_pids)}
    for pid in machines:
        procs.send_signal(pid, signal.SIGTERM)
    procs.wait_gone(machines, MACHINE_GRACE)
    everything = sorted(leftovers.pids | leftovers.machine_pids)
    for pid in everything:
        procs.send_signal(pid, signal.SIGKILL)
    if leftovers.device_dir is not None:  # and whatever they started meanwhile
        sweep = procs.end_processes_with(f"{MARKER_ENV}={leftovers.device_dir}", timeout=5.0)
        everything += [p for p in sweep.signalled if p not in commands]
    if leftovers.owner is not None:
        sweep = procs.end_processes_with(f"{OWNER_ENV}={leftovers.owner.token}", timeout=5.0)
        everything += [p for p in sweep.signalled if p not in everything]
    survivors = procs.wait_gone(everything, 5.0)
    for pid in everything:
        if pid not in survivors:
            removed.append(f"killed pid {pid} ({commands.get(pid, '?')})")
    if survivors:
        problems.append(f"processes {survivors} survived SIGKILL")
    if leftovers.device_dir is None:
        return removed, problems
    device_dir = leftovers.device_dir
    runtime = runtime_dir(device_dir)
    try:
        unmount_under(device_dir, runtime, unmounted=lambda point: removed.append(f"unmounted {point}"))
    except SimError as e:
        problems.append(str(e))
    for loop in _sim_loops().get(device_dir, []):
        try:
            run_tool(["losetup", "-d", loop.name], what=f"detaching {loop.name}")
            removed.append(f"detached {loop.name} ({loop.back_file} at offset {loop.offset})")
        except SimError as e:
            problems.append(str(e))
    if runtime.is_dir() and not problems:
        try:
            remove_runtime_dir(device_dir)
            removed.append(f"removed {runtime}")
        except SimError as e:
            problems.append(str(e))
    prefix = f"stale simulated device {device_dir} (owner pid {who} is gone): "
    return [prefix + line for line in removed], [prefix + line for line in problems]


def remove_stale(*, dry_run: bool = False) -> StaleReport:
    """Remove every simulated device whose owner is gone; leave every other one alone.

    ``dry_run``: only say what would be removed. Each removal is logged too."""
    removed: list[str] = []
    unowned: list[str] = []
    problems: list[str] = []
    for leftovers in find_leftovers():
        if leftovers.owner is None:
            if leftovers.in_use:
                unowned.append(f"{leftovers.name}: no owner record (an older sshfwup's, or not ours)")
            continue
        if not leftovers.stale:
            continue
        if leftovers.device_dir is not None and owner_of(leftovers.device_dir) not in (None, leftovers.owner):
            continue  # claimed by a new owner since we looked
        if not leftovers.in_use:
            # Only an empty runtime directory and the record: what a machine leaves when it
            # powered itself off after its owner died, or a device its creator left unpowered.
            if not dry_run and leftovers.device_dir is not None:
                try:
                    remove_runtime_dir(leftovers.device_dir)
                except SimError as e:
                    log.debug("keeping %s: %s", leftovers.runtime_dir, e)
            continue
        if dry_run:
            what = []
            if leftovers.pids or leftovers.machine_pids:
                what.append(f"processes {sorted(leftovers.pids | leftovers.machine_pids)}")
            if leftovers.mount_points:
                what.append(f"{len(leftovers.mount_points)} mounts")
            if leftovers.loops:
                what.append(f"loop devices {sorted(loop.name for loop in leftovers.loops)}")
            if leftovers.runtime_dir is not None:
                what.append(str(leftovers.runtime_dir))
            removed.append(f"would remove {leftovers.name} (owner pid {leftovers.owner.pid} is gone): {', '.join(what)}")
            continue
        done, failed = _remove(leftovers)
        for line in done:
            log.info("%s", line)
        for line in failed:
            log.error("%s", line)
        removed += done
        problems += failed
    return StaleReport(tuple(removed), tuple(unowned), tuple(problems))


def report_json(report: StaleReport) -> str:
    return json.dumps({"removed": report.removed, "unowned": report.unowned, "problems": report.problems}, indent=2)
