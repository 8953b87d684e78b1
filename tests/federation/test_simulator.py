"""The city simulator against a real ingest service: registers its city once
(a second start finds it), every kind of device reports at its rate, frames
are acknowledged, and abnormal vitals show up when episodes are frequent."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import re
import signal
import subprocess
import sys

import psycopg
import pytest

from rmiot.config import Config
from rmiot.deploy import broker_auth
from rmiot.ingest import city, simulator
from rmiot.ingest.service import IngestService
from rmiot.security.sm4 import Keyring
from tests.conftest import eventually, free_port


async def test_a_small_city_reports_and_is_acknowledged(base_cfg: Config, database: str,
                                                        keyring: Keyring) -> None:
    cfg = dataclasses.replace(
        base_cfg, ingest=dataclasses.replace(base_cfg.ingest, tcp_port=0, batch_max_ms=5),
        security=dataclasses.replace(base_cfg.security, keyring_dir=str(keyring.directory)))
    ingest = IngestService(cfg)
    port = await ingest.start()
    try:
        sim = await simulator.start_simulation(cfg, "small", hospitals=2, port=port, speed=30,
                                               abnormal_per_hour=3600)
        out = io.StringIO()
        progress = asyncio.create_task(simulator.report(sim, out, 0.5))
        try:
            await eventually(lambda: sim.stats["ok"] >= 1500, 20, 0.1)
        finally:
            progress.cancel()
            await sim.stop()
        again = await simulator.start_simulation(cfg, "small", hospitals=2, port=port)
        await again.stop()
    finally:
        await ingest.stop(drain_timeout=5)
    assert "frames/s" in out.getvalue() and "2 hospitals" in out.getvalue()
    shape = city.CITIES["small"]
    assert sim.devices == 2 * shape.scale * sum(k.per_hospital for k in city.KINDS)
    assert [h.tenant for h in again.hospitals] == [h.tenant for h in sim.hospitals]
    assert [d.id for h in again.hospitals for d in h.devices] == \
        [d.id for h in sim.hospitals for d in h.devices]
    assert not any(k.startswith("refused_") for k in sim.stats)
    assert sim.stats["abnormal"] > 0 and sim.stats["episodes"] > 0
    ids = [d.id for h in sim.hospitals for d in h.devices]
    with psycopg.connect(database, autocommit=True) as conn:
        kinds: dict[int, int] = dict(conn.execute(
            "SELECT kind, count(*) FROM telemetry WHERE device_id = ANY(%s) GROUP BY kind",
            (ids,)).fetchall())
        reporting = conn.execute(
            "SELECT count(DISTINCT device_id) FROM telemetry WHERE device_id = ANY(%s)",
            (ids,)).fetchone()
    assert set(kinds) == {1, 3}  # telemetry and RFID locations
    assert reporting is not None and reporting[0] >= len(ids) * 0.9  # (60 s kinds at 30x: 2 s)


@pytest.mark.slow
def test_make_run_feeds_the_platform_a_simulated_city(database: str, mqtt: tuple[str, int],
                                                      dev_certs: Config) -> None:
    """``rmiot run --simulate small`` with the MQTT and HTTP adapters on (what
    ``make run`` starts): the platform comes up, the city reports over RMF TCP,
    MQTT and HTTP with live rates, Ctrl-C stops both cleanly."""
    root = f"t-{dev_certs.database.name}-run"
    env = {**os.environ, "RMIOT_DATABASE_NAME": dev_certs.database.name,
           "RMIOT_GRPC_PORT": str(free_port()), "RMIOT_GRPC_MTLS_PORT": str(free_port()),
           "RMIOT_INGEST_TCP_PORT": str(free_port()), "RMIOT_INGEST_PROCESSES": "1",
           "RMIOT_MQTT_ENABLED": "true", "RMIOT_MQTT_TOPIC_ROOT": root,
           "RMIOT_MQTT_SHARE_GROUP": root, "RMIOT_HTTP_ENABLED": "true",
           "RMIOT_HTTP_PORT": str(free_port()), "RMIOT_DASHBOARD_PORT": str(free_port()),
           "RMIOT_LOG_FORMAT": "json", "RMIOT_LOG_LEVEL": "warning"}
    with subprocess.Popen([sys.executable, "-m", "rmiot.cli", "run", "--simulate", "small"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        lines: list[str] = []
        try:
            for line in proc.stdout:  # a progress line comes every 10 s off a terminal
                lines.append(line)
                if line.startswith("[") and "frames/s" in line:
                    break
        finally:
            proc.send_signal(signal.SIGINT)
            rest, stderr = proc.communicate(timeout=60)
    broker_auth.remove_realm(dataclasses.replace(
        dev_certs, mqtt=dataclasses.replace(dev_certs.mqtt, topic_root=root)))
    out = "".join(lines) + rest
    said = "\n".join(line for line in stderr.splitlines()
                     if not line.startswith("{") or '"error"' in line or "ERROR" in line)
    assert proc.returncode == 0, f"{out}\n{said}"
    assert "Traceback" not in stderr
    assert "simulating 3 hospitals, 213 devices" in out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("3 hospitals, 213 devices"), out
    sent = int(re.search(r"sent ([\d,]+)", summary)[1].replace(",", ""))  # type: ignore[index]
    assert sent > 300 and "refused 0" in summary and "unacked 0" in summary, summary
    assert "(http 3 mqtt 3 tcp 75)" in summary, summary
