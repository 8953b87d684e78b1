"""Device commands (standard 6.3 e): storage, state machine, and the downlink.

A command is queued for one device with parameters (RMF fields) and a time to
live; it goes down the device's RMF connection as a COMMAND frame (kind 0x82:
field metric 0 int64 = the command id, then the parameters) and the device
answers with a COMMAND_RESULT frame (kind 5: metric 0 int64 = the command id,
metric 1 int32 = the result code).

States, and what moves a command (migration 0008 refuses any other move and
records every change in ``command_events``):

==========  =================================================================
queued      stored; waits for the device to have a live connection
sent        claimed and written to the device's connection
delivered   result code 1 ("accepted, in progress"), or implied by a final one
succeeded   result code 0 (final)
failed      any other result code (final)
expired     not finished ``ttl_s`` after creation, in any state (final)
==========  =================================================================

A final result on a queued or sent command records ``delivered`` first, then
the outcome. A sent command whose connection closes before the device
confirms it is queued again and re-sent when the device is back: delivery is
at least once, and a device recognises a repeat by its command id. A result
for a finished command changes nothing; after expiry it is noted in the
history (the device did act, late).

``CommandDispatcher`` is the downlink of one ingest process. The pipeline
tells it ``device_seen(device, sink)`` once per device per connection (a
gateway's connection speaks for several devices), ``connection_closed(sink)``
and ``results(frames)`` with the COMMAND_RESULT frames it committed. It keeps
in memory which devices have queued commands (loaded at start, then kept by
NOTIFY on ``rmiot_commands``), so a device appearing costs a set lookup, and a
query only when something waits for it. Sending claims the commands in the
database first (``queued`` -> ``sent``, skipping rows another process holds),
so when several ingest processes share the port exactly one sends each
command; a crash between that commit and the socket write leaves a command
``sent`` that the device never got, until it expires. Each process also moves
overdue commands to ``expired`` once a second. A lost database connection is
retried with backoff; the work waits meanwhile, nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from rmiot.core_ext import KIND_COMMAND, Frame, encode_frame
from rmiot.db import ChangeFollower

log = logging.getLogger("rmiot.registry.commands")

CHANNEL = "rmiot_commands"
STATES = ("queued", "sent", "delivered", "succeeded", "failed", "expired")
OPEN_STATES = ("queued", "sent", "delivered")
RESULT_SUCCEEDED = 0
RESULT_ACCEPTED = 1  # delivered, still in progress; every other code is a failure
DEFAULT_TTL_S = 300
MAX_TTL_S = 7 * 86400
MAX_PARAMS = 254  # a frame holds 255 fields; the command id is one
FLOAT32_MAX = 3.4028234663852886e38

Param = tuple[int, int, object]  # (metric, vtype, value), as encode_frame takes them
AsyncConn = psycopg.AsyncConnection[TupleRow]
Clock = Callable[[], dt.datetime | None]  # None: the database's own clock

_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_COLUMNS = ("id, device_id, tenant_id, name, params, state, created_by, created_at, "
            "expires_at, sent_at, delivered_at, finished_at, result_code")
# A device in the tenant's subtree (tenants.path lists a node's ancestors and itself).
_IN_SUBTREE = "tenant_id IN (SELECT id FROM tenants WHERE path @> ARRAY[%s]::integer[])"


class CommandError(ValueError):
    """A command that cannot be queued as asked; the message says why."""


class CommandNotFound(LookupError):
    """No such device or command within the tenant asked about."""


@dataclass(frozen=True, slots=True)
class Command:
    id: int
    device_id: int
    tenant_id: int
    name: str
    params: list[Param]
    state: str
    created_by: str
    created_at: dt.datetime
    expires_at: dt.datetime
    sent_at: dt.datetime | None
    delivered_at: dt.datetime | None
    finished_at: dt.datetime | None
    result_code: int | None

    def frame(self, ts_us: int | None = None) -> bytes:
        """The COMMAND frame. Its seq is the id's low 32 bits, the same on every
        resend; ts_us is when it is sent."""
        ts = time.time_ns() // 1000 if ts_us is None else ts_us
        return encode_frame(KIND_COMMAND, self.tenant_id, self.device_id,
                            self.id & 0xFFFFFFFF, ts, [(0, 4, self.id), *self.params])


@dataclass(frozen=True, slots=True)
class CommandEvent:
    at: dt.datetime
    state: str
    detail: dict[str, Any] | None


def _command(row: Sequence[Any]) -> Command:
    return Command(row[0], row[1], row[2], row[3], params_from_json(row[4]), *row[5:])


def params_to_json(params: Iterable[Param]) -> list[list[object]]:
    return [[m, vt, {"hex": bytes(v).hex()} if vt == 7 else v]  # type: ignore[call-overload]
            for m, vt, v in params]


def params_from_json(value: list[list[Any]]) -> list[Param]:
    return [(int(m), int(vt), bytes.fromhex(v["hex"]) if vt == 7 else v) for m, vt, v in value]


def check_params(params: Sequence[Param]) -> list[Param]:
    """The parameters as they will be sent; CommandError when a frame could
    not carry them (metric 0 is the command id's)."""
    if len(params) > MAX_PARAMS:
        raise CommandError(f"{len(params)} parameters; at most {MAX_PARAMS} fit a frame")
    checked: list[Param] = []
    for metric, vtype, value in params:
        if not 1 <= metric <= 0xFFFF:
            raise CommandError(f"parameter metric {metric}: use 1..65535 (0 is the command id)")
        if vtype in (1, 2) and not (isinstance(value, int | float) and math.isfinite(value)
                                    and (vtype == 2 or abs(value) <= FLOAT32_MAX)):
            raise CommandError(f"parameter metric {metric}: a finite number is needed"
                               + (" (float32)" if vtype == 1 else ""))
        if vtype == 5:
            value = bool(value)
        checked.append((metric, vtype, value))
    try:
        encode_frame(KIND_COMMAND, 1, 1, 0, 0, [(0, 4, 2**63 - 1), *checked])
    except (ValueError, TypeError, OverflowError) as exc:
        raise CommandError(f"parameters: {exc}") from None
    return checked


def _at(now: dt.datetime | None) -> dt.datetime | str:
    # A parameter PostgreSQL reads as a timestamptz: the given time, or 'now'.
    return now if now is not None else "now"


# -- storage ------------------------------------------------------------------

async def queue(conn: AsyncConn, scope_tenant: int, device_id: int, name: str,
                params: Sequence[Param], ttl_s: int, created_by: str,
                now: dt.datetime | None = None) -> Command:
    """Queue a command for a device of ``scope_tenant``'s subtree (else
    CommandNotFound: another tenant's device is not told apart from none)."""
    if not _NAME.match(name):
        raise CommandError("name: a lower-case word of letters, digits, _ . - (at most 64)")
    ttl = ttl_s or DEFAULT_TTL_S
    if not 1 <= ttl <= MAX_TTL_S:
        raise CommandError(f"ttl_s: 1..{MAX_TTL_S} seconds (0: {DEFAULT_TTL_S})")
    checked = check_params(params)
    cur = await conn.execute(
        f"INSERT INTO commands (device_id, tenant_id, name, params, created_by, created_at, "
        f"expires_at, updated_at) SELECT id, tenant_id, %s, %s, %s, t, t + %s, t "
        f"FROM devices, (SELECT %s::timestamptz AS t) clock "
        f"WHERE id = %s AND {_IN_SUBTREE} RETURNING {_COLUMNS}".encode(),
        (name, Jsonb(params_to_json(checked)), created_by, dt.timedelta(seconds=ttl),
         _at(now), device_id, scope_tenant))
    row = await cur.fetchone()
    if row is None:
        raise CommandNotFound(f"device {device_id} not found")
    return _command(row)


async def get(conn: AsyncConn, scope_tenant: int, command_id: int) -> Command | None:
    cur = await conn.execute(
        f"SELECT {_COLUMNS} FROM commands WHERE id = %s AND {_IN_SUBTREE}".encode(),
        (command_id, scope_tenant))
    row = await cur.fetchone()
    return _command(row) if row else None


async def history(conn: AsyncConn, command_id: int) -> list[CommandEvent]:
    cur = await conn.execute("SELECT at, state, detail FROM command_events "
                             "WHERE command_id = %s ORDER BY id", (command_id,))
    return [CommandEvent(*row) for row in await cur.fetchall()]


async def find(conn: AsyncConn, scope_tenant: int, *, device_id: int = 0, state: str = "",
               before_id: int = 0, limit: int = 100) -> list[Command]:
    """Commands of a tenant's subtree, newest first; optionally of one device,
    in one state, and with ids below ``before_id`` (the next page)."""
    if state and state not in STATES:
        raise CommandError(f"state: one of {', '.join(STATES)}")
    where = [_IN_SUBTREE]
    params: list[object] = [scope_tenant]
    for column, value in (("device_id", device_id), ("state", state)):
        if value:
            where.append(f"{column} = %s")
            params.append(value)
    if before_id:
        where.append("id < %s")
        params.append(before_id)
    params.append(limit)
    cur = await conn.execute(f"SELECT {_COLUMNS} FROM commands WHERE {' AND '.join(where)} "
                             f"ORDER BY id DESC LIMIT %s".encode(), params)
    return [_command(row) for row in await cur.fetchall()]


async def claim_queued(conn: AsyncConn, device_id: int,
                       now: dt.datetime | None = None) -> list[Command]:
    """queued -> sent for the device's live commands, oldest first. Rows another
    process is claiming are skipped, never waited for (it sends them)."""
    cur = await conn.execute(
        f"UPDATE commands SET state = 'sent', sent_at = %(t)s, updated_at = %(t)s, "
        f"detail = NULL WHERE id IN (SELECT id FROM commands WHERE device_id = %(d)s "
        f"AND state = 'queued' AND expires_at > %(t)s FOR UPDATE SKIP LOCKED) "
        f"RETURNING {_COLUMNS}".encode(), {"t": _at(now), "d": device_id})
    return sorted((_command(row) for row in await cur.fetchall()), key=lambda c: c.id)


async def requeue(conn: AsyncConn, command_ids: Sequence[int], reason: str,
                  now: dt.datetime | None = None) -> int:
    """sent -> queued (the connection closed before the device confirmed)."""
    cur = await conn.execute(
        "UPDATE commands SET state = 'queued', updated_at = %s, detail = %s "
        "WHERE id = ANY(%s) AND state = 'sent' AND expires_at > %s",
        (_at(now), Jsonb({"reason": reason}), list(command_ids), _at(now)))
    return cur.rowcount


async def record_result(conn: AsyncConn, device_id: int, command_id: int, code: int,
                        detail: dict[str, Any] | None = None,
                        now: dt.datetime | None = None) -> str | None:
    """Apply a device's result code to its command; returns the state now, or
    None when the device has no such command (a device answers only its own)."""
    note = {"result_code": code, **(detail or {})}
    async with conn.transaction():
        cur = await conn.execute("SELECT state FROM commands WHERE id = %s AND device_id = %s "
                                 "FOR UPDATE", (command_id, device_id))
        row = await cur.fetchone()
        if row is None:
            return None
        state: str = row[0]
        if state == "expired":  # noted once: a retransmission has the same detail
            late = Jsonb({**note, "late": True})
            await conn.execute("INSERT INTO command_events (command_id, at, state, detail) "
                               "SELECT %(c)s, %(t)s, 'expired', %(d)s WHERE NOT EXISTS ("
                               "SELECT FROM command_events WHERE command_id = %(c)s "
                               "AND detail = %(d)s)", {"c": command_id, "t": _at(now), "d": late})
            return state
        if state in ("queued", "sent"):
            await conn.execute("UPDATE commands SET state = 'delivered', delivered_at = %s, "
                               "updated_at = %s, detail = %s WHERE id = %s",
                               (_at(now), _at(now), Jsonb(note), command_id))
            state = "delivered"
        if state == "delivered" and code != RESULT_ACCEPTED:
            state = "succeeded" if code == RESULT_SUCCEEDED else "failed"
            await conn.execute("UPDATE commands SET state = %s, result_code = %s, "
                               "finished_at = %s, updated_at = %s, detail = %s WHERE id = %s",
                               (state, code, _at(now), _at(now), Jsonb(note), command_id))
        return state


async def expire_due(conn: AsyncConn, now: dt.datetime | None = None) -> list[int]:
    """Every unfinished command past its expiry -> expired; returns their ids."""
    cur = await conn.execute(
        "UPDATE commands SET state = 'expired', finished_at = %(t)s, updated_at = %(t)s, "
        "detail = jsonb_build_object('was', state) "
        "WHERE state IN ('queued', 'sent', 'delivered') AND expires_at <= %(t)s RETURNING id",
        {"t": _at(now)})
    return [row[0] for row in await cur.fetchall()]


async def devices_with_queued(conn: AsyncConn) -> set[int]:
    cur = await conn.execute("SELECT DISTINCT device_id FROM commands WHERE state = 'queued' "
                             "AND expires_at > now()")
    return {row[0] for row in await cur.fetchall()}


def result_of(frame: Frame) -> tuple[int, int] | None:
    """(command id, result code) of a COMMAND_RESULT frame; None if it has neither."""
    command_id = code = None
    for metric, vtype, value in frame.fields():
        if metric == 0 and vtype == 4:
            command_id = value
        elif metric == 1 and vtype == 3:
            code = value
    if not isinstance(command_id, int) or not isinstance(code, int):
        return None
    return command_id, code


def to_us(when: dt.datetime | None) -> int:
    """Microseconds since 1970 UTC; 0 for None."""
    return 0 if when is None else (when - _EPOCH) // dt.timedelta(microseconds=1)


# -- the downlink -----------------------------------------------------------------

class CommandDispatcher(ChangeFollower):
    """Sends queued commands down the live connections of this process and
    applies the results that come up (see the module's docstring)."""

    channels = (CHANNEL,)
    name = "command dispatcher"

    def __init__(self, dsn: str, *, expiry_interval_s: float = 1.0,
                 clock: Clock = lambda: None) -> None:
        super().__init__(dsn)
        self.expiry_interval_s = expiry_interval_s
        self.clock = clock
        self.stats: Counter[str] = Counter()
        # Devices that may have queued commands (a superset: a dispatch prunes it).
        self.pending: set[int] = set()
        self._sinks_of: dict[int, dict[Any, None]] = {}  # device -> its sinks, latest last
        self._devices_of: dict[Any, set[int]] = {}       # sink -> devices seen on it
        self._unconfirmed: dict[int, Any] = {}           # command id -> sink it was sent on
        self._due: dict[int, None] = {}                  # devices to send to, in order
        self._results: list[Frame] = []
        self._requeue: list[list[int]] = []
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    # -- called by the pipeline (cheap, no I/O) ---------------------------------

    def device_seen(self, device: int, sink: Any) -> None:
        """A frame of ``device`` was accepted on ``sink``."""
        seen = self._devices_of.get(sink)
        if seen is None:
            seen = self._devices_of[sink] = set()
        elif device in seen:
            return
        seen.add(device)
        self._sinks_of.setdefault(device, {})[sink] = None
        if device in self.pending:
            self._due[device] = None
            self._wake.set()

    def connection_closed(self, sink: Any) -> None:
        for device in self._devices_of.pop(sink, ()):
            sinks = self._sinks_of.get(device)
            if sinks is not None:
                sinks.pop(sink, None)
                if not sinks:
                    del self._sinks_of[device]
        lost = [cid for cid, s in self._unconfirmed.items() if s is sink]
        if lost:
            for cid in lost:
                del self._unconfirmed[cid]
            self._requeue.append(lost)
            self._wake.set()

    def results(self, frames: list[Frame]) -> None:
        """COMMAND_RESULT frames, once committed as telemetry."""
        self._results.extend(frames)
        self._wake.set()

    # -- ChangeFollower ------------------------------------------------------------

    async def load_all(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.pending = await devices_with_queued(conn)
        self._want(self.pending)

    async def apply(self, conn: psycopg.AsyncConnection[Any],
                    notes: list[psycopg.Notify]) -> None:
        devices = {int(n.payload.partition(":")[2]) for n in notes
                   if n.payload.startswith("device:")}
        self.pending |= devices
        self._want(devices)

    def _want(self, devices: Iterable[int]) -> None:
        for device in devices:
            if device in self._sinks_of:
                self._due[device] = None
                self._wake.set()

    # -- the worker -------------------------------------------------------------------

    async def start(self) -> None:
        await super().start()
        self._worker = asyncio.create_task(self._work(), name="command-worker")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        await super().stop()

    async def _work(self) -> None:
        delay = 0.1
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.dsn,
                                                                 autocommit=True) as conn:
                    delay = 0.1
                    next_sweep = 0.0
                    while True:
                        await self._drain(conn)
                        if time.monotonic() >= next_sweep:
                            for cid in await expire_due(conn, self.clock()):
                                self._unconfirmed.pop(cid, None)
                                self.stats["expired"] += 1
                            next_sweep = time.monotonic() + self.expiry_interval_s
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(max(0.0, next_sweep - time.monotonic())):
                                await self._wake.wait()
                        self._wake.clear()
            except psycopg.Error as exc:
                log.warning("command dispatcher lost its database connection; retrying",
                            extra={"error": str(exc).strip(), "retry_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _drain(self, conn: AsyncConn) -> None:
        """Do the work waiting, oldest kind first; an item leaves its list only
        once done, so a lost connection retries it."""
        while self._requeue:
            ids = self._requeue[0]
            await self._attempt("requeue", requeue(conn, ids, "connection closed before the "
                                                   "device confirmed", self.clock()))
            self._requeue.pop(0)
            self.stats["requeued"] += len(ids)
        while self._results:
            await self._attempt("apply a result", self._apply_result(conn, self._results[0]))
            self._results.pop(0)
        while self._due:
            device = next(iter(self._due))
            await self._attempt("send", self._dispatch(conn, device))
            self._due.pop(device, None)

    async def _attempt(self, what: str, work: Awaitable[object]) -> None:
        """Run one item's work. A lost connection propagates (the item is retried
        after the reconnect); any other error skips the item, so one bad item
        cannot stall the rest."""
        try:
            await work
        except psycopg.OperationalError:
            raise
        except Exception as exc:
            self.stats["errors"] += 1
            log.error(f"command dispatcher could not {what}; skipping it",
                      extra={"error": str(exc).strip() or type(exc).__name__})

    async def _apply_result(self, conn: AsyncConn, frame: Frame) -> None:
        parsed = result_of(frame)
        if parsed is None:
            self.stats["result_without_id_or_code"] += 1
            return
        command_id, code = parsed
        state = await record_result(conn, frame.device, command_id, code,
                                    {"seq": frame.seq, "device_ts_us": frame.ts_us},
                                    self.clock())
        if state is None:
            self.stats["result_for_unknown_command"] += 1
            log.info("a device answered a command it was not sent",
                     extra={"device": frame.device, "command": command_id})
            return
        self.stats["results"] += 1
        self._unconfirmed.pop(command_id, None)

    async def _dispatch(self, conn: AsyncConn, device: int) -> None:
        if device not in self._sinks_of:
            return  # gone again: stays pending for when it is back
        self.pending.discard(device)  # before the claim: a NOTIFY after it re-adds
        try:
            claimed = await claim_queued(conn, device, self.clock())
        except BaseException:
            self.pending.add(device)
            raise
        if not claimed:
            return
        sinks = self._sinks_of.get(device)
        if not sinks:  # it closed during the claim: back to queued
            self._requeue.append([c.id for c in claimed])
            self._wake.set()
            return
        sink = next(reversed(sinks))  # the latest connection the device spoke on
        ts_us = time.time_ns() // 1000
        sink.send(b"".join(c.frame(ts_us) for c in claimed))
        for c in claimed:
            self._unconfirmed[c.id] = sink
        self.stats["sent"] += len(claimed)
