"""Compliance reminders and escalations as alarms, so they reach people the
way every other alarm does: AlarmService.Watch, the dashboard, and the
notification outbox (webhooks, MQTT) of the hospital's channels.

The registry's compliance pass (``registry.compliance.run``) opens tasks,
reminds and escalates; the registry may not import the alarm subsystem
(ingest), so this root module turns the tasks' state into alarms:

- a task's first reminder raises an alarm on its device (severity
  ``warning``), under a rule ``compliance.<kind>`` of the device's hospital
  (``calibration``, ``metrology`` or ``inspection``), which this module makes
  when missing. Its kind, ``compliance``, is never evaluated on telemetry; the
  rule names the alarms and lets a hospital see where they come from;
- each escalation level of the task escalates that alarm: ``escalated``
  event, ``escalation_step`` = the level, severity ``minor``, ``major``,
  ``critical`` for levels 1, 2, 3 and up, and whom the compliance policy
  notifies in the event's detail. A task already escalated when first seen
  raises its alarm at its level;
- when the task is done (the work recorded in the ledger) its open alarm
  clears (actor ``system:compliance``).

Reconciled from state, not from a feed: ``run`` is idempotent and safe on
several hosts (one open alarm per rule and device, migration 0014). An alarm
a person cleared stays cleared until its task escalates again. Later
reminders of the same level do not renotify.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
from dataclasses import dataclass

import psycopg

from rmiot.ingest import alarm_store
from rmiot.ingest.alarm_admin import RuleSpec, put_rule
from rmiot.ingest.alarm_eval import Transition
from rmiot.ingest.alarm_rules import RULE_COLUMNS, Rule, RuleError, rule_from_row
from rmiot.periodic import PeriodicJob
from rmiot.registry import compliance

log = logging.getLogger("rmiot.compliance_alarms")
ACTOR = "system:compliance"
SEVERITY = ("warning", "minor", "major", "critical")   # by escalation level (3+: critical)
NAMES = {"calibration": "Calibration due", "metrology": "Metrology (verification) due",
         "inspection": "Inspection due"}


def code(kind: str) -> str:
    return f"compliance.{kind}"


@dataclass(frozen=True)
class Reconciled:
    raised: int = 0
    escalated: int = 0
    cleared: int = 0


_TASKS = b"""
SELECT c.id, c.device_id, c.tenant_id, d.tenant_id, c.kind, c.due_on, c.owner,
       c.escalation_level, c.created_at
  FROM compliance_tasks c JOIN devices d ON d.id = c.device_id
 WHERE c.state = 'open' AND (c.reminders > 0 OR c.escalation_level > 0)
   AND (%(scope)s::int IS NULL OR c.tenant_id IN
        (SELECT id FROM tenants WHERE path @> ARRAY[%(scope)s::int]))
 ORDER BY c.id"""

# Open compliance alarms whose task is no longer open (done, or a newer due date).
_ENDED = b"""
SELECT a.id FROM alarms a
 WHERE a.rule_id = ANY (%(rules)s) AND a.state <> 'cleared'
   AND NOT EXISTS (SELECT FROM compliance_tasks c
                    WHERE c.device_id = a.device_id AND c.state = 'open'
                      AND 'compliance.' || c.kind = a.rule_code AND c.created_at <= a.raised_at)
 FOR UPDATE OF a"""


class ComplianceAlarms(PeriodicJob):
    """``run`` once, or every ``period_s`` in a platform (``start``/``stop``)."""

    name = "compliance-alarms"

    def __init__(self, dsn: str, period_s: float = 60.0, scope: int | None = None) -> None:
        super().__init__(period_s)
        self.dsn = dsn
        self.scope = scope
        self._rules: dict[tuple[int, str], Rule] = {}

    async def _rule(self, conn: alarm_store.AsyncConn, hospital: int, kind: str) -> Rule:
        """The hospital's rule for compliance alarms of ``kind``."""
        key = (hospital, kind)
        if key not in self._rules:
            for _ in range(2):  # another host may make it at the same moment
                cur = await conn.execute(
                    f"SELECT {RULE_COLUMNS} FROM alarm_rules WHERE tenant_id = %s AND code = %s "
                    "AND model_id IS NULL AND device_id IS NULL AND patient_id IS NULL "
                    "AND deleted_at IS NULL".encode(), (hospital, code(kind)))
                row = await cur.fetchone()
                if row is not None:
                    self._rules[key] = rule_from_row(row)
                    break
                with contextlib.suppress(RuleError):
                    self._rules[key] = await put_rule(conn, hospital, 0, RuleSpec(
                        hospital, code(kind), f"{NAMES[kind]} (compliance tasks)",
                        "compliance", SEVERITY[0], True, {}, {}), ACTOR)
                    break
        return self._rules[key]

    async def run(self, now: dt.datetime | None = None) -> Reconciled:
        """Raise, escalate and clear to match the compliance tasks."""
        at = now or dt.datetime.now(dt.UTC)
        raised = escalated = 0
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            cur = await conn.execute(_TASKS, {"scope": self.scope})
            for task, device, home, hospital, kind, due, owner, level, created in \
                    await cur.fetchall():
                rule = await self._rule(conn, hospital, kind)
                async with alarm_store.locked(conn):
                    cur = await conn.execute(
                        b"SELECT id, state, escalation_step FROM alarms WHERE device_id = %s "
                        b"AND rule_id = %s AND raised_at >= %s ORDER BY id DESC LIMIT 1 "
                        b"FOR UPDATE", (device, rule.id, created))
                    alarm = await cur.fetchone()
                    severity = SEVERITY[min(level, len(SEVERITY) - 1)]
                    detail = {"task": task, "kind": kind, "due_on": due.isoformat(),
                              "step": level, "notify": compliance.notify(level, owner, home,
                                                                         hospital)}
                    if alarm is None or (alarm[1] == "cleared" and alarm[2] < level):
                        late = (at.date() - due).days
                        message = (f"{NAMES[kind]}: {due.isoformat()}, " + (
                            f"overdue {late} days" if late > 0 else f"in {-late} days")
                            + f" (task {task}, owner {owner})")
                        step = await alarm_store.raise_alarm(conn, Transition(
                            "raise", dataclasses.replace(rule, severity=severity), device, home,
                            None, alarm_store.to_us(at), float(-late), message), at, None)
                        if step is not None:
                            raised += 1
                            await conn.execute(b"UPDATE alarms SET escalation_step = %s "
                                               b"WHERE id = %s", (level, step.alarm_id))
                    elif alarm[1] != "cleared" and alarm[2] < level:
                        await conn.execute(
                            b"UPDATE alarms SET escalation_step = %s, severity = %s, "
                            b"updated_at = %s WHERE id = %s", (level, severity, at, alarm[0]))
                        await alarm_store.add_event(conn, alarm[0], "escalated", ACTOR, detail)
                        escalated += 1
            cleared = await self._clear_ended(conn, at)
        return Reconciled(raised, escalated, cleared)

    async def _clear_ended(self, conn: alarm_store.AsyncConn, at: dt.datetime) -> int:
        cur = await conn.execute(b"SELECT id FROM alarm_rules WHERE code LIKE 'compliance.%' "
                                 b"AND deleted_at IS NULL")
        rules = [int(r[0]) for r in await cur.fetchall()]
        if not rules:
            return 0
        async with alarm_store.locked(conn):
            cur = await conn.execute(_ENDED, {"rules": rules})
            ended = [int(r[0]) for r in await cur.fetchall()]
            for alarm in ended:
                await conn.execute(
                    b"UPDATE alarms SET state = 'cleared', cleared_at = %s, cleared_by = %s, "
                    b"next_escalation_at = NULL, updated_at = %s WHERE id = %s",
                    (at, ACTOR, at, alarm))
                await alarm_store.add_event(conn, alarm, "cleared", ACTOR,
                                            {"reason": "compliance task done"})
        return len(ended)

    async def tick(self) -> None:
        done = await self.run()
        if done.raised or done.escalated or done.cleared:
            log.info("compliance alarms", extra=dataclasses.asdict(done))
