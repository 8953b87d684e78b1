"""Answers checked against SQL written independently over telemetry: every
resolution (day, hour, minute rollups and raw telemetry) gives the counts,
sums, minimums, maximums and reporting devices the raw rows give, and
percentiles within the sketches' 1 % (exactly, from raw)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from typing import Any

import pytest

from rmiot.proto import query_pb2 as pb
from rmiot.query import aggregates, calendar, sketch
from tests.query.conftest import District, Server

FRACTIONS = [0.5, 0.9, 0.99]


def expected(d: District, lo: dt.datetime, hi: dt.datetime, bucket: str, group: str,
             metrics: list[int], kind: str = "monitor") -> dict[tuple[int, int, int], Any]:
    """(bucket µs, group id, metric) -> (count, sum, min, max, devices, percentiles)."""
    groups = {"department": "coalesce(d.department_id, d.tenant_id)",
              "hospital": "d.tenant_id", "device": "d.id", "none": "0"}
    with d.conn() as conn:
        rows = conn.execute(f"""
            SELECT {bucket} AS b, {groups[group]} AS g, u.m, count(*), sum(u.v), min(u.v),
                   max(u.v), count(DISTINCT t.device_id),
                   percentile_disc(%(q)s::float8[]) WITHIN GROUP (ORDER BY u.v)
              FROM telemetry t JOIN devices d ON d.id = t.device_id
              JOIN device_models dm ON dm.id = d.model_id AND dm.kind = %(kind)s,
                   unnest(t.metrics, t.vals) AS u (m, v)
             WHERE t.ts >= %(lo)s AND t.ts < %(hi)s AND d.tenant_id = ANY (%(hospitals)s)
               AND u.m = ANY (%(metrics)s) AND u.v NOT IN ('NaN', 'Infinity', '-Infinity')
             GROUP BY 1, 2, 3""", {
            "q": FRACTIONS, "kind": kind, "lo": lo, "hi": hi, "metrics": metrics,
            "hospitals": [d.hospital_a, d.hospital_b], "origin": calendar.ORIGIN}).fetchall()
    return {(calendar.to_us(b), g, m): rest for b, g, m, *rest in rows}


def check(reply: pb.AggregateReply, want: dict[tuple[int, int, int], Any],
          exact_percentiles: bool, exact_devices: bool = True) -> None:
    """``exact_devices`` False: buckets spanning several rollup buckets, whose
    group size is the largest of theirs (a lower bound of the true one)."""
    got = {(r.bucket_us, r.group_id, r.metric): r for r in reply.rows}
    assert set(got) == set(want)
    assert want, "the comparison would check nothing"
    for key, (count, total, lo, hi, devices, pct) in want.items():
        row = got[key]
        assert not row.suppressed
        assert (row.count, row.min, row.max) == (count, lo, hi), key
        if exact_devices:
            assert row.devices == devices, key
        else:
            assert 1 <= row.devices <= devices, key
        assert math.isclose(row.sum, total, rel_tol=1e-12, abs_tol=1e-9), key
        assert math.isclose(row.avg, total / count, rel_tol=1e-12, abs_tol=1e-9)
        for approx, exact in zip(row.percentiles, pct, strict=True):
            if exact_percentiles:
                assert approx == exact, key
            else:
                assert abs(approx - exact) <= sketch.ALPHA * abs(exact) + 1e-12, key


async def aggregate(server: Server, **fields: Any) -> pb.AggregateReply:
    d = server.district
    request = pb.AggregateRequest(tenant_id=d.district, kinds=["monitor"],
                                  percentiles=FRACTIONS, page_size=10_000, **fields)
    return await server.client("admin_d")("Aggregate", request)  # type: ignore[no-any-return]


async def test_hourly_by_department_from_hour_rollups(server: Server) -> None:
    d = server.district
    reply = await aggregate(server, metrics=[1, 3, 4], from_us=calendar.to_us(d.base),
                            to_us=calendar.to_us(d.end), bucket_s=3600,
                            group_by=pb.GROUP_DEPARTMENT)
    assert reply.resolution == "hour" and not reply.percentiles_exact
    check(reply, expected(d, d.base, d.end, "time_bucket('1 hour', t.ts)", "department",
                          [1, 3, 4]), exact_percentiles=False)
    assert {r.group for r in reply.rows} == {"ICU", "Ward", "Cardiology"}


async def test_daily_by_hospital_from_day_rollups(server: Server) -> None:
    d = server.district
    reply = await aggregate(server, metrics=[1, 2], from_us=calendar.to_us(d.base),
                            to_us=calendar.to_us(d.end), bucket_s=86400,
                            group_by=pb.GROUP_HOSPITAL)
    assert reply.resolution == "day"
    check(reply, expected(d, d.base, d.end,
                          "time_bucket('1 day', t.ts, %(origin)s::timestamptz)", "hospital",
                          [1, 2]), exact_percentiles=False)


async def test_a_whole_range_in_one_bucket_over_hours(server: Server) -> None:
    d = server.district
    lo, hi = d.base + dt.timedelta(hours=5), d.base + dt.timedelta(hours=29)
    reply = await aggregate(server, metrics=[4], from_us=calendar.to_us(lo),
                            to_us=calendar.to_us(hi))
    assert reply.resolution == "hour"
    check(reply, expected(d, lo, hi, "%(lo)s::timestamptz", "none", [4]),
          exact_percentiles=False, exact_devices=False)


async def test_five_minute_buckets_from_minute_rollups(server: Server) -> None:
    d = server.district
    lo, hi = d.end - dt.timedelta(hours=3), d.end
    reply = await aggregate(server, metrics=[2], from_us=calendar.to_us(lo),
                            to_us=calendar.to_us(hi), bucket_s=300,
                            group_by=pb.GROUP_HOSPITAL)
    assert reply.resolution == "minute"
    check(reply, expected(d, lo, hi, "time_bucket('5 minutes', t.ts)", "hospital", [2]),
          exact_percentiles=False, exact_devices=False)


@pytest.mark.parametrize(("bucket_s", "group"), [(90, "department"), (3600, "device")])
async def test_what_no_rollup_answers_comes_from_telemetry(server: Server, bucket_s: int,
                                                           group: str) -> None:
    d = server.district
    lo, hi = d.base + dt.timedelta(hours=2), d.base + dt.timedelta(hours=8)
    group_by = {"department": pb.GROUP_DEPARTMENT, "device": pb.GROUP_DEVICE}[group]
    reply = await aggregate(server, metrics=[1, 4], from_us=calendar.to_us(lo),
                            to_us=calendar.to_us(hi), bucket_s=bucket_s, group_by=group_by)
    assert reply.resolution == "raw" and reply.percentiles_exact
    bucket = f"time_bucket('{bucket_s} seconds', t.ts, %(origin)s::timestamptz)"
    check(reply, expected(d, lo, hi, bucket, group, [1, 4]), exact_percentiles=True)


async def test_calendar_months_come_from_day_rollups(server: Server) -> None:
    d = server.district
    reply = await aggregate(server, metrics=[1], from_us=calendar.to_us(d.base),
                            to_us=calendar.to_us(d.end), bucket_months=1,
                            group_by=pb.GROUP_HOSPITAL)
    assert reply.resolution == "day"
    lo, hi = calendar.from_us(reply.from_us), calendar.from_us(reply.to_us)
    assert lo == calendar.month_floor(d.base) and hi >= d.end
    check(reply, expected(d, lo, hi, "time_bucket('1 month', t.ts, 'Asia/Shanghai')",
                          "hospital", [1]), exact_percentiles=False, exact_devices=False)


async def test_pages_and_the_stream_add_up_to_the_whole(server: Server) -> None:
    d = server.district
    fields: dict[str, Any] = {"metrics": [1, 2], "from_us": calendar.to_us(d.base),
                              "to_us": calendar.to_us(d.end), "bucket_s": 3600,
                              "group_by": pb.GROUP_DEPARTMENT}
    whole = await aggregate(server, **fields)
    client = server.client("admin_d")
    pages, token = [], ""
    while True:
        page = await client("Aggregate", pb.AggregateRequest(
            tenant_id=d.district, kinds=["monitor"], percentiles=FRACTIONS, page_size=50,
            page_token=token, **fields))
        pages += list(page.rows)
        token = page.next_page_token
        if not token:
            break
    assert pages == list(whole.rows)
    streamed = [row async for reply in client("AggregateStream", pb.AggregateRequest(
        tenant_id=d.district, kinds=["monitor"], percentiles=FRACTIONS, page_size=64,
        **fields)) for row in reply.rows]
    assert streamed == list(whole.rows)


async def test_latest_values_and_raw_frames_match_telemetry(server: Server) -> None:
    d = server.district
    device = d.monitors[d.b1][1]
    client = server.client("admin_d")
    latest = await client("Latest", pb.LatestRequest(device_id=device))
    raw_pages, token = [], ""
    lo, hi = d.base, d.base + dt.timedelta(hours=20)
    while True:
        page = await client("Raw", pb.RawRequest(
            device_id=device, from_us=calendar.to_us(lo), to_us=calendar.to_us(hi),
            page_size=25, page_token=token))
        raw_pages += list(page.frames)
        token = page.next_page_token
        if not token:
            break
    with d.conn() as conn:
        newest = conn.execute("SELECT ts, metrics, vals FROM telemetry WHERE device_id = %s "
                              "ORDER BY ts DESC LIMIT 1", (device,)).fetchone()
        frames = conn.execute("SELECT ts, seq, metrics, vals FROM telemetry WHERE device_id = "
                              "%s AND ts >= %s AND ts < %s ORDER BY ts, seq",
                              (device, lo, hi)).fetchall()
    assert newest is not None
    assert [(v.metric, v.value, v.ts_us) for v in latest.values] == [
        (m, v, calendar.to_us(newest[0])) for m, v in zip(newest[1], newest[2], strict=True)]
    assert [(f.ts_us, f.seq, list(f.metrics), list(f.values)) for f in raw_pages] == [
        (calendar.to_us(ts), seq, m, v) for ts, seq, m, v in frames]
    assert len(frames) == 120
    some = await client("Latest", pb.LatestRequest(device_id=device, metrics=[4, 2]))
    assert [v.metric for v in some.values] == [2, 4]


async def test_fleet_status_counts_devices_by_state_and_last_seen(server: Server) -> None:
    d = server.district
    with d.conn() as conn:
        conn.execute("UPDATE devices SET state = 'maintenance' WHERE id = %s",
                     (d.monitors[d.a1][-1],))
        conn.execute("INSERT INTO device_last_seen VALUES (%s, now()) ON CONFLICT (device_id) "
                     "DO UPDATE SET last_ts = now()", (d.monitors[d.a1][0],))
    try:
        reply = await server.client("admin_d")("FleetStatus", pb.FleetRequest(
            tenant_id=d.district, group_by=pb.GROUP_DEPARTMENT, online_within_s=600))
        hospitals = await server.client("admin_d")("FleetStatus", pb.FleetRequest(
            tenant_id=d.district, group_by=pb.GROUP_HOSPITAL, online_within_s=600))
    finally:
        with d.conn() as conn:
            conn.execute("UPDATE devices SET state = 'active' WHERE id = %s",
                         (d.monitors[d.a1][-1],))
    rows = {r.group_id: (r.total, r.online, r.offline, r.never_seen, r.in_fault, r.inactive)
            for r in reply.rows}
    assert rows == {d.a1: (13, 1, 11, 0, 1, 0), d.a2: (4, 0, 4, 0, 0, 0),
                    d.b1: (4, 0, 4, 0, 0, 0)}
    assert {(r.group_id, r.group, r.total, r.online) for r in hospitals.rows} == {
        (d.hospital_a, "Hospital A", 17, 1), (d.hospital_b, "Hospital B", 4, 0)}


@pytest.mark.parametrize("by_hospital", [False, True])
async def test_energy_per_zone_with_month_and_year_before(server: Server,
                                                          by_hospital: bool) -> None:
    d = server.district
    first, end = calendar.local_date(d.base), calendar.local_date(d.end)
    reply = await server.client("admin_d")("Energy", pb.EnergyRequest(
        tenant_id=d.district, from_date=first.isoformat(), to_date=end.isoformat(),
        by_hospital=by_hospital))
    zone = "dv.tenant_id" if by_hospital else "dv.department_id"

    def used(lo: dt.datetime, hi: dt.datetime) -> dict[int, float]:
        with d.conn() as conn:
            rows = conn.execute(
                f"SELECT {zone}, sum(t.vals[1]) FROM telemetry t "
                "JOIN devices dv ON dv.id = t.device_id WHERE t.device_id = ANY (%s) "
                "AND t.ts >= %s AND t.ts < %s GROUP BY 1", (d.meters, lo, hi)).fetchall()
        return dict(rows)

    now = used(d.base, d.end)
    before = used(calendar.add_months(d.base, -1), calendar.add_months(d.end, -1))
    year = used(calendar.add_months(d.base, -12), calendar.add_months(d.end, -12))
    assert {r.zone_id for r in reply.rows} == ({d.hospital_a} if by_hospital else {d.a1, d.a2})
    for r in reply.rows:
        assert math.isclose(r.energy, now[r.zone_id])
        assert math.isclose(r.previous_month, before[r.zone_id])
        assert math.isclose(r.last_year, year[r.zone_id])
        assert math.isclose(r.mom_pct, (now[r.zone_id] / before[r.zone_id] - 1) * 100)
        assert math.isclose(r.yoy_pct, (now[r.zone_id] / year[r.zone_id] - 1) * 100)


def test_days_over_whole_hospitals_are_read_from_the_hospitals_rows() -> None:
    lo = dt.datetime(2025, 3, 1, tzinfo=calendar.ZONE)
    day = aggregates.AggregateQuery(metrics=(1,), lo=lo, hi=lo + 7 * calendar.DAY,
                                    bucket=calendar.DAY, group_by=aggregates.GroupBy.HOSPITAL,
                                    homes=(1, 2, 3), whole_hospitals=True).checked()
    assert aggregates.choose_source(day, None) is aggregates.HOSPITAL_DAYS
    for finer in (dataclasses.replace(day, whole_hospitals=False),  # a department's scope
                  dataclasses.replace(day, group_by=aggregates.GroupBy.DEPARTMENT),
                  dataclasses.replace(day, deid_homes=(2,))):  # a mixed scope
        source = aggregates.choose_source(finer, None)
        assert source is not None and source.table == "rollup_day"
    hourly = dataclasses.replace(day, bucket=calendar.HOUR).checked()
    source = aggregates.choose_source(hourly, None)
    assert source is not None and source.table == "rollup_hour"
