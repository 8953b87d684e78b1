"""The rollup job: late rows landing in buckets already rolled up are
corrected (found through the writer's marks, or by the scan of recent rows),
marks are consumed once, and an open hour waits for its refresh with as_of
saying so."""

from __future__ import annotations

import datetime as dt

import psycopg

from rmiot.ingest import marks
from rmiot.proto import query_pb2 as pb
from rmiot.query import calendar
from rmiot.query.rollups import JobSettings, RollupJob
from tests.query.conftest import Server
from tests.query.test_results import FRACTIONS, check, expected


async def store(dsn: str, device: int, ts: dt.datetime, vals: list[float],
                mark: bool = True) -> None:
    """One frame written the way the batch writer writes it: row and mark in
    one transaction."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO telemetry (ts, device_id, tenant_id, seq, kind, metrics, vals) "
            "SELECT %s, id, tenant_id, 900000 + (random() * 1e6)::int, 1, '{1,2,3,4}', %s "
            "FROM devices WHERE id = %s", (ts, vals, device))
        if mark:  # as the writer marks a late frame
            await conn.execute(marks.MARK_SQL, ([device], [ts], [ts]))


async def hourly(server: Server, lo: dt.datetime, hi: dt.datetime, bucket_s: int = 3600,
                 group_by: pb.GroupBy.ValueType = pb.GROUP_DEPARTMENT) -> pb.AggregateReply:
    d = server.district
    request = pb.AggregateRequest(
        tenant_id=d.district, kinds=["monitor"], metrics=[1, 4], from_us=calendar.to_us(lo),
        to_us=calendar.to_us(hi), bucket_s=bucket_s, group_by=group_by, percentiles=FRACTIONS,
        page_size=10_000)
    reply: pb.AggregateReply = await server.client("admin_d")("Aggregate", request)
    return reply


async def test_a_late_row_in_a_rolled_up_hour_and_day_is_corrected(server: Server) -> None:
    d = server.district
    lo, hi = d.base, d.base + dt.timedelta(hours=6)
    before = await hourly(server, lo, hi)
    check(before, expected(d, lo, hi, "time_bucket('1 hour', t.ts)", "department", [1, 4]),
          exact_percentiles=False)
    late = d.base + dt.timedelta(hours=3, minutes=17, seconds=3)
    await store(d.dsn, d.monitors[d.b1][0], late, [500.0, 97.0, 36.6, -9.0])
    stale = await hourly(server, lo, hi)
    assert list(stale.rows) == list(before.rows)  # not rolled up yet: as_of says so
    assert stale.as_of_us < calendar.to_us(dt.datetime.now(dt.UTC))

    report = await RollupJob(d.dsn, JobSettings(scan=False)).run_once()
    assert report.ran and report.spans >= 1 and report.buckets["hour"] >= 1
    after = await hourly(server, lo, hi)
    want = expected(d, lo, hi, "time_bucket('1 hour', t.ts)", "department", [1, 4])
    check(after, want, exact_percentiles=False)
    key = (calendar.to_us(calendar.floor(late, calendar.HOUR)), d.b1, 1)
    assert want[key][3] == 500.0  # the late value is the hour's maximum now
    day = "time_bucket('1 day', t.ts, %(origin)s::timestamptz)"
    for group, group_by in (("department", pb.GROUP_DEPARTMENT),
                            ("hospital", pb.GROUP_HOSPITAL)):  # cells' days, hospitals' days
        daily = await hourly(server, d.base, d.end, bucket_s=86400, group_by=group_by)
        check(daily, expected(d, d.base, d.end, day, group, [1, 4]), exact_percentiles=False)
    with d.conn() as conn:
        assert conn.execute("SELECT count(*) FROM rollup_marks").fetchone() == (0,)
    again = await RollupJob(d.dsn, JobSettings(scan=False)).run_once()
    assert again.spans == 0 and again.buckets == {"minute": 0, "hour": 0, "day": 0}


async def test_on_time_rows_are_found_by_the_scan_without_marks(server: Server) -> None:
    d = server.district
    now = dt.datetime.now(dt.UTC)
    ts = now - dt.timedelta(seconds=20)
    await store(d.dsn, d.monitors[d.b1][1], ts, [61.0, 98.0, 36.9, 0.0], mark=False)
    await RollupJob(d.dsn).run_once()
    lo = calendar.floor(ts, calendar.MINUTE)
    reply = await hourly(server, lo, lo + calendar.MINUTE, bucket_s=60)
    assert reply.resolution == "minute"
    check(reply, expected(d, lo, lo + calendar.MINUTE, "time_bucket('1 minute', t.ts)",
                          "department", [1, 4]), exact_percentiles=False)
    assert any(r.group_id == d.b1 and r.max == 61.0 for r in reply.rows)


async def test_an_open_hour_waits_for_its_refresh_and_as_of_tells(server: Server) -> None:
    d = server.district
    first = await RollupJob(d.dsn, JobSettings(open_refresh_s=0)).run_once()
    ts = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    await store(d.dsn, d.monitors[d.a2][1], ts, [70.0, 96.0, 36.5, 1.0])
    waiting = await RollupJob(d.dsn, JobSettings(open_refresh_s=3600)).run_once()
    hour = calendar.floor(ts, calendar.HOUR)
    if hour + calendar.HOUR <= dt.datetime.now(dt.UTC):
        return  # the hour closed meanwhile: it was refreshed as a closed one
    assert waiting.buckets["hour"] == 0 and waiting.buckets["minute"] >= 1
    assert waiting.as_of["hour"] == first.as_of["minute"] < waiting.as_of["minute"]
    reply = await hourly(server, hour, hour + calendar.HOUR)
    assert reply.as_of_us == calendar.to_us(first.as_of["minute"])
    refreshed = await RollupJob(d.dsn, JobSettings(open_refresh_s=0)).run_once()
    assert refreshed.buckets["hour"] >= 1 and refreshed.as_of["hour"] == refreshed.as_of["minute"]
    reply = await hourly(server, hour, hour + calendar.HOUR)
    check(reply, expected(d, hour, hour + calendar.HOUR, "time_bucket('1 hour', t.ts)",
                          "department", [1, 4]), exact_percentiles=False)
