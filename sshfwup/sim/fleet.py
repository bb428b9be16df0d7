"""A fleet of simulated devices on 127.0.0.1, for fleet roll-out tests and benchmarks.

``SimFleet.start(base, firmwares, key)`` makes one device per firmware (each provisioned with it,
like a factory would, with its own SSH and app port), powers them all on and waits until every
server is ready; ``close()`` powers them off and removes every mount, loop device and process,
also when start-up failed halfway. It writes what a controller needs: a known_hosts file with
every device's host key (from OpenSSH's ``ssh-keyscan``) and an Ansible inventory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from .device import SimDevice, cleanup
from .host import KeyPair, free_port
from .machine import SimMachine

__all__ = ["FleetDevice", "SimFleet", "ansible_environment", "ansible_tool", "rollout_command"]

BOOT_TIMEOUT = 60.0
REPO = Path(__file__).resolve().parents[2]
ROLLOUT = REPO / "deploy" / "ansible" / "rollout.yml"
ANSIBLE_CFG = REPO / "deploy" / "ansible" / "ansible.cfg"


def ansible_environment(workdir: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Ansible's commands: the shipped ansible.cfg (it finds the collection in
    this repository), Ansible's own files under ``workdir``, this Python's ansible-core first."""
    environment = dict(
        os.environ,
        ANSIBLE_CONFIG=str(ANSIBLE_CFG),
        ANSIBLE_HOME=str(workdir / "ansible-home"),
        ANSIBLE_LOCAL_TEMP=str(workdir / "ansible-tmp"),
        ANSIBLE_NOCOLOR="1",
        PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    )
    environment.update(env or {})
    return environment


def ansible_tool(name: str) -> str:
    """This Python's ``ansible-playbook`` (or another of ansible-core's commands)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pip install 'sshfwup[fleet]' (ansible-core)")
    return str(path)


def rollout_command(workdir: Path, inventory: Path, firmware: Path | str, *args: str,
                    env: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, str]]:  # fmt: skip
    """``ansible-playbook -i INVENTORY deploy/ansible/rollout.yml -e firmware=FW ARGS``, and its environment."""
    argv = [ansible_tool("ansible-playbook"), "-i", str(inventory), str(ROLLOUT), "-e", f"firmware={firmware}", *args]
    return argv, ansible_environment(workdir, env)


@dataclass(frozen=True)
class FleetDevice:
    name: str
    device: SimDevice
    machine: SimMachine

    @property
    def ssh_port(self) -> int:
        return self.device.ssh_port

    @property
    def app_port(self) -> int:
        return self.device.app_port


class SimFleet:
    def __init__(self, base: Path, key: KeyPair) -> None:
        self.base = Path(base)
        self.key = key
        self.devices: list[FleetDevice] = []
        self.known_hosts = self.base / "known_hosts"
        self._paths: list[Path] = []  # every device directory made or being made

    @classmethod
    def start(
        cls,
        base: Path,
        firmwares: Sequence[Path],
        key: KeyPair,
        *,
        fwup: str | None = None,
        config_overrides: Mapping[str, Any] | None = None,
        prefix: str = "dev",
    ) -> SimFleet:
        """Devices ``{prefix}1..N`` (one per firmware), up and ready; closes them all on failure."""
        fleet = cls(base, key)
        try:
            for i, fw in enumerate(firmwares, 1):
                name = f"{prefix}{i}"
                fleet._paths.append(fleet.base / name)
                device = SimDevice.create(
                    fleet.base / name, firmware=fw, fwup=fwup, authorized_keys=[key.public_line],
                    ssh_port=free_port(), app_port=free_port(), config_overrides=config_overrides,
                )  # fmt: skip
                fleet.devices.append(FleetDevice(name, device, SimMachine.start(device.path)))
            anyio.run(fleet._wait_up)
            fleet._scan_host_keys()
        except BaseException:
            fleet.close()
            raise
        return fleet

    async def _wait_up(self) -> None:
        async with anyio.create_task_group() as tg:
            for d in self.devices:
                tg.start_soon(lambda m=d.machine: m.wait_up(timeout=BOOT_TIMEOUT))

    def _scan_host_keys(self) -> None:
        lines = []
        for d in self.devices:
            result = subprocess.run(
                ["ssh-keyscan", "-T", "10", "-t", "ed25519", "-p", str(d.ssh_port), "127.0.0.1"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            found = [line for line in result.stdout.splitlines() if line and not line.startswith("#")]
            if not found:
                raise RuntimeError(f"ssh-keyscan found no host key on {d.name} (port {d.ssh_port}): {result.stderr}")
            lines += found
        self.known_hosts.write_text("".join(f"{line}\n" for line in lines))

    def __getitem__(self, name: str) -> FleetDevice:
        return next(d for d in self.devices if d.name == name)

    def inventory(self, names: Sequence[str] | None = None, *, group: str = "devices",
                  extra_hosts: Mapping[str, Mapping[str, Any]] | None = None) -> str:  # fmt: skip
        """An Ansible YAML inventory of the devices (``names``, in that order), plus ``extra_hosts``."""
        import json

        chosen = [self[n] for n in names] if names is not None else self.devices
        hosts: dict[str, Mapping[str, Any]] = {
            d.name: {"ansible_host": "127.0.0.1", "ansible_port": d.ssh_port, "app_port": d.app_port} for d in chosen
        }
        hosts.update(extra_hosts or {})
        document = {
            group: {
                "hosts": hosts,
                "vars": {
                    "ansible_user": "root",
                    "ansible_ssh_private_key_file": str(self.key.private),
                    "sshfwup_known_hosts": str(self.known_hosts),
                },
            }
        }
        return json.dumps(document, indent=2) + "\n"  # JSON is YAML

    def close(self) -> None:
        """Power every device off and clean up after it (each one, whatever the others do)."""

        async def power_off_all() -> None:
            async with anyio.create_task_group() as tg:
                for d in self.devices:
                    tg.start_soon(self._power_off, d)

        try:
            anyio.run(power_off_all)
        finally:
            for path in self._paths:
                cleanup(path)

    @staticmethod
    async def _power_off(d: FleetDevice) -> None:
        try:
            await d.machine.__aexit__(None, None, None)
        except Exception:  # noqa: BLE001 - the other devices still get powered off; cleanup follows
            import logging

            logging.getLogger(__name__).exception("powering off %s failed", d.name)

    def __enter__(self) -> SimFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
