"""The hospital role's outbox, filled by the batch writer in the telemetry's own
transaction: every committed frame once, byte for byte, in arrival order per
device; retransmissions not queued again; the [uplink] filters."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from rmiot.config import Config
from rmiot.core_ext import FLAG_ACK_REQ, KIND_LOCATION, encode_frame
from rmiot.ingest import outbox
from rmiot.ingest.client import RmfClient
from rmiot.ingest.service import IngestService
from rmiot.security.sm4 import Keyring
from tests.federation.conftest import Site, now_us, vitals


def hospital_role(cfg: Config, keyring: Keyring, **uplink: Any) -> Config:
    return dataclasses.replace(
        cfg, platform=dataclasses.replace(cfg.platform, role="hospital"),
        ingest=dataclasses.replace(cfg.ingest, tcp_port=0, batch_max_rows=64, batch_max_ms=5,
                                   device_rate_per_s=1e6),
        security=dataclasses.replace(cfg.security, keyring_dir=str(keyring.directory)),
        uplink=dataclasses.replace(cfg.uplink, **uplink))


@pytest.fixture
async def hospital(hospital_cfg: Config, keyring: Keyring,
                   site: Site) -> AsyncIterator[IngestService]:
    service = IngestService(hospital_role(hospital_cfg, keyring))
    await service.start()
    yield service
    await service.stop(drain_timeout=5)


def queued(site: Site, devices: list[int]) -> list[tuple[int, int, bytes]]:
    """(id, device, frame) of the outbox rows of these devices, in id order."""
    with psycopg.connect(site.hospital_dsn, autocommit=True) as conn:
        return [(int(i), int(d), bytes(f)) for i, d, f in conn.execute(
            "SELECT id, device_id, frame FROM outbox WHERE device_id = ANY(%s) ORDER BY id",
            (devices,)).fetchall()]


async def send(port: int, frames: list[tuple[int, int, bytes]]) -> RmfClient:
    """Send (device, seq, frame)s on one connection; wait for every ack."""
    client = RmfClient("127.0.0.1", port)
    await client.connect()
    for device, seq, frame in frames:
        client.send(frame, device, seq)
    await client.drain()
    assert await client.wait_acked(20)
    await client.close()
    return client


async def test_every_committed_frame_is_queued_once_in_arrival_order(
        hospital: IngestService, site: Site) -> None:
    ts = now_us() - 10_000_000
    devices = site.devices[:3]
    sent = [(d, s, vitals(site.hospital, d, s, ts + s)) for s in range(200) for d in devices]
    await send(hospital.tcp.port, sent)
    rows = queued(site, devices)
    assert len(rows) == 600 == site.count(site.hospital_dsn, devices)
    assert sorted(f for _, _, f in rows) == sorted(f for _, _, f in sent)  # byte for byte
    for device in devices:  # several writers, yet each device's frames queue in order
        seqs = [int.from_bytes(f[20:24]) for _, d, f in rows if d == device]
        assert seqs == list(range(200))
    again = await send(hospital.tcp.port, sent[:100])   # retransmissions: stored before
    assert again.statuses == {1: 100}  # DUPLICATE
    assert len(queued(site, devices)) == 600
    waiting = await outbox.status(dataclasses.replace(hospital.cfg))
    assert waiting[1].startswith("no uplink.target set:") and not waiting[0]


@pytest.mark.parametrize("filters", ["tenants", "metrics", "kinds"])
async def test_filters_choose_what_goes_up(hospital_cfg: Config, keyring: Keyring, site: Site,
                                           filters: str) -> None:
    wanted = {"tenants": str(site.department), "metrics": "404, 405",
              "kinds": str(KIND_LOCATION)}[filters]
    service = IngestService(hospital_role(hospital_cfg, keyring, **{filters: wanted}))
    await service.start()
    try:
        ts = now_us() - 10_000_000
        ward, bed = site.devices[4], site.devices[0]
        gps = encode_frame(KIND_LOCATION, site.hospital, bed, 1, ts,
                           [(404, 2, 22.54), (405, 2, 114.05)], flags=FLAG_ACK_REQ)
        sent = [(ward, 0, vitals(site.department, ward, 0, ts)),
                (bed, 0, vitals(site.hospital, bed, 0, ts)), (bed, 1, gps)]
        await send(service.tcp.port, sent)
    finally:
        await service.stop(drain_timeout=5)
    assert site.count(site.hospital_dsn, [ward, bed]) == 3  # stored locally all the same
    expect = {"tenants": [sent[0][2]], "metrics": [gps], "kinds": [gps]}[filters]
    assert [f for _, _, f in queued(site, [ward, bed])] == expect
