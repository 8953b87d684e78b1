"""Calibration, metrology and inspection: due dates become tasks with owners
ahead of time, reminders as the day nears, escalations when it passes.

Due dates are the devices' (``calibration_due``, ``metrology_due``,
``inspection_due``); recording the work in the ledger closes the task and
moves the date on (``registry.ledger.record`` with ``next_due``).

A **policy** (``compliance_policies``, the nearest one up the tenant tree, or
``DEFAULT``) sets:

- ``lead_days`` (default 30, 7): a task opens ``max(lead_days)`` days before
  the due date; a reminder goes to its owner as each lead is reached;
- ``escalate_days`` (default 0, 7, 30): once the date has passed by more than
  each of these days, the task escalates one level — level 1 to its owner,
  2 to the department's head, 3 and up to the hospital's administrators;
- ``owner``: who owns tasks (default: the role ``device_manager@<hospital>``).

``run(conn, today)`` is idempotent: it creates missing tasks, and adds only
the reminders and escalations not yet made (events in ``compliance_events``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import psycopg

from rmiot.registry.ledger import DUE_COLUMNS
from rmiot.registry.store import RegistryError

KINDS = tuple(DUE_COLUMNS)


@dataclass(frozen=True)
class Policy:
    lead_days: tuple[int, ...] = (30, 7)
    escalate_days: tuple[int, ...] = (0, 7, 30)
    owner: str = ""


DEFAULT = Policy()


@dataclass(frozen=True)
class RunReport:
    created: int
    reminders: int
    escalations: int


@dataclass(frozen=True)
class Task:
    id: int
    device_id: int
    tenant_id: int
    kind: str
    due_on: dt.date
    owner: str
    state: str
    reminders: int
    escalation_level: int


def set_policy(conn: psycopg.Connection[Any], tenant_id: int, policy: Policy,
               actor: str) -> None:
    if not policy.lead_days or not policy.escalate_days:
        raise RegistryError("lead_days and escalate_days: at least one day each")
    if any(d < 0 or d > 3650 for d in (*policy.lead_days, *policy.escalate_days)):
        raise RegistryError("days: 0 to 3650")
    conn.execute(
        "INSERT INTO compliance_policies (tenant_id, lead_days, escalate_days, owner, "
        "updated_by) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (tenant_id) DO UPDATE SET "
        "lead_days = excluded.lead_days, escalate_days = excluded.escalate_days, "
        "owner = excluded.owner, updated_by = excluded.updated_by, updated_at = now()",
        (tenant_id, sorted(set(policy.lead_days), reverse=True),
         sorted(set(policy.escalate_days)), policy.owner or None, actor))


def policy_for(conn: psycopg.Connection[Any], tenant_id: int) -> Policy:
    """The policy of the tenant or its nearest ancestor that has one."""
    row = conn.execute(
        "SELECT p.lead_days, p.escalate_days, coalesce(p.owner, '') FROM tenants t "
        "JOIN LATERAL unnest(t.path) WITH ORDINALITY AS a (id, depth) ON true "
        "JOIN compliance_policies p ON p.tenant_id = a.id WHERE t.id = %s "
        "ORDER BY a.depth DESC LIMIT 1", (tenant_id,)).fetchone()
    if row is None:
        return DEFAULT
    return Policy(tuple(row[0]), tuple(row[1]), row[2])


def _reminders_due(policy: Policy, due: dt.date, today: dt.date) -> int:
    return sum(1 for lead in policy.lead_days if today >= due - dt.timedelta(days=lead))


def _level_due(policy: Policy, due: dt.date, today: dt.date) -> int:
    late = (today - due).days
    return sum(1 for days in policy.escalate_days if late > days)


def notify(level: int, owner: str, home: int, hospital: int) -> str:
    """Whom an escalation of ``level`` goes to."""
    if level <= 1:
        return owner
    if level == 2:
        return f"role:department_head@{home}"
    return f"role:hospital_admin@{hospital}"


def run(conn: psycopg.Connection[Any], today: dt.date, scope: int | None = None) -> RunReport:
    """Open tasks coming due, remind and escalate, for devices under ``scope``
    (None: every tenant)."""
    created = reminders = escalations = 0
    policies: dict[int, Policy] = {}
    horizon = today + dt.timedelta(days=3650)
    with conn.transaction():
        rows = conn.execute(
            "SELECT d.id, d.tenant_id, coalesce(d.department_id, d.tenant_id), "
            + ", ".join(f"d.{c}" for c in DUE_COLUMNS.values()) +
            " FROM devices d WHERE d.state NOT IN ('retired', 'scrapped') AND ("
            + " OR ".join(f"d.{c} <= %(h)s" for c in DUE_COLUMNS.values()) + ") "
            "AND (%(scope)s::int IS NULL OR coalesce(d.department_id, d.tenant_id) IN "
            "(SELECT id FROM tenants WHERE path @> ARRAY[%(scope)s::int])) ORDER BY d.id",
            {"h": horizon, "scope": scope}).fetchall()
        now = dt.datetime.now(dt.UTC)
        for device, hospital, home, *dues in rows:
            policy = policies.get(home) or policies.setdefault(home, policy_for(conn, home))
            for kind, due in zip(KINDS, dues, strict=True):
                if due is None or today < due - dt.timedelta(days=max(policy.lead_days)):
                    continue
                owner = policy.owner or f"role:device_manager@{hospital}"
                got = conn.execute(
                    "INSERT INTO compliance_tasks (device_id, tenant_id, kind, due_on, owner, "
                    "created_at) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING "
                    "RETURNING id", (device, home, kind, due, owner, now)).fetchone()
                if got is not None:
                    created += 1
                    _event(conn, int(got[0]), now, "created", 0, owner,
                           f"{kind} due {due.isoformat()}")
                task = conn.execute(
                    "SELECT id, reminders, escalation_level, owner, state FROM "
                    "compliance_tasks WHERE device_id = %s AND kind = %s AND due_on = %s",
                    (device, kind, due)).fetchone()
                assert task is not None
                task_id, sent, level, task_owner, state = task
                if state != "open":
                    continue
                for n in range(sent, _reminders_due(policy, due, today)):
                    reminders += 1
                    _event(conn, task_id, now, "reminder", n + 1, task_owner,
                           f"{kind} due {due.isoformat()} ({(due - today).days} days)")
                for lv in range(level + 1, _level_due(policy, due, today) + 1):
                    escalations += 1
                    _event(conn, task_id, now, "escalation", lv,
                           notify(lv, task_owner, home, hospital),
                           f"{kind} overdue since {due.isoformat()}")
                conn.execute(
                    "UPDATE compliance_tasks SET reminders = greatest(reminders, %s), "
                    "escalation_level = greatest(escalation_level, %s) WHERE id = %s",
                    (_reminders_due(policy, due, today), _level_due(policy, due, today),
                     task_id))
    return RunReport(created, reminders, escalations)


def _event(conn: psycopg.Connection[Any], task: int, at: dt.datetime, kind: str, level: int,
           notify: str, note: str) -> None:
    conn.execute("INSERT INTO compliance_events (task_id, at, kind, level, notify, note) "
                 "VALUES (%s, %s, %s, %s, %s, %s)", (task, at, kind, level, notify, note))


def tasks(conn: psycopg.Connection[Any], scope: int | None, *, open_only: bool = True,
          device_id: int = 0, limit: int = 500) -> list[Task]:
    rows = conn.execute(
        "SELECT c.id, c.device_id, c.tenant_id, c.kind, c.due_on, c.owner, c.state, "
        "c.reminders, c.escalation_level FROM compliance_tasks c "
        "WHERE (NOT %(open)s OR c.state = 'open') AND (%(dev)s = 0 OR c.device_id = %(dev)s) "
        "AND (%(scope)s::int IS NULL OR c.tenant_id IN "
        "(SELECT id FROM tenants WHERE path @> ARRAY[%(scope)s::int])) "
        "ORDER BY c.due_on, c.id LIMIT %(limit)s",
        {"open": open_only, "dev": device_id, "scope": scope,
         "limit": max(1, min(limit, 5000))}).fetchall()
    return [Task(*r) for r in rows]


def events(conn: psycopg.Connection[Any],
           task_id: int) -> list[tuple[dt.datetime, str, int, str, str]]:
    rows = conn.execute("SELECT at, kind, level, notify, note FROM compliance_events "
                        "WHERE task_id = %s ORDER BY id", (task_id,)).fetchall()
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


@dataclass(frozen=True)
class DepartmentCompliance:
    home_id: int
    name: str
    tracked: int          # due dates the department's devices carry
    overdue: int          # past due
    due_soon: int         # within the longest lead time
    open_tasks: int
    escalated: int        # open tasks escalated at least once

    @property
    def compliant_pct(self) -> float | None:
        return 100 * (self.tracked - self.overdue) / self.tracked if self.tracked else None


def by_department(conn: psycopg.Connection[Any], scope: int | None, today: dt.date,
                  soon_days: int = DEFAULT.lead_days[0]) -> list[DepartmentCompliance]:
    """The compliance view: per home of the scope's devices, how many due dates
    are tracked, overdue and due soon, and the open (and escalated) tasks."""
    dues = " UNION ALL ".join(f"SELECT d.id, coalesce(d.department_id, d.tenant_id) AS home, "
                              f"d.{c} AS due FROM devices d WHERE d.{c} IS NOT NULL AND "
                              "d.state NOT IN ('retired', 'scrapped')"
                              for c in DUE_COLUMNS.values())
    rows = conn.execute(f"""
WITH dues AS ({dues}),
scoped AS (SELECT * FROM dues WHERE %(scope)s::int IS NULL OR home IN
           (SELECT id FROM tenants WHERE path @> ARRAY[%(scope)s::int])),
per AS (SELECT home, count(*) AS tracked, count(*) FILTER (WHERE due < %(today)s) AS overdue,
               count(*) FILTER (WHERE due >= %(today)s AND due <= %(soon)s) AS soon
          FROM scoped GROUP BY home),
t AS (SELECT tenant_id AS home, count(*) AS open,
             count(*) FILTER (WHERE escalation_level > 0) AS escalated
        FROM compliance_tasks WHERE state = 'open' GROUP BY 1)
SELECT per.home, coalesce(n.name, ''), per.tracked, per.overdue, per.soon,
       coalesce(t.open, 0), coalesce(t.escalated, 0)
  FROM per LEFT JOIN t ON t.home = per.home LEFT JOIN tenants n ON n.id = per.home
 ORDER BY per.home""".encode(), {"scope": scope, "today": today,
                                 "soon": today + dt.timedelta(days=soon_days)}).fetchall()
    return [DepartmentCompliance(int(r[0]), r[1], *(int(v) for v in r[2:])) for r in rows]
