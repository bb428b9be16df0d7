"""TOML configuration → frozen dataclasses.

Every option is documented, with its default, in ``deploy/sshfwup.toml``.
Every error names the file and the key, so an operator can fix it without reading code.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "CAPABILITIES",
    "AppConfig",
    "BootConfig",
    "UpdateConfig",
    "Config",
    "ConfigError",
    "DeviceConfig",
    "FwupConfig",
    "InspectConfig",
    "ServerConfig",
    "SocketSpec",
    "load_config",
    "parse_config",
]


class ConfigError(Exception):
    """The configuration file is missing, unreadable or holds a bad value."""


@dataclass(frozen=True)
class SocketSpec:
    """One listening socket the supervisor owns: ``tcp:HOST:PORT`` or ``unix:PATH``."""

    kind: Literal["tcp", "unix"]
    address: str  # host for tcp, path for unix
    port: int = 0
    name: str = ""  # LISTEN_FDNAMES entry; defaults to "kind-index"

    @classmethod
    def parse(cls, text: str, *, index: int = 0) -> "SocketSpec":
        name = ""
        if "=" in text.split(":", 1)[0]:
            # "http=tcp:127.0.0.1:8080" names the socket for LISTEN_FDNAMES
            name, text = text.split("=", 1)
        kind, _, rest = text.partition(":")
        if kind == "tcp":
            host, sep, port = rest.rpartition(":")
            if not sep or not port.isdigit() or not host:
                raise ValueError(f"expected tcp:HOST:PORT, got {text!r}")
            host = host.strip("[]")
            return cls("tcp", host, int(port), name or f"tcp-{index}")
        if kind == "unix":
            if not rest:
                raise ValueError(f"expected unix:PATH, got {text!r}")
            return cls("unix", rest, 0, name or f"unix-{index}")
        raise ValueError(f"socket must start with tcp: or unix:, got {text!r}")

    def __str__(self) -> str:
        if self.kind == "tcp":
            host = f"[{self.address}]" if ":" in self.address else self.address
            return f"tcp:{host}:{self.port}"
        return f"unix:{self.address}"


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "0.0.0.0"
    port: int = 22
    host_key: Path = Path("/data/sshfwup/ssh_host_ed25519_key")
    authorized_keys: tuple[Path, ...] = (Path("/data/sshfwup/authorized_keys"),)
    login_timeout: float = 20.0  # sshd's LoginGraceTime: from TCP connect to authenticated
    max_startups: tuple[int, int, int] = (10, 30, 60)  # sshd's MaxStartups start:rate:full
    max_startups_per_source: int = 3  # unauthenticated connections from one address (IPv6: /64)
    # connections over a start-up limit wait (unanswered) for room instead of being refused:
    startup_queue_per_source: int = 32  # from one address: a burst of 30 `ssh HOST status` fits
    startup_queue: int = 64  # in all
    penalty_exempt: tuple[str, ...] = ()  # networks never penalised (sshd's PerSourcePenaltyExemptList)
    max_connections: int = 8  # authenticated connections
    session_idle_timeout: float = 120.0  # an authenticated connection with nothing running
    max_upload_size: int = 0  # bytes; 0 = unlimited
    idle_timeout: float = 300.0  # an upload that sends nothing for this long is aborted
    upload_timeout: float = 3600.0  # a whole upload, from taking the update lock to its end; 0 = unlimited
    front_idle_exit: float = 0.0  # > 0: the SSH front exits after this long without connections; started again by the next one
    front_hang_timeout: float = 30.0  # the SSH front silent this long (it says it is alive every third of it): killed, restarted
    data_dir: Path = Path("/data/sshfwup")
    run_dir: Path = Path("/run/sshfwup")
    lock_file: Path = Path("/run/sshfwup/update.lock")
    event_loop: str = "asyncio"  # "uvloop": the optional extra sshfwup[uvloop] (less CPU per upload)


@dataclass(frozen=True)
class FwupConfig:
    path: str = "fwup"
    devpath: Path = Path("/dev/mmcblk0")
    task: str = "upgrade"
    env: tuple[tuple[str, str], ...] = ()
    extra_args: tuple[str, ...] = ()
    public_keys: tuple[Path, ...] = ()
    precheck_callback: str = ""
    success_callback: str = "sshfwup.update.pipeline:run"


@dataclass(frozen=True)
class DeviceConfig:
    fw_env_config: Path = Path("/etc/fw_env.config")
    fw_printenv: str = "fw_printenv"
    fw_setenv: str = "fw_setenv"
    root_mount: Path = Path("/")  # where the running root is mounted
    slots: tuple[tuple[str, Path], ...] = (("a", Path("/dev/mmcblk0p1")), ("b", Path("/dev/mmcblk0p2")))
    rootfs_type: str = "squashfs"
    reboot_command: tuple[str, ...] = ("reboot",)
    reboot_delay: float = 0.5  # seconds between closing the uploader's channel and rebooting

    def slot_device(self, slot: str) -> Path:
        for name, dev in self.slots:
            if name == slot:
                return dev
        raise KeyError(slot)

    @property
    def slot_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.slots)


#: linux/capability.h, by name: the names ``[app] capabilities`` accepts, and the numbers the app's
#: room (:mod:`sshfwup.supervisor.room`) keeps in its bounding set and raises as ambient.
CAPABILITIES: dict[str, int] = {
    f"CAP_{name}": number
    for number, name in enumerate(
        "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE "
        "NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO "
        "SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME "
        "SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG "
        "WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE".split()
    )
}


@dataclass(frozen=True)
class AppConfig:
    command: tuple[str, ...] = ()  # empty: no application is supervised
    app_dir: str = "/srv/app"  # inside the root filesystem
    env: tuple[tuple[str, str], ...] = ()
    sockets: tuple[SocketSpec, ...] = ()
    ready: Literal["notify", "tcp", "http"] = "notify"
    ready_path: str = "/health"  # for ready = "http"
    ready_timeout: float = 30.0
    drain_timeout: float = 30.0
    observe: float = 10.0
    health_interval: float = 0.5
    # Saturated is not dead (issue #20): a version is unhealthy when it makes no progress, not
    # when one probe waits behind busy workers. A public socket whose probe connection waits while
    # nothing at all is accepted for stall_timeout seconds, or a health check that does not answer
    # within it, means dead; an answer that says unhealthy counts after health_failures in a row.
    stall_timeout: float = 5.0
    health_failures: int = 3
    strategy: Literal["overlap", "stop-first"] = "overlap"
    revert_on_failure: bool = True  # revert the boot env when a hot swap fails
    restart_backoff: tuple[float, float] = (0.5, 30.0)  # first and maximum delay
    # A hot-swapped version that crashes this many times in a row goes back to the running root's
    # firmware (0: never; it keeps being restarted)
    rollback_after_crashes: int = 3
    user: str = "sshfwup-app"  # "" = the server's own user (not for devices)
    group: str = ""  # "" = the user's primary group
    supplementary_groups: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ()  # kept in the bounding set and raised as ambient
    pass_env: tuple[str, ...] = ()  # names of the server's environment variables the app gets
    cgroup: str = "auto"  # "auto", "off", or a cgroup2 directory for the instances' cgroups
    # State and connection hand-off during a swap (sshfwup.app.handoff; the app must speak it)
    handoff: bool = False
    handoff_timeout: float = 5.0  # seconds for the transfer, and again for the new version's answer
    handoff_max_state: int = 16 * 1024 * 1024  # bytes
    handoff_max_sockets: int = 256
    # While no version runs (crashed, waiting for its restart; or it does not start), the
    # supervisor answers on the public sockets itself once this many seconds passed without one
    # (sshfwup.supervisor.unavailable): "503 Service Unavailable" and the reason on the sockets named in
    # http_sockets, a reset on the others. Sooner, connections wait in the queue for the restart.
    http_sockets: tuple[str, ...] = ("http",)
    unavailable_after: float = 1.0


@dataclass(frozen=True)
class InspectConfig:
    manifest: str = "/usr/share/sshfwup/manifest.json"
    marker: str = "/srv/app/HOT_RELOAD"
    app_dirs: tuple[str, ...] = ()  # default: (app.app_dir,)
    interpreter: tuple[str, ...] = ("/usr/bin/python3*", "/usr/lib/python3*")
    exclude: tuple[str, ...] = ()  # paths never compared (the manifest and marker always are not)
    max_manifest_size: int = 16 * 1024 * 1024
    max_manifest_entries: int = 100_000
    hash_timeout: float = 60.0  # seconds to hash the new slot's app files


@dataclass(frozen=True)
class UpdateConfig:
    allow_downgrade: bool = False  # an upload older than the running firmware is refused unless true


@dataclass(frozen=True)
class BootConfig:
    # Which bootloader contract the boot environment speaks (sshfwup.boot.backends): what boots
    # next, what validates, how a revert keeps the bootloader's fallback.
    contract: str = "uboot-bootcount"
    # contract = "fwup-ops" (sshfwup.boot.fwup_ops): the system's ops archive and its tasks. In a
    # task name {slot} is the slot the change is about and {running} the running slot; "" for
    # status_task/tryboot_task/prevent_revert_task: the system has no such task.
    ops_archive: Path = Path("/usr/share/fwup/ops.fw")
    ops_device: str = ""  # "" = [fwup] devpath
    reboot_param_path: str = ""  # "" = fwup's default (/run/systemd/reboot-param, /run/reboot-param)
    status_task: str = "status"
    validate_task: str = "validate"
    revert_task: str = "revert"
    tryboot_task: str = "tryboot"
    prevent_revert_task: str = "prevent-revert"
    ops_timeout: float = 30.0


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    fwup: FwupConfig = field(default_factory=FwupConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    app: AppConfig = field(default_factory=AppConfig)
    inspect: InspectConfig = field(default_factory=InspectConfig)
    boot: BootConfig = field(default_factory=BootConfig)
    source: Path | None = None

    @property
    def app_dirs(self) -> tuple[str, ...]:
        return self.inspect.app_dirs or (self.app.app_dir,)


# --- parsing -------------------------------------------------------------------------------

_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "fwup": FwupConfig,
    "update": UpdateConfig,
    "device": DeviceConfig,
    "app": AppConfig,
    "inspect": InspectConfig,
    "boot": BootConfig,
}


def load_config(path: str | os.PathLike[str]) -> Config:
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse_config(data, source=path)


def parse_config(data: dict[str, Any], *, source: Path | None = None) -> Config:
    where = str(source) if source else "<config>"
    base = source.parent if source else Path.cwd()
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"{where}: unknown section [{sorted(unknown)[0]}] (known: {', '.join(_SECTIONS)})")
    sections = {
        name: _section(cls, data.get(name, {}), f"{where}: [{name}]", base) for name, cls in _SECTIONS.items()
    }
    config = Config(**sections, source=source)
    _check(config, where)
    return config


def _section(cls: type, raw: Any, where: str, base: Path) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    known = {f.name.replace("_", "-"): f for f in fields(cls)} | {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        f = known.get(key)
        if f is None:
            raise ConfigError(f"{where} {key}: unknown option")
        try:
            values[f.name] = _convert(f.name, f.type, value, base)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where} {key}: {e}") from None
    return cls(**values)


def _path(value: Any, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise TypeError(f"expected a path string, got {value!r}")
    p = Path(value)
    return p if p.is_absolute() else base / p


def _str_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"expected a list of strings, got {value!r}")
    return tuple(value)


def _networks(value: Any) -> tuple[str, ...]:
    """Addresses or networks (``192.0.2.0/24``, ``2001:db8::/48``), each checked, as written."""
    for text in _str_list(value):
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not an address or network (e.g. 192.0.2.0/24, 2001:db8::/48)") from None
    return _str_list(value)


def _str_map(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise TypeError(f"expected a table of strings, got {value!r}")
    out = []
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise TypeError(f"value of {k!r} must be a string, got {v!r}")
        out.append((str(k), str(v)))
    return tuple(out)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected {what}, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):  # TOML has inf and nan
        raise ValueError(f"must be a finite number (every wait has a limit), got {value!r}")
    if value < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return value


def _max_startups(value: Any) -> tuple[int, int, int]:
    """sshd's MaxStartups: ``"start:rate:full"``, or one number N (= ``"N:100:N"``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, 100, value)
    parts = value.split(":") if isinstance(value, str) else []
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f'expected "start:rate:full" (e.g. "10:30:60") or a number, got {value!r}')
    start, rate, full = (int(p) for p in parts)
    if not (1 <= start <= full and rate <= 100):
        raise ValueError(f"need 1 <= start <= full and rate <= 100 (percent), got {value!r}")
    return (start, rate, full)


def _convert(name: str, typ: Any, value: Any, base: Path) -> Any:
    t = str(typ)
    if name == "slots":
        return tuple((slot, _path(dev, base)) for slot, dev in _str_map(value))
    if name == "sockets":
        return tuple(SocketSpec.parse(s, index=i) for i, s in enumerate(_str_list(value)))
    if name == "max_startups":
        return _max_startups(value)
    if name == "penalty_exempt":
        return _networks(value)
    if name == "restart_backoff":
        if not isinstance(value, list) or len(value) != 2:
            raise TypeError(f"expected [first, maximum] seconds, got {value!r}")
        return (_number(value[0], "seconds"), _number(value[1], "seconds"))
    if name in ("ready", "strategy", "event_loop"):
        allowed = {"ready": ("notify", "tcp", "http"), "strategy": ("overlap", "stop-first"),
                   "event_loop": ("asyncio", "uvloop")}[name]  # fmt: skip
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {value!r}")
        return value
    if t == "Path":
        return _path(value, base)
    if t == "tuple[Path, ...]":
        return tuple(_path(v, base) for v in _str_list(value))
    if t == "tuple[str, ...]":
        return _str_list(value)
    if t == "tuple[tuple[str, str], ...]":
        return _str_map(value)
    if t == "bool":
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        return value
    if t == "int":
        return int(_number(value, "an integer"))
    if t == "float":
        return float(_number(value, "a number of seconds"))
    if t == "str":
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported option type {t}")  # pragma: no cover - programming error


_OPS_KEYS = ("ops_archive", "ops_device", "reboot_param_path", "status_task", "validate_task", "revert_task",
             "tryboot_task", "prevent_revert_task", "ops_timeout")


def _check_boot(config: Config, where: str) -> None:
    """``[boot]``: the ops settings only with ``fwup-ops``, and sound there."""
    from sshfwup.boot.fwup_ops import task_name_problem

    boot, default = config.boot, BootConfig()
    if boot.contract != "fwup-ops":
        changed = [key for key in _OPS_KEYS if getattr(boot, key) != getattr(default, key)]
        if changed:
            raise ConfigError(f'{where}: [boot] {changed[0]}: only used with contract = "fwup-ops" '
                              f"(this configuration says {boot.contract!r})")  # fmt: skip
        return
    for key in ("ops_device", "reboot_param_path"):
        value = getattr(boot, key)
        if value and not value.startswith("/"):
            raise ConfigError(f"{where}: [boot] {key}: must be an absolute path, got {value!r}")
    for key in ("validate_task", "revert_task"):
        if not getattr(boot, key):
            raise ConfigError(f"{where}: [boot] {key}: the fwup-ops contract needs this task of the ops archive")
    for key in ("status_task", "validate_task", "revert_task", "tryboot_task", "prevent_revert_task"):
        problem = task_name_problem(getattr(boot, key))
        if problem:
            raise ConfigError(f"{where}: [boot] {key}: {problem}")
    if boot.ops_timeout <= 0:
        raise ConfigError(f"{where}: [boot] ops_timeout: must be more than 0 seconds")


def _check_upload_bounds(server: ServerConfig, where: str) -> None:
    # the bounds every upload transport is held to (sshfwup/update/intake.py); negative values
    # are refused for every number already
    if not server.idle_timeout > 0:
        raise ConfigError(f"{where}: [server] idle_timeout: must be more than 0 seconds")
    if server.front_idle_exit < 0:
        raise ConfigError(f"{where}: [server] front_idle_exit: must not be negative (0: the SSH front always runs)")
    if not server.front_hang_timeout >= 3:
        raise ConfigError(f"{where}: [server] front_hang_timeout: must be at least 3 seconds")


def _check(config: Config, where: str) -> None:
    from sshfwup.boot.backends import CONTRACTS

    if config.boot.contract not in CONTRACTS:
        raise ConfigError(
            f"{where}: [boot] contract: unknown boot contract {config.boot.contract!r} "
            f"(known: {', '.join(repr(c) for c in CONTRACTS)})"
        )
    _check_boot(config, where)
    if not 0 < config.server.port < 65536:
        raise ConfigError(f"{where}: [server] port: must be 1..65535, got {config.server.port}")
    if not config.server.authorized_keys:
        raise ConfigError(f"{where}: [server] authorized_keys: at least one file is required")
    if config.server.max_connections < 1:
        raise ConfigError(f"{where}: [server] max_connections: must be at least 1")
    for key in ("max_startups_per_source", "startup_queue_per_source", "startup_queue"):
        if getattr(config.server, key) < (1 if key == "max_startups_per_source" else 0):
            raise ConfigError(f"{where}: [server] {key}: must be at least {1 if key == 'max_startups_per_source' else 0}")
    _check_upload_bounds(config.server, where)
    slots = config.device.slot_names
    if sorted(slots) != ["a", "b"]:
        raise ConfigError(f"{where}: [device] slots: must name exactly the slots a and b, got {list(slots)}")
    for cb in ("precheck_callback", "success_callback"):
        value = getattr(config.fwup, cb)
        if value and ":" not in value:
            raise ConfigError(f'{where}: [fwup] {cb}: expected "package.module:function", got {value!r}')
    if not config.device.reboot_command:
        raise ConfigError(f"{where}: [device] reboot_command: must not be empty")
    app = config.app
    if app.command and not app.app_dir.startswith("/"):
        raise ConfigError(f"{where}: [app] app_dir: must be an absolute path inside the root filesystem")
    unknown = [c for c in app.capabilities if c.upper() not in CAPABILITIES]
    if unknown:
        raise ConfigError(f"{where}: [app] capabilities: unknown capability {unknown[0]!r} (e.g. CAP_NET_RAW)")
    if app.handoff and app.strategy != "overlap":
        raise ConfigError(f'{where}: [app] handoff: needs strategy = "overlap" (both versions run during a hand-off)')
    if app.stall_timeout <= 0:
        raise ConfigError(f"{where}: [app] stall_timeout: must be more than 0 seconds")
    if app.health_failures < 1:
        raise ConfigError(f"{where}: [app] health_failures: must be at least 1")
    if app.handoff_timeout <= 0:
        raise ConfigError(f"{where}: [app] handoff_timeout: must be more than 0 seconds")
    names = [spec.name for spec in app.sockets]
    unknown_http = [name for name in app.http_sockets if name not in names]
    if unknown_http and app.http_sockets != AppConfig.http_sockets:  # the default may name none
        raise ConfigError(
            f"{where}: [app] http_sockets: no socket named {unknown_http[0]!r} in [app] sockets"
            f" (named: {', '.join(names) or 'none'}; name one as \"http=tcp:HOST:PORT\")"
        )
    if app.cgroup not in ("auto", "off") and not app.cgroup.startswith("/"):
        raise ConfigError(f'{where}: [app] cgroup: expected "auto", "off" or an absolute path, got {app.cgroup!r}')
    for path in config.inspect.exclude:
        if not path.startswith("/"):
            raise ConfigError(f"{where}: [inspect] exclude: {path!r} is not an absolute path")
    if config.inspect.max_manifest_entries < 1 or config.inspect.max_manifest_size < 1024:
        raise ConfigError(f"{where}: [inspect] max_manifest_size/max_manifest_entries: too small to hold a manifest")
