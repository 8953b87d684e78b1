"""The query side's background work in a running platform: the rollup job
(every ``query.rollup_period_s``) and each tenant's retention (every
``query.retention_period_s``). Started once per platform host, in the main
process; the rollup job's advisory lock keeps two hosts from running it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import psycopg

from rmiot import db
from rmiot.config import Config
from rmiot.periodic import PeriodicJob
from rmiot.query import retention
from rmiot.query.rollups import JobSettings, RollupJob

log = logging.getLogger("rmiot.query.jobs")


class Retention(PeriodicJob):
    """Each tenant's retention_days, applied (``query.retention``)."""

    name = "retention"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg.query.retention_period_s)
        self.cfg = cfg

    async def tick(self) -> None:
        report = await asyncio.to_thread(retention.apply, db.admin_dsn(self.cfg))
        if report.chunks_dropped or report.telemetry_deleted or report.rollups_deleted:
            log.info("retention applied", extra={
                "chunks_dropped": report.chunks_dropped,
                "telemetry_deleted": report.telemetry_deleted,
                "rollups_deleted": report.rollups_deleted})


class QueryJobs:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rollups = RollupJob(db.app_dsn(cfg), JobSettings.of(cfg.query))
        self.retention = Retention(cfg)
        self._soon: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.rollups.start()
        await self.retention.start()

    def refresh_soon(self, delay_s: float = 3.0) -> None:
        """One rollup run ``delay_s`` from now, outside the period: after a
        burst of new devices (a simulated city starting), fleet status shows
        them online within seconds instead of at the next period."""
        async def later() -> None:
            await asyncio.sleep(delay_s)
            try:
                await self.rollups.run_once()
            except (psycopg.Error, OSError) as exc:
                log.warning("rollup run failed", extra={"error": str(exc).strip()})

        self._soon = asyncio.create_task(later(), name="rollup-soon")

    async def stop(self) -> None:
        if self._soon is not None:
            self._soon.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._soon
        await self.rollups.stop()
        await self.retention.stop()
