"""The rows behind the FHIR API, read by SQL from the registry's and
telemetry's tables (the query layer does not import the registry), plus the
shared results' table it writes.

Observations are read per device window: ``frames`` takes (device, from, to)
periods — a whole device for a caller who sees its home, a patient's binding
periods otherwise — and pages by the keyset (ts, device, seq), each device
read through the telemetry index on (device_id, ts DESC, seq).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import psycopg

from rmiot.query.fhir.resources import DeviceRow, SharedResult

EVER = dt.datetime(1, 1, 1, tzinfo=dt.UTC)
NEVER = dt.datetime(9999, 12, 31, tzinfo=dt.UTC)
Conn = psycopg.AsyncConnection[Any]


@dataclass(frozen=True)
class Period:
    device: int
    start: dt.datetime
    end: dt.datetime
    patient_id: int | None = None
    pseudonym: str = ""
    tenant_id: int = 0          # where the binding was made (0: not a binding)


@dataclass(frozen=True)
class PatientRow:
    id: int
    tenant_id: int
    tenant_name: str
    pseudonym: str
    sealed: bytes
    sex: str
    birth_year: int | None


_DEVICE_SQL = b"""
SELECT d.id, d.tenant_id, coalesce(d.department_id, d.tenant_id), t.name, d.state, d.udi,
       d.serial_no, d.location, d.gateway_id, v.name, m.name, m.kind,
       coalesce((SELECT array_agg((x ->> 'id')::int ORDER BY (x ->> 'id')::int)
                   FROM jsonb_array_elements(m.metrics) x), '{}'),
       (SELECT patient_id FROM device_bindings b
         WHERE b.device_id = d.id AND b.unbound_at IS NULL)
  FROM devices d
  JOIN tenants t ON t.id = coalesce(d.department_id, d.tenant_id)
  LEFT JOIN device_models m ON m.id = d.model_id
  LEFT JOIN vendors v ON v.id = m.vendor_id
"""


def _device(row: tuple[Any, ...]) -> DeviceRow:
    return DeviceRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8],
                     row[9], row[10], row[11], tuple(row[12]), row[13])


async def device(conn: Conn, device_id: int) -> DeviceRow | None:
    cur = await conn.execute(_DEVICE_SQL + b" WHERE d.id = %s", (device_id,))
    row = await cur.fetchone()
    return _device(row) if row else None


async def devices(conn: Conn, *, homes: list[int] | None = None,
                  patient_id: int | None = None, after: int = 0,
                  limit: int = 100) -> list[DeviceRow]:
    """Devices homed in ``homes`` or bound (now) to ``patient_id``, by id."""
    where, params = [b"d.id > %s"], [after]
    if homes is not None:
        where.append(b"coalesce(d.department_id, d.tenant_id) = ANY(%s)")
        params.append(homes)  # type: ignore[arg-type]
    if patient_id is not None:
        where.append(b"d.id IN (SELECT device_id FROM device_bindings WHERE patient_id = %s "
                     b"AND unbound_at IS NULL)")
        params.append(patient_id)
    cur = await conn.execute(_DEVICE_SQL + b" WHERE " + b" AND ".join(where)
                             + b" ORDER BY d.id LIMIT %s", [*params, limit])
    return [_device(r) for r in await cur.fetchall()]


async def patient(conn: Conn, patient_id: int) -> PatientRow | None:
    cur = await conn.execute(
        b"SELECT p.id, p.tenant_id, t.name, p.pseudonym, p.identity_enc, p.sex, p.birth_year "
        b"FROM patients p JOIN tenants t ON t.id = p.tenant_id WHERE p.id = %s", (patient_id,))
    row = await cur.fetchone()
    if row is None:
        return None
    return PatientRow(row[0], row[1], row[2], row[3], bytes(row[4]), row[5] or "U", row[6])


async def patients_by_pseudonym(conn: Conn, alias: str) -> list[tuple[int, int]]:
    """(patient id, tenant id) of every record of the person."""
    cur = await conn.execute(b"SELECT id, tenant_id FROM patients WHERE pseudonym = %s "
                             b"ORDER BY id", (alias,))
    return [(int(r[0]), int(r[1])) for r in await cur.fetchall()]


_BINDINGS_SQL = b"""
SELECT b.device_id, b.bound_at, b.unbound_at, b.patient_id,
       p.pseudonym, b.tenant_id
  FROM device_bindings b JOIN patients p ON p.id = b.patient_id
"""


def _periods(rows: list[tuple[Any, ...]]) -> list[Period]:
    return [Period(int(r[0]), r[1], r[2] or NEVER, r[3], r[4],
                   int(r[5])) for r in rows]


async def bindings_of_patient(conn: Conn, patient_id: int) -> list[Period]:
    cur = await conn.execute(_BINDINGS_SQL + b" WHERE b.patient_id = %s ORDER BY b.bound_at",
                             (patient_id,))
    return _periods(await cur.fetchall())


async def bindings_of_device(conn: Conn, device_id: int) -> list[Period]:
    cur = await conn.execute(_BINDINGS_SQL + b" WHERE b.device_id = %s ORDER BY b.bound_at",
                             (device_id,))
    return _periods(await cur.fetchall())


# Oldest first, in the order the (device_id, ts DESC, seq) index gives read
# backwards — (ts, seq DESC) — so each device's scan stops after ``limit`` rows
# instead of sorting its whole window; the keyset follows (ts, device, seq DESC).
async def homes(conn: Conn, devices: set[int]) -> dict[int, int]:
    """device id -> its home (department, else tenant), in one round trip."""
    if not devices:
        return {}
    cur = await conn.execute(b"SELECT id, coalesce(department_id, tenant_id) FROM devices "
                             b"WHERE id = ANY(%s)", (sorted(devices),))
    return {int(r[0]): int(r[1]) for r in await cur.fetchall()}


_FRAMES_SQL = b"""
SELECT x.device_id, x.ts, x.seq, x.metrics, x.vals
  FROM unnest(%(devs)s::bigint[], %(starts)s::timestamptz[], %(ends)s::timestamptz[]) p (dev, a, z)
  CROSS JOIN LATERAL (
       SELECT t.device_id, t.ts, t.seq, t.metrics, t.vals FROM telemetry t
        WHERE t.device_id = p.dev AND t.ts >= greatest(p.a, %(lo)s, %(after_ts)s)
          AND t.ts < least(p.z, %(hi)s)
          AND (t.ts > %(after_ts)s OR t.device_id > %(after_dev)s
               OR (t.device_id = %(after_dev)s AND t.seq < %(after_seq)s))
          AND (%(metrics)s::int[] IS NULL OR t.metrics && %(metrics)s::int[])
        ORDER BY t.ts, t.seq DESC LIMIT %(limit)s) x
 ORDER BY x.ts, x.device_id, x.seq DESC LIMIT %(limit)s"""


async def frames(conn: Conn, periods: list[Period], lo: dt.datetime, hi: dt.datetime,
                 metrics: list[int] | None, after: tuple[dt.datetime, int, int] | None,
                 limit: int) -> list[tuple[int, dt.datetime, int, list[int], list[float]]]:
    """Frames in the periods and [lo, hi), after the keyset (ts, device, seq),
    oldest first (see ``_FRAMES_SQL`` for the order)."""
    if not periods:
        return []
    cur = await conn.execute(_FRAMES_SQL, {
        "devs": [p.device for p in periods], "starts": [p.start for p in periods],
        "ends": [p.end for p in periods], "lo": lo, "hi": hi, "metrics": metrics,
        "after_ts": after[0] if after else EVER, "after_dev": after[1] if after else -1,
        "after_seq": after[2] if after else 1 << 62, "limit": limit})
    return [(int(r[0]), r[1], int(r[2]), r[3], r[4]) for r in await cur.fetchall()]


async def frame(conn: Conn, device_id: int, ts: dt.datetime,
                seq: int) -> tuple[list[int], list[float]] | None:
    cur = await conn.execute(b"SELECT metrics, vals FROM telemetry WHERE device_id = %s "
                             b"AND ts = %s AND seq = %s", (device_id, ts, seq))
    row = await cur.fetchone()
    return (row[0], row[1]) if row else None


# -- shared results ------------------------------------------------------------------

_RESULT_SQL = b"""
SELECT r.id, r.tenant_id, t.name, r.patient_id, r.device_id, r.code, r.title, r.content_type,
       r.content, r.period_start, r.period_end, r.published_by, r.published_at, r.pseudonym
  FROM shared_results r JOIN tenants t ON t.id = r.tenant_id
"""


def _result(row: tuple[Any, ...]) -> tuple[SharedResult, str]:
    return SharedResult(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                        bytes(row[8]), row[9], row[10], row[11], row[12]), row[13]


async def publish(conn: Conn, tenant_id: int, patient_id: int, alias: str,
                  device_id: int | None, code: str, title: str, content_type: str,
                  content: bytes, start: dt.datetime | None, end: dt.datetime | None,
                  actor: str) -> SharedResult:
    cur = await conn.execute(
        b"INSERT INTO shared_results (tenant_id, patient_id, pseudonym, device_id, code, title, "
        b"content_type, content, period_start, period_end, published_by) "
        b"VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (tenant_id, patient_id, alias, device_id, code, title, content_type, content, start,
         end, actor))
    row = await cur.fetchone()
    assert row is not None
    found = await result(conn, int(row[0]))
    assert found is not None
    return found[0]


async def result(conn: Conn, result_id: int) -> tuple[SharedResult, str] | None:
    cur = await conn.execute(_RESULT_SQL + b" WHERE r.id = %s", (result_id,))
    row = await cur.fetchone()
    return _result(row) if row else None


async def results_of(conn: Conn, alias: str, limit: int) -> list[SharedResult]:
    cur = await conn.execute(_RESULT_SQL + b" WHERE r.pseudonym = %s "
                             b"ORDER BY r.published_at DESC, r.id DESC LIMIT %s", (alias, limit))
    return [_result(r)[0] for r in await cur.fetchall()]
