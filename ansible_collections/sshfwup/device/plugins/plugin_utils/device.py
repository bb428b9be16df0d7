# -*- coding: utf-8 -*-
# Copyright: sshfwup developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Controller side shared by the action plugins: who to connect to, and sshfwup's client.

The connection parameters come from the task's arguments, else from the inventory's
connection variables (ansible_host, ansible_port, ansible_user, ansible_ssh_private_key_file,
ansible_host_key_checking), so an inventory written for ssh works unchanged.
"""

from __future__ import annotations

import os
from typing import Any

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase

try:
    from sshfwup.dependency_warnings import silence

    silence()  # dependencies' warnings (at asyncssh's import) would print in the play's output
    from sshfwup.host import fleet
except ImportError as e:  # the controller's Python lacks sshfwup
    fleet = None
    FLEET_IMPORT_ERROR: str | None = str(e)
else:
    FLEET_IMPORT_ERROR = None


def require_fleet() -> Any:
    if fleet is None:
        raise AnsibleActionFail(
            "the sshfwup Python package is not importable by the Python that runs ansible-playbook "
            f"({FLEET_IMPORT_ERROR}); install it there: pip install 'sshfwup[fleet]'"
        )
    return fleet


def _var(task_vars: dict[str, Any], templar: Any, *names: str) -> Any:
    for name in names:
        value = task_vars.get(name)
        if value is not None and value != "":
            return templar.template(value)
    return None


def _truth(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def device_address(args: dict[str, Any], task_vars: dict[str, Any], templar: Any) -> Any:
    """sshfwup.host.fleet.DeviceAddress from the task arguments, else the inventory's variables."""
    module = require_fleet()
    host = args.get("host") or _var(task_vars, templar, "ansible_host", "inventory_hostname")
    port = args.get("port") or _var(task_vars, templar, "ansible_port", "ansible_ssh_port") or 22
    user = args.get("user") or _var(task_vars, templar, "ansible_user", "ansible_ssh_user")
    key = args.get("key") or _var(task_vars, templar, "ansible_ssh_private_key_file", "ansible_private_key_file")
    checking = args.get("host_key_checking")
    if checking is None:
        found = _var(task_vars, templar, "ansible_host_key_checking", "ansible_ssh_host_key_checking")
        checking = True if found is None else _truth(found)
    known_hosts: Any = ()
    if not checking:
        known_hosts = None
    elif args.get("known_hosts"):
        known_hosts = str(args["known_hosts"])
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise AnsibleActionFail(f"port {port!r}: not a number") from None
    identities = (os.path.expanduser(str(key)),) if key else ()
    return module.DeviceAddress(str(host), port, str(user) if user else None, identities, known_hosts)


class DeviceAction(ActionBase):
    """What every sshfwup.device action shares: the arguments checked against ``ARGS``, the
    device's address, and a FleetError turned into a failed (or unreachable) result."""

    TRANSFERS_FILES = False
    _supports_check_mode = True
    _supports_async = False
    ARGS: dict[str, Any] = {}

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        result = super().run(tmp, task_vars)
        del tmp
        _validation, args = self.validate_argument_spec(argument_spec=self.ARGS)
        module = require_fleet()
        address = device_address(args, task_vars or {}, self._templar)
        if not 0 < address.port < 65536 or not args["timeout"] > 0:
            result.update(failed=True, changed=False,
                          msg=f"port {address.port} / timeout {args['timeout']:g}: out of range")  # fmt: skip
            return result
        try:
            result.update(self.act(module, address, args))
        except module.FleetError as e:
            if e.result is not None:
                result.update(e.result.to_json())
            result.update(changed=self.changed_despite(e), msg=str(e))
            # unreachable, not failed: Ansible counts a result that says both as failed
            result["unreachable" if isinstance(e, module.DeviceUnreachable) else "failed"] = True
        return result

    def act(self, fleet: Any, address: Any, args: dict[str, Any]) -> dict[str, Any]:
        """The action's own work: what goes into the result (raises fleet.FleetError)."""
        raise NotImplementedError

    def changed_despite(self, error: Any) -> bool:
        """Whether the device changed although the action failed."""
        return bool(error.result is not None and getattr(error.result, "changed", False))
