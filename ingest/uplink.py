"""The hospital role's uplink: drains the outbox (``rmiot.ingest.outbox``) to
the region over gRPC (``IngestService.Push`` on the region's mutual-TLS port,
with this hospital platform's client certificate).

Contract:
- every frame in the outbox reaches the region: a row is deleted only once the
  region's reply — sent after its commit — counts its frame stored or already
  stored (or refused for good: STALE or MALFORMED, which no resend can
  change; those are counted, logged and dropped);
- exactly once at the region: a request that fails or whose reply is lost is
  sent again, byte for byte, and the region answers what it already has
  DUPLICATE;
- in order per device: rows go up in outbox ``id`` order (each device's arrival
  order, see the outbox) a chunk at a time. A chunk is split by device over
  ``uplink.streams`` parallel pushes (a device's rows all in one of them),
  and the next chunk goes only once every part of this one is answered, i.e.
  committed at the region. When the region refuses a device's frames for a
  reason that may pass (RATE_LIMITED; or UNKNOWN_DEVICE, TENANT_MISMATCH,
  TENANT_FORBIDDEN, AUTH_FAILED, AUTH_REQUIRED: the two registries or the
  certificate disagree), that device is held: its frames stay in the outbox,
  none of its later frames go up before them, and they are tried again after
  a second (rate limit) or ``uplink.hold_s``;
- while the region is unreachable nothing is lost and nothing is dropped: the
  same request is retried (backoff up to ``uplink.retry_max_s``) and the
  outbox grows; the hospital keeps ingesting;
- one uplink per hospital database drains at a time (a session advisory lock;
  a second one waits);
- ``backlog`` (frames waiting, refreshed every few seconds) is also the
  observable gauge ``rmiot.uplink.backlog``, and is logged while non-zero.

While a chunk is at the region the next one is read and the previous one's
rows deleted, on two database connections of their own; each stream has a
gRPC channel (and connection) of its own, so a region running several
processes on its port spreads them.

``python -m rmiot.ingest.uplink`` runs it as a process of its own (the
configuration's ``[uplink]`` section); the platform runs it as a task
(``Uplink(cfg).start()``) in the hospital role.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections import Counter
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psycopg
import uvloop
from opentelemetry import metrics

from rmiot import db, logs
from rmiot.config import Config, load
from rmiot.ingest.outbox import backlog
from rmiot.proto import ingest_pb2, ingest_pb2_grpc

log = logging.getLogger("rmiot.ingest.uplink")
T = TypeVar("T")

# A session lock: one drainer per outbox ("rmioutbx").
DRAIN_LOCK = 0x726D696F75746278
POLL_S = 0.2            # an empty outbox is looked at again this often
BACKLOG_EVERY_S = 5.0   # the backlog figure is refreshed this often
RATE_HOLD_S = 1.0
RETRY_MIN_S = 0.2
HELD_CODES = frozenset({"UNKNOWN_DEVICE", "TENANT_MISMATCH", "TENANT_FORBIDDEN",
                        "AUTH_FAILED", "AUTH_REQUIRED"})
RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                         grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                         grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                         grpc.StatusCode.CANCELLED})

READ_SQL = ("SELECT id, device_id, frame FROM outbox "
            "WHERE id > %s::bigint AND device_id <> ALL(%s::bigint[]) ORDER BY id LIMIT %s")
TRIM_SQL = "DELETE FROM outbox WHERE id = ANY(%s::bigint[])"


@dataclass(frozen=True, slots=True)
class Chunk:
    """Outbox rows to send together, in id order."""

    ids: list[int]
    devices: list[int]
    frames: list[bytes]
    full: bool          # the read hit its limit: more may follow right after it

    @property
    def last(self) -> int:
        return self.ids[-1] if self.ids else 0

    def split(self, parts: int) -> list[Chunk]:
        """By device: each device's rows, in order, in one of ``parts`` chunks."""
        if parts == 1:
            return [self]
        rows: list[list[int]] = [[] for _ in range(parts)]
        for i, device in enumerate(self.devices):
            rows[device % parts].append(i)
        return [self.rows(kept) for kept in rows if kept]

    def rows(self, kept: list[int]) -> Chunk:
        """The chunk of these rows (positions), not "full": the next read
        starts over from the oldest row."""
        return Chunk([self.ids[i] for i in kept], [self.devices[i] for i in kept],
                     [self.frames[i] for i in kept], False)


def frame_key(raw: bytes) -> tuple[int, int, int]:
    """(device, seq, ts_us) from an RMF frame's header."""
    return (int.from_bytes(raw[12:20]), int.from_bytes(raw[20:24]),
            int.from_bytes(raw[24:32], signed=True))


def client_files(cfg: Config) -> tuple[bytes, bytes, bytes]:
    """(CA, key, certificate) PEM for the uplink's channel."""
    up = cfg.uplink
    cert = Path(up.client_cert) if up.client_cert else cfg.data_dir / "certs" / "uplink.crt"
    key = Path(up.client_key) if up.client_key else cert.with_suffix(".key")
    ca = Path(up.ca_file) if up.ca_file else cfg.tls_path("ca_file")
    try:
        return ca.read_bytes(), key.read_bytes(), cert.read_bytes()
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"uplink: {exc.filename} does not exist (uplink.client_cert, uplink.client_key, "
            f"uplink.ca_file; 'rmiot certs issue NAME --kind platform --tenant ID' at the "
            "region makes a client certificate)") from None


class Uplink:
    def __init__(self, cfg: Config, dsn: str | None = None) -> None:
        self.cfg = cfg
        self.dsn = dsn or db.app_dsn(cfg)
        self.stats: Counter[str] = Counter()
        self.backlog = 0
        self.connected = False       # the last push was answered
        self.held: dict[int, float] = {}  # device -> monotonic time it may go again
        self._task: asyncio.Task[None] | None = None
        self._backlog_at = 0.0
        self._complained_at = 0.0
        metrics.get_meter("rmiot.ingest.uplink").create_observable_gauge(
            "rmiot.uplink.backlog", callbacks=[self._observe], unit="{frame}",
            description="frames in the outbox waiting to reach the region")

    def _observe(self, _options: Any) -> Iterable[metrics.Observation]:
        yield metrics.Observation(self.backlog)

    async def start(self) -> None:
        """Drain in the background until ``stop``. Raises FileNotFoundError
        (naming the file and the key) when a certificate file is missing."""
        if not self.cfg.uplink.target:
            log.warning("hospital role without uplink.target: committed frames wait in the "
                        "outbox until one is set")
            return
        pems = client_files(self.cfg)
        self._task = asyncio.create_task(self.run(pems), name="uplink")
        self._task.add_done_callback(_ended)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self, pems: tuple[bytes, bytes, bytes]) -> None:
        """Drain forever; database trouble is waited out (nothing is lost).
        ``pems``: the CA, key and certificate (``client_files``)."""
        delay = RETRY_MIN_S
        credentials = grpc.ssl_channel_credentials(*pems)
        retry_ms = int(self.cfg.uplink.retry_max_s * 1000)
        options = [("grpc.max_send_message_length", 64 * 1024 * 1024),
                   ("grpc.initial_reconnect_backoff_ms", int(RETRY_MIN_S * 1000)),
                   ("grpc.min_reconnect_backoff_ms", int(RETRY_MIN_S * 1000)),
                   ("grpc.max_reconnect_backoff_ms", retry_ms),
                   ("grpc.keepalive_time_ms", 30_000),
                   ("grpc.use_local_subchannel_pool", 1)]  # a connection per channel
        async with contextlib.AsyncExitStack() as stack:
            # One channel per stream: a region running several processes on its
            # port (SO_REUSEPORT) gets the streams spread over them.
            stubs = [ingest_pb2_grpc.IngestServiceStub(await stack.enter_async_context(
                grpc.aio.secure_channel(self.cfg.uplink.target, credentials, options=options)))
                for _ in range(self.cfg.uplink.streams)]
            while True:
                try:
                    await self._drain(stubs)
                except psycopg.Error as exc:  # unavailable, or not migrated (no outbox)
                    log.warning("uplink: cannot read the outbox; retrying",
                                extra={"error": str(exc).strip().splitlines()[0]
                                       if str(exc).strip() else type(exc).__name__,
                                       "retry_s": delay})
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.cfg.uplink.retry_max_s)

    async def _drain(self, stubs: list[ingest_pb2_grpc.IngestServiceAsyncStub]) -> None:
        """Chunk after chunk: each split by device over the streams, pushed in
        parallel; the next chunk goes once all of this one is answered, so a
        device's frames reach the region in order."""
        connect = psycopg.AsyncConnection.connect
        async with await connect(self.dsn, autocommit=True) as reader, \
                await connect(self.dsn, autocommit=True) as trimmer:
            await self._lock(reader)
            pending: set[asyncio.Task[Any]] = set()
            try:
                await self._chunks(reader, trimmer, stubs, pending)
            finally:  # a dead connection or stop(): nothing of ours left running
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)

    async def _chunks(self, reader: psycopg.AsyncConnection[Any],
                      trimmer: psycopg.AsyncConnection[Any],
                      stubs: list[ingest_pb2_grpc.IngestServiceAsyncStub],
                      pending: set[asyncio.Task[Any]]) -> None:
        trim: asyncio.Task[None] | None = None
        chunk = await self._read(reader, 0)
        while True:
            if not chunk.ids:
                if trim is not None:
                    await trim
                    trim = None
                await self._refresh_backlog(trimmer, force=True)
                await asyncio.sleep(POLL_S)
                chunk = await self._read(reader, 0)
                continue
            # The next chunk is read while this one is at the region; after a
            # short read (the end of the outbox) reading starts over from the
            # oldest row, once the deletes before it are done.
            after = chunk.last if chunk.full else None
            ahead = _tracked(pending, self._read(reader, after)) if after else None
            parts = chunk.split(len(stubs))  # as many as have rows
            pushes = zip(stubs, parts, strict=False)
            replies = await asyncio.gather(*(self._push(st, part) for st, part in pushes))
            if trim is not None:
                await trim
            await self._refresh_backlog(trimmer)
            done: list[int] = []
            newly_held: set[int] = set()
            for part, reply in zip(parts, replies, strict=True):
                part_done, part_held = self._settle(part, reply)
                done += part_done
                newly_held |= part_held
            trim = _tracked(pending, self._trim(trimmer, done))
            if ahead is not None:
                chunk = await ahead
                if newly_held:  # their later frames stay for after the held ones
                    chunk = chunk.rows([i for i, d in enumerate(chunk.devices)
                                        if d not in newly_held])
            else:
                await trim
                trim = None
                chunk = await self._read(reader, 0)

    async def _lock(self, conn: psycopg.AsyncConnection[Any]) -> None:
        told = False
        while True:
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (DRAIN_LOCK,))
            row = await cur.fetchone()
            if row and row[0]:
                log.info("uplink draining the outbox", extra={"target": self.cfg.uplink.target})
                return
            if not told:
                log.warning("another uplink is draining this outbox; waiting for it to stop")
                told = True
            await asyncio.sleep(2.0)

    async def _read(self, conn: psycopg.AsyncConnection[Any], after: int | None) -> Chunk:
        """The next rows after id ``after`` (None or 0: from the oldest), held
        devices left out. Reading from the oldest ends the holds that are due."""
        now = time.monotonic()
        if not after:
            after = 0
            self.held = {d: until for d, until in self.held.items() if until > now}
        limit = self.cfg.uplink.batch_frames * self.cfg.uplink.streams
        cur = conn.cursor(binary=True)
        await cur.execute(READ_SQL, (after, list(self.held), limit), prepare=True)
        rows = await cur.fetchall()
        return Chunk([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                     len(rows) >= limit)

    async def _push(self, stub: ingest_pb2_grpc.IngestServiceAsyncStub,
                    chunk: Chunk) -> ingest_pb2.PushReply:
        """Send until the region answers (the same bytes every time)."""
        request = ingest_pb2.PushRequest(
            batch_id=f"{self.cfg.platform.name}:{chunk.ids[0]}-{chunk.last}",
            frames=b"".join(chunk.frames))
        delay = RETRY_MIN_S
        while True:
            self.stats["requests"] += 1
            try:
                reply: ingest_pb2.PushReply = await stub.Push(
                    request, timeout=self.cfg.uplink.timeout_s, wait_for_ready=True)
            except grpc.aio.AioRpcError as exc:
                self.stats["failures"] += 1
                self.connected = False
                code = exc.code()
                self._complain(f"uplink: push failed ({code.name}); retrying",
                               details=exc.details() or "", frames=len(chunk.ids))
                if code not in RETRY_CODES:  # the region refuses us: a configuration matter
                    delay = self.cfg.uplink.retry_max_s
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.cfg.uplink.retry_max_s)
                continue
            if not self.connected:
                log.info("uplink: the region answers", extra={"target": self.cfg.uplink.target})
                self.connected = True
            return reply

    def _settle(self, chunk: Chunk, reply: ingest_pb2.PushReply) -> tuple[list[int], set[int]]:
        """Which rows are done with (to delete), and the devices held from now."""
        statuses = reply.statuses
        self.stats["sent"] += len(chunk.ids)
        self.stats["stored"] += statuses.get("OK", 0)
        self.stats["duplicate"] += statuses.get("DUPLICATE", 0)
        if not reply.refused:
            return chunk.ids, set()
        codes = {(r.device_id, r.seq, r.ts_us): r.code for r in reply.refused}
        now = time.monotonic()
        done: list[int] = []
        newly_held: set[int] = set()
        dropped: Counter[str] = Counter()
        for row_id, raw in zip(chunk.ids, chunk.frames, strict=True):
            key = frame_key(raw)
            code = codes.get(key)
            device = key[0]
            if device in newly_held:
                continue  # after a held frame of its device: stays, in order
            if code is None:
                done.append(row_id)
            elif code == "RATE_LIMITED" or code in HELD_CODES:
                pause = RATE_HOLD_S if code == "RATE_LIMITED" else self.cfg.uplink.hold_s
                self.held[device] = now + pause
                newly_held.add(device)
                self.stats["held"] += 1
                if code != "RATE_LIMITED":
                    self._complain(f"uplink: the region refuses device {device}'s frames "
                                   f"({code}); they wait in the outbox", code=code)
            else:
                dropped[code] += 1
                done.append(row_id)
        if dropped:
            self.stats["dropped"] += sum(dropped.values())
            log.warning("uplink: frames the region can never take were dropped",
                        extra={"codes": dict(dropped)})
        return done, newly_held

    async def _trim(self, conn: psycopg.AsyncConnection[Any], ids: Sequence[int]) -> None:
        if ids:
            await conn.execute(TRIM_SQL, (list(ids),), prepare=True)
            self.backlog = max(0, self.backlog - len(ids))

    async def _refresh_backlog(self, conn: psycopg.AsyncConnection[Any],
                               force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._backlog_at < BACKLOG_EVERY_S:
            return
        was = self.backlog
        waiting = await backlog(conn)
        self.backlog, self._backlog_at = waiting.frames, now
        if waiting.frames and (now - self._complained_at > 30 or not was):
            log.info("uplink backlog", extra={"frames": waiting.frames,
                                              "oldest_s": round(waiting.oldest_s, 1)})

    def _complain(self, message: str, **extra: Any) -> None:
        """Log a recurring problem at most every 30 s."""
        now = time.monotonic()
        if now - self._complained_at >= 30.0:
            self._complained_at = now
            log.warning(message, extra=extra)


def _tracked(pending: set[asyncio.Task[Any]], work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A task for ``work``, in ``pending`` until it is done."""
    task = asyncio.create_task(work)
    pending.add(task)
    task.add_done_callback(pending.discard)
    return task


def _ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("uplink stopped by an error; the outbox keeps filling",
                  exc_info=task.exception())


async def main() -> None:
    cfg = load()
    logs.setup(cfg.log.level, "json")
    uplink = Uplink(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await uplink.start()
    print(f"UPLINK {cfg.uplink.target}", flush=True)
    await stop.wait()
    await uplink.stop()
    print(f"STATS {dict(uplink.stats)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    uvloop.run(main())
