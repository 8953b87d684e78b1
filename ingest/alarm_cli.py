"""``rmiot alarms list|ack|clear|rules``: the operator's view of alarms and
rules, straight on the database (``alarm_store``, ``alarm_admin``), within
a tenant's subtree. Steps are recorded as the operator named with ``--by``
(default ``operator:<login>``); people use AlarmService.

Every change (ack, clear, rules add, rules delete) lands in the audit chain
as the RPCs' do: one record, method ``rmiot alarms <action>``, actor the
``--by`` name, the machine login and process in ``source``, outcome ``ok`` or
``error`` with the reason; the command fails when its record could not be
committed."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import os
import socket
from typing import Any

import orjson
import psycopg

from rmiot import db
from rmiot.config import Config
from rmiot.ingest import alarm_admin, alarm_store
from rmiot.ingest.alarm_admin import RuleSpec
from rmiot.ingest.alarm_rules import KINDS, SEVERITIES, RuleError
from rmiot.ingest.alarm_store import AlarmError, AlarmNotFound
from rmiot.security.audit import AuditLog, AuditRecord, AuditUnavailable


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    text = "alarms and alarm rules of a tenant's subtree"
    parser: argparse.ArgumentParser = subparsers.add_parser("alarms", help=text,
                                                            description=text)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="alarms, newest first")
    listing.add_argument("--state", default="open",
                         choices=["open", "active", "acknowledged", "cleared", "all"])
    listing.add_argument("--limit", type=int, default=50)
    for name, help_text in (("ack", "acknowledge an active alarm"),
                            ("clear", "clear an alarm")):
        step = actions.add_parser(name, help=help_text)
        step.add_argument("alarm", type=int)
        step.add_argument("--comment", default="")
    rules = actions.add_parser("rules", help="list, add or delete rules")
    rules.add_argument("rule_action", choices=["list", "add", "delete"])
    rules.add_argument("--code", help="add: the rule's code (same code overrides inherited)")
    rules.add_argument("--kind", choices=KINDS)
    rules.add_argument("--severity", choices=SEVERITIES, default="major")
    rules.add_argument("--params", default="{}", help="add: the kind's params as JSON")
    rules.add_argument("--escalation", default="{}", help="add: the escalation chain as JSON")
    rules.add_argument("--device", type=int, help="add: only this device")
    rules.add_argument("--id", type=int, help="delete: the rule id")
    for p in (listing, rules, *(actions.choices[n] for n in ("ack", "clear"))):
        p.add_argument("--tenant", type=int, required=True, help="tenant id (its subtree)")
        p.add_argument("--by", default=f"operator:{getpass.getuser()}",
                       help="who is acting (recorded with the step)")
    return parser


def main(cfg: Config, args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_audited(cfg, args))
    except (AlarmNotFound, AlarmError, RuleError, AuditUnavailable) as exc:
        raise SystemExit(f"rmiot: {exc}") from None


def _changes(args: argparse.Namespace) -> bool:
    return args.action in ("ack", "clear") or (
        args.action == "rules" and args.rule_action in ("add", "delete"))


async def _audited(cfg: Config, args: argparse.Namespace) -> int:
    dsn = db.app_dsn(cfg)
    if not _changes(args):
        return await _main(dsn, args)
    audit = AuditLog(dsn, checkpoints=cfg.audit_checkpoints)
    await audit.start()
    action = args.action if args.action != "rules" else f"rules {args.rule_action}"
    obj = f"alarm:{args.alarm}" if args.action != "rules" else \
        f"rule:{args.id}" if args.rule_action == "delete" else f"rule:{args.code}"
    detail: dict[str, Any] = {"comment": args.comment} if getattr(args, "comment", "") else {}
    outcome = "error"
    try:
        await _main(dsn, args)
        outcome = "ok"
    except (AlarmNotFound, AlarmError, RuleError) as exc:
        detail["error"] = str(exc)
        raise
    finally:
        try:
            audit.append(AuditRecord(
                actor=args.by, tenant_id=args.tenant, method=f"rmiot alarms {action}",
                object=obj, outcome=outcome,
                source=f"cli:{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}",
                detail=detail))
        finally:
            await audit.stop()  # raises AuditUnavailable when the record was not committed
    return 0


async def _main(dsn: str, args: argparse.Namespace) -> int:
    now = dt.datetime.now(dt.UTC)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        if args.action == "list":
            state = "" if args.state == "all" else args.state
            for a in await alarm_store.find(conn, args.tenant, state=state, limit=args.limit):
                print(f"{a.id:>8}  {a.raised_at:%Y-%m-%d %H:%M:%S}  {a.severity:<8} "
                      f"{a.state:<12} device {a.device_id}  {a.message}")
        elif args.action in ("ack", "clear"):
            step = alarm_store.acknowledge if args.action == "ack" else alarm_store.clear
            events = await step(conn, args.tenant, args.alarm, args.by, args.comment, now)
            print(f"alarm {args.alarm}: {events[-1].state}")
        elif args.rule_action == "list":
            for r in await alarm_admin.list_rules(conn, args.tenant, inherited=True):
                scope = f"device {r.device_id}" if r.device_id else f"tenant {r.tenant_id}"
                print(f"{r.id:>6}  {r.code:<24} {r.kind:<9} {r.severity:<8} {scope:<16} "
                      f"{'on ' if r.enabled else 'off'}  {orjson.dumps(r.params).decode()}")
        elif args.rule_action == "add":
            if not args.code or not args.kind:
                raise RuleError("rules add needs --code and --kind")
            try:
                params, escalation = orjson.loads(args.params), orjson.loads(args.escalation)
            except orjson.JSONDecodeError as exc:
                raise RuleError(f"--params/--escalation: not JSON ({exc})") from None
            rule = await alarm_admin.put_rule(conn, args.tenant, 0, RuleSpec(
                args.tenant, args.code, "", args.kind, args.severity, True, params,
                escalation, device_id=args.device), args.by)
            print(rule.id)
        else:
            if not args.id:
                raise RuleError("rules delete needs --id")
            await alarm_admin.delete_rule(conn, args.tenant, args.id, args.by)
    return 0
