"""The update-safety model (tests/model.py) as a Hypothesis stateful test, on a simulated device
with the real fwup: random sequences of uploads (hot, reboot, bad, cut, slow, broken apps, the same
firmware), power cuts at random moments, reboots, validate and revert; after every step the
invariants of tests/model.py hold. CI runs a fixed, derandomized budget; bench/soak.py runs long.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from model import ALLOWED_REFUSALS, ModelDevice, ModelViolation, garbage, make_key, new_workdir, remove_workdir
from model import upload_in_background as in_background

STEPS = int(os.environ.get("SSHFWUP_MODEL_STEPS", "10"))
EXAMPLES = int(os.environ.get("SSHFWUP_MODEL_EXAMPLES", "10"))
COVERED: Counter[tuple[str, str]] = Counter()  # (abstract state, event) pairs walked, over all runs


def out(result) -> str:  # type: ignore[no-untyped-def]
    return (result.stdout + result.stderr).decode("utf-8", errors="replace")


class UpdateSafety(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.work = new_workdir()
        self.dev = ModelDevice(self.work, make_key(self.work))

    def teardown(self) -> None:
        COVERED.update(self.dev.events)
        try:
            self.dev.close()
        finally:
            remove_workdir(self.work)

    # --- helpers ---------------------------------------------------------------------------------

    def _begin(self, event: str) -> tuple[str, dict[str, str]]:
        state = self.dev.abstract_state()
        self.dev.record(event, state)
        return state, self.dev.env()

    def _refused_cleanly(self, result, before: dict[str, str], what: str) -> None:  # type: ignore[no-untyped-def]
        text = out(result)
        if result.returncode != 1:
            raise ModelViolation(f"{what}: exit status {result.returncode}, expected 1\n{text}")
        env = self.dev.env()
        if env.get("nerves_fw_active") != before.get("nerves_fw_active"):
            raise ModelViolation(f"{what} changed nerves_fw_active: {before.get('nerves_fw_active')} -> "
                                 f"{env.get('nerves_fw_active')}\n{text}")  # fmt: skip
        # 0 -> 1 is the device validating its own first boot meanwhile (its observation window
        # may end during the step); a refused upload must never take validation away
        if before.get("nerves_fw_validated") == "1" and env.get("nerves_fw_validated") != "1":
            raise ModelViolation(f"{what} un-validated the running firmware\n{text}")

    def _good_upload(self, data: bytes, version: str, what: str) -> None:
        before = self.dev.env()
        boots = self.dev.state().boot_count
        result = self.dev.upload(data)
        text = out(result)
        if result.returncode == 0:
            self._serves(version, text, boots, what)
            return
        if not any(reason in text for reason in ALLOWED_REFUSALS):
            raise ModelViolation(f"{what}: a good upload was refused without a documented reason\n{text}")
        self._refused_cleanly(result, before, what)
        self.dev.settle()

    def _serves(self, version: str, text: str, boots: int, what: str) -> None:
        """After an exit status 0: the new version serves, hot or after the reboot it announced."""
        if "rebooting into" in text:
            self.dev.wait_reboot(boots)
        else:
            self.dev.settle()
        served = self.dev.status()["app"]["version"]
        if served != version:
            raise ModelViolation(f"{what}: exit 0 but the app serves {served}, not {version}\n{text}")

    # --- rules -----------------------------------------------------------------------------------

    @rule()
    def hot_upload(self) -> None:
        self._begin("hot-upload")
        version, fw = self.dev.firmwares.make()
        self._good_upload(fw.read_bytes(), version, "hot upload")

    @rule()
    def reboot_upload(self) -> None:
        self._begin("reboot-upload")
        version, fw = self.dev.firmwares.make(changes=("system-file",))
        self._good_upload(fw.read_bytes(), version, "reboot-requiring upload")

    @rule(kind=st.sampled_from(["garbage", "flipped", "wrong-platform"]))
    def bad_upload(self, kind: str) -> None:
        _, before = self._begin(f"bad-upload:{kind}")
        if kind == "wrong-platform":
            data = self.dev.firmwares.make(platform="otherboard")[1].read_bytes()
        else:
            data = bytearray(self.dev.firmwares.make()[1].read_bytes())
            if kind == "garbage":
                data = bytearray(garbage(len(data), len(data)))
            else:
                data[len(data) - 3000] ^= 0x10  # inside the root filesystem's data
        self._refused_cleanly(self.dev.upload(bytes(data)), before, f"{kind} upload")
        self.dev.settle()

    @rule(fraction=st.floats(min_value=0.0, max_value=0.9999))
    def cut_upload(self, fraction: float) -> None:
        _, before = self._begin("cut-upload")
        data = self.dev.firmwares.make(filler=400 * 1024)[1].read_bytes()
        self._refused_cleanly(self.dev.upload(data[: int(len(data) * fraction)]), before, f"upload cut at {fraction:.4f}")
        self.dev.settle()

    @rule()
    def slow_tail_upload(self) -> None:
        self._begin("slow-tail-upload")
        version, fw = self.dev.firmwares.make()
        data = fw.read_bytes()
        # the uploader pauses before its last bytes; fwup's verdict must still stand
        import subprocess

        from model import SSH_OPTIONS

        argv = ["ssh", *SSH_OPTIONS, "-i", str(self.dev.key.private), "-p", str(self.dev.device.ssh_port),
                "-s", "root@127.0.0.1", "fwup"]  # fmt: skip
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write(data[:-100])
        proc.stdin.flush()
        time.sleep(0.5)
        proc.stdin.write(data[-100:])
        boots = self.dev.state().boot_count
        stdout, stderr = proc.communicate(timeout=120)
        result = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
        before = self.dev.env()
        if result.returncode == 0:
            self._serves(version, out(result), boots, "slow-tail upload")
        elif not any(reason in out(result) for reason in ALLOWED_REFUSALS):
            raise ModelViolation(f"slow-tail upload refused without a documented reason\n{out(result)}")
        else:
            self._refused_cleanly(result, before, "slow-tail upload")
            self.dev.settle()

    @rule(kind=st.sampled_from(["never_ready", "crash_after"]))
    def broken_app_upload(self, kind: str) -> None:
        _, before = self._begin(f"broken-app:{kind}")
        behavior = {"never_ready": True} if kind == "never_ready" else {"crash_after": 2.5}
        version, fw = self.dev.firmwares.make(app_behavior=behavior)
        boots = self.dev.state().boot_count
        result = self.dev.upload(fw.read_bytes())
        text = out(result)
        if result.returncode == 0 and "rebooting into" in text:
            self.dev.wait_reboot(boots)
        if kind == "crash_after" and result.returncode == 0:
            time.sleep(4)  # it crashes after the observation window: the device must notice
        self.dev.settle()
        if kind == "never_ready" and result.returncode == 0 and "rebooting into" not in text:
            # (with a reboot verdict it is judged after the boot: it falls back, checked by the invariants)
            raise ModelViolation(f"a version that never gets ready was hot-swapped in\n{text}")

    @rule(delay=st.floats(min_value=0.0, max_value=2.5))
    def power_cut_during_upload(self, delay: float) -> None:
        self._begin("power-cut")
        _, fw = self.dev.firmwares.make()
        boots = self.dev.state().boot_count
        thread = in_background(self.dev, fw.read_bytes())
        time.sleep(delay)
        cut = self.dev.state().boot_count  # the upload may have rebooted the device already
        self.dev.machine.power_cut()
        self.dev.settle(boot=max(boots, cut) + 1)
        thread.join(timeout=60)

    @rule()
    def reboot(self) -> None:
        self._begin("reboot")
        boots = self.dev.state().boot_count
        result = self.dev.ssh("reboot")
        if result.returncode != 0:
            raise ModelViolation(f"reboot refused: {out(result)}")
        self.dev.wait_reboot(boots)

    @rule()
    def validate(self) -> None:
        self._begin("validate")
        result = self.dev.ssh("validate")
        if result.returncode not in (0, 1):
            raise ModelViolation(f"validate: exit status {result.returncode}: {out(result)}")

    @rule()
    def revert(self) -> None:
        self._begin("revert")
        result = self.dev.ssh("revert")
        if result.returncode not in (0, 1):
            raise ModelViolation(f"revert: exit status {result.returncode}: {out(result)}")
        self.dev.settle()

    @rule()
    def same_firmware_upload(self) -> None:
        _, before = self._begin("same-upload")
        version = self.dev.status()["app"]["version"]
        fw = self.dev.firmwares.by_version.get(version)
        if fw is None:
            return
        result = self.dev.upload(fw.read_bytes())
        text = out(result)
        if result.returncode == 0 and "already running" not in text:
            raise ModelViolation(f"the running firmware was uploaded again and not recognised\n{text}")
        if result.returncode != 0 and not any(r in text for r in ALLOWED_REFUSALS):
            raise ModelViolation(f"the running firmware's upload was refused without a documented reason\n{text}")
        self.dev.settle()

    @invariant()
    def invariants_hold(self) -> None:
        self.dev.check()


MODEL_SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=True,  # a fixed sequence in CI; SSHFWUP_MODEL_EXAMPLES/STEPS or bench/soak.py for more
    database=None,
    suppress_health_check=list(HealthCheck),
    # no shrinking: a failure's message names the invariant, the device's state and the last
    # steps, and shrinking real devices would blow the suite's time budget
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)


@pytest.mark.model
def test_update_safety_model(fwup: str) -> None:
    print(f"\nupdate-safety model: {EXAMPLES} runs x up to {STEPS} steps, derandomized")
    started = time.monotonic()
    COVERED.clear()
    run_state_machine_as_test(UpdateSafety, settings=MODEL_SETTINGS)
    steps = sum(COVERED.values())
    print(f"{steps} steps in {time.monotonic() - started:.0f} s; {len(COVERED)} (state, event) pairs covered:")
    for (state, event), n in sorted(COVERED.items()):
        print(f"  {state:<40} {event:<28} {n}")
    assert steps >= EXAMPLES  # the machine really ran
