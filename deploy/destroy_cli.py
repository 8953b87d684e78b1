"""``rmiot data destroy tenant|patient|device ID`` and ``rmiot data requests``.

Two security administrators, each with password and TOTP (asked for, or two
lines on stdin with ``--password-stdin``: the password, then the code)::

    rmiot data destroy patient 42 --request --reason "court order 2026-17" --as alice
    rmiot data destroy patient 42 --approve 7 --as bob     # executes request 7

``rmiot data requests`` lists the requests not executed yet. What is
destroyed, what stays and why: ``rmiot.deploy.destroy``. Exit codes follow
``rmiot``: 0 done, 1 refused or failed (one line says why), 2 bad usage.

Wiring: ``add_parser(subparsers)`` adds ``data`` to rmiot's sub-parsers;
``main(cfg, args)`` runs it.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

import psycopg

from rmiot import db
from rmiot.config import Config, ConfigError, load
from rmiot.deploy import destroy

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``data`` to rmiot's sub-parsers (``parser.add_subparsers(...)``)."""
    text = "destroy a tenant's, a patient's or a device's data for good (two security admins)"
    parser: argparse.ArgumentParser = subparsers.add_parser("data", help=text, description=text)
    _add_actions(parser)
    return parser


def _add_actions(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    act = actions.add_parser("destroy", help="request, or approve and execute, a destruction")
    act.add_argument("kind", choices=destroy.KINDS)
    act.add_argument("id", type=int)
    step = act.add_mutually_exclusive_group(required=True)
    step.add_argument("--request", action="store_true", help="ask for it (first admin)")
    step.add_argument("--approve", type=int, metavar="REQUEST",
                      help="approve request REQUEST and execute it (second admin)")
    act.add_argument("--reason", help="with --request: why (recorded)")
    act.add_argument("--as", dest="username", required=True, metavar="USER",
                     help="your user name (a security administrator)")
    act.add_argument("--password-stdin", action="store_true",
                     help="read the password, then the TOTP code, one line each, from stdin")
    actions.add_parser("requests", help="destruction requests not executed yet")


def main(cfg: Config, args: argparse.Namespace) -> int:
    """Run ``rmiot data <action>``; returns the exit code."""
    try:
        return _run(cfg, args)
    except (destroy.DestroyError, db.DatabaseUnreachable, psycopg.Error) as exc:
        print(f"rmiot: {str(exc).strip()}", file=sys.stderr)
        return EXIT_FAILED


def _run(cfg: Config, args: argparse.Namespace) -> int:
    if args.action == "requests":
        for req in destroy.pending_requests(cfg):
            state = "approved" if req.approved_by else "waiting for approval"
            print(f"{req.id:>5}  {req.kind} {req.target}  by {req.requested_by} at "
                  f"{req.requested_at:%Y-%m-%d %H:%M}  expires {req.expires_at:%Y-%m-%d %H:%M}"
                  f"  {state}: {req.reason}")
        return EXIT_OK
    if args.request and not (args.reason and args.reason.strip()):
        print("rmiot: --request needs --reason", file=sys.stderr)
        return EXIT_USAGE
    who = _credentials(args.username, args.password_stdin)
    if args.request:
        req = destroy.request(cfg, who, args.kind, args.id, args.reason)
        print(f"request {req.id}: destroy {req.kind} {req.target}; another security "
              f"administrator approves it with\n  rmiot data destroy {req.kind} {req.target} "
              f"--approve {req.id} --as NAME\n(expires {req.expires_at:%Y-%m-%d %H:%M %Z})")
        return EXIT_OK
    done = destroy.approve(cfg, who, args.approve, args.kind, args.id)
    print(f"destroyed {done.kind} {done.target} (request {done.id}): "
          + json.dumps((done.outcome or {}).get("removed", {}), ensure_ascii=False)
          + f"; patient keys shredded: {(done.outcome or {}).get('keys_shredded', 0)}")
    legacy = (done.outcome or {}).get("legacy_sealed") or []
    if legacy:
        print(f"note: patients {legacy} were sealed under the shared key: their identities "
              "stay readable in backups taken before, until those are pruned", file=sys.stderr)
    return EXIT_OK


def _credentials(username: str, from_stdin: bool) -> destroy.Credentials:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\n")
        code = sys.stdin.readline().strip()
    else:
        password = getpass.getpass(f"Password for {username}: ")
        code = input("TOTP code: ").strip()
    return destroy.Credentials(username, password, code)


def _standalone(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rmiot.deploy.destroy_cli",
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
