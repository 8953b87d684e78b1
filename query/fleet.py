"""Fleet status and energy use: the complex tier's dashboards over equipment.

Fleet status counts a scope's devices per group (hospital, department, kind,
model): ``online`` — active and seen within the threshold; ``offline`` — active
and seen before it; ``never_seen`` — active, no data yet; ``in_fault`` — in
maintenance; ``inactive`` — registered, suspended, retired or scrapped. "Seen"
is ``device_last_seen``, which the rollup job keeps (so this reads one row per
device, not telemetry).

Energy use per zone (a meter's home tenant: a building or a department) over
local days [from, to), next to the same days a month earlier (month over month)
and a year earlier (year over year), from the day rollups of meters
(``kind = 'meter'``). A meter's energy metric (default 1) carries the energy
used since its previous frame (kWh), so a sum over a period is the energy used.
Neither describes patients, so neither is subject to small-group suppression.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import psycopg

from rmiot.query import calendar
from rmiot.query import rollup_sql as rsql
from rmiot.query.aggregates import KINDS, BadQuery, GroupBy

ENERGY_KIND = "meter"
ENERGY_METRIC = 1


@dataclass(frozen=True)
class FleetRow:
    group_id: int
    group: str
    total: int
    online: int
    offline: int
    never_seen: int
    in_fault: int
    inactive: int


@dataclass(frozen=True)
class EnergyRow:
    zone_id: int
    zone: str
    energy: float
    previous_month: float | None
    last_year: float | None

    @property
    def mom_pct(self) -> float | None:
        return _change(self.energy, self.previous_month)

    @property
    def yoy_pct(self) -> float | None:
        return _change(self.energy, self.last_year)


def _change(now: float, before: float | None) -> float | None:
    if before is None or before == 0:
        return None
    return (now - before) / before * 100


# A device's hospital is its owning tenant (devices.tenant_id, migration 0007).
_FLEET_GROUP = {GroupBy.NONE: "0", GroupBy.HOSPITAL: "x.hospital_id",
                GroupBy.DEPARTMENT: "x.home_id", GroupBy.MODEL: "x.model_id",
                GroupBy.KIND: "coalesce(array_position(%(all_kinds)b::text[], m.kind), 0)"}


async def fleet_status(conn: psycopg.AsyncConnection[Any], homes: tuple[int, ...] | None,
                       group_by: GroupBy, online_within: dt.timedelta) -> list[FleetRow]:
    if group_by not in _FLEET_GROUP:
        raise BadQuery("fleet status groups by hospital, department, kind or model")
    sql = f"""
WITH x AS (SELECT d.id, d.state, d.tenant_id AS hospital_id, {rsql.HOME} AS home_id,
                  {rsql.MODEL} AS model_id, s.last_ts
        FROM devices d LEFT JOIN device_last_seen s ON s.device_id = d.id
       WHERE %(homes)b::int[] IS NULL OR {rsql.HOME} = ANY (%(homes)b::int[]))
SELECT g.gid, coalesce(n.name, ''), g.total, g.online, g.offline, g.never_seen, g.in_fault,
       g.inactive
  FROM (SELECT {_FLEET_GROUP[group_by]} AS gid, count(*) AS total,
               count(*) FILTER (WHERE x.state = 'active' AND x.last_ts >= %(since)s) AS online,
               count(*) FILTER (WHERE x.state = 'active' AND x.last_ts < %(since)s) AS offline,
               count(*) FILTER (WHERE x.state = 'active' AND x.last_ts IS NULL) AS never_seen,
               count(*) FILTER (WHERE x.state = 'maintenance') AS in_fault,
               count(*) FILTER (WHERE x.state NOT IN ('active', 'maintenance')) AS inactive
          FROM x {"LEFT JOIN device_models m ON m.id = x.model_id"
                  if group_by is GroupBy.KIND else ""}
         GROUP BY 1) g
  LEFT JOIN {"device_models" if group_by is GroupBy.MODEL else "tenants"} n
         ON n.id = g.gid AND %(named)s
 ORDER BY g.gid"""
    cur = await conn.execute(sql.encode(), {
        "homes": list(homes) if homes is not None else None, "all_kinds": list(KINDS),
        "since": dt.datetime.now(dt.UTC) - online_within,
        "named": group_by in (GroupBy.HOSPITAL, GroupBy.DEPARTMENT, GroupBy.MODEL)})
    out = []
    for gid, name, *counts in await cur.fetchall():
        if group_by is GroupBy.KIND:
            name = KINDS[gid - 1] if 0 < gid <= len(KINDS) else "unknown"
        out.append(FleetRow(gid, name, *(int(c) for c in counts)))
    return out


@dataclass(frozen=True)
class Periods:
    current: tuple[dt.datetime, dt.datetime]
    previous_month: tuple[dt.datetime, dt.datetime]
    last_year: tuple[dt.datetime, dt.datetime]


def periods(first: dt.date, end: dt.date) -> Periods:
    """Local days [first, end) and the same days one month and one year before."""
    if end <= first:
        raise BadQuery("the period is empty (to_date must be after from_date)")
    lo, hi = calendar.start_of(first), calendar.start_of(end)
    return Periods((lo, hi), (calendar.add_months(lo, -1), calendar.add_months(hi, -1)),
                   (calendar.add_months(lo, -12), calendar.add_months(hi, -12)))


async def energy(conn: psycopg.AsyncConnection[Any], homes: tuple[int, ...] | None,
                 span: Periods, metric: int, by_hospital: bool,
                 whole_hospitals: bool = False) -> list[EnergyRow]:
    """``whole_hospitals``: the scope holds whole hospitals (then zones by
    hospital read the hospitals' day rows)."""
    if by_hospital and (homes is None or whole_hospitals):
        table, zone, scope = "rollup_day_hospital", "r.hospital_id", "r.hospital_id"
    else:
        table, zone = "rollup_day", "r.hospital_id" if by_hospital else "r.home_id"
        scope = "r.home_id"
    sql = f"""
SELECT e.zone, coalesce(n.name, ''), e.cur, e.prev, e.prev_n, e.yoy, e.yoy_n
  FROM (SELECT {zone} AS zone,
               coalesce(sum(r.total) FILTER (WHERE r.bucket >= %(lo)s AND r.bucket < %(hi)s), 0)
                   AS cur,
               sum(r.total) FILTER (WHERE r.bucket >= %(plo)s AND r.bucket < %(phi)s) AS prev,
               count(*) FILTER (WHERE r.bucket >= %(plo)s AND r.bucket < %(phi)s) AS prev_n,
               sum(r.total) FILTER (WHERE r.bucket >= %(ylo)s AND r.bucket < %(yhi)s) AS yoy,
               count(*) FILTER (WHERE r.bucket >= %(ylo)s AND r.bucket < %(yhi)s) AS yoy_n
          FROM {table} r JOIN device_models m ON m.id = r.model_id AND m.kind = %(kind)s
         WHERE r.metric = %(metric)s
           AND (%(homes)b::int[] IS NULL OR {scope} = ANY (%(homes)b::int[]))
           AND ((r.bucket >= %(lo)s AND r.bucket < %(hi)s)
                OR (r.bucket >= %(plo)s AND r.bucket < %(phi)s)
                OR (r.bucket >= %(ylo)s AND r.bucket < %(yhi)s))
         GROUP BY 1) e
  LEFT JOIN tenants n ON n.id = e.zone
 ORDER BY e.zone"""
    (lo, hi), (plo, phi), (ylo, yhi) = span.current, span.previous_month, span.last_year
    cur = await conn.execute(sql.encode(), {
        "lo": lo, "hi": hi, "plo": plo, "phi": phi, "ylo": ylo, "yhi": yhi, "kind": ENERGY_KIND,
        "metric": metric, "homes": list(homes) if homes is not None else None})
    return [EnergyRow(z, name, float(c), float(p) if pn else None, float(y) if yn else None)
            for z, name, c, p, pn, y, yn in await cur.fetchall()]
