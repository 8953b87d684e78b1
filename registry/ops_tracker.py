"""Keeps ``device_status`` — each device's latest battery (300), device_state
(304), zone (400), x/y (401/402) and floor (403) — from telemetry.

``refresh`` reads, for the given devices, the newest frame carrying each of
those metrics since ``since`` (one probe of the telemetry index per device and
metric) and folds it into the device's row: a metric not reported since keeps
its last value. A reported zone is kept when it is a tenant of the device's
hospital (a department or building), else dropped. A change of zone is a
movement (actor ``rtls``).

``StatusTracker`` runs it in the platform: devices seen since its mark, from
``device_last_seen`` (kept by the rollup job), every ``period_s``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

import psycopg

from rmiot.periodic import PeriodicJob

log = logging.getLogger("rmiot.registry.ops_tracker")

BATTERY, USAGE_HOURS, DEVICE_STATE = 300, 302, 304
ZONE, X, Y, FLOOR = 400, 401, 402, 403
TRACKED = (DEVICE_STATE, BATTERY, ZONE, FLOOR, X, Y)
MARK = "status_tracker"

_LATEST = " ".join(
    f"""LEFT JOIN LATERAL (SELECT t.ts, t.vals[array_position(t.metrics, {m})] AS v
                             FROM telemetry t
                            WHERE t.device_id = c.id AND t.ts >= %(since)s
                              AND t.metrics @> ARRAY[{m}]
                            ORDER BY t.ts DESC LIMIT 1) m{m} ON true""" for m in TRACKED)

_REFRESH = f"""
WITH latest AS (
  SELECT c.id, d.tenant_id AS hospital,
         m{DEVICE_STATE}.v AS use_state, m{DEVICE_STATE}.ts AS state_ts,
         m{BATTERY}.v AS battery, m{ZONE}.v AS zone, m{FLOOR}.v AS floor, m{X}.v AS x,
         m{Y}.v AS y,
         greatest(m{DEVICE_STATE}.ts, m{BATTERY}.ts, m{ZONE}.ts, m{FLOOR}.ts, m{X}.ts,
                  m{Y}.ts) AS seen
    FROM unnest(%(ids)s::bigint[]) c (id)
    JOIN devices d ON d.id = c.id
    {_LATEST}
), known AS (
  SELECT l.*, (SELECT z.id FROM tenants z WHERE z.id = l.zone::int
                  AND l.zone BETWEEN 1 AND 2147483647 AND l.hospital = ANY (z.path)) AS zone_id
    FROM latest l WHERE l.seen IS NOT NULL
), before AS (
  SELECT s.device_id, s.zone_id FROM device_status s WHERE s.device_id = ANY (%(ids)s)
), moved AS (
  INSERT INTO device_movements (device_id, from_zone, to_zone, actor, reason)
  SELECT k.id, b.zone_id, k.zone_id, 'rtls', 'seen in another zone'
    FROM known k JOIN before b ON b.device_id = k.id
   WHERE k.zone_id IS NOT NULL AND b.zone_id IS DISTINCT FROM k.zone_id
)
INSERT INTO device_status AS s (device_id, use_state, state_since, battery, zone_id, floor, x, y,
                                last_seen)
SELECT id, use_state::smallint, state_ts, battery, zone_id, floor::smallint, x, y, seen
  FROM known
ON CONFLICT (device_id) DO UPDATE SET
  state_since = CASE WHEN excluded.use_state IS NULL THEN s.state_since
                     WHEN excluded.use_state IS DISTINCT FROM s.use_state
                     THEN excluded.state_since ELSE s.state_since END,
  use_state = coalesce(excluded.use_state, s.use_state),
  battery = coalesce(excluded.battery, s.battery),
  zone_id = coalesce(excluded.zone_id, s.zone_id),
  floor = coalesce(excluded.floor, s.floor),
  x = coalesce(excluded.x, s.x), y = coalesce(excluded.y, s.y),
  last_seen = greatest(excluded.last_seen, s.last_seen)
"""


def refresh(conn: psycopg.Connection[Any], device_ids: Sequence[int],
            since: dt.datetime) -> int:
    """Fold the devices' frames since ``since`` into ``device_status``;
    returns how many devices had something to say."""
    if not device_ids:
        return 0
    with conn.transaction():
        cur = conn.execute(_REFRESH.encode(), {"ids": list(device_ids), "since": since})
    return cur.rowcount


class StatusTracker(PeriodicJob):
    """Refreshes the devices seen since the last pass, every ``period_s``."""

    name = "status-tracker"

    def __init__(self, dsn: str, period_s: float = 5.0, lookback_s: float = 900.0) -> None:
        super().__init__(period_s)
        self.dsn = dsn
        self.lookback = dt.timedelta(seconds=lookback_s)

    def run_once(self) -> int:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute("SELECT value FROM ops_state WHERE key = %s", (MARK,)).fetchone()
            now = dt.datetime.now(dt.UTC)
            mark = row[0] if row else now - self.lookback
            seen = conn.execute("SELECT device_id, last_ts FROM device_last_seen "
                                "WHERE last_ts > %s", (mark - dt.timedelta(seconds=30),)
                                ).fetchall()
            done = refresh(conn, [int(r[0]) for r in seen], mark - self.lookback)
            newest = max((r[1] for r in seen), default=mark)
            conn.execute("INSERT INTO ops_state (key, value) VALUES (%s, %s) ON CONFLICT (key) "
                         "DO UPDATE SET value = greatest(ops_state.value, excluded.value)",
                         (MARK, newest))
        return done

    async def tick(self) -> None:
        await asyncio.to_thread(self.run_once)
