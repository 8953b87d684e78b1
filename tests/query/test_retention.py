"""Retention by tenant: rows older than a tenant's retention go, other
tenants' stay; whole chunks are dropped only when every tenant with devices
has a retention, at the longest one."""

from __future__ import annotations

import datetime as dt

from rmiot.query import retention
from rmiot.tenants import settings
from tests.query.conftest import District

NOW = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)


def test_chunks_go_only_past_everyones_retention() -> None:
    p = retention.plan({1: 30, 2: 90, 3: 90}, {10: 400, 11: None}, NOW)
    assert p.drop_before == NOW - dt.timedelta(days=90)
    assert [(c.days, c.tenants) for c in p.telemetry] == [(30, (1,))]
    assert [(c.days, c.tenants) for c in p.rollups] == [(400, (10,))]
    kept = retention.plan({1: 30, 2: None}, {}, NOW)
    assert kept.drop_before is None  # tenant 2 keeps everything, so every chunk stays
    assert [(c.days, c.tenants) for c in kept.telemetry] == [(30, (1,))]
    assert retention.plan({}, {}, NOW).drop_before is None


def test_a_tenants_retention_removes_its_old_rows_only(district: District) -> None:
    d = district
    with d.conn() as conn:
        settings.update(conn, d.hospital_b, {"retention_days": {"telemetry": 1}})
        settings.update(conn, d.a2, {"retention_days": {"rollups": 1}})

    def counts() -> tuple[int, ...]:
        with d.conn() as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM telemetry WHERE tenant_id = %(b)s "
                "        AND ts < now() - interval '1 day'), "
                "       (SELECT count(*) FROM telemetry WHERE tenant_id = %(a)s), "
                "       (SELECT count(*) FROM rollup_hour WHERE home_id = %(a2)s "
                "        AND bucket < now() - interval '1 day'), "
                "       (SELECT count(*) FROM rollup_day WHERE home_id = %(a2)s "
                "        AND bucket < now() - interval '1 day'), "
                "       (SELECT count(*) FROM rollup_hour WHERE home_id = %(a1)s)",
                {"a": d.hospital_a, "b": d.hospital_b, "a1": d.a1, "a2": d.a2}).fetchone()
        assert row is not None
        return tuple(row)

    try:
        before = counts()
        assert all(before)
        dry = retention.apply(d.admin_dsn, dry_run=True)
        assert dry.plan.drop_before is None and counts() == before
        assert any(d.hospital_b in c.tenants for c in dry.plan.telemetry)
        done = retention.apply(d.admin_dsn)
        after = counts()
        assert after == (0, before[1], 0, 0, before[4])
        assert done.chunks_dropped == 0 and done.telemetry_deleted >= before[0]
        assert done.rollups_deleted >= before[2] + before[3]
    finally:
        with d.conn() as conn:
            settings.update(conn, d.hospital_b, {"retention_days": None})
            settings.update(conn, d.a2, {"retention_days": None})
