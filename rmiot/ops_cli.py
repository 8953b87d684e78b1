"""``rmiot ops``: hospital operations for operators, straight on the database
(the operator's own access; people use OpsService).

    rmiot ops report TENANT --month YYYY-MM [--regional] [--out DIR] [--pdf]
    rmiot ops compliance [--today YYYY-MM-DD]     open, remind, escalate now
    rmiot ops available TENANT [--kind K] [--zone Z] [--min-battery N]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import orjson

from rmiot import db, ops_reports
from rmiot.config import Config
from rmiot.registry import compliance, dispatch
from rmiot.registry.devices import Scope
from rmiot.registry.store import RegistryError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    text = "hospital operations: monthly reports, compliance pass, dispatch availability"
    parser: argparse.ArgumentParser = subparsers.add_parser("ops", help=text, description=text)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    report = actions.add_parser("report", help="write a month's report as CSV and HTML")
    report.add_argument("tenant", type=int)
    report.add_argument("--month", required=True, help="YYYY-MM")
    report.add_argument("--regional", action="store_true", help="de-identified, per hospital")
    report.add_argument("--out", default=".", help="directory (default: here)")
    report.add_argument("--pdf", action="store_true", help="a PDF as well (WeasyPrint)")
    run = actions.add_parser("compliance", help="open due tasks, remind and escalate now")
    run.add_argument("--today", default="", help="YYYY-MM-DD (default today)")
    free = actions.add_parser("available", help="devices free for an emergency, nearest first")
    free.add_argument("tenant", type=int)
    free.add_argument("--kind", default="")
    free.add_argument("--zone", type=int, default=0)
    free.add_argument("--min-battery", type=float, default=50.0)
    free.add_argument("--limit", type=int, default=20)
    return parser


def main(cfg: Config, args: argparse.Namespace) -> int:
    try:
        with db.connect(db.app_dsn(cfg)) as conn:
            if args.action == "compliance":
                today = dt.date.fromisoformat(args.today) if args.today else dt.date.today()
                done = compliance.run(conn, today)
                print(orjson.dumps(done.__dict__).decode())
            elif args.action == "available":
                found = dispatch.available(conn, Scope(args.tenant), dispatch.Need(
                    kind=args.kind, zone_id=args.zone, hospital_id=0 if args.zone else args.tenant,
                    min_battery=args.min_battery, limit=args.limit))
                for p in found:
                    print(orjson.dumps(p, default=str).decode())
            else:
                built = asyncio.run(ops_reports.build(db.app_dsn(cfg), args.tenant, args.month,
                                                      args.regional))
                for path in ops_reports.save(built, ops_reports.stem(
                        Path(args.out), args.tenant, args.month, args.regional), args.pdf):
                    print(path)
    except (RegistryError, ValueError) as exc:
        print(f"rmiot: {exc}")
        return 1
    return 0
