"""``rmiot tenants create|list|show|set|enable|disable``: the operator's view of
the tenant tree and its settings (see tenants/settings.py for the keys)."""

from __future__ import annotations

import argparse
from typing import Any

import orjson

from rmiot import db
from rmiot.config import Config
from rmiot.tenants import settings, store


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
    show = actions.add_parser("show", help="a tenant's settings in force (inherited included)")
    show.add_argument("tenant", type=int)
    change = actions.add_parser("set", help="set settings: KEY=JSON ... (KEY= unsets); "
                                f"keys: {', '.join(settings.KEYS)}")
    change.add_argument("tenant", type=int)
    change.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    for name, enabled in (("enable", True), ("disable", False)):
        toggle = actions.add_parser(name, help=f"{name} a tenant (its devices are "
                                    f"{'accepted' if enabled else 'refused'})")
        toggle.add_argument("tenant", type=int)
        toggle.set_defaults(enabled=enabled)
    return parser


def main(cfg: Config, args: argparse.Namespace) -> int:
    with db.connect(db.app_dsn(cfg), autocommit=True) as conn:
        if args.action == "show":
            print(orjson.dumps(settings.effective(conn, args.tenant),
                               option=orjson.OPT_INDENT_2).decode())
            return 0
        if args.action == "set":
            changes: dict[str, Any] = {}
            for pair in args.pairs:
                key, _, value = pair.partition("=")
                try:
                    changes[key] = orjson.loads(value) if value else None
                except orjson.JSONDecodeError:
                    raise SystemExit(f"rmiot: {key}: {value!r} is not JSON "
                                     "(true, 42, {\"telemetry\": 365})") from None
            try:
                settings.update(conn, args.tenant, changes)
            except settings.SettingsError as exc:
                raise SystemExit(f"rmiot: {exc}") from None
            return 0
        if args.action in ("enable", "disable"):
            conn.execute("UPDATE tenants SET enabled = %s WHERE id = %s",
                         (args.enabled, args.tenant))
            return 0
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
