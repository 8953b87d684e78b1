"""``rmiot ops``: hospital operations for operators, straight on the database
(the operator's own access; people use OpsService).

    rmiot ops report TENANT --month YYYY-MM [--regional] [--out DIR]
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

from rmiot import db
from rmiot.config import Config
from rmiot.query.ops_energy import OpsEnergy
from rmiot.registry import compliance, dispatch, ops_report
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
                    kind=args.kind, zone_id=args.zone, min_battery=args.min_battery,
                    limit=args.limit))
                for p in found:
                    print(orjson.dumps(p, default=str).decode())
            else:
                first, end = ops_report.month_bounds(args.month)
                energy = asyncio.run(_energy(db.app_dsn(cfg), args.tenant, first, end))
                built = ops_report.build(conn, args.tenant, args.month, args.regional, energy)
                kind = "regional" if args.regional else "hospital"
                out = Path(args.out)
                out.mkdir(parents=True, exist_ok=True)
                stem = out / f"ops-{kind}-{args.tenant}-{args.month}"
                stem.with_suffix(".csv").write_text(ops_report.to_csv(built), encoding="utf-8")
                stem.with_suffix(".html").write_text(ops_report.to_html(built), encoding="utf-8")
                print(f"{stem}.csv\n{stem}.html")
    except (RegistryError, ValueError) as exc:
        print(f"rmiot: {exc}")
        return 1
    return 0


async def _energy(dsn: str, tenant: int, first: dt.date, end: dt.date) -> list[Any]:
    return list(await OpsEnergy(dsn).energy(tenant, first, end, 201))
