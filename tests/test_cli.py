"""The ``rmiot`` command covers every operator task, each with ``--help``, and
its exit codes are what scripts rely on (0 done, 1 failed, 2 bad usage)."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg
import pytest

from rmiot.config import Config
from rmiot.registry import store
from rmiot.tenants import store as tenants_store

RMIOT = [sys.executable, "-m", "rmiot.cli"]
# The operator tasks of issue 10, as command lines that must offer --help.
TASKS = [["status"], ["db"], ["certs"], ["certs", "issue"], ["tenants"], ["devices", "import"],
         ["devices", "export"], ["credentials"], ["credentials", "issue"], ["credentials", "key"],
         ["simulate"], ["dataset"], ["query"], ["alarms"], ["audit", "verify"], ["frame"],
         ["run"], ["users"], ["backup"], ["config"]]


def _rmiot(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RMIOT, *args], capture_output=True, text=True, timeout=120,
                          env=env or os.environ.copy())


@pytest.mark.parametrize("task", TASKS, ids=" ".join)
def test_every_operator_task_has_help(task: list[str]) -> None:
    done = _rmiot(*task, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: rmiot " + " ".join(task))


def test_bad_usage_is_exit_code_2() -> None:
    done = _rmiot("credentials", "frobnicate")
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_credentials_round_trip(database: str, base_cfg: Config) -> None:
    env = {**os.environ, "RMIOT_DATABASE_NAME": base_cfg.database.name}
    with psycopg.connect(database, autocommit=True) as conn:
        region = tenants_store.create_tenant(conn, f"cli-r-{os.getpid()}", "CLI region",
                                             "region")
        tenant = tenants_store.create_tenant(conn, f"cli-{os.getpid()}", "CLI hospital",
                                             "hospital", region)
        device = store.register_device(conn, tenant, serial_no="cli-device")
    issued = _rmiot("credentials", "issue", str(device), env=env)
    assert issued.returncode == 0, issued.stderr
    username = issued.stdout.split()[1]
    assert issued.stdout.splitlines()[1].startswith("password ")
    listed = _rmiot("credentials", "list", "--device", str(device), env=env)
    assert listed.stdout.split() == [username, str(device)]
    key = _rmiot("credentials", "key", str(device), "--overlap-s", "0", env=env)
    assert key.returncode == 0 and len(key.stdout.split()[-1]) == 64  # 32 bytes, hex
    assert _rmiot("credentials", "revoke", str(device), env=env).stdout.startswith("1 ")
    assert _rmiot("credentials", "list", "--device", str(device), env=env).stdout == ""
    missing = _rmiot("credentials", "issue", "999999999999", env=env)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    with psycopg.connect(database, autocommit=True) as conn:
        audited = conn.execute("SELECT method, outcome FROM audit_log WHERE object = %s "
                               "ORDER BY id", (f"device:{device}",)).fetchall()
    assert audited == [("rmiot credentials issue", "ok"), ("rmiot credentials key", "ok"),
                       ("rmiot credentials revoke", "ok")]
