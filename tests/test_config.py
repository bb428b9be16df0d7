"""Configuration: the documented defaults are the code's defaults; every bad value names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from sshfwup.config import Config, ConfigError, SocketSpec, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def test_documented_config_is_exactly_the_defaults() -> None:
    loaded = load_config(ROOT / "deploy" / "sshfwup.toml")
    assert loaded.source is not None
    assert {k: v for k, v in vars(loaded).items() if k != "source"} == {
        k: v for k, v in vars(Config()).items() if k != "source"
    }


def test_every_option_is_documented() -> None:
    text = (ROOT / "deploy" / "sshfwup.toml").read_text()
    from dataclasses import fields

    for section in ("server", "fwup", "device", "app", "inspect"):
        for f in fields(type(getattr(Config(), section))):
            assert f"\n{f.name} = " in text, f"[{section}] {f.name} is not documented in deploy/sshfwup.toml"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"server": {"port": "22"}}, "[server] port: expected an integer"),
        ({"server": {"port": 0}}, "[server] port: must be 1..65535"),
        ({"server": {"bogus": 1}}, "[server] bogus: unknown option"),
        ({"nope": {}}, "unknown section [nope]"),
        ({"device": {"slots": {"a": "/dev/x"}}}, "[device] slots: must name exactly the slots a and b"),
        ({"fwup": {"success_callback": "no_colon"}}, '[fwup] success_callback: expected "package.module:function"'),
        ({"app": {"ready": "maybe"}}, "[app] ready: must be one of notify, tcp, http"),
        ({"server": {"event_loop": "trio"}}, "[server] event_loop: must be one of asyncio, uvloop"),
        ({"app": {"sockets": ["udp:1.2.3.4:5"]}}, "[app] sockets: socket must start with tcp: or unix:"),
        ({"app": {"drain_timeout": -1}}, "[app] drain_timeout: must not be negative"),
        ({"app": {"rollback_after_crashes": -1}}, "[app] rollback_after_crashes: must not be negative"),
        ({"app": {"drain_timeout": float("inf")}}, "[app] drain_timeout: must be a finite number"),
        ({"server": {"idle_timeout": float("nan")}}, "[server] idle_timeout: must be a finite number"),
        ({"server": {"idle_timeout": 0}}, "[server] idle_timeout: must be more than 0 seconds"),
        ({"server": {"upload_timeout": -1}}, "[server] upload_timeout: must not be negative"),
        ({"server": {"max_startups": "10:30"}}, '[server] max_startups: expected "start:rate:full"'),
        ({"server": {"max_startups": "20:30:10"}}, "[server] max_startups: need 1 <= start <= full"),
        ({"server": {"max_startups_per_source": 0}}, "[server] max_startups_per_source: must be at least 1"),
        ({"app": {"capabilities": ["CAP_FLY"]}}, "[app] capabilities: unknown capability 'CAP_FLY'"),
        ({"app": {"cgroup": "sometimes"}}, '[app] cgroup: expected "auto", "off" or an absolute path'),
        ({"inspect": {"exclude": ["etc"]}}, "[inspect] exclude: 'etc' is not an absolute path"),
        ({"app": {"handoff": True, "strategy": "stop-first"}}, '[app] handoff: needs strategy = "overlap"'),
        ({"app": {"handoff_timeout": 0}}, "[app] handoff_timeout: must be more than 0 seconds"),
        ({"app": {"handoff_max_sockets": -1}}, "[app] handoff_max_sockets: must not be negative"),
        ({"server": {"authorized_keys": []}}, "[server] authorized_keys: at least one file is required"),
        (
            {"app": {"sockets": ["web=tcp:127.0.0.1:80"], "http_sockets": ["htp"]}},
            "[app] http_sockets: no socket named 'htp' in [app] sockets (named: web",
        ),
        ({"app": {"unavailable_after": -1}}, "[app] unavailable_after: must not be negative"),
    ],
)
def test_bad_values_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(data, source=Path("/etc/sshfwup.toml"))
    assert message in str(e.value)
    assert str(e.value).startswith("/etc/sshfwup.toml")


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[server]\nhost_key = "keys/host"\ndata_dir = "/abs"\n')
    c = load_config(f)
    assert c.server.host_key == tmp_path / "keys" / "host"
    assert c.server.data_dir == Path("/abs")


def test_socket_specs() -> None:
    assert SocketSpec.parse("tcp:127.0.0.1:8080") == SocketSpec("tcp", "127.0.0.1", 8080, "tcp-0")
    assert SocketSpec.parse("http=tcp:[::1]:80", index=2) == SocketSpec("tcp", "::1", 80, "http")
    assert SocketSpec.parse("unix:/run/app.sock") == SocketSpec("unix", "/run/app.sock", 0, "unix-0")
    assert str(SocketSpec.parse("tcp:[::1]:80")) == "tcp:[::1]:80"
    for bad in ("tcp:1.2.3.4", "tcp::80", "unix:", "tcp:host:port"):
        with pytest.raises(ValueError):
            SocketSpec.parse(bad)


def test_max_startups_forms() -> None:
    assert parse_config({"server": {"max_startups": "5:50:20"}}).server.max_startups == (5, 50, 20)
    assert parse_config({"server": {"max_startups": 12}}).server.max_startups == (12, 100, 12)
