"""Configuration: defaults, the documented example, overrides, and clear errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rmiot.config import Config, ConfigError, load

REPO = Path(__file__).resolve().parent.parent
RMIOT = [sys.executable, "-m", "rmiot.cli"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMIOT_")}
    env.update(extra)
    return env


def test_example_file_documents_every_key_with_its_default() -> None:
    example = load(REPO / "deploy/rmiot.example.toml", environ={})
    defaults = load(None, environ={}) if not Path("rmiot.toml").exists() else Config()
    assert dataclasses.replace(example, source="x") == dataclasses.replace(defaults, source="x")
    text = (REPO / "deploy/rmiot.example.toml").read_text()
    for section in dataclasses.fields(Config):
        if section.name == "source":
            continue
        assert f"[{section.name}]" in text
        for key in dataclasses.fields(getattr(Config(), section.name)):
            assert f"\n{key.name} = " in text, f"{section.name}.{key.name} undocumented"


def test_environment_overrides_and_short_forms(tmp_path: Path) -> None:
    cfg = load(None, environ={"RMIOT_GRPC_PORT": "6001", "RMIOT_GRPC_TLS": "false",
                              "RMIOT_DSN": "host=db.example port=5433 dbname=x",
                              "RMIOT_MQTT_URL": "mqtt://broker:1883"})
    assert cfg.grpc.port == 6001 and cfg.grpc.tls is False
    assert cfg.database.dsn.startswith("host=db.example") and not cfg.database.private
    assert cfg.broker.url == "mqtt://broker:1883" and not cfg.broker.private


def test_file_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[grpc]\nport = 7000\n[platform]\nrole = "hospital"\n')
    cfg = load(path, environ={"RMIOT_GRPC_PORT": "7001"})
    assert cfg.grpc.port == 7001 and cfg.platform.role == "hospital"
    assert cfg.source == str(path)


@pytest.mark.parametrize(("text", "env", "names"), [
    ("[grpc]\nprot = 1\n", {}, "grpc.prot"),
    ("[grcp]\nport = 1\n", {}, "[grcp]"),
    ('[grpc]\nport = "x"\n', {}, "grpc.port must be an integer"),
    ("[grpc]\nport = 70000\n", {}, "grpc.port must be a port number"),
    ("[grpc]\nport = -1\n", {}, "grpc.port must be a port number"),
    ('[platform]\nrole = "city"\n', {}, "platform.role must be one of"),
    ("[grpc]\ntls = 1\n", {}, "grpc.tls must be true or false"),
    ("", {"RMIOT_GRPC_PORT": "abc"}, "environment RMIOT_GRPC_PORT"),
    ("", {"RMIOT_GRPC_PROT": "1"}, "grpc.prot"),
    ("", {"RMIOT_NOSUCH": "1"}, "RMIOT_NOSUCH"),
    ('[broker]\nurl = "http://x"\n', {}, "broker.url must start with mqtt://"),
    ("[grpc\n", {}, "not valid TOML"),
])
def test_bad_configuration_names_the_key(tmp_path: Path, text: str, env: dict[str, str],
                                         names: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path, environ=env)
    assert names in str(info.value)


def test_command_reports_bad_configuration_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[database]\nprot = 5432\n")
    out = subprocess.run([*RMIOT, "--config", str(path), "run"], capture_output=True,
                         text=True, env=_env(), timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "database.prot" in out.stderr and "Traceback" not in out.stderr


def test_command_reports_unreachable_database_by_endpoint(tmp_path: Path) -> None:
    # An external DSN on a port where nothing listens: start-up names it and stops.
    out = subprocess.run([*RMIOT, "run"], capture_output=True, text=True, timeout=60,
                         env=_env(RMIOT_DSN="host=127.0.0.1 port=9 dbname=rmiot user=x "
                                            "connect_timeout=2",
                                  RMIOT_MQTT_URL="mqtt://127.0.0.1:9"))
    assert out.returncode == 1, out.stderr
    assert "cannot reach the database at 127.0.0.1:9/rmiot" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml", environ={})
