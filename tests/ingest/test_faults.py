"""Fault tests: nothing acknowledged is ever lost, nothing is stored twice.

Several devices stream frames with ACK_REQ while (1) the ingest server is
killed with SIGKILL and restarted, or (2) the database is restarted under it.
Afterwards every frame a device holds an OK/DUPLICATE ack for is in the
database exactly once, and the devices' retransmissions fill in the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rmiot.config import Config
from rmiot.deploy import cluster
from rmiot.ingest.client import RmfClient
from rmiot.ingest.service import IngestService
from rmiot.registry import store
from tests.conftest import eventually, free_port
from tests.ingest.conftest import Hospital, now_us, vitals

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
FRAMES = 3000


async def stream(client: RmfClient, tenant: int, device: int, first_ts: int,
                 stop_sending: asyncio.Event) -> None:
    """A device sending FRAMES frames in bursts; tolerates its connection dying."""
    seq = 0
    while seq < FRAMES:
        if client.connected:
            for _ in range(50):
                client.send(vitals(tenant, device, seq, first_ts + seq), device, seq)
                seq += 1
            with contextlib.suppress(OSError):
                await client.drain()
        await asyncio.sleep(0.01)
        if stop_sending.is_set():
            await stop_sending.wait()


async def reconnect(client: RmfClient, port: int) -> None:
    await client.close()
    for _ in range(200):
        try:
            await client.connect()
            await client.resend_unacked()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError("could not reconnect")


def assert_exactly_once(hospital: Hospital, devices: list[int],
                        clients: list[RmfClient]) -> None:
    with hospital.conn() as conn:
        rows = conn.execute(
            "SELECT device_id, seq, count(*) FROM telemetry WHERE device_id = ANY(%s) "
            "GROUP BY 1, 2", (devices,)).fetchall()
    stored = {(d, s): n for d, s, n in rows}
    assert all(n == 1 for n in stored.values()), "a frame was stored twice"
    for client in clients:
        assert not client.unacked
        assert client.acked <= set(stored)   # every acked frame is there
    assert len(stored) == FRAMES * len(devices)  # and retransmissions filled the rest


def _server(cfg: Config, port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "RMIOT_DATABASE_NAME": cfg.database.name,
           "RMIOT_INGEST_TCP_PORT": str(port), "RMIOT_INGEST_BATCH_MAX_ROWS": "200",
           "RMIOT_SECURITY_KEYRING_DIR": cfg.security.keyring_dir,
           "RMIOT_INGEST_DEVICE_RATE_PER_S": "1000000",
           "RMIOT_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "rmiot.ingest.worker"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("PORT ")
    return proc


async def test_server_killed_mid_load(ingest_cfg: Config, hospital: Hospital) -> None:
    with hospital.conn() as conn:
        devices = [store.register_device(conn, hospital.tenant) for _ in range(4)]
    port = free_port()
    server = _server(ingest_cfg, port)
    clients = [RmfClient("127.0.0.1", port) for _ in devices]
    paused = asyncio.Event()
    try:
        for c in clients:
            await c.connect()
        ts = now_us()
        tasks = [asyncio.create_task(stream(c, hospital.tenant, d, ts, paused))
                 for c, d in zip(clients, devices, strict=True)]
        await eventually(lambda: sum(len(c.acked) for c in clients) >= 2000, 30)
        server.send_signal(signal.SIGKILL)
        server.wait()
        acked_before = sum(len(c.acked) for c in clients)
        assert acked_before < FRAMES * len(devices)  # killed mid-load, as intended
        server.stdout.close()  # type: ignore[union-attr]
        server = _server(ingest_cfg, port)
        for c in clients:
            await reconnect(c, port)
        await asyncio.gather(*tasks)
        for c in clients:
            await c.resend_unacked()
            assert await c.wait_acked(30)
    finally:
        for c in clients:
            await c.close()
        server.terminate()
        server.wait(30)
        if server.stdout:
            server.stdout.close()
    assert_exactly_once(hospital, devices, clients)


async def test_database_restarted_mid_load(ingest: IngestService, ingest_cfg: Config,
                                           hospital: Hospital) -> None:
    if not ingest_cfg.database.private:
        pytest.skip("restarts the private cluster; RMIOT_DSN points elsewhere")
    with hospital.conn() as conn:
        devices = [store.register_device(conn, hospital.tenant) for _ in range(4)]
    await eventually(lambda: all(d in ingest.view.devices for d in devices), 2)
    clients = [RmfClient("127.0.0.1", ingest.tcp.port) for _ in devices]
    for c in clients:
        await c.connect()
    ts = now_us()
    never = asyncio.Event()
    tasks = [asyncio.create_task(stream(c, hospital.tenant, d, ts, never))
             for c, d in zip(clients, devices, strict=True)]
    await eventually(lambda: sum(len(c.acked) for c in clients) >= 2000, 30)
    pg = cluster.Cluster(ingest_cfg)
    await asyncio.to_thread(pg.stop)
    await asyncio.sleep(1.0)  # the database is away; the server keeps its sockets
    assert all(c.connected for c in clients)
    await asyncio.to_thread(pg.start)
    await asyncio.gather(*tasks)
    for c in clients:
        assert c.connected, "the server dropped a device while the database was away"
        assert await c.wait_acked(60)
        await c.close()
    assert ingest.pipeline.writer.reconnects >= 1
    assert_exactly_once(hospital, devices, clients)
    # The device view followed the database back too.
    with hospital.conn() as conn:
        store.set_state(conn, devices[0], "suspended")
    await eventually(lambda: not ingest.view.get(devices[0]).may_send, 5)  # type: ignore[union-attr]
