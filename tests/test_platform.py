"""`rmiot run` brings the platform up, `rmiot status` sees it, Ctrl-C stops it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rmiot.config import Config
from tests.conftest import free_port

pytestmark = pytest.mark.slow


def test_run_status_and_clean_stop(database: str, mqtt: tuple[str, int],
                                   dev_certs: Config) -> None:
    env = {**os.environ, "RMIOT_DATABASE_NAME": dev_certs.database.name,
           "RMIOT_GRPC_PORT": str(free_port()),
           "RMIOT_GRPC_MTLS_PORT": str(free_port()), "RMIOT_DASHBOARD_PORT": str(free_port()),
           "RMIOT_INGEST_TCP_PORT": str(free_port()), "RMIOT_LOG_FORMAT": "json"}
    rmiot = [sys.executable, "-m", "rmiot.cli"]
    with subprocess.Popen([*rmiot, "run"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        stderr = _run_until_interrupted(proc, rmiot, env)
    assert proc.returncode == 0
    assert "Traceback" not in stderr
    events = [json.loads(line)["msg"] for line in stderr.splitlines() if line.startswith("{")]
    assert events[-1] == "platform stopped"

    down = subprocess.run([*rmiot, "status"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert down.returncode == 3 and "DOWN  grpc api" in down.stdout


def _run_until_interrupted(proc: subprocess.Popen[str], rmiot: list[str],
                           env: dict[str, str]) -> str:
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        banner = "".join(lines)
        assert "platform is up" in banner, banner + (proc.stderr.read() if proc.poll() else "")
        assert f"grpcs://127.0.0.1:{env['RMIOT_GRPC_PORT']}" in banner

        status = subprocess.run([*rmiot, "status", "--json"], env=env, capture_output=True,
                                text=True, timeout=60)
        checks = {c["name"]: c for c in json.loads(status.stdout)}
        assert status.returncode == 0, checks
        assert set(checks) == {"database", "mqtt broker", "rmf tcp", "grpc api", "grpc mtls"}
        assert "TimescaleDB" in checks["database"]["detail"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    return proc.stderr.read() if proc.stderr else ""
