"""Federation with real processes: a region (``rmiot.ingest.push_worker`` on
the test database) and a hospital (``rmiot.ingest.worker`` in the hospital
role, plus ``rmiot.ingest.uplink``, on the hospital database). Devices stream
to the hospital; the region is killed, the hospital keeps ingesting and is
itself killed and restarted mid-outage; when the region is back every frame
reaches it exactly once, each device's frames in order, and the outbox
empties."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from rmiot.config import Config
from rmiot.ingest.client import RmfClient
from rmiot.security.sm4 import Keyring
from tests.conftest import eventually, free_port
from tests.federation.conftest import Site, now_us, vitals
from tests.federation.test_uplink import assert_once_in_order

pytestmark = pytest.mark.slow
FRAMES = 1500           # per device
BURST, PAUSE_S = 10, 0.04


@dataclass
class Processes:
    """The three processes, started and restarted with fixed ports."""

    env: dict[str, str]
    hospital_db: str
    region_db: str
    tcp: int = field(default_factory=free_port)          # the hospital's RMF port
    mtls: int = field(default_factory=free_port)         # the region's push port
    running: dict[str, subprocess.Popen[str]] = field(default_factory=dict)

    def start(self, name: str) -> None:
        env = {**self.env, "RMIOT_LOG_LEVEL": "warning"}
        if name == "region":
            module, ready = "rmiot.ingest.push_worker", "MTLS "
            env.update(RMIOT_DATABASE_NAME=self.region_db, RMIOT_INGEST_TCP_PORT="0",
                       RMIOT_GRPC_PORT="0", RMIOT_GRPC_MTLS_PORT=str(self.mtls))
        else:
            module, ready = {"hospital": ("rmiot.ingest.worker", "PORT "),
                             "uplink": ("rmiot.ingest.uplink", "UPLINK ")}[name]
            env.update(RMIOT_DATABASE_NAME=self.hospital_db, RMIOT_PLATFORM_ROLE="hospital",
                       RMIOT_INGEST_TCP_PORT=str(self.tcp),
                       RMIOT_UPLINK_TARGET=f"127.0.0.1:{self.mtls}")
        proc = subprocess.Popen([sys.executable, "-m", module], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(ready):
                break
        else:
            raise AssertionError(f"{name} did not start")
        self.running[name] = proc

    def kill(self, name: str) -> None:
        proc = self.running.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()

    def stop_all(self) -> None:
        for proc in self.running.values():
            proc.terminate()
        for proc in self.running.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        self.running.clear()


@pytest.fixture
def processes(site: Site, hospital_cfg: Config, base_cfg: Config,
              keyring: Keyring) -> Iterator[Processes]:
    env = {**os.environ, "RMIOT_SECURITY_KEYRING_DIR": str(keyring.directory),
           "RMIOT_INGEST_DEVICE_RATE_PER_S": "1000000", "RMIOT_INGEST_BATCH_MAX_ROWS": "200",
           "RMIOT_UPLINK_CLIENT_CERT": str(site.cert_path),
           "RMIOT_UPLINK_CLIENT_KEY": str(site.cert_path.with_suffix(".key")),
           "RMIOT_UPLINK_BATCH_FRAMES": "400", "RMIOT_UPLINK_RETRY_MAX_S": "0.5",
           "RMIOT_SECURITY_CALLER_RATE_PER_S": "100000",
           "RMIOT_SECURITY_TENANT_RATE_PER_S": "100000"}
    procs = Processes(env, hospital_cfg.database.name, base_cfg.database.name)
    yield procs
    procs.stop_all()


async def device(port: int, tenant: int, device_id: int, ts0: int) -> RmfClient:
    """A device sending FRAMES frames in bursts, riding out the hospital's
    restart (reconnects, resends what was not acknowledged)."""
    client = RmfClient("127.0.0.1", port, keep_acks=False)
    seq = 0
    while seq < FRAMES or client.unacked:
        if not client.connected:
            await client.close()
            with contextlib.suppress(OSError):
                await client.connect()
                await client.resend_unacked()
            if not client.connected:
                await asyncio.sleep(0.05)
                continue
        if seq < FRAMES:
            for _ in range(BURST):
                client.send(vitals(tenant, device_id, seq, ts0 + seq * 1000), device_id, seq)
                seq += 1
            with contextlib.suppress(OSError):
                await client.drain()
            await asyncio.sleep(PAUSE_S)
        elif not await client.wait_acked(2):
            await client.close()  # silent for 2 s: reconnect, resend
    await client.close()
    return client


async def test_outage_and_restart_lose_nothing_and_keep_order(processes: Processes,
                                                              site: Site) -> None:
    devices = site.devices
    total = FRAMES * len(devices)
    for name in ("region", "hospital", "uplink"):
        processes.start(name)
    ts0 = now_us() - 60_000_000
    streams = asyncio.gather(*(
        device(processes.tcp, site.department if d == devices[-1] else site.hospital, d, ts0)
        for d in devices))
    try:
        # Forwarding works; then the link is cut (the region dies mid-push).
        await eventually(lambda: site.count(site.region_dsn, devices) >= 1000, 30, 0.05)
        processes.kill("region")
        at_outage = site.count(site.region_dsn, devices)
        # The hospital keeps ingesting, then dies and comes back mid-outage.
        await eventually(lambda: site.count(site.hospital_dsn, devices) >= at_outage + 2000,
                         30, 0.05)
        processes.kill("uplink")
        processes.kill("hospital")
        await asyncio.sleep(0.5)
        processes.start("hospital")
        processes.start("uplink")
        clients = await asyncio.wait_for(streams, 60)
    finally:
        if not streams.done():
            streams.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await streams
    assert all(not c.unacked for c in clients)
    stored = site.rows(site.hospital_dsn, devices)
    assert len(stored) == total == len({(d, s) for d, s, _, _ in stored})
    assert site.count(site.region_dsn, devices) < total  # the outage held frames back
    assert site.outbox(devices) > 0
    # The link returns.
    processes.start("region")
    await eventually(lambda: site.outbox(devices) == 0, 60, 0.1)
    assert_once_in_order(site.rows(site.region_dsn, devices), total)
