"""Energy oversight for hospital operations: sub-metered electricity, water and
gas per building / zone / department (a meter's home tenant), with month over
month and year over year, and the hours a zone heated and cooled at once.

Two kinds of meter reading, by metric:

- the catalogue's counters — 201 energy_total (kWh), 202 water_total (m3),
  203 gas_total (m3) — grow for ever: what a meter used over [lo, hi) is its
  last reading before ``hi`` minus its last reading before ``lo`` (or its
  first in the period when it has none before); meters' uses add up per zone.
  One probe of the telemetry index per meter and bound;
- any other metric is "used since the previous frame" (as the district
  dataset's meters send it) and is summed from the day rollups:
  ``query.fleet.energy``.

Either way the periods are ``query.fleet.periods`` and rows ``EnergyRow``.

Simultaneous heating and cooling: a zone's hour counts when a heating and a
cooling output (metrics whose model names them ``heating…`` / ``cooling…``)
both averaged above ``threshold`` in that hour (the hour rollups).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import psycopg

from rmiot.query import fleet
from rmiot.query.fleet import EnergyRow

COUNTERS = {201: "electricity (kWh)", 202: "water (m3)", 203: "gas (m3)"}
_LOOKBACK = dt.timedelta(days=3)   # how far before a period a base reading is looked for

_COUNTER_SQL = """
WITH m AS (
  SELECT d.id, coalesce(d.department_id, d.tenant_id) AS home
    FROM devices d JOIN device_models dm ON dm.id = d.model_id AND dm.kind = 'meter'
   WHERE %(scope)s::int IS NULL OR coalesce(d.department_id, d.tenant_id) IN
         (SELECT id FROM tenants WHERE path @> ARRAY[%(scope)s::int])
), p (k, lo, hi) AS (VALUES (0, %(lo)s::timestamptz, %(hi)s::timestamptz),
                            (1, %(plo)s, %(phi)s), (2, %(ylo)s, %(yhi)s)),
used AS (
  SELECT m.home, p.k, last.v - coalesce(base.v, first.v) AS v
    FROM m CROSS JOIN p
    CROSS JOIN LATERAL (
      SELECT t.vals[array_position(t.metrics, %(metric)s::int)] AS v FROM telemetry t
       WHERE t.device_id = m.id AND t.ts < p.hi AND t.ts >= p.lo
         AND t.metrics @> ARRAY[%(metric)s::int] ORDER BY t.ts DESC LIMIT 1) last
    LEFT JOIN LATERAL (
      SELECT t.vals[array_position(t.metrics, %(metric)s::int)] AS v FROM telemetry t
       WHERE t.device_id = m.id AND t.ts < p.lo AND t.ts >= p.lo - %(back)s
         AND t.metrics @> ARRAY[%(metric)s::int] ORDER BY t.ts DESC LIMIT 1) base ON true
    LEFT JOIN LATERAL (
      SELECT t.vals[array_position(t.metrics, %(metric)s::int)] AS v FROM telemetry t
       WHERE t.device_id = m.id AND t.ts >= p.lo AND t.ts < p.hi
         AND t.metrics @> ARRAY[%(metric)s::int] ORDER BY t.ts LIMIT 1) first ON base.v IS NULL
)
SELECT u.home, coalesce(n.name, ''), coalesce(sum(u.v) FILTER (WHERE u.k = 0), 0),
       sum(u.v) FILTER (WHERE u.k = 1), sum(u.v) FILTER (WHERE u.k = 2)
  FROM used u LEFT JOIN tenants n ON n.id = u.home
 GROUP BY u.home, n.name ORDER BY u.home"""


async def sub_metered(conn: psycopg.AsyncConnection[Any], scope: int | None, first: dt.date,
                      end: dt.date, metric: int) -> list[EnergyRow]:
    """Use per zone under ``scope`` over local days [first, end), with the
    same days a month and a year before."""
    span = fleet.periods(first, end)
    if metric not in COUNTERS:
        homes = None
        if scope is not None:
            cur = await conn.execute("SELECT id FROM tenants WHERE path @> ARRAY[%s]::integer[]",
                                     (scope,))
            homes = tuple(int(r[0]) for r in await cur.fetchall())
        return await fleet.energy(conn, homes, span, metric, by_hospital=False)
    (lo, hi), (plo, phi), (ylo, yhi) = span.current, span.previous_month, span.last_year
    cur = await conn.execute(_COUNTER_SQL.encode(), {
        "scope": scope, "metric": metric, "lo": lo, "hi": hi, "plo": plo, "phi": phi,
        "ylo": ylo, "yhi": yhi, "back": _LOOKBACK})
    return [EnergyRow(int(z), name, float(c), None if p is None else float(p),
                      None if y is None else float(y))
            for z, name, c, p, y in await cur.fetchall()]


@dataclass(frozen=True)
class HeatCool:
    zone_id: int
    zone: str
    hours: int          # hours with any heating or cooling reading
    heating_hours: int
    cooling_hours: int
    both_hours: int     # heating and cooling at once: waste


_HEAT_COOL_SQL = """
WITH hm AS (
  SELECT m.id AS model_id, (x ->> 'id')::int AS metric,
         (x ->> 'name') ILIKE 'heat%%' AS heating
    FROM device_models m, jsonb_array_elements(m.metrics) x
   WHERE (x ->> 'name') ILIKE 'heat%%' OR (x ->> 'name') ILIKE 'cool%%'
), h AS (
  SELECT r.bucket, r.home_id,
         bool_or(hm.heating AND r.total / r.n > %(thr)s) AS heat,
         bool_or(NOT hm.heating AND r.total / r.n > %(thr)s) AS cool
    FROM rollup_hour r JOIN hm ON hm.model_id = r.model_id AND hm.metric = r.metric
   WHERE r.bucket >= %(lo)s AND r.bucket < %(hi)s AND r.n > 0
     AND (%(scope)s::int IS NULL OR r.home_id IN
          (SELECT id FROM tenants WHERE path @> ARRAY[%(scope)s::int]))
   GROUP BY 1, 2
)
SELECT h.home_id, coalesce(n.name, ''), count(*), count(*) FILTER (WHERE heat),
       count(*) FILTER (WHERE cool), count(*) FILTER (WHERE heat AND cool)
  FROM h LEFT JOIN tenants n ON n.id = h.home_id
 GROUP BY h.home_id, n.name ORDER BY h.home_id"""


async def heating_and_cooling(conn: psycopg.AsyncConnection[Any], scope: int | None,
                              lo: dt.datetime, hi: dt.datetime,
                              threshold: float = 0.0) -> list[HeatCool]:
    cur = await conn.execute(_HEAT_COOL_SQL.encode(), {"scope": scope, "lo": lo, "hi": hi,
                                                       "thr": threshold})
    return [HeatCool(int(r[0]), r[1], *(int(v) for v in r[2:])) for r in await cur.fetchall()]


class OpsEnergy:
    """The energy source the operations service reads through (a connection a
    call: these are reports, not a hot path)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def energy(self, scope: int, first: dt.date, end: dt.date,
                     metric: int) -> list[EnergyRow]:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            return await sub_metered(conn, scope or None, first, end, metric)

    async def heating_cooling(self, scope: int, lo: dt.datetime,
                              hi: dt.datetime) -> list[HeatCool]:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            return await heating_and_cooling(conn, scope or None, lo, hi)
