"""``rmiot backup enable|create|list|verify|restore|discard|prune``.

- ``enable [--restart]``: WAL archiving into ``backup.dir`` (one restart of
  the database; the platform reconnects).
- ``create [--verify] [--prune]``: a base backup now; ``--verify`` runs its
  restore drill at once, ``--prune`` applies retention after (what the
  schedule, ``deploy/rmiot-backup.timer``, runs).
- ``list [--json]``: every backup, oldest first; only ``verified`` ones count.
- ``verify [LABEL]``: the restore drill of a backup (default: the newest).
- ``restore --to TIME [--name NAME] [--port N]``: the state at TIME (ISO
  8601 with its zone) in a new cluster; prints its port and DSN.
- ``discard NAME``: stop and delete a restored cluster.
- ``prune [--keep N]``: retention (default ``backup.keep``).

What each does and costs: ``rmiot.deploy.backup`` and ``rmiot.deploy.restore``. Exit codes follow
``rmiot``: 0 done, 1 failed (one line says why; a failed drill too), 2 bad usage.

Wiring: ``add_parser(subparsers)`` adds ``backup`` to rmiot's sub-parsers;
``main(cfg, args)`` runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import datetime
from typing import Any

import psycopg

from rmiot.config import Config, ConfigError, load
from rmiot.deploy import backup, cluster, pgnode, restore

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``backup`` to rmiot's sub-parsers (``parser.add_subparsers(...)``)."""
    text = "base backups, WAL archiving, restore drills, point-in-time restore, retention"
    parser: argparse.ArgumentParser = subparsers.add_parser("backup", help=text,
                                                            description=text)
    _add_actions(parser)
    return parser


def _add_actions(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    enable = actions.add_parser("enable", help="archive WAL continuously into backup.dir")
    enable.add_argument("--restart", action="store_true",
                        help="restart the database when archiving needs it (once)")
    create = actions.add_parser("create", help="take a base backup now")
    create.add_argument("--verify", action="store_true", help="run its restore drill at once")
    create.add_argument("--prune", action="store_true", help="apply retention afterwards")
    listing = actions.add_parser("list", help="the backups, oldest first")
    listing.add_argument("--json", action="store_true")
    verify = actions.add_parser("verify", help="restore drill: restore into a scratch "
                                "cluster, count rows, verify the audit chain")
    verify.add_argument("label", nargs="?", help="which backup (default: the newest)")
    restore = actions.add_parser("restore", help="restore the state at a time into a new "
                                 "cluster on its own port")
    restore.add_argument("--to", required=True, metavar="TIME",
                         help="ISO 8601 with zone, e.g. 2026-01-22T09:30:00+08:00")
    restore.add_argument("--name", help="directory under data_dir (default pg-restore-<time>)")
    restore.add_argument("--port", type=int, help="its port (default: a free one)")
    discard = actions.add_parser("discard", help="stop and delete a restored cluster")
    discard.add_argument("name", help="its directory under data_dir (pg-restore-...)")
    prune = actions.add_parser("prune", help="keep the newest verified backups, remove the rest")
    prune.add_argument("--keep", type=int, help="how many verified backups (default backup.keep)")


def main(cfg: Config, args: argparse.Namespace) -> int:
    """Run ``rmiot backup <action>``; returns the exit code."""
    if not cfg.database.private:
        print("rmiot: backups here are of the private cluster; with database.dsn, back up "
              "that server with its own tools", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _run(cfg, args)
    except (backup.BackupError, cluster.ClusterError, psycopg.Error) as exc:
        print(f"rmiot: {str(exc).strip()}", file=sys.stderr)
        return EXIT_FAILED


def _run(cfg: Config, args: argparse.Namespace) -> int:
    if args.action == "enable":
        for line in backup.enable(cfg, restart=args.restart):
            print(line)
        return EXIT_OK
    if args.action == "create":
        info = backup.create(cfg)
        print(f"backup {info.label}: {info.bytes / 1e6:.1f} MB, WAL from {info.start_wal}")
        code = _report(restore.run_drill(cfg, info.label)) if args.verify else EXIT_OK
        if args.prune and code == EXIT_OK:
            _print_pruned(backup.prune(cfg))
        return code
    if args.action == "list":
        backups = backup.list_backups(cfg)
        if args.json:
            print(json.dumps([asdict(b) | {"verified": b.verified} for b in backups]))
        for b in [] if args.json else backups:
            drill = ("verified" if b.verified else "DRILL FAILED" if b.drill else "unverified")
            print(f"{b.label}  finished {b.finished}  {b.bytes / 1e6:9.1f} MB  {drill}")
        return EXIT_OK
    if args.action == "verify":
        return _report(restore.run_drill(cfg, args.label))
    if args.action == "restore":
        try:
            to = datetime.fromisoformat(args.to)
        except ValueError:
            print(f"rmiot: --to {args.to!r} is not an ISO 8601 time", file=sys.stderr)
            return EXIT_USAGE
        done = restore.point_in_time(cfg, to, args.name, args.port)
        print(f"restored {done.target} from backup {done.backup} into {done.name}, port "
              f"{done.port}\n  psql \"{pgnode.dsn(done.server, cfg.database.name)}\"")
        return EXIT_OK
    if args.action == "discard":
        restore.discard(cfg, args.name)
        print(f"{args.name} stopped and deleted")
        return EXIT_OK
    _print_pruned(backup.prune(cfg, args.keep))
    return EXIT_OK


def _report(info: backup.BackupInfo) -> int:
    drill = info.drill
    assert drill is not None
    if drill.ok:
        print(f"backup {info.label} verified: restored in {drill.restore_s:.1f} s, "
              f"{sum(drill.counts.values())} rows in {len(drill.counts)} tables, "
              f"audit chain of {drill.audit_records} records intact")
        return EXIT_OK
    print(f"backup {info.label} FAILED its restore drill: {drill.problem}")
    return EXIT_FAILED


def _print_pruned(removed: list[str]) -> None:
    print(f"removed {', '.join(removed)}" if removed else "nothing to remove")


def _standalone(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rmiot.deploy.backup_cli",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", metavar="PATH", help="TOML configuration file")
    _add_actions(parser)
    args = parser.parse_args(argv)
    try:
        return main(load(args.config), args)
    except ConfigError as exc:
        print(f"rmiot: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(_standalone())
