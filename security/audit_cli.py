"""``rmiot audit``: verify the audit chain, export a checkpoint, apply retention.

``rmiot audit verify [--checkpoints PATH]`` prints ``ok: N records, head <hex>``
and exits 0, or names the first bad record (``FAILED: record <id>: <kind>:
<what is wrong>``) and exits 1. Without ``--checkpoints`` it reads
the configured checkpoint file (``security.audit_checkpoints``) when it exists; with no
checkpoints at all a rewritten chain or a tail deleted together with the head
row cannot be seen, and it says so on stderr.

``rmiot audit patient ID|PSEUDONYM`` lists who read or changed a patient's
data (``rmiot.security.patient_access``).

``rmiot audit checkpoint`` appends the current head to the checkpoint file;
``rmiot audit retain --days N`` (N >= 180) drops older records as the
administrator (see ``rmiot.security.audit``).

Exit codes follow ``rmiot``: 0 ok, 1 the chain has a problem or the task
failed, 2 bad usage (an unreadable checkpoint file, too short a retention).

Wiring: ``add_parser(subparsers)`` adds the ``audit`` command to ``rmiot``'s
sub-parsers, with ``handler(args, cfg)`` set as rmiot.cli expects. Standalone:
``python -m rmiot.security.audit_cli [--config PATH] verify ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import psycopg

from rmiot import db
from rmiot.config import Config, ConfigError, load
from rmiot.security import audit_checkpoints, audit_verify
from rmiot.security.audit import MIN_RETENTION_DAYS
from rmiot.security.patient_access import patient_access

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``audit`` to rmiot's sub-parsers (``parser.add_subparsers(...)``)."""
    text = "the tamper-evident audit chain: verify it, checkpoint it, apply retention"
    parser: argparse.ArgumentParser = subparsers.add_parser("audit", help=text, description=text)
    parser.set_defaults(handler=_handler)
    _add_actions(parser)
    return parser


def _add_actions(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    where = "checkpoint file (default: security.audit_checkpoints)"
    verify = actions.add_parser(
        "verify", help="walk the hash chain; name the first altered, missing or moved record")
    verify.add_argument("--checkpoints", metavar="PATH", type=Path,
                        help=where + "; used when present")
    checkpoint = actions.add_parser(
        "checkpoint", help="append the chain's head to the checkpoint file now")
    checkpoint.add_argument("--checkpoints", metavar="PATH", type=Path, help=where)
    retain = actions.add_parser(
        "retain", help=f"drop records older than DAYS (at least {MIN_RETENTION_DAYS}); "
                       "needs the administrator's DSN")
    retain.add_argument("--days", type=int, required=True)
    retain.add_argument("--checkpoints", metavar="PATH", type=Path, help=where)
    patient = actions.add_parser(
        "patient", help="who looked at this patient's records (reads and changes of their "
                        "data, newest first)")
    patient.add_argument("patient", metavar="ID|PSEUDONYM",
                         help="a patient's id (any hospital's record) or pseudonym")
    patient.add_argument("--limit", type=int, default=1000)


def _handler(args: argparse.Namespace, cfg: Config) -> int:
    return main(cfg, args)


def main(cfg: Config, args: argparse.Namespace) -> int:
    """Run ``rmiot audit <action>``; returns the exit code."""
    default = cfg.audit_checkpoints
    path: Path = args.checkpoints or default
    if args.action == "verify":
        return _verify(cfg, args.checkpoints or (default if default.exists() else None))
    if args.action == "patient":
        for e in patient_access(db.app_dsn(cfg), args.patient, args.limit):
            print(f"{e.ts.isoformat(timespec='seconds')}  {e.actor}  {e.role or '-'}  "
                  f"{e.method}  {e.object or '-'}  {e.outcome}  {e.source or '-'}")
        return EXIT_OK
    if args.action == "checkpoint":
        cp = audit_checkpoints.export_checkpoint(db.app_dsn(cfg), path)
        print(f"checkpoint: record {cp.id}, head {cp.hash.hex()} -> {path}")
        return EXIT_OK
    try:
        result = audit_verify.drop_older_than(db.admin_dsn(cfg), args.days, checkpoints=path)
    except ValueError as exc:
        print(f"rmiot: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (audit_checkpoints.AuditIntegrityError, audit_checkpoints.CheckpointFileError) as exc:
        print(f"rmiot: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"removed {result.removed} records; the chain starts at record {result.first_id}"
          if result.removed else "nothing older to remove")
    return EXIT_OK


def _verify(cfg: Config, checkpoints: Path | None) -> int:
    try:
        report = audit_verify.verify(db.app_dsn(cfg), checkpoints)
    except audit_checkpoints.CheckpointFileError as exc:
        print(f"rmiot: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if checkpoints is None:
        print("note: no checkpoint file; a rewritten chain, or a tail deleted together with "
              "the head row, cannot be detected", file=sys.stderr)
    if report.problem is not None:
        p = report.problem
        print(f"FAILED: record {p.id}: {p.kind}: {p.message}")
        return EXIT_FAILED
    if report.anchor != "genesis":
        print(f"note: the chain starts at record {report.first_id}, anchored by the "
              f"{report.anchor}", file=sys.stderr)
    print(f"ok: {report.records} records, head {report.head_hash.hex()}")
    return EXIT_OK


def _standalone(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rmiot.security.audit_cli",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", metavar="PATH", help="TOML configuration file")
    _add_actions(parser)
    args = parser.parse_args(argv)
    try:
        return main(load(args.config), args)
    except ConfigError as exc:
        print(f"rmiot: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (psycopg.Error, db.DatabaseUnreachable) as exc:
        print(f"rmiot: database error: {str(exc).strip()}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(_standalone())
