"""EscalationRunner: deadlines of unacknowledged alarms.

An active alarm carries ``next_escalation_at``, counted from its raise by its
rule's escalation chain (``alarm_rules.Escalation``). When the clock passes
it, every step now due is taken — an ``escalated`` event naming the audience
(clinician -> department head -> emergency contact) and, when the step says
so, a higher severity — or, when no step is due, a ``renotified`` event; then
the next deadline is set. Acknowledging or clearing the alarm ends its
deadlines. Each step is an alarm event (so it reaches Watch clients and the
notification channels) and an audit record.

``tick(now)`` does one round for the given time: the clock is injectable, so
the tests walk deadlines without waiting. Several platform processes may run
one each: the rows are locked while taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg

from rmiot.ingest import alarm_store
from rmiot.ingest.alarm_rules import RANK, parse_escalation
from rmiot.ingest.alarm_store import SYSTEM, Event
from rmiot.ingest.alarm_writer import AuditSink, audit_event

log = logging.getLogger("rmiot.ingest.alarms")

BATCH = 500


class EscalationRunner:
    def __init__(self, dsn: str, audit: AuditSink | None = None,
                 clock: Callable[[], float] = time.time, interval_s: float = 1.0) -> None:
        self.audit = audit
        self.clock = clock
        self.interval_s = interval_s
        self._db = alarm_store.StandingConnection(dsn)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="alarm-escalation")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._db.close()

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except psycopg.OperationalError as exc:
                log.warning("escalation: database unavailable", extra={"error": str(exc)})
            await asyncio.sleep(self.interval_s)

    async def tick(self, now: float | None = None) -> list[Event]:
        """Take every step due at ``now`` (default: the clock); returns the events."""
        at = dt.datetime.fromtimestamp(self.clock() if now is None else now, dt.UTC)
        events: list[Event] = []
        conn = await self._db.get()
        cur = await conn.execute(b"SELECT 1 FROM alarms WHERE state = 'active' "
                                 b"AND next_escalation_at <= %s LIMIT 1", (at,))
        if await cur.fetchone() is None:  # the usual second: no lock taken
            return events
        async with alarm_store.locked(conn):
            cur = await conn.execute(
                b"SELECT a.id, a.raised_at, a.escalation_step, a.severity, r.escalation "
                b"FROM alarms a JOIN alarm_rules r ON r.id = a.rule_id "
                b"WHERE a.state = 'active' AND a.next_escalation_at <= %s "
                b"ORDER BY a.next_escalation_at LIMIT %s FOR UPDATE OF a SKIP LOCKED",
                (at, BATCH))
            for row in await cur.fetchall():
                events += await self._due(conn, at, *row)
        for event in events:
            audit_event(self.audit, event, "escalation")
        return events

    async def _due(self, conn: psycopg.AsyncConnection[Any], at: dt.datetime, alarm_id: int,
                   raised_at: dt.datetime, step: int, severity: str,
                   raw: dict[str, Any]) -> list[Event]:
        chain = parse_escalation(raw)
        elapsed = (at - raised_at).total_seconds()
        events: list[Event] = []
        while step < len(chain.steps) and elapsed >= chain.steps[step].after_s:
            taken = chain.steps[step]
            step += 1
            if taken.severity is not None and RANK[taken.severity] > RANK[severity]:
                severity = taken.severity
            await conn.execute(b"UPDATE alarms SET escalation_step = %s, severity = %s, "
                               b"updated_at = %s WHERE id = %s", (step, severity, at, alarm_id))
            events.append(await alarm_store.add_event(
                conn, alarm_id, "escalated", SYSTEM,
                {"step": step, "notify": taken.notify, "after_s": taken.after_s}))
        if not events:
            events.append(await alarm_store.add_event(conn, alarm_id, "renotified", SYSTEM,
                                                      {"step": step}))
        following = chain.next_deadline_s(step, elapsed)
        await conn.execute(
            b"UPDATE alarms SET next_escalation_at = %s WHERE id = %s",
            (raised_at + dt.timedelta(seconds=following) if following is not None else None,
             alarm_id))
        return events
