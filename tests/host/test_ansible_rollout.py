"""deploy/ansible/rollout.yml with the sshfwup.device collection, run by the real ansible-playbook
against fleets of simulated devices on 127.0.0.1 (real fwup, real SSH, real processes).

One 6-device fleet carries the scenarios that follow each other on a real fleet, in order: a
bad input, a canary that never becomes ready (rolled back, the play stops), the hot roll-out to
all six, the same play again (nothing changes), rebooting them into the new firmware, a device
that goes offline (the play stops). A
second, mixed fleet checks that check mode's predictions are what a real run then does.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import long_lived

from sshfwup.sim.fleet import FleetDevice, SimFleet, ansible_environment, ansible_tool, rollout_command
from sshfwup.sim.host import KeyPair
from sshfwup.sim.rootfs import build_sample_firmware

CALLBACKS = Path(__file__).resolve().parents[1] / "ansible" / "callback_plugins"
UPDATE_TASK = "Update the firmware (hot swap or reboot; waits for validation)"
HEALTH_TASK = "Health gate (the application answers)"
REBOOT_TASK = "Reboot into the new firmware (reboot_after=true; a hot swap leaves it pending)"
FLEET_CONFIG = {"app": {"ready_timeout": 6}}  # a never-ready canary is given up on sooner (the sim says 10)


@dataclass(frozen=True)
class Run:
    returncode: int
    data: dict[str, Any]  # what tests/ansible/callback_plugins/record_results.py wrote
    stdout: str
    stderr: str

    def results(self, task: str) -> dict[str, dict[str, Any]]:
        """host → the task's result, over every wave."""
        return {t["host"]: t["result"] for t in self.data.get("tasks", []) if t["task"] == task}

    @property
    def stats(self) -> dict[str, dict[str, int]]:
        return self.data.get("stats", {})

    def total(self, key: str) -> int:
        return sum(s.get(key, 0) for s in self.stats.values())

    def __str__(self) -> str:
        return f"exit {self.returncode}; stats {self.stats}\n{self.stdout[-3000:]}\n{self.stderr[-2000:]}"


def playbook(workdir: Path, inventory: str, firmware: Path | str, *args: str, timeout: float = 300) -> Run:
    """``ansible-playbook -i INVENTORY deploy/ansible/rollout.yml -e firmware=FW ARGS``."""
    inv = workdir / "inventory.yml"
    inv.write_text(inventory)
    record = workdir / "results.json"
    record.unlink(missing_ok=True)
    callback = {"ANSIBLE_CALLBACK_PLUGINS": str(CALLBACKS), "ANSIBLE_CALLBACKS_ENABLED": "record_results",
                "RECORD_RESULTS_FILE": str(record)}  # fmt: skip
    try:
        argv, env = rollout_command(workdir, inv, firmware, *args, env=callback)
    except FileNotFoundError as e:
        pytest.fail(str(e))
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if not record.exists():
        pytest.fail(f"ansible-playbook recorded nothing (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return Run(result.returncode, json.loads(record.read_text()), result.stdout, result.stderr)


# --- what a device looks like ------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    env: dict[str, str]
    app: dict[str, Any]  # what the app answers: version, slot, pid
    journal: str


def snapshot(d: FleetDevice) -> Snapshot:
    with urllib.request.urlopen(f"http://127.0.0.1:{d.app_port}/", timeout=5) as r:
        app = json.loads(r.read())
    journal_file = d.device.server_data_dir / "journal.json"
    return Snapshot(d.device.env(), app, journal_file.read_text() if journal_file.exists() else "")


def assert_on_v1(d: FleetDevice) -> None:
    s = snapshot(d)
    assert s.env["nerves_fw_active"] == "a" and s.env["nerves_fw_validated"] == "1", (d.name, s.env)
    assert s.app["version"] == "1.0.0" and s.app["slot"] == "a", (d.name, s.app)


# --- fixtures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Releases:
    dir: Path
    v1: Path  # 1.0.0
    v2: Path  # 2.0.0: app-only, hot from 1.0.0
    never_ready: Path  # 2.0.1: app-only, its app never becomes ready
    system: Path  # 1.5.0: /etc differs from the baseline (so 1.5.0 → 2.0.0 needs a reboot)


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory, fwup: str) -> Releases:
    d = tmp_path_factory.mktemp("releases")
    return Releases(
        d,
        build_sample_firmware(d, version="1.0.0", name="app-1.0.0"),
        build_sample_firmware(d, version="2.0.0", name="app-2.0.0"),
        build_sample_firmware(d, version="2.0.1", name="app-2.0.1-broken", app_behavior={"never_ready": True}),
        build_sample_firmware(d, version="1.5.0", name="app-1.5.0", changes=("system-file",)),
    )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, releases: Releases, client_key: KeyPair, fwup: str) -> Iterator[SimFleet]:
    base = tmp_path_factory.mktemp("fleet6")
    with long_lived(base), SimFleet.start(base, [releases.v1] * 6, client_key, fwup=fwup,
                                          config_overrides=FLEET_CONFIG) as f:  # fmt: skip
        yield f


# --- the 6-device fleet, in order --------------------------------------------------------------


def test_firmware_facts_is_the_devices_status(fleet: SimFleet, tmp_path: Path) -> None:
    inv = tmp_path / "inventory.yml"
    inv.write_text(fleet.inventory(["dev1", "dev2"]))
    result = subprocess.run(
        [ansible_tool("ansible"), "devices", "-i", str(inv), "-m", "sshfwup.device.firmware_facts",
         "-a", f"known_hosts={fleet.known_hosts}", "-o"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=ansible_environment(tmp_path), timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("dev1", "dev2"):
        line = next(x for x in result.stdout.splitlines() if x.startswith(f"{name} | SUCCESS"))
        facts = json.loads(line.split("=>", 1)[1])["ansible_facts"]["sshfwup"]
        assert facts["running_root"] == "a" and facts["slots"]["a"]["version"] == "1.0.0", facts
        assert facts["app"]["pid"] == snapshot(fleet[name]).app["pid"], facts


def test_bad_firmware_path_fails_before_any_device_is_touched(fleet: SimFleet, tmp_path: Path) -> None:
    before = {d.name: snapshot(d) for d in fleet.devices}
    run = playbook(tmp_path, fleet.inventory(), tmp_path / "missing.fw")
    assert run.returncode != 0, run
    canary = run.results(UPDATE_TASK)["dev1"]
    assert canary["failed"] and "no such file" in canary["msg"], canary
    assert set(run.stats) == {"dev1"}, run  # the canary's failure stopped the play
    not_fw = tmp_path / "notes.fw"
    not_fw.write_text("not a firmware\n")
    run = playbook(tmp_path, fleet.inventory(), not_fw)
    assert run.returncode != 0 and "not a usable .fw" in run.results(UPDATE_TASK)["dev1"]["msg"], run
    assert {d.name: snapshot(d) for d in fleet.devices} == before


def test_canary_that_never_becomes_ready_is_rolled_back_and_stops_the_play(
    fleet: SimFleet, releases: Releases, tmp_path: Path
) -> None:
    before = {d.name: snapshot(d) for d in fleet.devices}
    run = playbook(tmp_path, fleet.inventory(), releases.never_ready)
    assert run.returncode != 0, run
    canary = run.results(UPDATE_TASK)["dev1"]
    assert canary["failed"] and canary["predicted"] == "hot", canary
    assert set(run.stats) == {"dev1"} and run.stats["dev1"]["failures"] == 1, run  # no other wave started
    dev1 = fleet["dev1"]
    assert_on_v1(dev1)  # the old version serves, the boot env points at it again
    assert dev1.device.env().get("b.sshfwup_state") == "rolled-back", dev1.device.env()
    for d in fleet.devices[1:]:
        assert snapshot(d) == before[d.name], d.name  # env, slots, app (same pid), journal


def test_hot_rollout_to_all_six_with_delta_patches(fleet: SimFleet, releases: Releases, tmp_path: Path) -> None:
    run = playbook(tmp_path, fleet.inventory(), releases.v2, "-e", f"delta_from={releases.dir}")
    assert run.returncode == 0, run
    assert run.total("changed") == 6 and run.total("failures") == 0, run
    updates = run.results(UPDATE_TASK)
    health = run.results(HEALTH_TASK)
    for d in fleet.devices:
        r = updates[d.name]
        assert (r["verdict"], r["predicted"], r["from_version"], r["to_version"]) == ("hot", "hot", "1.0.0", "2.0.0"), r
        assert r["hot"] and not r["reboot"] and r["reboot_pending"], r
        assert 0 < r["bytes_sent"] < releases.v2.stat().st_size / 2, r  # a patch from 1.0.0, not the whole .fw
        assert any("patch" in line for line in r["device_output"]), r["device_output"]
        assert r["durations"]["total"] >= r["durations"]["update"] > 0, r
        assert health[d.name]["status"] == 200, health[d.name]
        s = snapshot(d)
        assert s.app["version"] == "2.0.0" and s.app["slot"] == "b", s.app
        assert s.env["nerves_fw_active"] == "b" and s.env["b.nerves_fw_version"] == "2.0.0", s.env
        assert f"{d.name}: hot 1.0.0 -> 2.0.0, " in run.stdout  # the summary line, per device


def test_same_play_again_changes_nothing(fleet: SimFleet, releases: Releases, tmp_path: Path) -> None:
    before = {d.name: snapshot(d) for d in fleet.devices}
    run = playbook(tmp_path, fleet.inventory(), releases.v2)
    assert run.returncode == 0, run
    assert run.total("changed") == 0 and run.total("ok") > 0, run
    for d in fleet.devices:
        r = run.results(UPDATE_TASK)[d.name]
        assert r["verdict"] == "unchanged" and r["reboot_pending"] and r["bytes_sent"] == 0, r
        assert snapshot(d) == before[d.name], d.name  # not even an upload reached the device


def test_reboot_after_boots_the_hot_swapped_firmware(fleet: SimFleet, releases: Releases, tmp_path: Path) -> None:
    check = playbook(tmp_path, fleet.inventory(), releases.v2, "-e", "reboot_after=true", "--check")
    assert check.returncode == 0 and all(r["changed"] for r in check.results(REBOOT_TASK).values()), check
    assert all(snapshot(d).env["nerves_fw_validated"] == "0" for d in fleet.devices)  # check mode rebooted nothing
    run = playbook(tmp_path, fleet.inventory(), releases.v2, "-e", "reboot_after=true")
    assert run.returncode == 0, run
    assert run.total("changed") == 6 and not any(r["changed"] for r in run.results(UPDATE_TASK).values()), run
    for d in fleet.devices:
        r = run.results(REBOOT_TASK)[d.name]
        assert (r["from_version"], r["to_version"], r["validated"]) == ("1.0.0", "2.0.0", True), r
        s = snapshot(d)
        assert s.env["nerves_fw_active"] == "b" and s.env["nerves_fw_validated"] == "1", s.env
        assert s.app["version"] == "2.0.0" and s.app["slot"] == "b", s.app
        assert d.device.running_slot() == "b"
    again = playbook(tmp_path, fleet.inventory(), releases.v2, "-e", "reboot_after=true")
    assert again.returncode == 0 and again.total("changed") == 0, again  # nothing pending: nothing rebooted


def test_device_offline_mid_play_fails_and_stops_the_play(fleet: SimFleet, releases: Releases, tmp_path: Path) -> None:
    anyio.run(fleet["dev2"].machine.power_off)  # the second wave's device goes away
    run = playbook(tmp_path, fleet.inventory(), releases.v2)
    assert run.returncode != 0, run
    assert run.stats["dev1"]["ok"] > 0 and run.stats["dev1"]["unreachable"] == 0, run
    assert run.stats["dev2"]["unreachable"] == 1, run
    assert "connection refused" in run.results(UPDATE_TASK)["dev2"]["msg"], run.results(UPDATE_TASK)["dev2"]
    assert not set(run.stats) & {"dev3", "dev4", "dev5", "dev6"}, run  # the last wave never started


# --- check mode on a mixed fleet ---------------------------------------------------------------


def test_check_mode_predicts_what_the_real_run_does(
    tmp_path_factory: pytest.TempPathFactory, releases: Releases, client_key: KeyPair, fwup: str, tmp_path: Path
) -> None:
    expected = {"dev1": "hot", "dev2": "reboot", "dev3": "unchanged"}
    with SimFleet.start(tmp_path_factory.mktemp("mixed"), [releases.v1, releases.system, releases.v2], client_key,
                        fwup=fwup) as mixed:  # fmt: skip
        before = {d.name: snapshot(d) for d in mixed.devices}
        check = playbook(tmp_path, mixed.inventory(), releases.v2, "--check")
        assert check.returncode == 0, check
        predicted = {h: r["verdict"] for h, r in check.results(UPDATE_TASK).items()}
        assert predicted == expected, check.results(UPDATE_TASK)
        assert "/etc" in " ".join(check.results(UPDATE_TASK)["dev2"]["reasons"])
        assert check.total("changed") == 2 and all(r["bytes_sent"] == 0 for r in check.results(UPDATE_TASK).values())
        assert {d.name: snapshot(d) for d in mixed.devices} == before  # check mode changed nothing

        run = playbook(tmp_path, mixed.inventory(), releases.v2)
        assert run.returncode == 0, run
        done = run.results(UPDATE_TASK)
        assert {h: r["verdict"] for h, r in done.items()} == predicted, done
        assert {h: r["changed"] for h, r in done.items()} == {"dev1": True, "dev2": True, "dev3": False}
        assert done["dev2"]["reboot"] and done["dev2"]["validated"] and not done["dev2"]["reboot_pending"], done["dev2"]
        rebooted = snapshot(mixed["dev2"])
        assert rebooted.app == {**rebooted.app, "version": "2.0.0", "slot": "b"}
        assert rebooted.env["nerves_fw_active"] == "b" and rebooted.env["nerves_fw_validated"] == "1"
        assert snapshot(mixed["dev3"]) == before["dev3"]


def test_allow_reboot_false_fails_before_sending(
    tmp_path_factory: pytest.TempPathFactory, releases: Releases, client_key: KeyPair, fwup: str, tmp_path: Path
) -> None:
    with SimFleet.start(tmp_path_factory.mktemp("one"), [releases.system], client_key, fwup=fwup) as one:
        before = snapshot(one["dev1"])
        run = playbook(tmp_path, one.inventory(), releases.v2, "-e", "allow_reboot=false")
        assert run.returncode != 0, run
        r = run.results(UPDATE_TASK)["dev1"]
        assert r["failed"] and "would not be a hot swap" in r["msg"] and r["bytes_sent"] == 0, r
        assert snapshot(one["dev1"]) == before


def test_unknown_host_key_is_refused(fleet: SimFleet, releases: Releases, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    inventory = json.loads(fleet.inventory(["dev1"]))
    inventory["devices"]["vars"]["sshfwup_known_hosts"] = str(empty)
    run = playbook(tmp_path, json.dumps(inventory), releases.v2)
    assert run.returncode != 0, run
    assert "not a known host" in run.results(UPDATE_TASK)["dev1"]["msg"], run.results(UPDATE_TASK)

