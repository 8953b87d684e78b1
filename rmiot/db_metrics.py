"""Metrics the database knows best, read by one platform process every few
seconds while metrics are on (``rmiot.observability``):

- ``rmiot.alarm.latency``: for each alarm raised since the last look, from
  the measurement where its condition began (``onset_at``: a rule's required
  duration is part of it) to the commit of its "raised" event, by rule kind
  and severity. Read from the alarm tables, so it covers every ingest process;
- ``rmiot.outbox.backlog`` / ``rmiot.outbox.oldest`` (hospital role): frames
  waiting for the uplink and the age of the oldest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import psycopg

from rmiot import observability
from rmiot.ingest import outbox

log = logging.getLogger("rmiot.db_metrics")

RAISED_SQL = (
    "SELECT e.id, a.kind, a.severity, extract(epoch FROM e.at - a.onset_at)::float8 "
    "FROM alarm_events e JOIN alarms a ON a.id = e.alarm_id "
    "WHERE e.id > %s AND e.kind = 'raised' ORDER BY e.id LIMIT 10000")


class DatabaseMetrics:
    def __init__(self, dsn: str, interval_s: float, hospital: bool) -> None:
        self.dsn = dsn
        self.interval_s = interval_s
        self.hospital = hospital
        self.cursor = 0
        self.backlog = outbox.Backlog(0, 0.0, True)
        self._task: asyncio.Task[None] | None = None
        self._unwatch: list[Callable[[], None]] = []

    async def start(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            cur = await conn.execute("SELECT coalesce(max(id), 0) FROM alarm_events")
            row = await cur.fetchone()
            self.cursor = int(row[0]) if row else 0
        if self.hospital:
            self._unwatch = [
                observability.watch("rmiot.outbox.backlog", self._frames),
                observability.watch("rmiot.outbox.oldest", self._oldest)]
        self._task = asyncio.create_task(self._run(), name="db-metrics")

    def _frames(self) -> Iterable[observability.Sample]:
        return [({}, self.backlog.frames)]

    def _oldest(self) -> Iterable[observability.Sample]:
        return [({}, self.backlog.oldest_s)]

    async def stop(self) -> None:
        for unwatch in self._unwatch:
            unwatch()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.dsn,
                                                                 autocommit=True) as conn:
                    while True:
                        await self.sample(conn)
                        await asyncio.sleep(self.interval_s)
            except psycopg.OperationalError as exc:
                log.debug("database metrics paused", extra={"error": str(exc).strip()})
                await asyncio.sleep(self.interval_s)

    async def sample(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """One look: new alarms' latencies, the outbox's backlog."""
        cur = await conn.execute(RAISED_SQL, (self.cursor,))
        record = observability.instruments.alarm_latency.record
        for event_id, kind, severity, seconds in await cur.fetchall():
            record(max(float(seconds), 0.0), {"kind": kind, "severity": severity})
            self.cursor = int(event_id)
        if self.hospital:
            self.backlog = await outbox.backlog(conn)
