"""The simple tier: one device (or patient), few rows, read through the
telemetry index on (device_id, ts) — the standard's "clear conditions, few
records" queries.

- ``latest``: the newest value of each metric among the device's newest
  ``LATEST_DEPTH`` frames (a frame need not carry every metric);
- ``raw``: a device's frames over a window, oldest first, a page at a time
  (keyset on (ts, seq), so a page costs the same wherever it starts);
- ``bindings``: the open bindings of a device or of a patient (pseudonym, bed,
  episode — never the sealed identity).

Each answer first learns the device's home tenant in the same statement and
checks it against the caller's :class:`~rmiot.query.access.Scope`: a caller who
sees the home gets everything; a clinician gets the data recorded while a
patient was bound to the device by a binding made in the clinician's subtree;
anyone else gets :class:`NotFound`, exactly as for a device that does not exist.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from rmiot.query import calendar
from rmiot.query.access import Scope
from rmiot.security.interceptor import note_patient

LATEST_DEPTH = 64
EVER = dt.datetime(1, 1, 1, tzinfo=dt.UTC)


class NotFound(Exception):
    """No such object in the caller's reach (the message names it)."""


@dataclass(frozen=True)
class Value:
    metric: int
    value: float
    ts: dt.datetime


@dataclass(frozen=True)
class Frame:
    ts: dt.datetime
    seq: int
    metrics: list[int]
    values: list[float]


@dataclass(frozen=True)
class Binding:
    id: int
    device_id: int
    patient_id: int | None
    pseudonym: str
    bed: str
    episode: str
    tenant_id: int
    bound_at: dt.datetime


# The newest value of each metric among the newest frames, taken apart in the
# database: a row a metric comes back, not the frames.
LATEST_SQL = b"""
SELECT coalesce(d.department_id, d.tenant_id), x.ts, x.metric, x.value, pb.pseudonyms
  FROM devices d
  CROSS JOIN LATERAL (SELECT array_agg(p.pseudonym) AS pseudonyms
                        FROM device_bindings b JOIN patients p ON p.id = b.patient_id
                       WHERE b.device_id = d.id AND b.unbound_at IS NULL) pb
  LEFT JOIN LATERAL (
       SELECT DISTINCT ON (u.metric) f.ts, u.metric, u.value
         FROM (SELECT t.ts, t.metrics, t.vals FROM telemetry t
                WHERE t.device_id = d.id ORDER BY t.ts DESC LIMIT %(depth)s) f,
              unnest(f.metrics, f.vals) AS u (metric, value)
        ORDER BY u.metric, f.ts DESC) x ON true
 WHERE d.id = %(device)s"""

RAW_SQL = b"""
SELECT coalesce(d.department_id, d.tenant_id), x.ts, x.seq, x.metrics, x.vals, pb.pseudonyms
  FROM devices d
  CROSS JOIN LATERAL (SELECT array_agg(DISTINCT p.pseudonym) AS pseudonyms
                        FROM device_bindings b JOIN patients p ON p.id = b.patient_id
                       WHERE b.device_id = d.id AND b.bound_at < %(hi)s
                         AND (b.unbound_at IS NULL OR b.unbound_at > %(lo)s)) pb
  LEFT JOIN LATERAL (SELECT t.ts, t.seq, t.metrics, t.vals FROM telemetry t
                      WHERE t.device_id = d.id AND t.ts >= %(lo)s AND t.ts < %(hi)s
                        AND t.ts >= %(after_ts)s
                        AND (t.ts > %(after_ts)s OR t.seq > %(after_seq)s)
                        AND (%(periods_from)s::timestamptz[] IS NULL OR EXISTS (
                             SELECT FROM unnest(%(periods_from)s::timestamptz[],
                                                %(periods_to)s::timestamptz[]) p (a, z)
                              WHERE t.ts >= p.a AND t.ts < p.z))
                      ORDER BY t.ts, t.seq LIMIT %(limit)s) x ON true
 WHERE d.id = %(device)s"""

# A clinician's windows on a device: bindings to a patient made in their reach.
BOUND_PERIODS_SQL = b"""
SELECT tenant_id, bound_at, least(coalesce(unbound_at, %(hi)s), %(hi)s) FROM device_bindings
 WHERE device_id = %(device)s AND patient_id IS NOT NULL AND bound_at < %(hi)s
   AND (unbound_at IS NULL OR unbound_at > %(lo)s)"""

BINDINGS_OF_DEVICE_SQL = b"""
SELECT coalesce(d.department_id, d.tenant_id), b.id, b.device_id, b.patient_id,
       p.pseudonym, b.bed, b.episode, b.tenant_id, b.bound_at
  FROM devices d
  LEFT JOIN device_bindings b ON b.device_id = d.id AND b.unbound_at IS NULL
  LEFT JOIN patients p ON p.id = b.patient_id
 WHERE d.id = %s"""

BINDINGS_OF_PATIENT_SQL = b"""
SELECT p.tenant_id, b.id, b.device_id, b.patient_id, p.pseudonym, b.bed, b.episode,
       b.tenant_id, b.bound_at
  FROM patients p
  LEFT JOIN device_bindings b ON b.patient_id = p.id AND b.unbound_at IS NULL
 WHERE p.id = %s"""


async def latest(conn: psycopg.AsyncConnection[Any], scope: Scope, device: int,
                 metrics: Sequence[int] = ()) -> list[Value]:
    cur = await conn.execute(LATEST_SQL, {"device": device, "depth": LATEST_DEPTH})
    rows = await cur.fetchall()
    since = await _visible_since(conn, scope, device, rows)
    _read_patients(rows[0][4])
    wanted = set(metrics)
    # A metric whose newest value predates what the caller may see has none to show.
    return [Value(metric, value, ts) for _, ts, metric, value, _ in rows
            if ts is not None and ts >= since and (not wanted or metric in wanted)]


def _read_patients(pseudonyms: Sequence[str] | None) -> None:
    """The patients whose data a read returns (a device bound to them): in
    the call's audit record (``rmiot audit patient``)."""
    for pseudonym in pseudonyms or ():
        note_patient(pseudonym)


async def _visible_since(conn: psycopg.AsyncConnection[Any], scope: Scope, device: int,
                         rows: Sequence[tuple[Any, ...]]) -> dt.datetime:
    """From when the caller may see the device's latest data; NotFound when never."""
    if not rows:
        raise NotFound(f"device {device} not found")
    if scope.sees(rows[0][0]):
        return EVER
    if scope.bound:
        cur = await conn.execute(
            b"SELECT tenant_id, bound_at FROM device_bindings WHERE device_id = %s "
            b"AND unbound_at IS NULL AND patient_id IS NOT NULL", (device,))
        row = await cur.fetchone()
        if row is not None and row[0] in scope.bound:
            return row[1]  # type: ignore[no-any-return]
    raise NotFound(f"device {device} not found")


async def raw(conn: psycopg.AsyncConnection[Any], scope: Scope, device: int, lo: dt.datetime,
              hi: dt.datetime, limit: int, after: tuple[dt.datetime, int] | None = None,
              metrics: Sequence[int] = ()) -> list[Frame]:
    """Frames in [lo, hi) after the keyset ``after`` (ts, seq), oldest first."""
    params: dict[str, Any] = {
        "device": device, "lo": lo, "hi": hi, "limit": limit,
        "after_ts": after[0] if after else EVER, "after_seq": after[1] if after else -1,
        "periods_from": None, "periods_to": None}
    cur = await conn.execute(RAW_SQL, params)
    rows = await cur.fetchall()
    if not rows:
        raise NotFound(f"device {device} not found")
    if not scope.sees(rows[0][0]):
        periods = await _bound_periods(conn, scope, device, lo, hi)
        params["periods_from"] = [a for a, _ in periods]
        params["periods_to"] = [z for _, z in periods]
        cur = await conn.execute(RAW_SQL, params)
        rows = await cur.fetchall()
    if any(row[1] is not None for row in rows):
        _read_patients(rows[0][5])
    wanted = set(metrics)
    out = []
    for _, ts, seq, ids, vals, _ in rows:
        if ts is None:
            continue
        if wanted:
            pairs = [(m, v) for m, v in zip(ids, vals, strict=True) if m in wanted]
            if not pairs:
                continue
            ids, vals = [m for m, _ in pairs], [v for _, v in pairs]
        out.append(Frame(ts, seq, list(ids), list(vals)))
    return out


async def _bound_periods(conn: psycopg.AsyncConnection[Any], scope: Scope, device: int,
                         lo: dt.datetime, hi: dt.datetime) -> list[tuple[dt.datetime,
                                                                         dt.datetime]]:
    if scope.bound:
        cur = await conn.execute(BOUND_PERIODS_SQL, {"device": device, "lo": lo, "hi": hi})
        periods = [(a, z) for tenant, a, z in await cur.fetchall() if tenant in scope.bound]
        if periods:
            return periods
    raise NotFound(f"device {device} not found")


async def bindings(conn: psycopg.AsyncConnection[Any], scope: Scope, *, device: int = 0,
                   patient: int = 0) -> list[Binding]:
    """Open bindings of a device, or of a patient (exactly one of the two)."""
    if device:
        cur = await conn.execute(BINDINGS_OF_DEVICE_SQL, (device,))
        what = f"device {device}"
    else:
        cur = await conn.execute(BINDINGS_OF_PATIENT_SQL, (patient,))
        what = f"patient {patient}"
    rows = await cur.fetchall()
    if not rows:
        raise NotFound(f"{what} not found")
    found = [Binding(r[1], r[2], r[3], r[4] or "", r[5] or "", r[6] or "", r[7], r[8])
             for r in rows if r[1] is not None]
    if not scope.sees(rows[0][0]):
        found = [b for b in found if b.patient_id is not None and b.tenant_id in scope.bound]
        if not found:
            raise NotFound(f"{what} not found")
    _read_patients([b.pseudonym for b in found if b.pseudonym])
    return found


def page_token(frame: Frame) -> str:
    return f"{calendar.to_us(frame.ts)}.{frame.seq}"


def parse_page_token(token: str) -> tuple[dt.datetime, int] | None:
    """The keyset of a raw page token; None for the first page. ValueError if malformed."""
    if not token:
        return None
    ts, _, seq = token.partition(".")
    return calendar.from_us(int(ts)), int(seq)
