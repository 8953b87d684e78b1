"""Per-tenant retention of telemetry and rollups, applied by the platform
(the Apache-2 edition of TimescaleDB has no retention policies).

Each tenant's ``retention_days`` setting (tenants/settings.py: inherited down
the tree, the nearest node that sets it wins) names days per data class:

- ``telemetry``: rows are kept by the tenant in their ``tenant_id`` (the
  owning hospital). Whole chunks are dropped (``drop_chunks``) older than the
  longest retention of any tenant holding devices — cheap, and only possible
  when every such tenant has one; the tenants with a shorter retention then
  have their older rows deleted. A tenant with no setting keeps its data, and
  so keeps every chunk;
- ``rollups``: hour and day rollup rows of a cell are deleted by its home
  tenant's setting, a hospital's day rows by the hospital's (minute rollups
  are the job's, kept a few days);
- ``audit`` is ``rmiot audit retain``'s (hash chain, 180 days at least) and
  ``alarms`` the alarm service's: not here.

Dropping and deleting telemetry need the administrator's DSN (the platform's
role may only append to it). ``plan`` decides, ``apply`` carries it out;
``rmiot query retain --dry-run`` prints the plan.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg

# Rollup tables kept by tenant retention, and the column naming their tenant.
ROLLUP_TABLES = (("rollup_hour", "home_id"), ("rollup_day", "home_id"),
                 ("rollup_day_hospital", "hospital_id"))


@dataclass(frozen=True)
class Cut:
    """Delete what is older than ``before`` for these tenants."""

    days: int
    before: dt.datetime
    tenants: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    now: dt.datetime
    drop_before: dt.datetime | None  # drop telemetry chunks entirely older than this
    telemetry: list[Cut] = field(default_factory=list)
    rollups: list[Cut] = field(default_factory=list)


@dataclass
class Report:
    plan: Plan
    chunks_dropped: int = 0
    telemetry_deleted: int = 0
    rollups_deleted: int = 0


def plan(telemetry_days: Mapping[int, int | None], rollup_days: Mapping[int, int | None],
         now: dt.datetime) -> Plan:
    """What to remove, from each telemetry tenant's and each rollup home's days
    (None: keep everything)."""
    kept = [d for d in telemetry_days.values() if d is not None]
    drop_before = None
    longest = None
    if kept and len(kept) == len(telemetry_days):
        longest = max(kept)
        drop_before = now - dt.timedelta(days=longest)
    return Plan(now, drop_before,
                _cuts({t: d for t, d in telemetry_days.items() if d is not None and d != longest},
                      now),
                _cuts({t: d for t, d in rollup_days.items() if d is not None}, now))


def _cuts(days: Mapping[int, int], now: dt.datetime) -> list[Cut]:
    by_days: dict[int, list[int]] = {}
    for tenant, d in days.items():
        by_days.setdefault(d, []).append(tenant)
    return [Cut(d, now - dt.timedelta(days=d), tuple(sorted(ts)))
            for d, ts in sorted(by_days.items())]


def load_plan(conn: psycopg.Connection[Any]) -> Plan:
    """The plan for the settings in force now."""
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    rows = conn.execute(
        "SELECT t.id, (rmiot_tenant_setting(t.id, 'retention_days') ->> 'telemetry')::int, "
        "(rmiot_tenant_setting(t.id, 'retention_days') ->> 'rollups')::int, "
        "EXISTS (SELECT FROM devices d WHERE d.tenant_id = t.id) FROM tenants t").fetchall()
    return plan({t: days for t, days, _, holds in rows if holds},
                {t: days for t, _, days, _ in rows}, row[0])


def apply(admin_dsn: str, dry_run: bool = False) -> Report:
    """Carry out the plan (each step in its own transaction)."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        report = Report(load_plan(conn))
        if dry_run:
            return report
        p = report.plan
        if p.drop_before is not None:
            dropped = conn.execute("SELECT drop_chunks('telemetry', older_than => %s)",
                                   (p.drop_before,)).fetchall()
            report.chunks_dropped = len(dropped)
        for cut in p.telemetry:
            report.telemetry_deleted += conn.execute(
                "DELETE FROM telemetry WHERE tenant_id = ANY (%s) AND ts < %s",
                (list(cut.tenants), cut.before)).rowcount
        for cut in p.rollups:
            for table, tenant in ROLLUP_TABLES:
                report.rollups_deleted += conn.execute(
                    f"DELETE FROM {table} WHERE {tenant} = ANY (%s) AND bucket < %s".encode(),
                    (list(cut.tenants), cut.before)).rowcount
    return report

