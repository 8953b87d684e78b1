"""Rollups the platform keeps itself: per-minute, per-hour and per-day
aggregates of every cell (devices sharing a home and a model; migration 0010
has the tables and the reasoning), recomputed bucket by bucket as data lands.

Contract
- A rollup row is exact for the rows its bucket held when it was last
  recomputed: count, sum, min, max, and a sketch for percentiles within 1 %.
  ``as_of`` (per level, in ``rollup_state``) is a time before which every
  committed row is reflected; the query service reports it with each answer.
- Late data is corrected: a row landing in a bucket already rolled up makes
  that bucket dirty, and the next run recomputes it from its source — minute
  and hour buckets from telemetry, day buckets from their hours. Buckets are
  recomputed, never patched, so rows deleted and marked (``rmiot data
  destroy``) leave them the same way.
- What is dirty comes from two places, merged:
  1. *marks*: the ingest batch writer adds one (``rmiot.ingest.marks``) in
     the transaction of each COPY, so a mark commits exactly with its rows
     and nothing can land unseen, however late;
  2. a *scan* of each device's recent rows (the telemetry index, one short
     range a device), from the previous run's snapshot minus
     ``scan_overlap_s``: it finds on-time rows without any help from ingest,
     and late rows up to that overlap.
  Without the writer hook, rows arriving later than the overlap are only
  picked up by ``rmiot query rollup --rebuild``. Retention deletes telemetry
  without marks on purpose: rollups keep their own retention.
- A run is one REPEATABLE READ transaction holding an advisory lock: marks are
  consumed (deleted) in the snapshot that reads their rows, and a failed run
  leaves everything as it was. One job runs at a time across processes.
- Cost: minute buckets are recomputed whenever dirty (each row is read again
  only with its minute's other rows); an hour still open is refreshed at most
  every ``open_refresh_s`` (closed hours at once), so an hour's rows are read
  a handful of times, not once per run; days are merged from 24 hour rows.
  Minute rows older than ``minute_keep`` are deleted each run.
- A device's rows count in the cell of its *current* home and model when their
  bucket is recomputed; after moving devices, rebuild the affected range.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from rmiot.config import QueryConfig
from rmiot.periodic import PeriodicJob
from rmiot.query import calendar
from rmiot.query import rollup_sql as sql

log = logging.getLogger("rmiot.query.rollups")

# Advisory lock key held by a run or a rebuild ("rmrollup").
LOCK_KEY = 0x726D726F6C6C7570


@dataclass(frozen=True)
class Level:
    name: str
    table: str
    width: dt.timedelta
    sql_width: str  # the same width as an SQL interval literal


MINUTE = Level("minute", "rollup_minute", calendar.MINUTE, "interval '1 minute'")
HOUR = Level("hour", "rollup_hour", calendar.HOUR, "interval '1 hour'")
DAY = Level("day", "rollup_day", calendar.DAY, "interval '1 day'")
LEVELS = (DAY, HOUR, MINUTE)  # coarsest first, as the planner tries them


@dataclass(frozen=True)
class JobSettings:
    """How the job runs (the rollup_* keys of the [query] configuration section)."""

    period_s: float = 30.0
    scan: bool = True
    scan_overlap_s: float = 120.0
    open_refresh_s: float = 300.0
    minute_keep: dt.timedelta = dt.timedelta(days=2)

    @classmethod
    def of(cls, cfg: QueryConfig) -> JobSettings:
        return cls(period_s=cfg.rollup_period_s, scan_overlap_s=cfg.rollup_scan_overlap_s,
                   open_refresh_s=cfg.rollup_open_refresh_s,
                   minute_keep=dt.timedelta(days=cfg.rollup_minute_keep_days))


@dataclass
class RunReport:
    ran: bool = True
    spans: int = 0
    buckets: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    as_of: dict[str, dt.datetime] = field(default_factory=dict)


class RollupJob(PeriodicJob):
    """Keeps the rollups current: :meth:`run_once` now, or every
    ``period_s`` between :meth:`start` and :meth:`stop` (a failed run is
    redone next period: nothing was consumed)."""

    name = "rollup-job"

    def __init__(self, dsn: str, settings: JobSettings | None = None) -> None:
        self.dsn = dsn
        self.settings = settings or JobSettings()
        super().__init__(self.settings.period_s)
        self.last: RunReport | None = None

    async def tick(self) -> None:
        self.last = await self.run_once()

    async def run_once(self) -> RunReport:
        """One run (see the module docstring); ``ran`` is False when another
        run or a rebuild held the lock."""
        t0 = time.perf_counter()
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
            async with conn.transaction():
                cur = await conn.execute(b"SELECT pg_try_advisory_xact_lock(%s), now()",
                                         (LOCK_KEY,))
                locked, snap = await _row(cur)
                if not locked:
                    return RunReport(ran=False)
                report = await _run(conn, snap, self.settings)
        report.seconds = time.perf_counter() - t0
        return report


async def _row(cur: psycopg.AsyncCursor[Any]) -> tuple[Any, ...]:
    row = await cur.fetchone()
    assert row is not None
    return tuple(row)


async def _state(conn: psycopg.AsyncConnection[Any]) -> dict[str, dt.datetime]:
    cur = await conn.execute(b"SELECT key, value FROM rollup_state")
    return {key: value for key, value in await cur.fetchall()}


async def _set_state(conn: psycopg.AsyncConnection[Any], values: dict[str, dt.datetime]) -> None:
    for key, value in values.items():
        await conn.execute(b"INSERT INTO rollup_state (key, value) VALUES (%s, %s) "
                           b"ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                           (key, value))


async def _run(conn: psycopg.AsyncConnection[Any], snap: dt.datetime,
               settings: JobSettings) -> RunReport:
    state = await _state(conn)
    report = RunReport()
    await conn.execute(b"CREATE TEMP TABLE spans (device_id bigint, lo timestamptz, "
                       b"hi timestamptz) ON COMMIT DROP")
    cur = await conn.execute(
        b"WITH gone AS (DELETE FROM rollup_marks RETURNING device_ids, first_ts, last_ts) "
        b"INSERT INTO spans SELECT u.* FROM gone, unnest(gone.device_ids, gone.first_ts, "
        b"gone.last_ts) AS u")
    report.spans = cur.rowcount
    if settings.scan:
        # Each device's rows since then, by the (device_id, ts) index: one short
        # range scan a device (telemetry has no index on time alone, by design).
        overlap = dt.timedelta(seconds=settings.scan_overlap_s)
        start = state.get("scan.to", snap) - overlap
        cur = await conn.execute(b"INSERT INTO spans SELECT d.id, t.lo, t.hi FROM devices d "
                                 b"CROSS JOIN LATERAL (SELECT min(ts) AS lo, max(ts) AS hi "
                                 b"FROM telemetry WHERE device_id = d.id AND ts >= %s) t "
                                 b"WHERE t.lo IS NOT NULL", (start,))
        report.spans += cur.rowcount
        await _set_state(conn, {"scan.to": snap})

    horizon = calendar.floor(snap - settings.minute_keep, calendar.MINUTE)
    for level, floor in ((MINUTE, horizon), (HOUR, None)):
        await conn.execute(_expand(level.sql_width), {
            "level": level.name, "since": snap, "horizon": floor,
            "origin": calendar.ORIGIN})

    # Minutes: everything dirty since the horizon; older ones are out of scope.
    await conn.execute(b"DELETE FROM rollup_dirty WHERE level = 'minute' AND bucket < %s",
                       (horizon,))
    report.buckets["minute"] = await _recompute(conn, MINUTE, "true", {})
    # Hours: closed ones at once, open ones every open_refresh_s.
    refreshed = state.get("hour.refreshed")
    refresh_open = refreshed is None or (
        (snap - refreshed).total_seconds() >= settings.open_refresh_s)
    which = "true" if refresh_open else "bucket + interval '1 hour' <= %(snap)s"
    report.buckets["hour"] = await _recompute(conn, HOUR, which, {"snap": snap})
    if refresh_open:
        refreshed = snap
        await _set_state(conn, {"hour.refreshed": snap})
    report.buckets["day"] = await _recompute_days(conn)
    if report.buckets["day"]:
        await _recompute_hospital_days(conn)

    await conn.execute(b"INSERT INTO device_last_seen (device_id, last_ts) "
                       b"SELECT device_id, max(hi) FROM spans GROUP BY device_id "
                       b"ON CONFLICT (device_id) DO UPDATE "
                       b"SET last_ts = greatest(device_last_seen.last_ts, excluded.last_ts)")
    await conn.execute(b"DELETE FROM rollup_minute WHERE bucket < %s", (horizon,))
    cur = await conn.execute(b"SELECT count(*) FROM rollup_dirty WHERE level = 'hour'")
    (waiting,) = await _row(cur)
    hour_as_of = snap if not waiting else refreshed or snap
    report.as_of = {"minute": snap, "hour": hour_as_of, "day": hour_as_of}
    await _set_state(conn, {"minute.horizon": horizon,
                            **{f"{name}.as_of": at for name, at in report.as_of.items()}})
    return report


def _expand(width: str) -> bytes:
    """SQL: every bucket of ``width`` that a span touches, per cell of the
    span's device, made dirty (from the horizon on, when there is one)."""
    return f"""
INSERT INTO rollup_dirty (level, bucket, home_id, model_id, since)
SELECT DISTINCT %(level)s, b, c.home_id, c.model_id, %(since)s
  FROM (SELECT {sql.HOME} AS home_id, {sql.MODEL} AS model_id, s.lo, s.hi
          FROM spans s JOIN devices d ON d.id = s.device_id) c,
       generate_series(time_bucket({width}, greatest(c.lo, %(horizon)s), %(origin)s),
                       c.hi, {width}) AS b
 WHERE %(horizon)s::timestamptz IS NULL OR c.hi >= %(horizon)s
ON CONFLICT DO NOTHING""".encode()


@contextlib.asynccontextmanager
async def bulk_plans(conn: psycopg.AsyncConnection[Any]) -> AsyncIterator[None]:
    """Within a transaction, plans for aggregating many groups at once, for the
    body's statements: hash joins, not nested loops (row estimates after CTEs
    and GROUP BYs are guesses, and a nested loop between two sets of thousands
    of groups costs minutes); sorted, not hashed, aggregation (the sketch
    arrays of a few hundred thousand groups overflow a hash table's memory and
    spill to disk, where a sort streams them: a day of a district rolls up in
    two thirds of the time). Reads that need an index per row (LATERAL, range
    joins) are materialised before, outside."""
    await conn.execute(b"SET LOCAL enable_nestloop = off")
    await conn.execute(b"SET LOCAL enable_hashagg = off")
    try:
        yield
    finally:
        await conn.execute(b"SET LOCAL enable_nestloop = on")
        await conn.execute(b"SET LOCAL enable_hashagg = on")


async def _recompute(conn: psycopg.AsyncConnection[Any], level: Level, which: str,
                     params: dict[str, Any]) -> int:
    """Recompute from telemetry the level's dirty buckets that ``which``
    selects; they stay listed in temp table work_<level> for the day level."""
    work = f"work_{level.name}"
    await conn.execute(f"CREATE TEMP TABLE {work} (bucket timestamptz, home_id integer, "
                       f"model_id bigint) ON COMMIT DROP".encode())
    cur = await conn.execute(
        f"WITH gone AS (DELETE FROM rollup_dirty WHERE level = %(level)s AND ({which}) "
        f"RETURNING bucket, home_id, model_id) INSERT INTO {work} SELECT * FROM gone".encode(),
        {"level": level.name, **params})
    dirty = cur.rowcount
    if not dirty:
        return 0
    runs, rows = f"runs_{level.name}", f"rows_{level.name}"
    await conn.execute(f"CREATE TEMP TABLE {runs} ON COMMIT DROP AS "
                       f"{sql.runs_of(work, level.sql_width)}".encode())
    await conn.execute(f"CREATE TEMP TABLE {rows} ON COMMIT DROP AS "
                       f"{sql.telemetry_of_runs(runs)}".encode(),
                       {"width": level.width, "origin": calendar.ORIGIN})
    await conn.execute(f"DELETE FROM {level.table} r USING {work} w WHERE r.bucket = w.bucket "
                       f"AND r.home_id = w.home_id AND r.model_id = w.model_id".encode())
    async with bulk_plans(conn):
        await conn.execute(sql.insert_from_telemetry(level.table, f"SELECT * FROM {rows}")
                           .encode(), {"width": level.width, "origin": calendar.ORIGIN})
    return dirty


async def _recompute_days(conn: psycopg.AsyncConnection[Any]) -> int:
    """Re-merge the days of the hours just recomputed."""
    cur = await conn.execute(
        b"CREATE TEMP TABLE work_day ON COMMIT DROP AS "
        b"SELECT DISTINCT time_bucket('1 day'::interval, bucket, %s::timestamptz) AS bucket, "
        b"home_id, model_id FROM work_hour", (calendar.ORIGIN,))
    dirty = cur.rowcount
    if not dirty:
        return 0
    await conn.execute(b"CREATE TEMP TABLE rows_day ON COMMIT DROP AS SELECT h.* "
                       b"FROM rollup_hour h JOIN work_day w ON h.home_id = w.home_id "
                       b"AND h.model_id = w.model_id AND h.bucket >= w.bucket "
                       b"AND h.bucket < w.bucket + interval '1 day'")
    await conn.execute(b"DELETE FROM rollup_day r USING work_day w WHERE r.bucket = w.bucket "
                       b"AND r.home_id = w.home_id AND r.model_id = w.model_id")
    async with bulk_plans(conn):
        await conn.execute(sql.insert_day_from_hours("rows_day h").encode(),
                           {"origin": calendar.ORIGIN})
    return dirty


async def _recompute_hospital_days(conn: psycopg.AsyncConnection[Any]) -> None:
    """Re-merge the hospital days of the cell days just recomputed."""
    await conn.execute(
        f"CREATE TEMP TABLE work_hospital_day ON COMMIT DROP AS WITH {sql.HOSPITAL_OF.strip()} "
        f"SELECT DISTINCT w.bucket, coalesce(h.hospital, w.home_id) AS hospital_id, w.model_id "
        f"FROM work_day w LEFT JOIN hospital_of h ON h.id = w.home_id".encode())
    await conn.execute(b"CREATE TEMP TABLE rows_hospital_day ON COMMIT DROP AS SELECT r.* "
                       b"FROM rollup_day r JOIN work_hospital_day w ON r.bucket = w.bucket "
                       b"AND r.hospital_id = w.hospital_id AND r.model_id = w.model_id")
    await conn.execute(b"DELETE FROM rollup_day_hospital r USING work_hospital_day w "
                       b"WHERE r.bucket = w.bucket AND r.hospital_id = w.hospital_id "
                       b"AND r.model_id = w.model_id")
    async with bulk_plans(conn):
        await conn.execute(sql.insert_hospital_days("rows_hospital_day r").encode())


# -- rebuilding a range ----------------------------------------------------------

Progress = Callable[[int, int], None]


async def rebuild(dsn: str, lo: dt.date, hi: dt.date, *, workers: int = 2,
                  minute_keep: dt.timedelta = JobSettings.minute_keep,
                  progress: Progress | None = None) -> int:
    """Recompute every cell's rollups for the local days [lo, hi) from
    telemetry, ``workers`` days at a time (one connection each); the device
    last-seen times too. For bulk loads that bypassed the writer's marks, and
    after moving devices. Returns the rows written."""
    days = [lo + dt.timedelta(days=i) for i in range((hi - lo).days)]
    queue: asyncio.Queue[dt.date] = asyncio.Queue()
    for day in days:
        queue.put_nowait(day)
    written = 0
    done = 0

    async def worker() -> None:
        nonlocal written, done
        while not queue.empty():
            day = queue.get_nowait()
            written += await retrying(
                functools.partial(_rebuild_day, day=day, minute_keep=minute_keep), dsn)
            done += 1
            if progress:
                progress(done, len(days))

    await asyncio.gather(*(worker() for _ in range(max(1, min(workers, len(days))))))
    return written


async def retrying(work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[int]],
                        dsn: str, attempts: int = 3) -> int:
    """``work`` (one transaction) on a fresh connection, again after a lost
    connection: a long rebuild survives a database restart."""
    for attempt in range(attempts):
        try:
            async with await psycopg.AsyncConnection.connect(dsn) as conn:
                await conn.execute(b"SET work_mem = '256MB'")
                return await work(conn)
        except psycopg.OperationalError as exc:
            if attempt == attempts - 1:
                raise
            log.warning("lost the database connection; retrying",
                        extra={"attempt": attempt, "error": str(exc).strip()})
            await asyncio.sleep(2.0 * (attempt + 1))
    raise AssertionError("unreachable")


async def _rebuild_day(conn: psycopg.AsyncConnection[Any], day: dt.date,
                       minute_keep: dt.timedelta) -> int:
    lo = calendar.start_of(day)
    hi = lo + calendar.DAY
    written = 0
    async with conn.transaction():
        # Shared with other rebuilding days; excludes a job run meanwhile.
        await conn.execute(b"SELECT pg_advisory_xact_lock_shared(%s)", (LOCK_KEY,))
        cur = await conn.execute(b"SELECT now()")
        (now,) = await _row(cur)
        horizon = calendar.floor(now - minute_keep, calendar.MINUTE)
        for level, start in ((HOUR, lo), (MINUTE, max(lo, horizon))):
            if start >= hi:
                continue
            params = {"lo": start, "hi": hi, "width": level.width, "origin": calendar.ORIGIN}
            await conn.execute(f"DELETE FROM {level.table} WHERE bucket >= %(lo)s "
                               f"AND bucket < %(hi)s".encode(), params)
            async with bulk_plans(conn):
                cur = await conn.execute(sql.insert_from_telemetry(
                    level.table, sql.telemetry_in_range()).encode(), params)
            written += cur.rowcount
        params = {"lo": lo, "hi": hi, "origin": calendar.ORIGIN}
        await conn.execute(b"DELETE FROM rollup_day WHERE bucket >= %(lo)s AND bucket < %(hi)s",
                           params)
        await conn.execute(b"DELETE FROM rollup_day_hospital "
                           b"WHERE bucket >= %(lo)s AND bucket < %(hi)s", params)
        async with bulk_plans(conn):
            cur = await conn.execute(sql.insert_day_from_hours(
                "rollup_hour h WHERE h.bucket >= %(lo)s AND h.bucket < %(hi)s").encode(),
                params)
            written += cur.rowcount
            cur = await conn.execute(sql.insert_hospital_days(
                "rollup_day r WHERE r.bucket >= %(lo)s AND r.bucket < %(hi)s").encode(), params)
        written += cur.rowcount
        await conn.execute(b"INSERT INTO device_last_seen (device_id, last_ts) "
                           b"SELECT device_id, max(ts) FROM telemetry "
                           b"WHERE ts >= %(lo)s AND ts < %(hi)s GROUP BY device_id "
                           b"ON CONFLICT (device_id) DO UPDATE SET last_ts = "
                           b"greatest(device_last_seen.last_ts, excluded.last_ts)", params)
    return written
