"""Backups: a restore drill counts a backup, a point-in-time restore brings back
exactly what was committed by then, a damaged backup fails its drill, and
retention keeps what the drills vouched for."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import psycopg
import pytest

from rmiot.deploy import backup, pgnode, restore
from rmiot.registry import store
from rmiot.security.audit import AuditLog, AuditRecord
from rmiot.security.audit_verify import verify
from rmiot.tenants import store as tenants_store
from tests.durability.conftest import Site

pytestmark = pytest.mark.slow


def write_rows(site: Site, tenant: int, device: int, seqs: range) -> None:
    """Telemetry rows and one audit record per call, as the platform writes them."""
    with site.admin() as conn:
        conn.execute(
            "INSERT INTO telemetry (ts, device_id, tenant_id, seq, kind, metrics, vals) "
            "SELECT now() - make_interval(secs => s), %s, %s, s, 1, '{1}', '{72.0}' "
            "FROM generate_series(%s::int, %s::int) s", (device, tenant, seqs.start, seqs.stop - 1))

    async def audit() -> None:
        log = AuditLog(site.dsn(), checkpoints=site.cfg.audit_checkpoints)
        await log.start()
        log.append(AuditRecord(actor="test", method="write_rows", outcome="ok",
                               detail={"first": seqs.start, "rows": len(seqs)}))
        await log.stop()

    asyncio.run(audit())


def telemetry_count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM telemetry").fetchone()
    return int(row[0]) if row else 0


def test_drill_point_in_time_restore_and_retention(site: Site) -> None:
    with site.app() as conn:
        region = tenants_store.create_tenant(conn, "pitr-r", "Region", "region")
        tenant = tenants_store.create_tenant(conn, "pitr-h", "Hospital", "hospital", region)
        device = store.register_device(conn, tenant)
    write_rows(site, tenant, device, range(0, 300))

    first = backup.create(site.cfg)
    assert first.counts_end["telemetry"] == 300 and not first.verified
    drilled = restore.run_drill(site.cfg, first.label)
    assert drilled.verified, drilled.drill
    assert drilled.drill is not None
    assert drilled.drill.counts["telemetry"] == 300 and drilled.drill.audit_records == 1
    assert not (site.cfg.data_dir / restore.DRILL).exists()  # the scratch cluster is gone

    write_rows(site, tenant, device, range(300, 400))       # committed before the target
    time.sleep(0.3)
    target = datetime.now(UTC)
    time.sleep(0.3)
    write_rows(site, tenant, device, range(400, 450))       # after it

    done = restore.point_in_time(site.cfg, target)
    try:
        assert done.backup == first.label
        dsn = pgnode.dsn(done.server, site.cfg.database.name)
        assert telemetry_count(dsn) == 400
        report = verify(dsn)
        assert report.ok and report.records == 2, report.problem
        assert pgnode.in_recovery(done.server) is False  # promoted: usable at once
    finally:
        restore.discard(site.cfg, done.name)
    assert not done.server.root.exists()
    assert telemetry_count(site.dsn()) == 450  # the live cluster is untouched

    # A damaged backup fails its drill; retention keeps the verified one.
    second = backup.create(site.cfg)
    victim = next(p for p in (backup.backup_dir(site.cfg) / "base" / second.label / "base")
                  .rglob("*") if p.is_file() and p.stat().st_size > 0)
    victim.write_bytes(b"\0" * victim.stat().st_size)
    failed = restore.run_drill(site.cfg, second.label)
    assert failed.drill is not None and not failed.drill.ok
    assert "pg_verifybackup" in failed.drill.problem
    third = backup.create(site.cfg)       # not drilled yet: kept
    assert backup.prune(site.cfg, keep=1) == [second.label]
    assert [b.label for b in backup.list_backups(site.cfg)] == [first.label, third.label]
    with pytest.raises(backup.BackupError, match="no backup finished before"):
        restore.point_in_time(site.cfg, datetime(2000, 1, 1, tzinfo=UTC))
