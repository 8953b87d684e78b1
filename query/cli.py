"""``rmiot query``: the operator's side of the query service.

- ``rollup`` runs the rollup job once; ``rollup --rebuild --from DAY --to DAY``
  recomputes every cell over those local days (after a bulk import that
  bypassed the writer, or after moving devices);
- ``retain [--dry-run]`` applies each tenant's retention (administrator DSN);
- ``status``: the rollups' as_of per level, the minute horizon, work waiting;
- ``latest``, ``raw``, ``aggregate``, ``fleet``, ``energy``: the service's
  queries, answered from the database directly, one JSON object a line. This is
  an operator's view, like psql: no per-user authorisation or de-identification
  (people and systems use the gRPC QueryService, which applies both).

Times are ISO 8601 (``2025-03-01T08:00+08:00``; no zone: local time), ``now``,
or relative to now (``-2h``, ``-30m``, ``-7d``); bucket widths are ``90s``,
``15m``, ``1h``, ``1d``.

Exit codes follow ``rmiot``: 0 done, 1 failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import re
import sys
from typing import Any

import orjson
import psycopg

from rmiot import db
from rmiot.config import Config
from rmiot.query import aggregates, calendar, fleet, retention, rollups, simple
from rmiot.query.access import Scope

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_SPAN = re.compile(r"^([+-]?\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
GROUPS = {g.name.lower(): g for g in aggregates.GroupBy}


def when(text: str) -> dt.datetime:
    """A time argument: ISO 8601, ``now`` or ``-2h``."""
    now = dt.datetime.now(dt.UTC)
    if text == "now":
        return now
    span = _SPAN.match(text)
    if span:
        return now + dt.timedelta(seconds=int(span[1]) * _UNITS[span[2]])
    try:
        ts = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {text!r}") from None
    return ts if ts.tzinfo else ts.replace(tzinfo=calendar.ZONE)


def width(text: str) -> dt.timedelta:
    span = _SPAN.match(text)
    if not span or int(span[1]) <= 0:
        raise argparse.ArgumentTypeError(f"not a bucket width: {text!r} (90s, 15m, 1h, 1d)")
    return dt.timedelta(seconds=int(span[1]) * _UNITS[span[2]])


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``query`` to rmiot's sub-parsers."""
    text = "rollups, retention and direct queries over the platform's data"
    parser: argparse.ArgumentParser = subparsers.add_parser("query", help=text,
                                                            description=text)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    rollup = actions.add_parser("rollup", help="run the rollup job once, or --rebuild days")
    rollup.add_argument("--rebuild", action="store_true",
                        help="recompute every cell over [--from, --to) local days")
    rollup.add_argument("--from", dest="first", type=dt.date.fromisoformat, metavar="DAY")
    rollup.add_argument("--to", dest="end", type=dt.date.fromisoformat, metavar="DAY")
    rollup.add_argument("--workers", type=int, default=2)
    retain = actions.add_parser("retain", help="apply the tenants' retention_days "
                                "(needs the administrator's DSN)")
    retain.add_argument("--dry-run", action="store_true", help="print the plan only")
    actions.add_parser("status", help="the rollups' state")
    latest = actions.add_parser("latest", help="a device's newest values")
    latest.add_argument("device", type=int)
    latest.add_argument("--metric", type=int, action="append", default=[])
    raw = actions.add_parser("raw", help="a device's frames over a window")
    raw.add_argument("device", type=int)
    raw.add_argument("--from", dest="lo", type=when, default=when("-1h"))
    raw.add_argument("--to", dest="hi", type=when, default=when("now"))
    raw.add_argument("--metric", type=int, action="append", default=[])
    agg = actions.add_parser("aggregate", help="time-bucketed aggregates over a subtree")
    agg.add_argument("--tenant", type=int, required=True)
    agg.add_argument("--metric", type=int, action="append", required=True)
    agg.add_argument("--from", dest="lo", type=when, default=when("-1d"))
    agg.add_argument("--to", dest="hi", type=when, default=when("now"))
    agg.add_argument("--bucket", type=width, help="bucket width (default: the whole range)")
    agg.add_argument("--months", type=int, default=0, help="calendar-month buckets")
    agg.add_argument("--group-by", choices=sorted(GROUPS), default="none")
    agg.add_argument("--kind", action="append", default=[])
    agg.add_argument("--percentile", type=float, action="append", default=[])
    agg.add_argument("--limit", type=int, default=10_000)
    fleet_ = actions.add_parser("fleet", help="devices online, offline and in fault")
    fleet_.add_argument("--tenant", type=int, required=True)
    fleet_.add_argument("--group-by", choices=sorted(GROUPS), default="department")
    fleet_.add_argument("--online-within", type=width, default=dt.timedelta(minutes=5))
    energy = actions.add_parser("energy", help="energy use per zone, MoM and YoY")
    energy.add_argument("--tenant", type=int, required=True)
    energy.add_argument("--from", dest="first", type=dt.date.fromisoformat, required=True)
    energy.add_argument("--to", dest="end", type=dt.date.fromisoformat, required=True)
    energy.add_argument("--metric", type=int, default=fleet.ENERGY_METRIC)
    energy.add_argument("--by-hospital", action="store_true")
    return parser


def main(cfg: Config, args: argparse.Namespace) -> int:
    """Run ``rmiot query <action>``; returns the exit code."""
    try:
        if args.action == "rollup":
            return _rollup(cfg, args)
        if args.action == "retain":
            report = retention.apply(db.admin_dsn(cfg), dry_run=args.dry_run)
            _emit({"plan": _plain(report.plan), "chunks_dropped": report.chunks_dropped,
                   "telemetry_deleted": report.telemetry_deleted,
                   "rollups_deleted": report.rollups_deleted, "dry_run": args.dry_run})
            return EXIT_OK
        if args.action == "status":
            return _status(cfg)
        return asyncio.run(_query(cfg, args))
    except (aggregates.BadQuery, simple.NotFound) as exc:
        print(f"rmiot: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, aggregates.BadQuery) else EXIT_FAILED


def _rollup(cfg: Config, args: argparse.Namespace) -> int:
    dsn = db.app_dsn(cfg)
    if args.rebuild:
        if not (args.first and args.end and args.first < args.end):
            print("rmiot: --rebuild needs --from DAY and a later --to DAY", file=sys.stderr)
            return EXIT_USAGE
        written = asyncio.run(rollups.rebuild(dsn, args.first, args.end, workers=args.workers))
        _emit({"rebuilt_from": args.first, "to": args.end, "rows": written})
        return EXIT_OK
    report = asyncio.run(rollups.RollupJob(dsn).run_once())
    _emit(_plain(report))
    return EXIT_OK if report.ran else EXIT_FAILED


def _status(cfg: Config) -> int:
    with psycopg.connect(db.app_dsn(cfg)) as conn:
        state: dict[str, dt.datetime] = dict(
            conn.execute("SELECT key, value FROM rollup_state").fetchall())
        waiting: dict[str, int] = dict(
            conn.execute("SELECT level, count(*) FROM rollup_dirty GROUP BY 1").fetchall())
        marks = conn.execute("SELECT count(*) FROM rollup_marks").fetchone()
    _emit({"state": state, "dirty_buckets": waiting, "marks_waiting": marks[0] if marks else 0})
    return EXIT_OK


async def _query(cfg: Config, args: argparse.Namespace) -> int:
    async with await psycopg.AsyncConnection.connect(db.app_dsn(cfg), autocommit=True) as conn:
        cur = await conn.execute(b"SELECT id FROM tenants")
        everything = Scope(full=frozenset(r[0] for r in await cur.fetchall()))
        if args.action == "latest":
            for v in await simple.latest(conn, everything, args.device, args.metric):
                _emit(_plain(v))
        elif args.action == "raw":
            after = None
            while True:
                frames = await simple.raw(conn, everything, args.device, args.lo, args.hi,
                                          1000, after, args.metric)
                for f in frames:
                    _emit(_plain(f))
                if len(frames) < 1000:
                    break
                after = (frames[-1].ts, frames[-1].seq)
        elif args.action == "aggregate":
            homes = await _homes(conn, args.tenant)
            answer = await aggregates.aggregate(conn, aggregates.AggregateQuery(
                metrics=tuple(args.metric), lo=args.lo, hi=args.hi, bucket=args.bucket,
                months=args.months, group_by=GROUPS[args.group_by], kinds=tuple(args.kind),
                percentiles=tuple(args.percentile), homes=homes, limit=args.limit,
                whole_hospitals=await _whole_hospitals(conn, args.tenant)),
                await _horizon(conn))
            for row in answer.rows:
                _emit({**_plain(row), "bucket": calendar.from_us(row.bucket_us), "avg": row.avg,
                       "resolution": answer.resolution})
        elif args.action == "fleet":
            for status in await fleet.fleet_status(conn, await _homes(conn, args.tenant),
                                                   GROUPS[args.group_by], args.online_within):
                _emit(_plain(status))
        elif args.action == "energy":
            for e in await fleet.energy(conn, await _homes(conn, args.tenant),
                                        fleet.periods(args.first, args.end), args.metric,
                                        args.by_hospital,
                                        await _whole_hospitals(conn, args.tenant)):
                _emit({**_plain(e), "mom_pct": e.mom_pct, "yoy_pct": e.yoy_pct})
    return EXIT_OK


async def _homes(conn: psycopg.AsyncConnection[Any], tenant: int) -> tuple[int, ...] | None:
    cur = await conn.execute(b"SELECT id, parent_id IS NULL FROM tenants WHERE %s = ANY (path)",
                             (tenant,))
    rows = await cur.fetchall()
    if not rows:
        raise simple.NotFound(f"tenant {tenant} not found")
    if any(root and tid == tenant for tid, root in rows):
        return None
    return tuple(sorted(r[0] for r in rows))


async def _whole_hospitals(conn: psycopg.AsyncConnection[Any], tenant: int) -> bool:
    cur = await conn.execute(b"SELECT level FROM tenants WHERE id = %s", (tenant,))
    row = await cur.fetchone()
    return row is not None and row[0] in ("region", "district", "hospital")


async def _horizon(conn: psycopg.AsyncConnection[Any]) -> dt.datetime | None:
    cur = await conn.execute(b"SELECT value FROM rollup_state WHERE key = 'minute.horizon'")
    row = await cur.fetchone()
    return row[0] + dt.timedelta(minutes=10) if row else None


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return obj


def _emit(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
                     + "\n")
