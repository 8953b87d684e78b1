"""The uplink in one process with a hospital and a region (two databases):
everything reaches the region once, in per-device order, and leaves the
outbox only then; a device the region refuses waits in the outbox, and what
the region can never take is dropped and counted."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

import psycopg
import pytest

from rmiot.config import Config
from rmiot.ingest.client import RmfClient
from rmiot.ingest.service import IngestService
from rmiot.ingest.uplink import Uplink
from rmiot.registry import store
from rmiot.security.sm4 import Keyring
from tests.conftest import eventually
from tests.federation.conftest import (
    Region,
    Site,
    now_us,
    open_region,
    region_cfg,
    vitals,
)
from tests.federation.test_outbox import hospital_role


@dataclass
class Hospital:
    ingest: IngestService
    uplink: Uplink


def uplink_cfg(hospital_cfg: Config, keyring: Keyring, site: Site, region: Region) -> Config:
    return hospital_role(hospital_cfg, keyring, target=f"127.0.0.1:{region.server.mtls_port}",
                         client_cert=str(site.cert_path),
                         client_key=str(site.cert_path.with_suffix(".key")))


async def start_hospital(cfg: Config, batch_frames: int = 300) -> Hospital:
    cfg = dataclasses.replace(cfg, uplink=dataclasses.replace(
        cfg.uplink, batch_frames=batch_frames, hold_s=0.3, retry_max_s=0.5))
    ingest = IngestService(cfg)
    await ingest.start()
    uplink = Uplink(cfg)
    await uplink.start()
    return Hospital(ingest, uplink)


async def stop_hospital(hospital: Hospital) -> None:
    await hospital.uplink.stop()
    await hospital.ingest.stop(drain_timeout=5)


@pytest.fixture
async def hospital(hospital_cfg: Config, keyring: Keyring, site: Site,
                   region: Region) -> AsyncIterator[Hospital]:
    started = await start_hospital(uplink_cfg(hospital_cfg, keyring, site, region))
    yield started
    await stop_hospital(started)


def assert_once_in_order(rows: list[tuple[int, int, int, int]], expected: int) -> None:
    """Rows (device, seq, ts_us, insert xid): each frame once, and each
    device's frames committed at the region in (ts, seq) order."""
    assert len(rows) == expected == len({(d, s, t) for d, s, t, _ in rows})
    by_device: dict[int, list[tuple[int, int, int]]] = {}
    for device, seq, ts, xid in rows:
        by_device.setdefault(device, []).append((ts, seq, xid))
    for device, frames in by_device.items():
        xids = [x for _, _, x in sorted(frames)]
        assert xids == sorted(xids), f"device {device}: frames reached the region out of order"


async def stream(port: int, frames: list[tuple[int, int, bytes]]) -> RmfClient:
    client = RmfClient("127.0.0.1", port, keep_acks=False)
    await client.connect()
    for i in range(0, len(frames), 50):
        for device, seq, frame in frames[i:i + 50]:
            client.send(frame, device, seq)
        await client.drain()
    assert await client.wait_acked(30)
    await client.close()
    return client


async def test_everything_reaches_the_region_once_in_order(hospital: Hospital,
                                                           site: Site) -> None:
    ts = now_us() - 30_000_000
    devices = site.devices
    frames = [(d, s, vitals(site.department if d == devices[-1] else site.hospital, d, s,
                            ts + s * 1000)) for s in range(600) for d in devices]
    await stream(hospital.ingest.tcp.port, frames)
    await eventually(lambda: site.count(site.region_dsn, devices) >= 3000, 30, 0.1)
    await eventually(lambda: site.outbox(devices) == 0, 10, 0.1)
    assert_once_in_order(site.rows(site.region_dsn, devices), 3000)
    assert hospital.uplink.stats["stored"] == 3000
    assert hospital.uplink.stats["requests"] >= 10  # 300 frames a request


async def test_a_refused_device_waits_in_the_outbox_then_goes_in_order(
        hospital: Hospital, site: Site) -> None:
    # A device only the hospital knows yet (the region's registry lags behind).
    with psycopg.connect(site.region_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT nextval('device_id_seq')").fetchone()  # an id of its own
    assert row is not None
    with psycopg.connect(site.hospital_dsn, autocommit=True) as conn:
        late = store.register_device(conn, site.hospital, serial_no="late", device_id=row[0])
    await eventually(lambda: hospital.ingest.view.get(late) is not None, 5)
    ts = now_us() - 30_000_000
    known = site.devices[0]
    await stream(hospital.ingest.tcp.port,
                 [(d, s, vitals(site.hospital, d, s, ts + s)) for s in range(100)
                  for d in (known, late)])
    await eventually(lambda: site.count(site.region_dsn, [known]) == 100, 20, 0.1)
    await eventually(lambda: hospital.uplink.stats["held"] > 0, 5)
    assert site.outbox([late]) == 100 and site.count(site.region_dsn, [late]) == 0
    with psycopg.connect(site.region_dsn, autocommit=True) as conn:
        store.register_device(conn, site.hospital, serial_no="late", device_id=late)
    await eventually(lambda: site.count(site.region_dsn, [late]) == 100, 20, 0.1)
    await eventually(lambda: site.outbox([known, late]) == 0, 10, 0.1)
    assert_once_in_order(site.rows(site.region_dsn, [known, late]), 200)


async def test_frames_the_region_can_never_take_are_dropped_and_counted(
        hospital_cfg: Config, dev_certs: Config, keyring: Keyring, site: Site) -> None:
    # This region keeps only the last minute: older frames are STALE there.
    region = await open_region(region_cfg(dev_certs, keyring, past_window_s=60))
    hospital = await start_hospital(uplink_cfg(hospital_cfg, keyring, site, region))
    try:
        device = site.devices[1]
        old, fresh = now_us() - 600_000_000, now_us() - 1_000_000
        await stream(hospital.ingest.tcp.port,
                     [(device, s, vitals(site.hospital, device, s, (old if s < 5 else fresh) + s))
                      for s in range(10)])
        await eventually(lambda: site.outbox([device]) == 0, 20, 0.1)
        assert site.count(site.region_dsn, [device]) == 5
        assert hospital.uplink.stats["dropped"] == 5
    finally:
        await stop_hospital(hospital)
        await region.close()
