"""BatchWriter: commits batches of telemetry rows, then reports each batch's
outcome so the pipeline can acknowledge exactly what is stored.

Each writer owns one database connection and takes whole batches from a shared
queue; several writers (``ingest.writers``, one per core) keep the database
busy while the event loop decodes. A batch is written with one binary
``COPY telemetry FROM STDIN`` of the rows the decoder already encoded, in one
transaction:

- fast path: plain COPY. The table's unique index on (device_id, ts, seq)
  rejects the whole COPY if any row was stored before (a device retransmitting
  a frame whose ack it lost, maybe before a restart);
- then the slow path for that batch only: COPY into a temporary staging table
  and ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` the keys stored, so the
  rest are reported as duplicates (acked DUPLICATE, stored once);
- a row the database refuses for its data (it should not happen: the decoder
  and the pipeline's checks come first) is isolated by bisecting the batch and
  reported as rejected, so one bad row never costs the others;
- the same transaction marks the late frames it stored for the query
  service's rollups (``rmiot.ingest.marks``: one small row per batch that has
  any), so late rows correct buckets already rolled up;
- in the hospital role (``outbox`` set), the same transaction also COPYs the
  newly stored frames into the outbox the uplink drains to the region
  (``rmiot.ingest.outbox``), so nothing committed is missing from it; the
  region role does not take that path;
- when the connection fails, the writer reconnects with exponential backoff
  (0.1 s to 1 s) and retries the same batch: nothing is reported — and so
  nothing acknowledged — until it is committed. Meanwhile the batches waiting
  grow, and the pipeline stops reading from devices (backpressure).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import errors

from rmiot import observability
from rmiot.core_ext import Frame, copy_header, copy_trailer
from rmiot.ingest.marks import mark_stored
from rmiot.ingest.outbox import Outbox

log = logging.getLogger("rmiot.ingest.writer")

COPY_SQL = "COPY telemetry FROM STDIN (FORMAT BINARY)"
STAGE_SQL = ("CREATE TEMP TABLE IF NOT EXISTS telemetry_stage "
             "(LIKE telemetry INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
MERGE_SQL = ("INSERT INTO telemetry SELECT * FROM telemetry_stage "
             "ON CONFLICT DO NOTHING RETURNING device_id, seq, ts")
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
ONE_US = dt.timedelta(microseconds=1)

Key = tuple[int, int, int]  # (device, seq, ts_us)


def frame_key(frame: Frame) -> Key:
    return frame.device, frame.seq, frame.ts_us


@dataclass(slots=True)
class Batch:
    """Frames to store together, with whoever waits for each one's ack."""

    frames: list[Frame] = field(default_factory=list)
    sinks: list[Any] = field(default_factory=list)
    ticket: int = 0  # hospital role: the batch's place in the outbox's commit order
    trace: observability.BatchTrace | None = None  # when tracing: its timestamps

    def add(self, frame: Frame, sink: Any) -> None:
        self.frames.append(frame)
        self.sinks.append(sink)

    def __len__(self) -> int:
        return len(self.frames)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a batch: keys already stored before, and frames refused."""

    duplicates: frozenset[Key] = frozenset()
    rejected: frozenset[Key] = frozenset()


class BatchWriter:
    def __init__(self, dsn: str, writers: int,
                 on_done: Callable[[Batch, Outcome], None]) -> None:
        self.dsn = dsn
        self.writers = writers
        self.on_done = on_done
        self.queue: asyncio.Queue[Batch] = asyncio.Queue()
        self.busy = 0
        self.rows_committed = 0
        self.reconnects = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self.outbox: Outbox | None = None  # hospital role: frames to forward to the region

    async def start(self) -> None:
        """Open every writer's connection (fails fast when the database is away)."""
        conns = [await self._connect() for _ in range(self.writers)]
        if self.outbox is not None:
            await self.outbox.prepare(conns[0])
        self._tasks = [asyncio.create_task(self._run(c), name=f"batch-writer-{i}")
                       for i, c in enumerate(conns)]

    def submit(self, batch: Batch) -> None:
        self._idle.clear()
        if self.outbox is not None:
            batch.ticket = self.outbox.ticket()
        self.queue.put_nowait(batch)

    @property
    def backlog(self) -> int:
        """Batches waiting or being written."""
        return self.queue.qsize() + self.busy

    async def drain(self, timeout: float) -> bool:
        """Wait until every submitted batch is committed; False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                while self.backlog:
                    self._idle.clear()
                    await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        await conn.execute(STAGE_SQL)
        return conn

    async def _run(self, conn: psycopg.AsyncConnection[Any]) -> None:
        try:
            while True:
                batch = await self.queue.get()
                self.busy += 1
                try:
                    started = time.perf_counter()
                    trace = batch.trace
                    if trace is not None:
                        trace.writing_ns = time.time_ns()
                    conn, outcome = await self._commit_until_done(conn, batch)
                    stored = len(batch) - len(outcome.duplicates) - len(outcome.rejected)
                    self.rows_committed += stored
                    observability.instruments.batch_duration.record(
                        time.perf_counter() - started)
                    observability.instruments.batch_rows.record(len(batch))
                    if trace is not None:
                        trace.written_ns = time.time_ns()
                        trace.rows, trace.duplicates, trace.rejected = (
                            stored, len(outcome.duplicates), len(outcome.rejected))
                    self.on_done(batch, outcome)
                finally:
                    if self.outbox is not None:
                        self.outbox.finished(batch.ticket)
                    self.busy -= 1
                    if not self.backlog:
                        self._idle.set()
        finally:
            await conn.close()

    async def _commit_until_done(self, conn: psycopg.AsyncConnection[Any],
                                 batch: Batch) -> tuple[psycopg.AsyncConnection[Any], Outcome]:
        delay = 0.1
        while True:
            try:
                if conn.closed:
                    conn = await self._connect()
                    self.reconnects += 1
                    log.info("batch writer reconnected")
                return conn, await self._commit(conn, batch.frames, batch.ticket)
            except psycopg.OperationalError as exc:
                log.warning("database unavailable; batch kept, retrying",
                            extra={"rows": len(batch), "retry_s": delay,
                                   "error": str(exc).strip().splitlines()[0]
                                   if str(exc).strip() else type(exc).__name__})
                with contextlib.suppress(Exception):
                    await conn.close()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _commit(self, conn: psycopg.AsyncConnection[Any],
                      frames: Sequence[Frame], ticket: int = 0) -> Outcome:
        data = b"".join([copy_header(), *(f.copy_row for f in frames), copy_trailer()])
        try:
            async with conn.transaction():
                async with conn.cursor().copy(COPY_SQL) as copy:
                    await copy.write(data)
                await mark_stored(conn, frames)
                if self.outbox is not None:
                    await self.outbox.write(conn, frames, ticket)
            return Outcome()
        except errors.UniqueViolation:
            return await self._commit_deduplicated(conn, frames, data, ticket)
        except (errors.DataError, errors.IntegrityError) as exc:
            return await self._bisect(conn, frames, exc, ticket)

    async def _commit_deduplicated(self, conn: psycopg.AsyncConnection[Any],
                                   frames: Sequence[Frame], data: bytes,
                                   ticket: int = 0) -> Outcome:
        try:
            async with conn.transaction():
                async with conn.cursor().copy(COPY_SQL.replace("telemetry", "telemetry_stage",
                                                               1)) as copy:
                    await copy.write(data)
                cur = await conn.execute(MERGE_SQL)
                stored = {(dev, seq, (ts - EPOCH) // ONE_US)
                          for dev, seq, ts in await cur.fetchall()}
                fresh = [f for f in frames if frame_key(f) in stored]
                await mark_stored(conn, fresh)
                if self.outbox is not None:
                    await self.outbox.write(conn, fresh, ticket)
        except (errors.DataError, errors.IntegrityError) as exc:
            return await self._bisect(conn, frames, exc, ticket)
        duplicates = frozenset(k for k in map(frame_key, frames) if k not in stored)
        return Outcome(duplicates=duplicates)

    async def _bisect(self, conn: psycopg.AsyncConnection[Any], frames: Sequence[Frame],
                      exc: Exception, ticket: int = 0) -> Outcome:
        if len(frames) == 1:
            log.error("row refused by the database", extra={
                "device": frames[0].device, "seq": frames[0].seq, "error": str(exc).strip()})
            return Outcome(rejected=frozenset([frame_key(frames[0])]))
        half = len(frames) // 2
        left = await self._commit(conn, frames[:half], ticket)
        right = await self._commit(conn, frames[half:], ticket)
        return Outcome(left.duplicates | right.duplicates, left.rejected | right.rejected)
