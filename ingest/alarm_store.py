"""Alarms in the database (migration 0014): raising and ending them, people's
steps (acknowledge, clear, comment, read), and reading them back.

Every transaction that adds alarm events runs in ``locked(conn)``: it takes
``rmiot_alarm_lock()`` first, so event ids follow commit order and a Watch
cursor never skips an event (see the migration). Each step is one row in
``alarm_events``, written here with the alarm's state after it.

Lifecycle: ``active`` -> ``acknowledged`` -> ``cleared``, or ``active`` ->
``cleared``. When a rule's condition ends, a non-latching alarm clears itself
(actor ``system:alarms``); a latching one is marked ``normal`` and clears when
acknowledged (or at once if it already was). Scope: every lookup takes the
caller's tenant and sees only that tenant's subtree; anything else is
``AlarmNotFound``, as if it did not exist.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from rmiot.ingest.alarm_eval import Transition

SYSTEM = "system:alarms"
IN_SUBTREE = "tenant_id IN (SELECT id FROM tenants WHERE path @> ARRAY[%s]::integer[])"
MAX_COMMENT = 1000
ALARM_COLUMNS = ("id, rule_id, rule_code, kind, tenant_id, device_id, patient_id, severity, "
                 "state, message, value, latching, onset_at, raised_at, normal_at, acked_at, "
                 "acked_by, ack_comment, cleared_at, cleared_by, clear_comment, "
                 "escalation_step, next_escalation_at")
EVENT_SQL = """
SELECT e.id, e.alarm_id, e.tenant_id, e.at, e.kind, e.actor, e.severity, e.state, e.detail,
       a.device_id, a.rule_code, a.message, a.raised_at
  FROM alarm_events e JOIN alarms a ON a.id = e.alarm_id
"""
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

AsyncConn = psycopg.AsyncConnection[Any]


class AlarmNotFound(LookupError):
    """No such alarm (or rule, or channel) within the tenant asked about."""


class AlarmError(ValueError):
    """A step the alarm cannot take; the message says why."""


@dataclass(frozen=True, slots=True)
class Alarm:
    id: int
    rule_id: int
    rule_code: str
    kind: str
    tenant_id: int
    device_id: int
    patient_id: int | None
    severity: str
    state: str
    message: str
    value: float | None
    latching: bool
    onset_at: dt.datetime
    raised_at: dt.datetime
    normal_at: dt.datetime | None
    acked_at: dt.datetime | None
    acked_by: str | None
    ack_comment: str | None
    cleared_at: dt.datetime | None
    cleared_by: str | None
    clear_comment: str | None
    escalation_step: int
    next_escalation_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    alarm_id: int
    tenant_id: int
    at: dt.datetime
    kind: str
    actor: str
    severity: str
    state: str
    detail: dict[str, Any] | None
    device_id: int
    rule_code: str
    message: str
    raised_at: dt.datetime


def to_us(at: dt.datetime | None) -> int:
    return (at - _EPOCH) // dt.timedelta(microseconds=1) if at is not None else 0


def from_us(us: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=us)


class StandingConnection:
    """One autocommit connection kept open between uses (the alarm writer,
    escalation runner and notifier each hold one): ``get`` hands it out, or
    a new one when it was never opened or is lost."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: AsyncConn | None = None

    async def get(self) -> AsyncConn:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            await self.close()
            conn = self._conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        return conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()


@contextlib.asynccontextmanager
async def locked(conn: AsyncConn) -> AsyncIterator[AsyncConn]:
    """A transaction holding the alarm lock (event ids in commit order)."""
    async with conn.transaction():
        await conn.execute(b"SELECT rmiot_alarm_lock()")
        yield conn


# The event columns a step returns, from a CTE ``e`` (the event inserted) and
# ``a`` (its alarm as the statement left it): one statement, one round trip.
_STEP_RETURNS = (b"SELECT e.id, e.alarm_id, e.tenant_id, e.at, e.kind, e.actor, e.severity, "
                 b"e.state, e.detail, a.device_id, a.rule_code, a.message, a.raised_at "
                 b"FROM e JOIN a ON a.id = e.alarm_id")
_EVENT_FROM_A = (b"e AS (INSERT INTO alarm_events (alarm_id, tenant_id, kind, actor, severity, "
                 b"state, detail) SELECT a.id, a.tenant_id, %s, %s, a.severity, a.state, %s "
                 b"FROM a RETURNING id, alarm_id, tenant_id, at, kind, actor, severity, state, "
                 b"detail) ")
_A_COLUMNS = b"RETURNING id, tenant_id, severity, state, device_id, rule_code, message, raised_at"


def _detail(detail: dict[str, Any] | None) -> Jsonb | None:
    return Jsonb(detail) if detail is not None else None


async def add_event(conn: AsyncConn, alarm_id: int, kind: str, actor: str,
                    detail: dict[str, Any] | None = None) -> Event:
    """Record a step of the alarm (inside ``locked``), with its state now."""
    cur = await conn.execute(
        b"WITH a AS (SELECT id, tenant_id, severity, state, device_id, rule_code, message, "
        b"raised_at FROM alarms WHERE id = %s), " + _EVENT_FROM_A + _STEP_RETURNS,
        (alarm_id, kind, actor, _detail(detail)))
    got = await cur.fetchone()
    assert got is not None
    return Event(*got)


async def raise_alarm(conn: AsyncConn, t: Transition, now: dt.datetime,
                      first_deadline_s: float | None) -> Event | None:
    """Open the alarm of a transition "raise" (None: one is open already).
    One statement: the alarm and its "raised" event."""
    return await fetch_step(await send_raise(conn, t, now, first_deadline_s))


async def send_raise(conn: AsyncConn, t: Transition, now: dt.datetime,
                     first_deadline_s: float | None) -> psycopg.AsyncCursor[Any]:
    """``raise_alarm``'s statement, sent (in pipeline mode: queued); its
    result is read with ``fetch_step``."""
    rule = t.rule
    deadline = now + dt.timedelta(seconds=first_deadline_s) \
        if first_deadline_s is not None else None
    return await conn.execute(
        b"WITH a AS (INSERT INTO alarms (rule_id, rule_code, kind, tenant_id, device_id, "
        b"patient_id, subject, severity, message, value, latching, onset_at, raised_at, "
        b"next_escalation_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
        b"ON CONFLICT (rule_id, subject) WHERE state <> 'cleared' DO NOTHING " + _A_COLUMNS
        + b"), " + _EVENT_FROM_A + _STEP_RETURNS,
        (rule.id, rule.code, rule.kind, t.tenant, t.device, t.patient, t.subject,
         rule.severity, t.message, t.value, bool(rule.params.get("latching", False)),
         from_us(t.ts_us), now, deadline,
         "raised", SYSTEM, Jsonb({"value": t.value, "onset_us": t.ts_us})))


async def condition_ended(conn: AsyncConn, t: Transition, now: dt.datetime) -> Event | None:
    """The condition of a transition "normal" ended: clear the open alarm, or
    (latching, unacknowledged) mark it normal. None: no alarm was open."""
    return await fetch_step(await send_condition_ended(conn, t, now))


async def send_condition_ended(conn: AsyncConn, t: Transition,
                               now: dt.datetime) -> psycopg.AsyncCursor[Any]:
    """``condition_ended``'s statement, sent; read with ``fetch_step``."""
    return await conn.execute(
        b"WITH a AS (UPDATE alarms SET normal_at = %s, updated_at = %s, "
        b"state = CASE WHEN latching AND state = 'active' THEN state ELSE 'cleared' END, "
        b"cleared_at = CASE WHEN latching AND state = 'active' THEN NULL ELSE %s END, "
        b"cleared_by = CASE WHEN latching AND state = 'active' THEN NULL ELSE %s END, "
        b"next_escalation_at = CASE WHEN latching AND state = 'active' "
        b"THEN next_escalation_at END "
        b"WHERE rule_id = %s AND subject = %s AND state <> 'cleared' " + _A_COLUMNS + b"), "
        + _EVENT_FROM_A.replace(b"SELECT a.id, a.tenant_id, %s,",
                                b"SELECT a.id, a.tenant_id, CASE WHEN a.state = 'cleared' "
                                b"THEN 'cleared' ELSE 'normal' END,") + _STEP_RETURNS,
        (from_us(t.ts_us), now, now, SYSTEM, t.rule.id, t.subject,
         SYSTEM, Jsonb({"value": t.value, "at_us": t.ts_us})))


async def fetch_step(cur: psycopg.AsyncCursor[Any]) -> Event | None:
    """The event a sent step made (None: the step had nothing to do)."""
    row = await cur.fetchone()
    return Event(*row) if row is not None else None


async def _open_for_update(conn: AsyncConn, scope: int, alarm_id: int) -> Alarm:
    cur = await conn.execute(f"SELECT {ALARM_COLUMNS} FROM alarms WHERE id = %s AND "
                             f"{IN_SUBTREE} FOR UPDATE".encode(), (alarm_id, scope))
    row = await cur.fetchone()
    if row is None:
        raise AlarmNotFound(f"alarm {alarm_id} not found")
    return Alarm(*row)


def _comment(comment: str) -> str | None:
    if len(comment) > MAX_COMMENT:
        raise AlarmError(f"comment: at most {MAX_COMMENT} characters")
    return comment or None


async def acknowledge(conn: AsyncConn, scope: int, alarm_id: int, actor: str, comment: str,
                      now: dt.datetime) -> list[Event]:
    """active -> acknowledged (cleared too, when its condition already ended and
    it is latching); escalation stops."""
    text = _comment(comment)
    async with locked(conn):
        alarm = await _open_for_update(conn, scope, alarm_id)
        if alarm.state != "active":
            raise AlarmError(f"alarm {alarm_id} is {alarm.state}: only an active alarm "
                             "is acknowledged")
        await conn.execute(
            b"UPDATE alarms SET state = 'acknowledged', acked_at = %s, acked_by = %s, "
            b"ack_comment = %s, next_escalation_at = NULL, updated_at = %s WHERE id = %s",
            (now, actor, text, now, alarm_id))
        events = [await add_event(conn, alarm_id, "acknowledged", actor,
                                  {"comment": text} if text else None)]
        if alarm.normal_at is not None:  # latching, its condition over: done
            await conn.execute(
                b"UPDATE alarms SET state = 'cleared', cleared_at = %s, cleared_by = %s, "
                b"updated_at = %s WHERE id = %s", (now, SYSTEM, now, alarm_id))
            events.append(await add_event(conn, alarm_id, "cleared", SYSTEM,
                                          {"reason": "acknowledged after its condition ended"}))
    return events


async def clear(conn: AsyncConn, scope: int, alarm_id: int, actor: str, comment: str,
                now: dt.datetime) -> list[Event]:
    """A person clears the alarm (from active or acknowledged)."""
    text = _comment(comment)
    async with locked(conn):
        alarm = await _open_for_update(conn, scope, alarm_id)
        if alarm.state == "cleared":
            raise AlarmError(f"alarm {alarm_id} is already cleared")
        await conn.execute(
            b"UPDATE alarms SET state = 'cleared', cleared_at = %s, cleared_by = %s, "
            b"clear_comment = %s, next_escalation_at = NULL, updated_at = %s WHERE id = %s",
            (now, actor, text, now, alarm_id))
        return [await add_event(conn, alarm_id, "cleared", actor,
                                {"comment": text} if text else None)]


async def note(conn: AsyncConn, scope: int, alarm_id: int, actor: str, kind: str,
               comment: str = "") -> list[Event]:
    """A comment or a reading receipt."""
    text = _comment(comment)
    if kind == "comment" and not text:
        raise AlarmError("comment: some text is required")
    async with locked(conn):
        await _open_for_update(conn, scope, alarm_id)
        return [await add_event(conn, alarm_id, kind, actor,
                                {"comment": text} if text else None)]


async def get(conn: AsyncConn, scope: int, alarm_id: int) -> Alarm:
    cur = await conn.execute(f"SELECT {ALARM_COLUMNS} FROM alarms WHERE id = %s AND "
                             f"{IN_SUBTREE}".encode(), (alarm_id, scope))
    row = await cur.fetchone()
    if row is None:
        raise AlarmNotFound(f"alarm {alarm_id} not found")
    return Alarm(*row)


async def history(conn: AsyncConn, alarm_id: int) -> list[Event]:
    cur = await conn.execute((EVENT_SQL + " WHERE e.alarm_id = %s ORDER BY e.id").encode(),
                             (alarm_id,))
    return [Event(*row) for row in await cur.fetchall()]


async def find(conn: AsyncConn, scope: int, *, state: str = "", device_id: int = 0,
               min_severity: str = "", before_id: int = 0, limit: int = 100) -> list[Alarm]:
    """The subtree's alarms, newest first."""
    where = [IN_SUBTREE]
    params: list[Any] = [scope]
    if state == "open":
        where.append("state <> 'cleared'")
    elif state:
        where.append("state = %s")
        params.append(state)
    if device_id:
        where.append("device_id = %s")
        params.append(device_id)
    if min_severity:
        where.append("rmiot_severity_rank(severity) >= rmiot_severity_rank(%s)")
        params.append(min_severity)
    if before_id:
        where.append("id < %s")
        params.append(before_id)
    cur = await conn.execute(f"SELECT {ALARM_COLUMNS} FROM alarms WHERE {' AND '.join(where)} "
                             f"ORDER BY id DESC LIMIT %s".encode(), (*params, limit))
    return [Alarm(*row) for row in await cur.fetchall()]


async def events_after(conn: AsyncConn, cursor: int, limit: int = 1000) -> list[Event]:
    """Every event after ``cursor``, in id (= commit) order."""
    cur = await conn.execute((EVENT_SQL + " WHERE e.id > %s ORDER BY e.id LIMIT %s").encode(),
                             (cursor, limit))
    return [Event(*row) for row in await cur.fetchall()]


async def last_event_id(conn: AsyncConn) -> int:
    cur = await conn.execute(b"SELECT coalesce(max(id), 0) FROM alarm_events")
    row = await cur.fetchone()
    return int(row[0]) if row else 0
