"""A platform job that runs every ``period_s`` on a task of its own, from
``start`` until ``stop``; a database or file-system failure is logged and
tried again next period (the job's ``tick`` decides what one period does)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import psycopg


class PeriodicJob:
    name = "job"

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._task: asyncio.Task[None] | None = None

    async def tick(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        log = logging.getLogger(f"rmiot.{self.name}")
        while True:
            try:
                await self.tick()
            except (psycopg.Error, OSError) as exc:
                log.warning("%s failed; retrying next period", self.name,
                            extra={"error": str(exc).strip()})
            await asyncio.sleep(self.period_s)
