"""The batch writer marks the late frames it stored for the query service's
rollups, in the transaction of the COPY: a late frame (hours old) arriving over
TCP leaves a mark naming its device and ts, an on-time one none (the rollup
job's scan finds it), a retransmission stored once adds no second mark."""

from __future__ import annotations

import datetime as dt

from rmiot.core_ext import ACK_DUPLICATE, ACK_OK
from rmiot.ingest.client import RmfClient
from tests.ingest.conftest import Hospital, now_us, vitals

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def marks_of(hospital: Hospital, device: int) -> list[tuple[dt.datetime, dt.datetime]]:
    with hospital.conn() as conn:
        rows = conn.execute(
            "SELECT m.first_ts[i], m.last_ts[i] FROM rollup_marks m, "
            "generate_subscripts(m.device_ids, 1) i WHERE m.device_ids[i] = %s ORDER BY m.id",
            (device,)).fetchall()
    return [(a, b) for a, b in rows]


async def test_a_late_frame_is_marked_with_its_rows(client: RmfClient,
                                                    hospital: Hospital) -> None:
    late = now_us() - 3 * 3600 * 1_000_000 + 17
    later = late + 250_000
    for seq, ts in ((1, late), (2, later)):
        client.send(vitals(hospital.tenant, hospital.plain, seq, ts), hospital.plain, seq)
    await client.drain()
    assert await client.wait_acked(5)
    assert client.statuses == {ACK_OK: 2}
    spans = marks_of(hospital, hospital.plain)
    assert spans, "no mark for the stored frames"
    first = min(a for a, _ in spans)
    last = max(b for _, b in spans)
    assert first == EPOCH + dt.timedelta(microseconds=late)
    assert last == EPOCH + dt.timedelta(microseconds=later)


async def test_a_duplicate_adds_no_mark(client: RmfClient, hospital: Hospital) -> None:
    ts = now_us() - 600 * 1_000_000
    client.send(vitals(hospital.tenant, hospital.plain, 5, ts), hospital.plain, 5)
    await client.drain()
    assert await client.wait_acked(5)
    before = marks_of(hospital, hospital.plain)
    assert len(before) == 1
    client.send(vitals(hospital.tenant, hospital.plain, 5, ts), hospital.plain, 5)
    await client.drain()
    assert await client.wait_acked(5)
    assert client.statuses == {ACK_OK: 1, ACK_DUPLICATE: 1}
    assert marks_of(hospital, hospital.plain) == before
    assert hospital.stored(hospital.plain) == 1


async def test_an_on_time_frame_is_left_to_the_scan(client: RmfClient,
                                                    hospital: Hospital) -> None:
    client.send(vitals(hospital.tenant, hospital.plain, 1, now_us()), hospital.plain, 1)
    await client.drain()
    assert await client.wait_acked(5)
    assert hospital.stored(hospital.plain) == 1 and marks_of(hospital, hospital.plain) == []
