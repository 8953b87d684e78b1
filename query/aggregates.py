"""Time-bucketed aggregates over a tenant subtree: count, sum, avg, min, max
and percentiles per (bucket, group, metric) — the complex tier's main query.

Resolution: the coarsest source that answers exactly. The range is widened
to whole buckets (``calendar``), then the first of day, hour, minute rollups
whose width divides the bucket (calendar months are whole days) is used; the
minute rollups only from their horizon on; days over whole hospitals, grouped
no finer than by hospital, come from the hospitals' own day rows. Grouping by
device, or a bucket no rollup divides (say 90 s), reads telemetry itself
(``resolution = "raw"``) through the device index, which suits a department
or a hospital over days.
Counts, sums, min and max are exact either way; percentiles are exact from
telemetry and within 1 % (relative) from rollup sketches. Rollup answers are
current up to the rollups' ``as_of`` (reported); telemetry answers to now.

Groups: none, hospital, department (a device's home: its department, else its
hospital), device, device kind, model. Filters: kinds, models.

De-identification: for tenants a caller reaches only through a commission role
(``Scope.deid``), a group with fewer than k contributing devices is returned
with ``suppressed`` set and every figure zeroed. A group's size is the number of
devices that reported in the bucket; where an answer bucket spans several rollup
buckets it is the largest of theirs — a lower bound, so suppression errs
towards hiding. (A device serves one patient at a time: devices stand for people.)

Pages: rows come ordered by (bucket, group id, metric); ``after`` is the last
row of the previous page and the next page starts after it.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import psycopg

from rmiot.query import calendar, sketch
from rmiot.query import rollup_sql as rsql
from rmiot.query.rollups import DAY, LEVELS, MINUTE, Level

# Device kinds as migration 0007 lists them; a kind's group id is its position + 1.
KINDS = ("monitor", "wearable", "infusion_pump", "ventilator", "rfid_tag", "meter", "sensor",
         "gateway", "imaging", "analyzer", "smart_bed", "other")
MAX_BUCKETS = 100_000


class GroupBy(enum.IntEnum):  # the values of proto GroupBy
    NONE = 0
    HOSPITAL = 1
    DEPARTMENT = 2
    DEVICE = 3
    KIND = 4
    MODEL = 5


class BadQuery(ValueError):
    """The request cannot be answered as asked; the message says why."""


@dataclass(frozen=True)
class Keyset:
    bucket: dt.datetime
    group_id: int
    metric: int


@dataclass(frozen=True)
class AggregateQuery:
    metrics: tuple[int, ...]
    lo: dt.datetime
    hi: dt.datetime
    bucket: dt.timedelta | None = None  # None and months == 0: the whole range is one bucket
    months: int = 0
    group_by: GroupBy = GroupBy.NONE
    kinds: tuple[str, ...] = ()
    models: tuple[int, ...] = ()
    percentiles: tuple[float, ...] = ()
    homes: tuple[int, ...] | None = None  # the scope's tenants; None: every tenant
    whole_hospitals: bool = False         # the scope holds whole hospitals (not below one)
    deid_all: bool = False                # every one reached only through commission roles
    deid_homes: tuple[int, ...] = ()      # else those that are (a mixed scope)
    min_group_size: int = 11
    after: Keyset | None = None
    limit: int = 1000

    def checked(self) -> AggregateQuery:
        """Validated, with the range widened to whole buckets."""
        if not self.metrics:
            raise BadQuery("name at least one metric")
        if self.hi <= self.lo:
            raise BadQuery("the time range is empty (to must be after from)")
        if any(not 0 <= q <= 1 for q in self.percentiles):
            raise BadQuery("percentiles are fractions from 0 to 1 (0.95, not 95)")
        if any(k not in KINDS for k in self.kinds):
            raise BadQuery(f"unknown device kind; kinds are {', '.join(KINDS)}")
        if self.months:
            if self.bucket is not None or not 1 <= self.months <= 120:
                raise BadQuery("bucket_months is 1 to 120, without bucket_s")
            lo = calendar.month_floor(self.lo)
            hi = lo
            while hi < self.hi:
                hi = calendar.add_months(hi, self.months)
            return replace(self, lo=lo, hi=hi)
        if self.bucket is None:
            return replace(self, lo=calendar.floor(self.lo, calendar.MINUTE),
                           hi=calendar.ceil(self.hi, calendar.MINUTE))
        if self.bucket < dt.timedelta(seconds=1) or self.bucket % dt.timedelta(seconds=1):
            raise BadQuery("bucket_s is a whole number of seconds")
        lo, hi = calendar.floor(self.lo, self.bucket), calendar.ceil(self.hi, self.bucket)
        if (hi - lo) / self.bucket > MAX_BUCKETS:
            raise BadQuery(f"more than {MAX_BUCKETS} buckets: widen the bucket")
        return replace(self, lo=lo, hi=hi)


@dataclass(frozen=True, slots=True)
class Row:
    bucket_us: int              # the bucket's start, µs since 1970 UTC
    group_id: int
    group: str
    metric: int
    count: int
    total: float
    lo: float
    hi: float
    devices: int
    percentiles: tuple[float, ...]
    suppressed: bool = False

    @property
    def avg(self) -> float:
        return self.total / self.count if self.count else math.nan


@dataclass(frozen=True)
class Answer:
    rows: list[Row]
    resolution: str            # "day", "hour", "minute" or "raw"
    lo: dt.datetime
    hi: dt.datetime
    more: bool                 # another page follows


@dataclass(frozen=True)
class Source:
    """Where a rollup answer is read: a level's table, and the column naming
    the tenant its scope filter applies to."""

    level: Level
    table: str
    tenant: str


HOSPITAL_DAYS = Source(DAY, "rollup_day_hospital", "r.hospital_id")
_BY_HOSPITAL = (GroupBy.NONE, GroupBy.HOSPITAL, GroupBy.KIND, GroupBy.MODEL)


def choose_source(query: AggregateQuery, minute_horizon: dt.datetime | None) -> Source | None:
    """Where to read ``query`` (already checked): the coarsest level that
    answers it exactly, and for days over whole hospitals, not grouped finer
    and not mixing de-identified and plain tenants, the hospitals' day rows."""
    level = choose_level(query, minute_horizon)
    if level is None:
        return None
    if (level is DAY and query.group_by in _BY_HOSPITAL and not query.deid_homes
            and (query.homes is None or query.whole_hospitals)):
        return HOSPITAL_DAYS
    return Source(level, level.table, "r.home_id")


def choose_level(query: AggregateQuery, minute_horizon: dt.datetime | None) -> Level | None:
    """The coarsest rollup level that answers ``query`` (already checked)
    exactly; None: telemetry."""
    if query.group_by is GroupBy.DEVICE:
        return None
    for level in LEVELS:
        if query.months:
            divides = True
        elif query.bucket is not None:
            divides = query.bucket % level.width == dt.timedelta(0)
        else:
            divides = True
        aligned = (calendar.aligned(query.lo, level.width)
                   and calendar.aligned(query.hi, level.width))
        covered = level is not MINUTE or (minute_horizon is not None
                                          and query.lo >= minute_horizon)
        if divides and aligned and covered:
            return level
    return None


async def aggregate(conn: psycopg.AsyncConnection[Any], query: AggregateQuery,
                    minute_horizon: dt.datetime | None) -> Answer:
    query = query.checked()
    source = choose_source(query, minute_horizon)
    params = _params(query)
    if source is None:
        cur = await conn.execute(_from_telemetry(query).encode(), params, binary=True)
        fetched = await cur.fetchall()
        rows = [_row(query, r[:10], tuple(r[10]) if query.percentiles else ())
                for r in fetched[:query.limit]]
        return Answer(rows, "raw", query.lo, query.hi, len(fetched) > query.limit)
    # Binary results: thousands of rows parse several times faster.
    cur = await conn.execute(_from_rollup(query, source).encode(), params, binary=True)
    fetched = await cur.fetchall()
    page = fetched[:query.limit]
    sketches: dict[tuple[Any, ...], tuple[list[int], list[int]]] = {}
    if query.percentiles and page:
        # The page's merged sketches, in a statement of their own: joining them
        # to the figures above in SQL would join two sets of groups on three
        # keys, which the planner can only guess the size of.
        last = page[-1]
        cur = await conn.execute(_sketches(query, source).encode(), {
            **params, "last_b": calendar.from_us(last[0]), "last_g": last[1],
            "last_m": last[2]}, binary=True)
        sketches = {(b, g, m): (bins, counts) for b, g, m, bins, counts in await cur.fetchall()}
    rows = []
    for r in page:
        bins, counts = sketches.get((r[0], r[1], r[2]), ([], []))
        pct = tuple(sketch.percentiles(bins, counts, query.percentiles)) \
            if query.percentiles else ()
        rows.append(_row(query, r, pct))
    return Answer(rows, source.level.name, query.lo, query.hi, len(fetched) > query.limit)


def _params(query: AggregateQuery) -> dict[str, Any]:
    after = query.after
    return {
        "metrics": list(query.metrics), "lo": query.lo, "hi": query.hi,
        "bucket": query.bucket, "months": f"{query.months} months",
        "origin": calendar.ORIGIN, "month_origin": query.lo, "zone": calendar.TIMEZONE,
        "homes": list(query.homes) if query.homes is not None else None,
        "deid_homes": list(query.deid_homes), "kinds": list(query.kinds) or None,
        "models": list(query.models) or None, "all_kinds": list(KINDS),
        "fractions": list(query.percentiles),
        "after_b": after.bucket if after else calendar.EPOCH - dt.timedelta(days=36500),
        "after_g": after.group_id if after else -(2**63),
        "after_m": after.metric if after else -(2**31),
        "limit": query.limit + 1,
    }


def _bucket_of(query: AggregateQuery, column: str) -> str:
    if query.months:
        return (f"time_bucket(%(months)s::interval, {column}, %(zone)s, "
                f"%(month_origin)s::timestamptz)")
    if query.bucket is None:
        return "%(lo)s::timestamptz"
    return f"time_bucket(%(bucket)s::interval, {column}, %(origin)s::timestamptz)"


def _deid(query: AggregateQuery, home: str) -> str:
    """SQL: does this row count towards a de-identified group?"""
    if query.deid_all:
        return "true"
    if not query.deid_homes:
        return "false"
    return f"{home} = ANY (%(deid_homes)b::int[])"


def _filters(home: str, model: str) -> str:
    return (f"(%(homes)b::int[] IS NULL OR {home} = ANY (%(homes)b::int[]))"
            f" AND (%(models)b::bigint[] IS NULL OR {model} = ANY (%(models)b::bigint[]))"
            f" AND (%(kinds)b::text[] IS NULL OR {model} IN "
            f"(SELECT id FROM device_models WHERE kind = ANY (%(kinds)b::text[])))")


# The group id of a row, per grouping: (rollup row alias r, telemetry path alias d).
_KIND = "coalesce(array_position(%(all_kinds)b::text[], m.kind), 0)"
_GROUP_ROLLUP = {GroupBy.NONE: "0", GroupBy.HOSPITAL: "r.hospital_id",
                 GroupBy.DEPARTMENT: "r.home_id", GroupBy.KIND: _KIND, GroupBy.MODEL: "r.model_id"}
_GROUP_RAW = {GroupBy.NONE: "0", GroupBy.HOSPITAL: "d.hospital_id", GroupBy.DEPARTMENT: "d.home_id",
              GroupBy.DEVICE: "d.id", GroupBy.KIND: _KIND, GroupBy.MODEL: "d.model_id"}


def _page_and_names(query: AggregateQuery, body: str, extra: str) -> str:
    """Order, keyset and names around ``body`` (a SELECT of ob, gid, metric…)."""
    name, join = _NAMES.get(query.group_by, ("''", ""))
    return f"""
SELECT {_US.format("a.ob")}, a.gid, a.metric, a.n, a.total, a.lo, a.hi, a.devices, a.deid,
       {name}{extra}
  FROM ({body}) a {join}
 WHERE (a.ob, a.gid, a.metric) > (%(after_b)s, %(after_g)s, %(after_m)s)
 ORDER BY a.ob, a.gid, a.metric
 LIMIT %(limit)s"""


# A bucket's start as µs since 1970: the wire's unit, without a datetime per row.
_US = "(extract(epoch FROM {}) * 1000000)::int8"

# A group's name, and the join that finds it.
_NAMES = {
    GroupBy.HOSPITAL: ("n.name", "LEFT JOIN tenants n ON n.id = a.gid"),
    GroupBy.DEPARTMENT: ("n.name", "LEFT JOIN tenants n ON n.id = a.gid"),
    GroupBy.MODEL: ("n.name", "LEFT JOIN device_models n ON n.id = a.gid"),
    GroupBy.DEVICE: ("coalesce(n.serial_no, n.udi, '')", "LEFT JOIN devices n ON n.id = a.gid"),
}


def _rollup_rows(query: AggregateQuery, source: Source, columns: str) -> str:
    """The source's rows in the scope, filters and range, as (ob, gid, metric, …)."""
    join_models = "LEFT JOIN device_models m ON m.id = r.model_id" \
        if query.group_by is GroupBy.KIND else ""
    return f"""
    SELECT {_bucket_of(query, "r.bucket")} AS ob, {_GROUP_ROLLUP[query.group_by]} AS gid,
           r.metric, {columns}
      FROM {source.table} r {join_models}
     WHERE r.metric = ANY (%(metrics)b::int[]) AND r.bucket >= %(lo)s AND r.bucket < %(hi)s
       AND {_filters(source.tenant, "r.model_id")}"""


def _from_rollup(query: AggregateQuery, source: Source) -> str:
    """Figures per (bucket, group, metric) in two aggregation steps and no join:
    per rollup bucket first (the cells of a group report disjoint devices, so
    their devices add up), then per answer bucket (the largest group size)."""
    per_level = _rollup_rows(query, source, f"""r.bucket AS lb, sum(r.n) AS n,
           sum(r.total) AS total, min(r.lo) AS lo, max(r.hi) AS hi, sum(r.devices) AS devices,
           bool_or({_deid(query, source.tenant)}) AS deid""") + " GROUP BY 1, 2, 3, 4"
    body = f"""
SELECT ob, gid, metric, sum(n)::int8 AS n, sum(total) AS total, min(lo) AS lo, max(hi) AS hi,
       bool_or(deid) AS deid, max(devices)::int AS devices
  FROM ({per_level}) x
 GROUP BY 1, 2, 3"""
    return _page_and_names(query, body, "")


def _sketches(query: AggregateQuery, source: Source) -> str:
    """The merged sketch of each (bucket, group, metric) of one page."""
    return f"""
SELECT {_US.format("ob")}, gid, metric, array_agg(bin ORDER BY bin), array_agg(c ORDER BY bin)
  FROM (SELECT ob, gid, metric, e >> 32 AS bin, sum((e & 4294967295)::int) AS c
          FROM ({_rollup_rows(query, source, "unnest(r.sketch) AS e")}) x
         GROUP BY 1, 2, 3, 4) y
 WHERE (ob, gid, metric) > (%(after_b)s, %(after_g)s, %(after_m)s)
   AND (ob, gid, metric) <= (%(last_b)s, %(last_g)s, %(last_m)s)
 GROUP BY 1, 2, 3"""


def _from_telemetry(query: AggregateQuery) -> str:
    pct = ""
    extra = ""
    if query.percentiles:
        pct = ", percentile_disc(%(fractions)b::float8[]) WITHIN GROUP (ORDER BY v) AS pct"
        extra = ", a.pct"
    body = f"""
WITH {rsql.HOSPITAL_OF.strip()},
devs AS (
    SELECT d.id, {rsql.HOME} AS home_id, {rsql.MODEL} AS model_id FROM devices d
     WHERE {_filters(rsql.HOME, rsql.MODEL)}),
vals AS (
    SELECT {_bucket_of(query, "t.ts")} AS ob, {_GROUP_RAW[query.group_by]} AS gid,
           t.device_id, {_deid(query, "d.home_id")} AS deid,
           unnest(t.metrics) AS metric, unnest(t.vals) AS v
      FROM (SELECT devs.*, coalesce(h.hospital, devs.home_id) AS hospital_id
              FROM devs LEFT JOIN hospital_of h ON h.id = devs.home_id) d
      JOIN telemetry t ON t.device_id = d.id AND t.ts >= %(lo)s AND t.ts < %(hi)s
      {"LEFT JOIN device_models m ON m.id = d.model_id" if query.group_by is GroupBy.KIND else ""})
SELECT ob, gid, metric, count(*) AS n, sum(v) AS total, min(v) AS lo, max(v) AS hi,
       bool_or(deid) AS deid, count(DISTINCT device_id)::int AS devices{pct}
  FROM vals
 WHERE metric = ANY (%(metrics)b::int[]) AND abs(v) < 'Infinity'::float8
 GROUP BY 1, 2, 3"""
    return _page_and_names(query, body, extra)


def _row(query: AggregateQuery, r: Sequence[Any], pct: tuple[float, ...]) -> Row:
    ob, gid, metric, n, total, lo, hi, devices, deid, name = r[:10]
    if query.group_by is GroupBy.KIND:
        name = KINDS[gid - 1] if 0 < gid <= len(KINDS) else "unknown"
    if deid and devices < query.min_group_size:
        return Row(ob, gid, name or "", metric, 0, 0.0, 0.0, 0.0, 0,
                   tuple(0.0 for _ in pct), suppressed=True)
    return Row(ob, gid, name or "", metric, int(n), float(total), float(lo), float(hi),
               int(devices), pct)
