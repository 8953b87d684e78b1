"""AlarmWriter: what the rule engine produced, written in transactions of its
own, beside the telemetry batches: acks never wait for alarms, nor alarms for
the batch their frame is in.

One task per ingest process, woken by the engine: transitions become alarms
and events (``alarm_store``; one transaction for all waiting, sent in
pipeline mode: the lock, one statement per alarm with its event, and the
commit cost one round trip), tags become
``telemetry_tags`` rows, linkage rules queue their commands
(``registry.commands.queue``, the rule's tenant as scope, actor
``rule:<id>``). Every alarm step it writes is also appended to the audit
chain. On a database error the work stays queued and is retried with backoff
(0.1 s to 1 s); nothing is dropped.

Once a second it also looks for silent devices (offline rules): the
engine's candidates are checked against the database's latest frame of the
device first, since a device that reconnected may now be sending to another
ingest process. And it seeds energy baselines: hourly means of the last weeks
from the stored telemetry, once per (device, rule).

``OpenAlarms`` is every process's view of which (rule, subject) has an open
alarm, loaded at start and kept by NOTIFY on ``rmiot_alarm_events``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import psycopg

from rmiot.db import ChangeFollower
from rmiot.ingest import alarm_store
from rmiot.ingest.alarm_engine import Engine
from rmiot.ingest.alarm_eval import Transition
from rmiot.ingest.alarm_store import Event
from rmiot.registry import commands
from rmiot.security.audit import AuditRecord, AuditUnavailable

log = logging.getLogger("rmiot.ingest.alarms")

EVENTS_CHANNEL = "rmiot_alarm_events"
SWEEP_S = 1.0


class AuditSink(Protocol):
    def append(self, record: AuditRecord) -> None: ...


def audit_event(audit: AuditSink | None, event: Event, source: str) -> None:
    """A system step of an alarm, on the audit chain (people's steps are
    audited by the interceptor with their RPC)."""
    if audit is None:
        return
    try:
        audit.append(_record(event, source))
    except AuditUnavailable as exc:  # the alarm is stored; say loudly what is missing
        log.error("alarm step not audited", extra={"event": event.id, "error": str(exc)})


def _record(event: Event, source: str) -> AuditRecord:
    return AuditRecord(
        ts=event.at, actor=event.actor, role=None, tenant_id=event.tenant_id,
        method=f"alarm.{event.kind}", object=f"alarm:{event.alarm_id}", outcome="ok",
        source=source, request_id="",
        detail={"rule": event.rule_code, "device": event.device_id, "severity": event.severity,
                "state": event.state, "event": event.id}, patient=None)


class OpenAlarms(ChangeFollower):
    channels = (EVENTS_CHANNEL,)
    name = "open alarms"

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self.open: set[tuple[int, str]] = set()
        self.cursor = 0

    def is_open(self, rule_id: int, subject: str) -> bool:
        return (rule_id, subject) in self.open

    async def load_all(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.cursor = await alarm_store.last_event_id(conn)
        cur = await conn.execute(b"SELECT rule_id, subject FROM alarms WHERE state <> 'cleared'")
        self.open = {(r, s) for r, s in await cur.fetchall()}

    async def apply(self, conn: psycopg.AsyncConnection[Any],
                    notes: list[psycopg.Notify]) -> None:
        cur = await conn.execute(
            b"SELECT e.id, a.rule_id, a.subject, e.state FROM alarm_events e "
            b"JOIN alarms a ON a.id = e.alarm_id WHERE e.id > %s AND e.kind IN "
            b"('raised', 'cleared') ORDER BY e.id", (self.cursor,))
        for event_id, rule_id, subject, state in await cur.fetchall():
            if state == "cleared":
                self.open.discard((rule_id, subject))
            else:
                self.open.add((rule_id, subject))
            self.cursor = max(self.cursor, event_id)


class AlarmWriter:
    def __init__(self, dsn: str, engine: Engine, audit: AuditSink | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.dsn = dsn
        self.engine = engine
        self.audit = audit
        self.clock = clock
        self.written = 0
        self.on_event: Callable[[Event], None] = lambda event: None
        self._bell = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._db = alarm_store.StandingConnection(dsn)
        self._sweep_db = alarm_store.StandingConnection(dsn)  # never inside a write
        engine.wake = self._bell.set

    async def start(self) -> None:
        await self._db.get()
        self._tasks = [asyncio.create_task(self._run(), name="alarm-writer"),
                       asyncio.create_task(self._sweep(), name="alarm-sweeper")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._db.close()
        await self._sweep_db.close()

    async def _run(self) -> None:
        delay = 0.1
        while True:
            await self._bell.wait()
            self._bell.clear()
            try:
                await self.write_waiting()
                delay = 0.1
            except psycopg.OperationalError as exc:
                log.warning("alarm writer: database unavailable; retrying",
                            extra={"error": str(exc).strip(), "retry_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                self._bell.set()

    async def write_waiting(self) -> None:
        engine, conn = self.engine, await self._db.get()
        if engine.transitions:
            waiting = list(engine.transitions)
            events = await self._transitions(conn, waiting)
            del engine.transitions[:len(waiting)]  # only once committed
            for event in events:
                audit_event(self.audit, event, "ingest")
                self.on_event(event)
            self.written += len(events)
        if engine.tags:
            tags = list(engine.tags)
            async with conn.cursor() as cur:
                await cur.executemany(
                    b"INSERT INTO telemetry_tags (device_id, ts, seq, tag, rule_id) "
                    b"VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    [(t.device, alarm_store.from_us(t.ts_us), t.seq, t.tag, t.rule_id)
                     for t in tags])
            del engine.tags[:len(tags)]
        if engine.linkages:
            links = list(engine.linkages)
            for link in links:
                p = link.rule.params
                try:
                    await commands.queue(conn, link.rule.tenant_id, int(p["device_id"]),
                                         str(p["name"]), [tuple(x) for x in p["params"]],
                                         int(p["ttl_s"]), f"rule:{link.rule.id}")
                except (commands.CommandError, commands.CommandNotFound) as exc:
                    log.warning("linkage command refused", extra={
                        "rule": link.rule.id, "error": str(exc)})
            del engine.linkages[:len(links)]

    async def _transitions(self, conn: psycopg.AsyncConnection[Any],
                           waiting: list[Transition]) -> list[Event]:
        """One transaction for all waiting, in pipeline mode: the lock, one
        statement per transition (alarm and event together) and the commit
        go out in one round trip."""
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        async with conn.pipeline():
            async with alarm_store.locked(conn):
                sent = [await alarm_store.send_raise(
                            conn, t, now, t.rule.escalation.next_deadline_s(0, 0.0))
                        if t.kind == "raise" else
                        await alarm_store.send_condition_ended(conn, t, now)
                        for t in waiting]
            found = [await alarm_store.fetch_step(cur) for cur in sent]
        return [event for event in found if event is not None]

    # -- once a second ----------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            try:
                await self.sweep_once()
            except psycopg.OperationalError as exc:
                log.warning("alarm sweep: database unavailable",
                            extra={"error": str(exc).strip()})

    async def sweep_once(self) -> None:
        conn = await self._sweep_db.get()
        engine = self.engine
        while engine.to_seed:
            device, energy = engine.to_seed.pop()
            metric = int(energy.rule.params["metric"])
            cur = await conn.execute(
                b"SELECT (extract(epoch FROM time_bucket('1 hour', ts)) / 3600)::bigint, "
                b"avg(vals[array_position(metrics, %s)]) FROM telemetry "
                b"WHERE device_id = %s AND ts >= now() - make_interval(weeks => %s) "
                b"AND ts < date_trunc('hour', now()) AND %s = ANY (metrics) GROUP BY 1",
                (metric, device, energy.weeks, metric))
            energy.seed({int(h): float(v) for h, v in await cur.fetchall() if v is not None})
        silent = engine.silent()
        if not silent:
            return
        now = self.clock()
        for ev in silent:
            cur = await conn.execute(
                b"SELECT extract(epoch FROM max(ts))::float8 FROM telemetry WHERE device_id = %s",
                (ev.device,))
            row = await cur.fetchone()
            latest = row[0] if row and row[0] is not None else 0.0
            if now - latest <= ev.silence_s:
                ev.last_seen = max(ev.last_seen, latest)  # sending elsewhere
            else:
                ev.raise_offline(int(now * 1e6))
        engine.wake()
