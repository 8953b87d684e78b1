"""The outbox: what the hospital role still has to forward to the region.

Written by the batch writer (``BatchWriter.outbox``) with a second binary COPY
of the same frames, as the device sent them, into table ``outbox`` (migration
0013), inside the transaction that COPYs them into telemetry: a frame is in
the outbox if and only if its telemetry row committed (a duplicate, already
stored and queued before, is not queued again). The uplink
(``rmiot.ingest.uplink``) drains it in ``id`` order and deletes a row only
once the region has acknowledged its frame, so the outbox survives restarts
of either side.

Order.  Several writers commit batches concurrently, so a device's frames in
two batches could commit in either order. In the hospital role each batch
takes a ticket when the pipeline hands it over (``BatchWriter.submit``), and a
batch writes its outbox rows (which draws their ids) only once every earlier
ticket is finished, then commits: outbox ids, commits and the batches' order
agree within a process, so the uplink, reading in id order, sends each
device's frames in the order they arrived. A batch waits at most
``TURN_WAIT_S`` for its turn (a guard against two processes' batches waiting
on each other's rows), then writes anyway and logs it.

What goes up (``[uplink]`` tenants, metrics, kinds; empty: everything): a frame
is queued when its tenant is in the subtree of a listed tenant (the tree is
read when the writers start), it carries one of the listed metrics, and its
kind is listed. Filtering happens here, so what is filtered out never takes
outbox space.

``backlog`` and ``status`` report what is waiting, for the uplink's gauge and
``rmiot status``.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from rmiot import db
from rmiot.config import Config, UplinkConfig
from rmiot.core_ext import Frame, copy_header, copy_trailer

log = logging.getLogger("rmiot.ingest.outbox")

COPY_SQL = "COPY outbox (device_id, tenant_id, frame) FROM STDIN (FORMAT BINARY)"
TURN_WAIT_S = 10.0
# One binary COPY tuple: 3 fields; int8 device_id, int4 tenant_id, then the
# frame's length (its bytes follow).
_ROW = struct.Struct("!hiqiii")
# Above this many rows the backlog is estimated from the id range (an exact
# count would scan the table).
EXACT_COUNT_UP_TO = 100_000


class Outbox:
    """The writer's side: which frames go up, and in what order they commit."""

    def __init__(self, cfg: UplinkConfig) -> None:
        self.tenant_roots = cfg.ids("tenants")
        self.metrics = cfg.ids("metrics")
        self.kinds = cfg.ids("kinds")
        self.tenants: frozenset[int] = frozenset()  # the roots' subtrees, once prepared
        self.queued = 0
        self._issued = 0
        self._done = 0                 # every ticket up to this one is finished
        self._finished: set[int] = set()
        self._waiting: dict[int, asyncio.Future[None]] = {}  # ticket -> its turn

    @property
    def filtered(self) -> bool:
        return bool(self.tenant_roots or self.metrics or self.kinds)

    async def prepare(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Read the listed tenants' subtrees (before the first batch)."""
        if self.tenant_roots:
            cur = await conn.execute("SELECT id FROM tenants WHERE path && %s::int[]",
                                     (sorted(self.tenant_roots),))
            self.tenants = frozenset(row[0] for row in await cur.fetchall())
            missing = sorted(self.tenant_roots - self.tenants)
            if missing:
                log.warning("uplink.tenants names tenants that do not exist: nothing of "
                            "theirs goes up", extra={"tenants": missing})

    def wanted(self, frame: Frame) -> bool:
        if self.tenant_roots and frame.tenant not in self.tenants:
            return False
        if self.kinds and frame.kind not in self.kinds:
            return False
        return not self.metrics or any(m in self.metrics for m, _, _ in frame.fields())

    # -- order ------------------------------------------------------------------

    def ticket(self) -> int:
        """The next batch's place in the commit order (taken when it is submitted)."""
        self._issued += 1
        return self._issued

    def finished(self, ticket: int) -> None:
        """The batch holding ``ticket`` is committed (or given up): later ones may go."""
        self._finished.add(ticket)
        while self._done + 1 in self._finished:
            self._done += 1
            self._finished.discard(self._done)
        for waiting, turn in self._waiting.items():
            if self._done >= waiting - 1 and not turn.done():
                turn.set_result(None)

    async def _turn(self, ticket: int) -> None:
        if self._done >= ticket - 1:
            return
        turn = self._waiting[ticket] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(TURN_WAIT_S):
                await turn
        except TimeoutError:
            log.warning("outbox: an earlier batch is still not committed; writing this one "
                        "out of order", extra={"ticket": ticket, "waiting_for": self._done + 1})
        finally:
            del self._waiting[ticket]

    # -- the write ----------------------------------------------------------------

    async def write(self, conn: psycopg.AsyncConnection[Any], frames: Sequence[Frame],
                    ticket: int) -> None:
        """COPY the wanted ``frames`` into the outbox, in the caller's transaction,
        once it is ``ticket``'s turn."""
        rows = [f for f in frames if self.wanted(f)] if self.filtered else frames
        if not rows:
            return
        await self._turn(ticket)
        pack = _ROW.pack
        parts = [copy_header()]
        for f in rows:
            raw = f.raw
            parts.append(pack(3, 8, f.device, 4, f.tenant, len(raw)))
            parts.append(raw)
        parts.append(copy_trailer())
        async with conn.cursor().copy(COPY_SQL) as copy:
            await copy.write(b"".join(parts))
        self.queued += len(rows)


# -- what is waiting -------------------------------------------------------------

@dataclass(frozen=True)
class Backlog:
    frames: int            # waiting (estimated from the id range above EXACT_COUNT_UP_TO)
    oldest_s: float        # age of the oldest waiting frame; 0 when none
    exact: bool


async def backlog(conn: psycopg.AsyncConnection[Any]) -> Backlog:
    """What the outbox holds now (a few index lookups; exact when small)."""
    cur = await conn.execute("SELECT id, extract(epoch FROM now() - queued_at)::float8 "
                             "FROM outbox ORDER BY id LIMIT 1")
    row = await cur.fetchone()
    if row is None:
        return Backlog(0, 0.0, True)
    first, age = int(row[0]), max(float(row[1]), 0.0)
    cur = await conn.execute("SELECT max(id) FROM outbox")
    top = await cur.fetchone()
    span = int(top[0]) - first + 1 if top and top[0] is not None else 1
    if span > EXACT_COUNT_UP_TO:
        return Backlog(span, age, False)
    cur = await conn.execute("SELECT count(*) FROM outbox")
    counted = await cur.fetchone()
    return Backlog(int(counted[0]) if counted else 0, age, True)


async def status(cfg: Config) -> tuple[bool, str]:
    """The uplink's line for ``rmiot status``: (ok, detail). Not ok when the
    outbox cannot be read, when frames wait and no ``uplink.target`` is set,
    or when the oldest waiting frame is older than ``uplink.backlog_alarm_s``
    (the region has been unreachable, or refuses them, for that long)."""
    if cfg.platform.role != "hospital":
        return True, "region role: nothing to forward"
    dsn = db.app_dsn(cfg)
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            waiting = await backlog(conn)
    except psycopg.Error as exc:
        return False, f"outbox at {db.describe(dsn)} unreadable: {str(exc).strip()}"
    target = f"to {cfg.uplink.target}" if cfg.uplink.target else "no uplink.target set"
    if not waiting.frames:
        return True, f"{target}: outbox empty"
    count = f"{'' if waiting.exact else '~'}{waiting.frames:,}"
    detail = f"{target}: {count} frames waiting, oldest {_age(waiting.oldest_s)}"
    return bool(cfg.uplink.target) and waiting.oldest_s <= cfg.uplink.backlog_alarm_s, detail


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
