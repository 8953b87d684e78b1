"""IngestService.Push through the real gRPC server (mutual TLS, the security
interceptor, the ingest pipeline and the test database): answered after
commit with per-frame status counts and per-device high-water marks;
idempotent; frames outside the certificate's subtree refused by name; wrong
certificates refused before anything is read."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc
import psycopg
import pytest

from rmiot.core_ext import AUTH_HMAC_SHA256
from rmiot.deploy import certs
from rmiot.proto import ingest_pb2
from tests.federation.conftest import Region, Site, now_us, vitals


def batch(site: Site, count: int, *, start: int = 0, ts0: int | None = None) -> bytes:
    """``count`` frames spread over the hospital's plain devices (the last in
    the department), consecutive seqs per device."""
    ts0 = ts0 if ts0 is not None else now_us() - 60_000_000
    devices = site.devices
    out = []
    for i in range(start, start + count):
        device = devices[i % len(devices)]
        tenant = site.department if device == devices[-1] else site.hospital
        seq = i // len(devices)
        out.append(vitals(tenant, device, seq, ts0 + seq * 1000))
    return b"".join(out)


def statuses(reply: ingest_pb2.PushReply) -> dict[str, int]:
    return dict(reply.statuses)


async def test_push_is_stored_and_answered_with_high_water_marks(region: Region,
                                                                  site: Site) -> None:
    ts0 = now_us() - 60_000_000
    stub = region.stub(site.cert)
    reply = await stub.Push(ingest_pb2.PushRequest(batch_id="b-1",
                                                   frames=batch(site, 500, ts0=ts0)))
    assert reply.batch_id == "b-1" and reply.frames == 500
    assert statuses(reply) == {"OK": 500}
    assert not reply.refused
    # Answered after commit: everything is in the database when the reply arrives.
    assert site.count(site.region_dsn, site.devices) == 500
    marks = {m.device_id: (m.tenant_id, m.seq, m.ts_us) for m in reply.high_water}
    assert marks == {d: (site.department if d == site.devices[-1] else site.hospital,
                         99, ts0 + 99 * 1000) for d in site.devices}


async def test_a_resend_after_a_lost_reply_stores_nothing_twice(region: Region,
                                                                 site: Site) -> None:
    frames = batch(site, 400)
    stub = region.stub(site.cert)
    request = ingest_pb2.PushRequest(batch_id="x", frames=frames)
    # The first reply is lost: the caller stops waiting long before it comes
    # (the server goes on and commits).
    with contextlib.suppress(grpc.aio.AioRpcError):
        await stub.Push(request, timeout=0.002)
    again = await stub.Push(request)
    third = await stub.Push(ingest_pb2.PushRequest(batch_id="x", frames=frames))
    assert statuses(third) == {"DUPLICATE": 400}
    assert sum(statuses(again).values()) == 400
    assert len(third.high_water) == len(site.devices)  # durable, so marked
    rows = site.rows(site.region_dsn, site.devices)
    assert len(rows) == 400 == len({(d, s, t) for d, s, t, _ in rows})


async def test_concurrent_copies_of_a_batch_store_it_once(region: Region, site: Site) -> None:
    frames = batch(site, 300)
    stub = region.stub(site.cert)
    replies = await asyncio.gather(*(stub.Push(ingest_pb2.PushRequest(frames=frames))
                                     for _ in range(3)))
    assert sum(statuses(r).get("OK", 0) for r in replies) == 300
    assert all(sum(statuses(r).values()) == 300 for r in replies)
    assert site.count(site.region_dsn, site.devices) == 300


async def test_frames_outside_the_certificate_subtree_are_refused_by_name(
        region: Region, site: Site) -> None:
    ts = now_us() - 1_000_000
    mine = [vitals(site.hospital, site.devices[0], s, ts + s) for s in range(10)]
    theirs = [vitals(site.other, site.foreign, s, ts + s) for s in range(3)]
    # A device of ours claiming another tenant: refused by the tenant check.
    posing = [vitals(site.other, site.devices[1], 0, ts)]
    # Another tenant's device claiming ours: in our subtree, but not its tenant.
    mismatch = [vitals(site.hospital, site.foreign, 9, ts)]
    frames = b"".join(mine[:5] + theirs + posing + mismatch + mine[5:])
    reply = await region.stub(site.cert).Push(ingest_pb2.PushRequest(frames=frames))
    assert statuses(reply) == {"OK": 10, "TENANT_FORBIDDEN": 4, "TENANT_MISMATCH": 1}
    refused = sorted((r.device_id, r.seq, r.code) for r in reply.refused)
    assert refused == sorted([(site.foreign, s, "TENANT_FORBIDDEN") for s in range(3)]
                             + [(site.devices[1], 0, "TENANT_FORBIDDEN"),
                                (site.foreign, 9, "TENANT_MISMATCH")])
    assert site.count(site.region_dsn, [site.foreign, site.devices[1]]) == 0
    assert site.count(site.region_dsn, [site.devices[0]]) == 10


async def test_wrong_certificates_are_refused(region: Region, site: Site,
                                              tmp_path: Path) -> None:
    frames = batch(site, 20)
    request = ingest_pb2.PushRequest(frames=frames)
    # From another CA: the TLS handshake fails.
    other = tmp_path / "other-ca"
    certs.ensure_dev_ca(other)
    path = certs.issue_client(other, "intruder", "platform", tenant=site.hospital)
    intruder = (path.with_suffix(".key").read_bytes(), path.read_bytes())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await region.stub(intruder).Push(request, timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # From our CA, naming the hospital, but holding no right to push (a vendor's).
    directory = region.cfg.data_dir / "certs"
    name = f"vendor-{site.name}"
    path = certs.issue_client(directory, name, "vendor", tenant=site.hospital)
    try:
        vendor = (path.with_suffix(".key").read_bytes(), path.read_bytes())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await region.stub(vendor).Push(request, timeout=5)
    finally:
        path.unlink()
        path.with_suffix(".key").unlink()
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "ingest" in (info.value.details() or "")
    assert site.count(site.region_dsn, site.devices) == 0
    await region.security.audit.flush()
    with psycopg.connect(site.region_dsn) as conn:
        outcomes = conn.execute("SELECT outcome FROM audit_log WHERE actor = %s",
                                (f"cert:{name}",)).fetchall()
    assert ("denied",) in outcomes


async def test_frames_without_ack_request_and_signed_frames_are_answered(
        region: Region, site: Site) -> None:
    ts = now_us() - 5_000_000
    frames = [vitals(site.hospital, site.devices[2], s, ts + s, ack=False) for s in range(50)]
    frames += [vitals(site.hospital, site.keyed, s, ts + s, ack=s % 2 == 0, key=site.key,
                      auth=AUTH_HMAC_SHA256) for s in range(50)]
    # Unsigned, from a device that must sign: refused by the pipeline's check.
    frames.append(vitals(site.hospital, site.keyed, 99, ts, ack=False))
    reply = await region.stub(site.cert).Push(ingest_pb2.PushRequest(frames=b"".join(frames)))
    assert statuses(reply) == {"OK": 100, "AUTH_REQUIRED": 1}
    assert site.count(site.region_dsn, [site.devices[2], site.keyed]) == 100


async def test_garbage_between_frames_costs_only_itself(region: Region, site: Site) -> None:
    ts = now_us() - 5_000_000
    good = [vitals(site.hospital, site.devices[3], s, ts + s) for s in range(4)]
    broken = bytearray(vitals(site.hospital, site.devices[3], 50, ts))
    broken[-1] ^= 0xFF  # CRC
    frames = good[0] + b"\x00junk\x00" + good[1] + bytes(broken) + good[2] + good[3][:20]
    reply = await region.stub(site.cert).Push(ingest_pb2.PushRequest(frames=frames))
    codes = statuses(reply)
    assert codes.pop("OK") == 3
    assert codes == {"BAD_MAGIC": 1, "BAD_CRC": 1, "TRUNCATED": 1}
    assert site.count(site.region_dsn, [site.devices[3]]) == 3


async def test_oversized_batch_id_is_invalid(region: Region, site: Site) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await region.stub(site.cert).Push(ingest_pb2.PushRequest(batch_id="x" * 200))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
