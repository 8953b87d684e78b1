"""RMF over TCP end to end: real sockets, the real database, acks after commit."""

from __future__ import annotations

import asyncio

import psycopg

from rmiot.core_ext import (
    ACK_AUTH_FAILED,
    ACK_AUTH_REQUIRED,
    ACK_BAD_CRC,
    ACK_DUPLICATE,
    ACK_MALFORMED,
    ACK_OK,
    ACK_STALE,
    ACK_TENANT_MISMATCH,
    ACK_UNKNOWN_DEVICE,
    KIND_COMMAND,
)
from rmiot.ingest.client import RmfClient
from rmiot.ingest.service import IngestService
from rmiot.registry import store
from tests.conftest import eventually
from tests.ingest.conftest import Hospital, now_us, vitals


async def test_every_ack_follows_its_commit(client: RmfClient, hospital: Hospital) -> None:
    base = now_us()
    for seq in range(300):
        client.send(vitals(hospital.tenant, hospital.plain, seq, base + seq), hospital.plain, seq)
    await client.drain()
    assert await client.wait_acked(10)
    assert client.statuses == {ACK_OK: 300}
    assert hospital.stored(hospital.plain) == 300
    with hospital.conn() as conn:
        row = conn.execute("SELECT metrics, vals, kind, tenant_id FROM telemetry "
                           "WHERE device_id = %s AND seq = 7", (hospital.plain,)).fetchone()
    assert row is not None
    assert row[0] == [1, 2, 3, 4, 5, 6, 7, 8] and row[1][0] == 72.0 and row[3] == hospital.tenant


async def test_ack_means_the_row_is_already_visible(client: RmfClient,
                                                    hospital: Hospital) -> None:
    ts = now_us()
    client.send(vitals(hospital.tenant, hospital.plain, 1, ts), hospital.plain, 1)
    await client.drain()
    assert await client.wait_acked(5)
    assert hospital.stored(hospital.plain) == 1  # read right after the ack: committed


async def test_retransmission_is_stored_once(client: RmfClient, hospital: Hospital,
                                             ingest: IngestService) -> None:
    ts = now_us()
    frame = vitals(hospital.tenant, hospital.plain, 5, ts)
    client.send(frame, hospital.plain, 5)
    await client.drain()
    assert await client.wait_acked(5)
    # Later retransmission (its ack was "lost"): answered DUPLICATE, not stored again.
    client.send(frame, hospital.plain, 5)
    # Two copies inside one batch window: one stored, the other DUPLICATE.
    twin = vitals(hospital.tenant, hospital.plain, 6, ts + 1)
    client.send_raw(twin + twin)
    client.unacked[(hospital.plain, 6)] = twin
    await client.drain()
    assert await client.wait_acks(4, 5)
    assert [s for d, q, s in client.acks if q == 5] == [ACK_OK, ACK_DUPLICATE]
    assert sorted(s for d, q, s in client.acks if q == 6) == [ACK_OK, ACK_DUPLICATE]
    assert hospital.stored(hospital.plain) == 2


async def test_platform_checks_nack_with_codes_and_spare_good_frames(
        client: RmfClient, hospital: Hospital) -> None:
    ts = now_us()
    bad_crc = bytearray(vitals(hospital.tenant, hospital.plain, 90, ts))
    bad_crc[40] ^= 0xFF
    wrong_key = vitals(hospital.tenant, hospital.keyed, 91, ts, key=b"\x01" * 32)
    cases = [
        (vitals(hospital.tenant, 987654321, 80, ts), ACK_UNKNOWN_DEVICE),
        (vitals(hospital.tenant, hospital.foreign, 81, ts), ACK_TENANT_MISMATCH),
        (vitals(hospital.tenant, hospital.keyed, 82, ts), ACK_AUTH_REQUIRED),
        (vitals(hospital.tenant, hospital.plain, 83, ts - 30 * 86400 * 10**6), ACK_STALE),
        (vitals(hospital.tenant, hospital.plain, 84, ts + 3600 * 10**6), ACK_STALE),
        (vitals(hospital.tenant, hospital.plain, 85, ts, kind=KIND_COMMAND), ACK_MALFORMED),
        (bytes(bad_crc), ACK_BAD_CRC),
        (wrong_key, ACK_AUTH_FAILED),
    ]
    good = [vitals(hospital.tenant, hospital.plain, 100 + i, ts + i) for i in range(len(cases))]
    stream = b"".join(bad + ok for (bad, _), ok in zip(cases, good, strict=True))
    signed = vitals(hospital.tenant, hospital.keyed, 200, ts, key=hospital.key)
    client.send_raw(stream + signed)
    await client.drain()
    assert await client.wait_acks(2 * len(cases) + 1, 10)
    got = {seq: status for _, seq, status in client.acks}
    for i, (_, expected) in enumerate(cases):
        assert got[80 + i if i < 6 else 90 + i - 6] == expected, (i, got)
        assert got[100 + i] == ACK_OK
    assert got[200] == ACK_OK
    assert hospital.stored(hospital.plain) == len(cases)
    assert hospital.stored(hospital.keyed) == 1
    assert hospital.stored(hospital.foreign) == 0


async def test_frames_without_ack_req_are_stored_silently(client: RmfClient,
                                                          hospital: Hospital) -> None:
    ts = now_us()
    client.send_raw(b"".join(vitals(hospital.tenant, hospital.plain, s, ts + s, ack=False)
                             for s in range(20)))
    client.send(vitals(hospital.tenant, hospital.plain, 20, ts + 20), hospital.plain, 20)
    await client.drain()
    assert await client.wait_acked(5)
    assert len(client.acks) == 1
    assert hospital.stored(hospital.plain) == 21


async def test_revocation_and_suspension_reach_open_connections(
        client: RmfClient, hospital: Hospital, ingest: IngestService) -> None:
    ts = now_us()
    client.send(vitals(hospital.tenant, hospital.keyed, 1, ts, key=hospital.key),
                hospital.keyed, 1)
    await client.drain()
    assert await client.wait_acked(5)
    with hospital.conn() as conn:
        store.revoke_keys(conn, hospital.keyed)
        store.set_state(conn, hospital.plain, "suspended")
    # The standard's bar: visible within a second.
    await eventually(lambda: not ingest.view.key(hospital.keyed)
                     and not ingest.view.get(hospital.plain).may_send, 1.0)  # type: ignore[union-attr]
    client.send_raw(vitals(hospital.tenant, hospital.keyed, 2, ts + 1, key=hospital.key)
                    + vitals(hospital.tenant, hospital.plain, 3, ts + 2))
    await client.drain()
    assert await client.wait_acks(3, 5)
    assert client.acks[1:] == [(hospital.keyed, 2, ACK_AUTH_FAILED),
                               (hospital.plain, 3, ACK_UNKNOWN_DEVICE)]


async def test_incomplete_frame_is_dropped_and_stream_resynchronises(
        client: RmfClient, hospital: Hospital, ingest: IngestService) -> None:
    ts = now_us()
    stuck = bytearray(vitals(hospital.tenant, hospital.plain, 1, ts))
    stuck[6:8] = (60000).to_bytes(2, "big")  # a corrupted length: waits for 60 kB
    client.send_raw(bytes(stuck[:40]))
    good = vitals(hospital.tenant, hospital.plain, 2, ts + 1)
    client.send(good, hospital.plain, 2)
    await client.drain()
    assert await client.wait_acked(5)  # the sweeper dropped the stuck frame after 0.5-1.5 s
    assert ingest.pipeline.stats["partial_frames_dropped"] >= 1
    assert hospital.stored(hospital.plain) == 1


async def test_connection_limit_and_idle_timeout(ingest: IngestService,
                                                 hospital: Hospital) -> None:
    ingest.tcp.cfg = ingest.pipeline.cfg = type(ingest.tcp.cfg)(
        **{**ingest.tcp.cfg.__dict__, "max_connections": 2, "idle_timeout_s": 1.0})
    clients = [RmfClient("127.0.0.1", ingest.tcp.port) for _ in range(3)]
    for c in clients:
        await c.connect()
        await asyncio.sleep(0.05)
    await eventually(lambda: not clients[2].connected, 3)  # over the limit: closed at once
    assert ingest.pipeline.stats["refused_connection_limit"] == 1
    assert clients[0].connected and clients[1].connected
    # Silent for over a second: closed by the sweeper.
    await eventually(lambda: not clients[0].connected and not clients[1].connected, 5)
    assert ingest.pipeline.stats["closed_idle"] == 2
    for c in clients:
        await c.close()


async def test_backpressure_stops_reading_instead_of_dropping(
        client: RmfClient, hospital: Hospital, ingest: IngestService) -> None:
    ts = now_us()
    total = 15_000
    with psycopg.connect(hospital.dsn.replace("user=rmiot_app", "user=postgres")) as lock:
        lock.execute("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")  # the database "stalls"
        for seq in range(total):
            client.send(vitals(hospital.tenant, hospital.plain, seq, ts + seq),
                        hospital.plain, seq)
        await eventually(lambda: ingest.pipeline.paused, 20)
        assert not client.acks  # nothing acked while nothing is committed
        lock.rollback()
    await client.drain()
    assert await client.wait_acked(60)
    assert not ingest.pipeline.paused
    assert client.statuses == {ACK_OK: total}
    assert hospital.stored(hospital.plain) == total


async def test_a_flooding_device_is_rate_limited_alone(client: RmfClient, hospital: Hospital,
                                                       ingest: IngestService) -> None:
    from rmiot.core_ext import ACK_RATE_LIMITED
    from rmiot.security.limits import RateLimiter

    abuse: list[tuple[str, int]] = []
    ingest.pipeline.per_device = RateLimiter(50, 50, abuse_threshold=10)
    ingest.pipeline.on_abuse = lambda kind, key: abuse.append((kind, key))
    ts = now_us()
    client.send_raw(b"".join(vitals(hospital.tenant, hospital.plain, s, ts + s)
                             for s in range(200)))
    client.send_raw(vitals(hospital.tenant, hospital.keyed, 1, ts, key=hospital.key))
    await client.drain()
    assert await client.wait_acks(201, 10)
    statuses = [s for d, _, s in client.acks if d == hospital.plain]
    assert statuses.count(ACK_OK) == 50 and statuses.count(ACK_RATE_LIMITED) == 150
    assert [s for d, _, s in client.acks if d == hospital.keyed] == [ACK_OK]  # others unharmed
    assert abuse == [("device", hospital.plain)]
    assert hospital.stored(hospital.plain) == 50


async def test_key_rotation_overlaps_then_only_the_new_key_works(
        client: RmfClient, hospital: Hospital, ingest: IngestService) -> None:
    from rmiot.registry.credentials import rotate_key

    with hospital.conn() as conn:
        _, new_key = rotate_key(conn, hospital.keyring, hospital.keyed, overlap_s=2)
    await eventually(lambda: isinstance(ingest.view.key(hospital.keyed), tuple), 1.0)
    ts = now_us()
    client.send_raw(vitals(hospital.tenant, hospital.keyed, 1, ts, key=hospital.key)
                    + vitals(hospital.tenant, hospital.keyed, 2, ts + 1, key=new_key))
    await client.drain()
    assert await client.wait_acks(2, 5)
    assert [s for _, _, s in client.acks] == [ACK_OK, ACK_OK]  # both keys, in the window
    await eventually(lambda: ingest.view.key(hospital.keyed) == new_key, 5.0, interval=0.1)
    client.send_raw(vitals(hospital.tenant, hospital.keyed, 3, ts + 2, key=hospital.key)
                    + vitals(hospital.tenant, hospital.keyed, 4, ts + 3, key=new_key))
    await client.drain()
    assert await client.wait_acks(4, 5)
    assert [s for _, _, s in client.acks[2:]] == [ACK_AUTH_FAILED, ACK_OK]  # the window closed
    assert hospital.stored(hospital.keyed) == 3


async def test_a_tenant_over_its_points_quota_is_limited(client: RmfClient, hospital: Hospital,
                                                         ingest: IngestService) -> None:
    from rmiot.core_ext import ACK_RATE_LIMITED
    from rmiot.tenants import settings

    with hospital.conn() as conn:  # 80 points a second: a burst of 160, i.e. 20 vitals frames
        settings.update(conn, hospital.tenant, {"points_per_s": 80})
    await eventually(lambda: ingest.view.get(hospital.plain).points_per_s == 80, 1.0)  # type: ignore[union-attr]
    ts = now_us()
    client.send_raw(b"".join(vitals(hospital.tenant, hospital.plain, s, ts + s)
                             for s in range(50)))
    await client.drain()
    assert await client.wait_acks(50, 10)
    statuses = [s for _, _, s in client.acks]
    assert statuses.count(ACK_OK) == 20 and statuses.count(ACK_RATE_LIMITED) == 30
    with hospital.conn() as conn:
        settings.update(conn, hospital.tenant, {"points_per_s": None})


async def test_a_gateway_signs_for_its_children(client: RmfClient, hospital: Hospital,
                                                ingest: IngestService) -> None:
    with hospital.conn() as conn:
        gateway = store.register_device(conn, hospital.tenant, serial_no="gateway")
        _, gateway_key = store.add_key(conn, hospital.keyring, gateway)
        child = store.register_device(conn, hospital.tenant, serial_no="child",
                                      auth_required=True)
        conn.execute("UPDATE devices SET gateway_id = %s WHERE id = %s", (gateway, child))
    await eventually(lambda: ingest.view.key(child) == gateway_key, 1.0)
    ts = now_us()
    client.send_raw(vitals(hospital.tenant, child, 1, ts, key=gateway_key)
                    + vitals(hospital.tenant, child, 2, ts + 1, key=b"\x05" * 32))
    await client.drain()
    assert await client.wait_acks(2, 5)
    assert sorted((q, s) for _, q, s in client.acks) == [(1, ACK_OK), (2, ACK_AUTH_FAILED)]
    with hospital.conn() as conn:  # the child gets a key of its own: the gateway's stops
        _, child_key = store.add_key(conn, hospital.keyring, child)
    await eventually(lambda: ingest.view.key(child) == child_key, 1.0)
