"""The ``rmiot`` command: every operator task, one subcommand each.

Exit codes a script can rely on: 0 done; 1 the task failed (the message says
why); 2 bad usage or configuration; 3 ``status`` found a part down.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable

from rmiot import __version__, db, logs
from rmiot.config import Config, ConfigError, load
from rmiot.deploy import replica_cli

EXIT_FAILED, EXIT_USAGE, EXIT_DOWN = 1, 2, 3

Handler = Callable[[argparse.Namespace, Config], int]


# -- run / status / config ---------------------------------------------------

def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    import uvloop

    from rmiot.platform import Infrastructure, serve

    infra = Infrastructure(cfg)
    try:
        infra.up()
        uvloop.run(serve(cfg, infra, simulate=args.simulate))
    finally:
        infra.down()
    return 0


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    from rmiot.status import run_checks

    checks = asyncio.run(run_checks(cfg))
    if args.json:
        print(json.dumps([c.__dict__ for c in checks]))
    else:
        for c in checks:
            print(f"{'ok  ' if c.ok else 'DOWN'}  {c.name:<12} {c.detail}")
    return 0 if all(c.ok for c in checks) else EXIT_DOWN


def cmd_config(args: argparse.Namespace, cfg: Config) -> int:
    import dataclasses

    if args.action == "show":
        out = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "source"}
        if out["database"]["dsn"]:
            out["database"]["dsn"] = db.describe(out["database"]["dsn"])
        print(json.dumps(out, indent=2))
    print(f"configuration ok (from {cfg.source})", file=sys.stderr)
    return 0


# -- db / broker / certs -----------------------------------------------------

def cmd_db(args: argparse.Namespace, cfg: Config) -> int:
    from rmiot.deploy import cluster, migrate

    if args.action in ("replica", "failover"):
        return replica_cli.main(cfg, args)

    private = cluster.Cluster(cfg) if cfg.database.private else None
    needs_private = args.action in ("init", "start", "stop")
    if needs_private and private is None:
        raise ConfigError(f"'rmiot db {args.action}' manages the private cluster, but "
                          "database.dsn (RMIOT_DSN) points at an external server")
    if args.action == "init" and private:
        print("initialised" if private.init() else "already initialised")
    elif args.action == "start" and private:
        print("started" if private.start() else "already running")
    elif args.action == "stop" and private:
        print("stopped" if private.stop() else "not running")
    elif args.action == "migrate":
        applied = migrate.migrate(db.admin_dsn(cfg))
        for mig in applied:
            print(f"applied {mig.path.name}")
        print(f"schema at v{migrate.current_version(db.admin_dsn(cfg))}")
    elif args.action == "status":
        from rmiot.status import check_database

        check = check_database(cfg)
        print(f"{'ok  ' if check.ok else 'DOWN'}  {check.detail}")
        return 0 if check.ok else EXIT_DOWN
    elif args.action == "dsn":
        print(db.admin_dsn(cfg) if args.admin else db.app_dsn(cfg))
    return 0


def cmd_broker(args: argparse.Namespace, cfg: Config) -> int:
    from rmiot.deploy import broker

    if args.action == "status":
        from rmiot.status import check_broker

        check = asyncio.run(check_broker(cfg))
        print(f"{'ok  ' if check.ok else 'DOWN'}  {check.detail}")
        return 0 if check.ok else EXIT_DOWN
    if not cfg.broker.private:
        raise ConfigError(f"'rmiot broker {args.action}' manages the private broker, but "
                          "broker.url (RMIOT_MQTT_URL) points at an external one")
    b = broker.Broker(cfg)
    if args.action == "start":
        print("started" if b.start() else "already running")
    else:
        print("stopped" if b.stop() else "not running")
    return 0


def cmd_certs(args: argparse.Namespace, cfg: Config) -> int:
    from rmiot.deploy import certs

    directory = cfg.data_dir / "certs"
    if args.action == "dev":
        written = certs.ensure_dev_ca(directory, force=args.force)
        print(f"{directory}: " + (", ".join(written) + " written" if written else "up to date"))
    else:
        path = certs.issue_client(directory, args.name, args.kind, args.tenant)
        print(f"{path} and {path.with_suffix('.key')} written")
    return 0


def cmd_frame(args: argparse.Namespace, cfg: Config) -> int:
    from rmiot import frame_tool

    return frame_tool.main(args.action, args.keys, args.stream, args.hex)


# -- parser ------------------------------------------------------------------

def _delegate(main: Callable[[Config, argparse.Namespace], int]) -> Handler:
    """A package's own command (``main(cfg, args)``) as a handler."""
    return lambda args, cfg: main(cfg, args)


def build_parser() -> argparse.ArgumentParser:
    from rmiot.ingest import city

    parser = argparse.ArgumentParser(
        prog="rmiot", description="Regional medical IoT platform (T/GDIOT 009-2024).")
    parser.add_argument("--config", metavar="PATH",
                        help="TOML configuration file (default: $RMIOT_CONFIG or ./rmiot.toml)")
    parser.add_argument("--version", action="version", version=f"rmiot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = add("run", cmd_run, "start the platform (and the private database and broker) "
            "until Ctrl-C")
    p.add_argument("--simulate", metavar="CITY", choices=sorted(city.CITIES), default="",
                   help="also run a simulated city feeding the platform (small, medium, "
                        "large: see rmiot simulate --help), with live rates on the terminal")
    p = add("status", cmd_status, "check the database, broker and every service")
    p.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    p = add("config", cmd_config, "validate the configuration, or show the effective one")
    p.add_argument("action", choices=["check", "show"])
    p = add("db", cmd_db, "the private TimescaleDB cluster and the schema")
    p.add_argument("action", choices=["init", "start", "stop", "status", "migrate", "dsn",
                                      "replica", "failover"],
                   help="init/start/stop the private cluster; migrate applies the schema; "
                        "dsn prints the connection string; replica create|status|drop|sync|"
                        "async manages the standby; failover promotes it")
    p.add_argument("--admin", action="store_true", help="with dsn: the administrator's DSN")
    replica_cli.add_db_arguments(p)
    p = add("broker", cmd_broker, "the private MQTT broker")
    p.add_argument("action", choices=["start", "stop", "status"])
    p = add("certs", cmd_certs, "the development certificate authority")
    certs_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    dev = certs_sub.add_parser("dev", help="create the dev CA and server certificate if missing")
    dev.add_argument("--force", action="store_true", help="replace them")
    issue = certs_sub.add_parser("issue", help="issue a client certificate")
    issue.add_argument("name", help="file name and common name, e.g. hospital-12")
    issue.add_argument("--kind", required=True, choices=["platform", "vendor", "operator"])
    issue.add_argument("--tenant", type=int, help="tenant id whose subtree the holder speaks for")
    from rmiot import ops_cli
    from rmiot.deploy import backup_cli, destroy_cli
    from rmiot.ingest import alarm_cli, simulator
    from rmiot.query import cli as query_cli
    from rmiot.query import dataset_cli
    from rmiot.registry import credentials_cli, importer
    from rmiot.security import audit_cli, keys_cli, users_cli
    from rmiot.tenants import cli as tenants_cli

    for module in (tenants_cli, importer, credentials_cli, users_cli, keys_cli, audit_cli,
                   backup_cli, destroy_cli, simulator, query_cli, dataset_cli, alarm_cli, ops_cli):
        module.add_parser(sub).set_defaults(handler=_delegate(module.main))
    p = add("frame", cmd_frame, "decode or encode RMF v1 frames (a vendor's debugging tool)")
    p.add_argument("action", choices=["decode", "encode"],
                   help="decode: frames on stdin -> one JSON object a line; "
                        "encode: JSON lines on stdin -> frames")
    p.add_argument("--keys", metavar="FILE", help="JSON object of device id -> hex HMAC key")
    p.add_argument("--stream", action="store_true",
                   help="decode: input is a stream of frames and garbage, as on TCP")
    p.add_argument("--hex", action="store_true", help="hex text instead of binary")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config)
        logs.setup(cfg.log.level, cfg.log.format)
        handler: Handler = args.handler
        return handler(args, cfg)
    except ConfigError as exc:
        print(f"rmiot: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        known = _known_failure(exc)
        if known is None:
            raise
        print(f"rmiot: {known}", file=sys.stderr)
        return EXIT_FAILED


def _known_failure(exc: Exception) -> str | None:
    """The one-line message for failures an operator can act on (else None: a bug)."""
    import psycopg

    from rmiot.deploy import broker, certs, cluster, migrate

    if isinstance(exc, psycopg.Error):
        return f"database error: {str(exc).strip()}"
    from rmiot.frame_tool import FrameToolError

    known = (FrameToolError, db.DatabaseUnreachable, cluster.ClusterError, broker.BrokerError,
             migrate.MigrationError, certs.CertError, FileNotFoundError, PermissionError)
    return str(exc) if isinstance(exc, known) else None


if __name__ == "__main__":
    sys.exit(main())
