"""Read routing with bounded staleness: complex-tier queries (aggregates,
fleet status, energy — the commission's dashboards) may read from a standby
instead of the primary, while it is no more than ``query.replica_max_staleness_s``
behind. A watcher measures the standby's lag every ``CHECK_PERIOD_S``; while
it is too far behind or unreachable, those queries go to the primary. Answers
say how fresh they are either way: their ``as_of`` is read on the server that
answers. Simple-tier queries (a device's newest values, a binding) always use
the primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

import psycopg
from psycopg_pool import AsyncConnectionPool

from rmiot import db

log = logging.getLogger("rmiot.query.replica")
CHECK_PERIOD_S = 1.0


class ReadRoute:
    """A pool on the read DSN and whether it may be used now."""

    def __init__(self, pool: AsyncConnectionPool, max_staleness_s: float) -> None:
        self.pool = pool
        self.max_staleness_s = max_staleness_s
        self.usable = False
        self.staleness_s = math.inf
        self.standby = False  # the read DSN reached a standby (not the primary)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.check(timeout=5.0)  # the pool's first connection may take a moment
        self._task = asyncio.create_task(self._watch(), name="query-read-route")

    async def check(self, timeout: float = CHECK_PERIOD_S) -> bool:
        """Measure the lag once; returns whether the route is usable."""
        try:
            async with self.pool.connection(timeout=timeout) as conn:
                cur = await conn.execute(db.STALENESS_SQL)
                row = await cur.fetchone()
            self.staleness_s, self.standby = (float(row[0]), bool(row[1])) if row else \
                (math.inf, False)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            if self.usable:
                log.warning("read replica unavailable: reading from the primary",
                            extra={"error": str(exc).strip()})
            self.staleness_s = math.inf
        was = self.usable
        self.usable = self.staleness_s <= self.max_staleness_s
        if was and not self.usable and math.isfinite(self.staleness_s):
            log.warning("read replica behind: reading from the primary",
                        extra={"staleness_s": self.staleness_s})
        return self.usable

    def failed(self) -> None:
        """A query on the route failed for the server's sake: stop using it
        until the watcher finds it healthy again."""
        self.usable = False

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(CHECK_PERIOD_S)
            with contextlib.suppress(Exception):
                await self.check()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.pool.close()
