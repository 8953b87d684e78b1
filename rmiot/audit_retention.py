"""Audit retention applied by the platform: every ``PERIOD_S``, when
``security.audit_retention_days`` is set (0: keep everything; else at least
180 days), records older than that are dropped as ``rmiot audit retain --days
N`` drops them — only after the whole chain verifies against its checkpoints,
the newest record always kept and the new first record anchored by a
checkpoint (``rmiot.security.audit_verify.drop_older_than``). A chain that
does not verify is left alone and the refusal logged as an error: that is for
an auditor to look at, not for a job to work around.
"""

from __future__ import annotations

import asyncio
import logging

from rmiot import db
from rmiot.config import Config
from rmiot.periodic import PeriodicJob
from rmiot.security.audit_checkpoints import AuditIntegrityError, CheckpointFileError
from rmiot.security.audit_verify import RetentionResult, drop_older_than

log = logging.getLogger("rmiot.audit.retention")
PERIOD_S = 6 * 3600.0


class AuditRetention(PeriodicJob):
    name = "audit-retention"

    def __init__(self, cfg: Config, period_s: float = PERIOD_S) -> None:
        super().__init__(period_s)
        self.cfg = cfg
        self.last: RetentionResult | None = None

    async def tick(self) -> None:
        days = self.cfg.security.audit_retention_days
        if not days:
            return
        try:
            self.last = await asyncio.to_thread(drop_older_than, db.admin_dsn(self.cfg), days,
                                                checkpoints=self.cfg.audit_checkpoints)
        except (AuditIntegrityError, CheckpointFileError) as exc:
            log.error("audit retention refused", extra={"error": str(exc)})
            return
        if self.last.removed:
            log.info("audit retention applied", extra={
                "removed": self.last.removed, "first_id": self.last.first_id, "days": days})
