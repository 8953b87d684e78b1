"""The tamper-evident audit trail (T/GDIOT 009—2024 §9, GB/T 22239-2019 level 3).

Every RPC and every login becomes one :class:`AuditRecord` appended to the
``audit_log`` hypertable as a hash chain::

    hash(N) = SM3(canonical(record N, N, hash(N-1)))      hash(0) = 32 zero bytes

Ids are dense from 1: one chain for the whole platform, however many processes
append. An appender locks the single row of ``audit_head`` (last id, last
hash, count), numbers and hashes its batch from it, inserts the batch and moves
the head forward, all in one transaction (migration 0004).

Canonical encoding (format 1). ``canonical(record, id, prev_hash)`` is exactly
the byte string that is hashed; every integer is big-endian::

    prev_hash     32 bytes
    b"rmiot.audit.1\\0"                      format tag (14 bytes)
    id            int64
    ts            int64, microseconds since 1970-01-01T00:00:00Z
    tenant_id     0x00 when absent, else 0x01 + int32
    actor, role, method, object, outcome, source, request_id, patient, detail
                  in this order, each 0xFFFFFFFF when absent (None / SQL NULL),
                  else uint32 length + the bytes: UTF-8 text; for detail, the
                  orjson encoding with OPT_SORT_KEYS (compact, keys sorted by
                  code point at every level) of the normalised detail

Nothing in it depends on the Python version, the locale or dict order. The
detail is normalised when appended so that it survives PostgreSQL's ``jsonb``
unchanged (verification re-encodes what the database returns): it is reduced
to JSON types (orjson's conversion: tuples to lists, NaN and infinities to
null ...), -0.0 becomes 0.0, and a float orjson would print with a positive
exponent (``1e+16`` and beyond: always a whole number) becomes that integer,
because jsonb prints it without one; beyond the 64-bit range it is refused
(send it as a string). Text containing NUL is refused (PostgreSQL cannot store
it). A refused record raises ``ValueError``/``TypeError`` from
:meth:`AuditLog.append`, at the caller.

Appending (:class:`AuditLog`): ``append`` only validates, encodes and queues;
the RPC's hot path never waits for the database. One task per AuditLog commits
what is queued in batches (group commit: whatever queued while the previous
batch was committing, up to ``batch_max``), one transaction each, by binary
COPY. On a database error the batch stays queued and is retried with
exponential backoff; a commit whose outcome was lost with the connection is
recognised on retry (its last id and hash are looked up) and never stored
twice. The queue is bounded: when ``queue_max`` records wait, ``append`` raises
:class:`AuditUnavailable` — the audit trail FAILS CLOSED: the caller refuses
the RPC rather than serve it unrecorded. ``flush`` waits until everything
appended so far is committed; ``stop`` flushes (up to a timeout), exports a
checkpoint and closes.

Checkpoints: one JSON line ``{"ts", "id", "hash" (hex), "count", "reason"}``
appended to a file outside the database (default
``<data_dir>/audit/checkpoints.jsonl``), naming the head at that moment — by
the AuditLog every ``checkpoint_interval_s`` and on stop, by
:func:`export_checkpoint`, and by retention for the new first record. Whoever
controls the database can rewrite the whole chain consistently; the
checkpoints, kept elsewhere, are what catches that, and a deleted tail.

Verification (:func:`verify`) walks the chain in id order through a
server-side cursor (constant memory) inside one repeatable-read snapshot and
reports the FIRST problem, by id:

- ``altered``: the record does not hash to its stored hash;
- ``missing``: an id is absent (records deleted);
- ``duplicate``: an id appears twice (a record inserted);
- ``reordered``: the record does not link to the previous one and does not hash
  at its position: moved from another id, or forged;
- ``rewritten``: the next record links to a different hash than this one's,
  though that next record is intact: this one was replaced with a recomputed
  hash (or records after it deleted and the rest renumbered);
- ``checkpoint``: the record differs from a checkpoint of that id (the chain
  was rewritten at or before it);
- ``truncated``: the chain ends before the head row's id or a checkpoint's id;
- ``head``: the head row disagrees with the last record;
- ``unanchored``: see retention.

Retention (:func:`drop_older_than`, administrator's DSN): keeps at least 180
days. It verifies the chain first (evidence is not destroyed unexamined),
exports a checkpoint of the new first record, then drops whole chunks and
deletes the remaining older records in one transaction. A chain whose first
record is not id 1 with the genesis prev_hash is accepted only when a
checkpoint names exactly that first record (id and hash); otherwise verify
reports ``unanchored`` at that id ("starts after retention at id N"), since
deleting the oldest records would otherwise go unnoticed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import itertools
import logging
import random
import struct
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg.conninfo import conninfo_to_dict

from rmiot.security.audit_checkpoints import AuditIntegrityError, append_line, checkpoint_line

log = logging.getLogger("rmiot.audit")

GENESIS = bytes(32)
FORMAT_TAG = b"rmiot.audit.1\x00"
MIN_RETENTION_DAYS = 180

try:
    _SM3 = hashlib.new("sm3")
except ValueError:  # pragma: no cover - depends on the OpenSSL build
    raise ImportError("SM3 is not available from this Python's OpenSSL (needs OpenSSL 3 "
                      "with SM3 enabled); the audit chain cannot be computed") from None

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01, PostgreSQL's binary timestamp origin
_I64, _I32, _U32 = struct.Struct(">q"), struct.Struct(">i"), struct.Struct(">I")
_ABSENT = b"\xff\xff\xff\xff"
_LEN8, _LEN32 = b"\x00\x00\x00\x08", b"\x00\x00\x00\x20"
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_TRAILER = b"\xff\xff"
_FIELD_COUNT = struct.pack(">h", 14)
_COPY_SQL = ("COPY audit_log (ts, id, actor, role, tenant_id, method, object, outcome, source, "
             "request_id, detail, patient, prev_hash, hash) FROM STDIN (FORMAT BINARY)")
_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1


class AuditUnavailable(Exception):
    """The audit trail cannot take this record (queue full, not running, or its
    appender failed): refuse the operation it would have recorded."""


def sm3(data: bytes) -> bytes:
    """SM3 digest (GB/T 32905) of ``data``: 32 bytes."""
    h = _SM3.copy()
    h.update(data)
    return h.digest()


@dataclass(frozen=True, kw_only=True)
class AuditRecord:
    """One audited event. ``ts`` must be timezone-aware; ``detail`` JSON-able."""

    ts: datetime = field(default_factory=lambda: datetime.now(UTC))
    actor: str
    role: str | None = None
    tenant_id: int | None = None
    method: str
    object: str | None = None
    outcome: str  # "ok", "denied", "error", "failed_login", ...
    source: str | None = None
    request_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    patient: str | None = None


# -- canonical encoding -------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Encoded:
    """A record's bytes, prepared once at append: what follows the id in the
    hash input, and its binary COPY row around the id and the hashes."""

    hashed_tail: bytes
    row_head: bytes
    row_middle: bytes


def canonical(record: AuditRecord, id: int, prev_hash: bytes) -> bytes:
    """The exact bytes hashed for ``record`` at ``id`` after ``prev_hash``
    (layout in the module docstring); raises ValueError/TypeError when the
    record cannot be stored."""
    if len(prev_hash) != 32:
        raise ValueError("prev_hash must be 32 bytes")
    return prev_hash + FORMAT_TAG + _I64.pack(id) + _encode(record).hashed_tail


def record_hash(record: AuditRecord, id: int, prev_hash: bytes) -> bytes:
    """The chain hash of ``record`` at ``id``."""
    return sm3(canonical(record, id, prev_hash))


def _text(name: str, value: str | None, required: bool = False) -> bytes | None:
    if value is None:
        if required:
            raise ValueError(f"audit record field {name} is required")
        return None
    if not isinstance(value, str):
        raise TypeError(f"audit record field {name} must be a string, got {type(value).__name__}")
    if required and not value:
        raise ValueError(f"audit record field {name} must not be empty")
    if "\x00" in value:
        raise ValueError(f"audit record field {name} contains a NUL character")
    return value.encode()  # raises on lone surrogates: not storable either


def _normalise(value: Any) -> Any:
    """Make a JSON value survive jsonb unchanged (see the module docstring)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if "\x00" in key:
                raise ValueError("audit detail key contains a NUL character")
            out[key] = _normalise(item)
        return out
    if isinstance(value, list):
        return [_normalise(item) for item in value]
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("audit detail text contains a NUL character")
        return value
    if isinstance(value, float):
        if value == 0.0:
            return 0.0  # jsonb has no negative zero
        if b"e+" in orjson.dumps(value):
            whole = int(value)
            if not _INT_MIN <= whole <= _UINT_MAX:
                raise ValueError(f"audit detail number {value!r} is beyond the 64-bit range; "
                                 "record it as a string")
            return whole
    return value


def _detail_bytes(detail: dict[str, Any]) -> bytes:
    if not isinstance(detail, dict):
        raise TypeError(f"audit record detail must be a dict, got {type(detail).__name__}")
    if not detail:
        return b"{}"
    try:
        plain = orjson.dumps(detail)
    except orjson.JSONEncodeError as exc:
        raise TypeError(f"audit record detail is not JSON-able: {exc}") from None
    value = orjson.loads(plain)  # JSON types only, whatever the caller passed
    # The walk is needed only when a float could change in jsonb or a NUL
    # hides in a string; the byte search may over-match (inside text), which
    # only costs the walk.
    if b"e+" in plain or b"-0.0" in plain or b"\\u0000" in plain:
        value = _normalise(value)
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _field(data: bytes | None) -> bytes:
    # Absent in the canonical form and NULL in binary COPY are the same four
    # bytes (uint32 0xFFFFFFFF, int32 -1): one encoding serves both.
    return _ABSENT if data is None else _U32.pack(len(data)) + data


def _ts_us(ts: datetime) -> int:
    delta = ts - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _encode_parts(ts_us: int, tenant_id: int | None, texts: tuple[bytes | None, ...],
                  detail: bytes | None) -> _Encoded:
    """texts: actor, role, method, object, outcome, source, request_id, patient."""
    actor, role, method, obj, outcome, source, request_id, patient = map(_field, texts)
    if tenant_id is None:
        tenant, tenant_column = b"\x00", _ABSENT
    else:
        packed = _I32.pack(tenant_id)
        tenant, tenant_column = b"\x01" + packed, b"\x00\x00\x00\x04" + packed
    if detail is None:
        detail_field = detail_column = _ABSENT
    else:
        detail_field = _U32.pack(len(detail)) + detail
        # jsonb's binary form: version byte 1, then the text.
        detail_column = _U32.pack(len(detail) + 1) + b"\x01" + detail
    hashed_tail = b"".join((_I64.pack(ts_us), tenant, actor, role, method, obj, outcome,
                            source, request_id, patient, detail_field))
    row_head = _FIELD_COUNT + _LEN8 + _I64.pack(ts_us - _PG_EPOCH_US)
    row_middle = b"".join((actor, role, tenant_column, method, obj, outcome, source,
                           request_id, detail_column, patient))
    return _Encoded(hashed_tail, row_head, row_middle)


def _encode(record: AuditRecord) -> _Encoded:
    ts = record.ts
    if not isinstance(ts, datetime) or ts.tzinfo is None or ts.utcoffset() is None:
        raise ValueError("audit record ts must be a timezone-aware datetime")
    tenant = record.tenant_id
    if tenant is not None and (isinstance(tenant, bool) or not isinstance(tenant, int)
                               or not -(2**31) <= tenant < 2**31):
        raise ValueError(f"audit record tenant_id must be an int32, got {tenant!r}")
    texts = (_text("actor", record.actor, True), _text("role", record.role),
             _text("method", record.method, True), _text("object", record.object),
             _text("outcome", record.outcome, True), _text("source", record.source),
             _text("request_id", record.request_id), _text("patient", record.patient))
    return _encode_parts(_ts_us(ts), tenant, texts, _detail_bytes(record.detail))


def stored_row_hash(row: tuple[Any, ...]) -> bytes | None:
    """The hash a stored row should carry, or None when it cannot be encoded
    (it was not written by an appender)."""
    (ident, ts_us, actor, role, tenant, method, obj, outcome, source, request_id, detail,
     patient, prev, _stored) = row
    if ts_us is None:
        return None
    try:
        texts = tuple(None if t is None else t.encode() for t in
                      (actor, role, method, obj, outcome, source, request_id, patient))
        detail_bytes = None if detail is None else \
            orjson.dumps(orjson.loads(detail), option=orjson.OPT_SORT_KEYS)
        enc = _encode_parts(ts_us, tenant, texts, detail_bytes)
    except (ValueError, TypeError, orjson.JSONDecodeError, struct.error):
        return None
    return sm3(bytes(prev) + FORMAT_TAG + _I64.pack(ident) + enc.hashed_tail)


# -- appending ----------------------------------------------------------------

class AuditLog:
    """Appends records to the chain from one process (see the module docstring).

    ``append`` is synchronous and must be called from the event loop's thread.
    """

    def __init__(self, dsn: str, *, checkpoints: Path | None = None,
                 checkpoint_interval_s: float = 600.0, queue_max: int = 50_000,
                 batch_max: int = 5_000, retry_initial_s: float = 0.05,
                 retry_max_s: float = 5.0, lock_timeout_s: float = 10.0) -> None:
        if queue_max < 1 or batch_max < 1:
            raise ValueError("queue_max and batch_max must be at least 1")
        self.dsn = dsn
        self.checkpoints = checkpoints
        self.checkpoint_interval_s = checkpoint_interval_s
        self.queue_max = queue_max
        self.batch_max = batch_max
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.lock_timeout_s = lock_timeout_s
        # A stuck appender elsewhere must not hold the head forever, nor this
        # one wait for it forever: both end in a retry. Set at connect time,
        # so reconnecting costs no extra round trips.
        given = conninfo_to_dict(dsn).get("options")
        self._options = " ".join(filter(None, (
            str(given) if given else None,
            f"-c lock_timeout={int(lock_timeout_s * 1000)}",
            "-c idle_in_transaction_session_timeout=60000")))
        self.last_error: str | None = None
        self._pending: collections.deque[_Encoded] = collections.deque()
        self._appended = 0
        self._committed = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._conn: psycopg.AsyncConnection[Any] | None = None
        # (records, last id, last hash) of a batch whose COMMIT was sent.
        self._inflight: tuple[int, int, bytes] | None = None
        self._last_checkpoint: tuple[int, bytes] | None = None

    @property
    def pending(self) -> int:
        """Records appended but not yet committed."""
        return len(self._pending)

    @property
    def committed(self) -> int:
        """Records this AuditLog has committed since start."""
        return self._committed

    async def start(self) -> None:
        """Start the appender. It connects on its own and keeps retrying while
        the database is unreachable, so this does not wait for the database."""
        if self._task is not None:
            raise RuntimeError("AuditLog already started")
        self._task = asyncio.create_task(self._run(), name="audit-appender")
        self._task.add_done_callback(self._appender_done)

    def append(self, record: AuditRecord) -> None:
        """Queue ``record``; never waits. Raises AuditUnavailable when the
        queue is full or the log is not running (fail closed), ValueError or
        TypeError when the record cannot be stored."""
        if self._task is None or self._stopping or self._task.done():
            raise AuditUnavailable("the audit log is not running")
        if len(self._pending) >= self.queue_max:
            raise AuditUnavailable(
                f"the audit queue is full ({self.queue_max} records wait for the database"
                + (f": {self.last_error}" if self.last_error else "") + ")")
        self._pending.append(_encode(record))
        self._appended += 1
        self._wakeup.set()

    async def flush(self) -> None:
        """Wait until every record appended so far is committed. While the
        database is down this waits (the appender retries): bound it with
        ``asyncio.timeout`` where that matters."""
        if self._task is None:
            raise RuntimeError("AuditLog not started")
        target = self._appended
        if self._committed >= target:
            return
        if self._task.done():
            raise AuditUnavailable("the audit appender has stopped") from _task_error(self._task)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, future))
        await future

    async def stop(self, timeout: float | None = 30.0) -> None:
        """Commit what is queued (waiting up to ``timeout`` seconds), export a
        final checkpoint, close. Raises AuditUnavailable naming how many
        records were lost when the database did not take them in time."""
        if self._task is None:
            return
        self._stopping = True
        self._wakeup.set()
        task = self._task
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            lost = len(self._pending)
            log.error("audit log stopped with records not committed",
                      extra={"lost": lost, "error": self.last_error})
            raise AuditUnavailable(f"{lost} audit records were not committed before stop"
                                   + (f": {self.last_error}" if self.last_error else "")) from None
        except Exception as exc:
            raise AuditUnavailable(f"the audit appender failed; {len(self._pending)} records "
                                   "were not committed") from exc

    # The appender task ---------------------------------------------------------

    def _appender_done(self, task: asyncio.Task[None]) -> None:
        error = _task_error(task)
        for target, future in self._waiters:
            if future.done():
                continue
            if self._committed >= target:
                future.set_result(None)
            else:
                failure = AuditUnavailable("the audit appender has stopped")
                failure.__cause__ = error
                future.set_exception(failure)
        self._waiters.clear()
        if error is not None:
            log.error("audit appender failed", exc_info=error)

    async def _run(self) -> None:
        backoff = self.retry_initial_s
        next_checkpoint = time.monotonic() + self.checkpoint_interval_s
        try:
            while True:
                try:
                    # Checked first so that a steady backlog cannot postpone it.
                    if time.monotonic() >= next_checkpoint:
                        await self._export_checkpoint("periodic")
                        next_checkpoint = time.monotonic() + self.checkpoint_interval_s
                    if self._pending:
                        done = await self._commit_batch()
                        for _ in range(done):
                            self._pending.popleft()
                        self._committed += done
                        self._release_waiters()
                    elif self._stopping:
                        await self._export_checkpoint("stop")
                        return
                    else:
                        self._wakeup.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wakeup.wait(),
                                                   next_checkpoint - time.monotonic())
                        continue
                    backoff = self.retry_initial_s
                    self.last_error = None
                except psycopg.Error as exc:
                    self.last_error = _first_line(exc)
                    log.warning("audit append failed; retrying",
                                extra={"error": self.last_error, "pending": len(self._pending),
                                       "retry_s": round(backoff, 3)})
                    await self._close()
                    await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                    backoff = min(backoff * 2, self.retry_max_s)
        finally:
            await self._close()

    def _release_waiters(self) -> None:
        still = []
        for target, future in self._waiters:
            if self._committed >= target:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((target, future))
        self._waiters = still

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True,
                                                               options=self._options)
        return self._conn

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

    async def _commit_batch(self) -> int:
        """Commit the oldest queued records; returns how many are now committed."""
        conn = await self._connection()
        if self._inflight is not None:
            count, last_id, last_hash = self._inflight
            cur = await conn.execute("SELECT 1 FROM audit_log WHERE id = %s AND hash = %s",
                                     (last_id, last_hash))
            self._inflight = None
            if await cur.fetchone() is not None:
                log.info("audit batch was committed before the connection was lost",
                         extra={"records": count, "last_id": last_id})
                return count
        batch = list(itertools.islice(self._pending, self.batch_max))
        async with conn.transaction():
            cur = await conn.execute(
                "SELECT last_id, last_hash, count FROM audit_head FOR UPDATE")
            head = await cur.fetchone()
            if head is None:
                raise AuditIntegrityError("audit_head has no row (migration 0004 not applied?)")
            first_id, prev, count = head[0] + 1, bytes(head[1]), head[2]
            buf = bytearray(_COPY_HEADER)
            for ident, rec in enumerate(batch, first_id):
                id_bytes = _I64.pack(ident)
                h = _SM3.copy()
                h.update(prev + FORMAT_TAG + id_bytes + rec.hashed_tail)
                digest = h.digest()
                buf += rec.row_head
                buf += _LEN8 + id_bytes
                buf += rec.row_middle
                buf += _LEN32 + prev + _LEN32 + digest
                prev = digest
            buf += _COPY_TRAILER
            async with cur.copy(_COPY_SQL) as copy:
                await copy.write(bytes(buf))
            last_id = first_id + len(batch) - 1
            await conn.execute(
                "UPDATE audit_head SET last_id = %s, last_hash = %s, count = %s, "
                "updated_at = now()", (last_id, prev, count + len(batch)))
            self._inflight = (len(batch), last_id, prev)
        self._inflight = None
        return len(batch)

    async def _export_checkpoint(self, reason: str) -> None:
        if self.checkpoints is None:
            return
        conn = await self._connection()
        cur = await conn.execute("SELECT last_id, last_hash, count FROM audit_head")
        row = await cur.fetchone()
        if row is None:
            raise AuditIntegrityError("audit_head has no row (migration 0004 not applied?)")
        mark = (row[0], bytes(row[1]))
        if mark == self._last_checkpoint:
            return  # nothing new since this log's last line
        line = checkpoint_line(row[0], bytes(row[1]), row[2], reason)
        try:
            await asyncio.to_thread(append_line, self.checkpoints, line)
        except OSError as exc:
            # Records keep flowing: a checkpoint is evidence kept beside the
            # chain, not part of it; the next interval tries again.
            log.error("cannot write audit checkpoint",
                      extra={"path": str(self.checkpoints), "error": str(exc)})
            return
        self._last_checkpoint = mark


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _task_error(task: asyncio.Task[None]) -> BaseException | None:
    if task.cancelled() or not task.done():
        return None
    return task.exception()
