"""``rmiot tenants create|list``: the operator's view of the tenant tree."""

from __future__ import annotations

import argparse
from typing import Any

from rmiot import db
from rmiot.config import Config
from rmiot.tenants import store


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    text = "the tenant tree: region > district > hospital > department"
    parser: argparse.ArgumentParser = subparsers.add_parser("tenants", help=text,
                                                            description=text)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="add a tenant; prints its id")
    create.add_argument("code", help="unique short code, e.g. sz-futian-h03")
    create.add_argument("name", help="display name")
    create.add_argument("--level", required=True, choices=store.LEVELS)
    create.add_argument("--parent", type=int, help="parent tenant id (none for the region)")
    actions.add_parser("list", help="print the tree")
    return parser


def main(cfg: Config, args: argparse.Namespace) -> int:
    with db.connect(db.app_dsn(cfg), autocommit=True) as conn:
        if args.action == "create":
            try:
                tenant = store.create_tenant(conn, args.code, args.name, args.level, args.parent)
            except store.TenantError as exc:
                raise SystemExit(f"rmiot: {exc}") from None
            print(tenant)
            return 0
        rows = conn.execute("SELECT id, level, code, name, enabled, cardinality(path) "
                            "FROM tenants ORDER BY path").fetchall()
    for tenant_id, level, code, name, enabled, depth in rows:
        mark = "" if enabled else "  (disabled)"
        print(f"{'  ' * (depth - 1)}{tenant_id:>6}  {level:<10} {code}  {name}{mark}")
    return 0
