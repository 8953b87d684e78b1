"""``rmiot users create|grant|totp|unlock``: the operator's bootstrap path.

The first security administrator has to come from somewhere: an operator on
the platform's machine creates them here (after that, people and roles are
managed through the API by the security administrator). Every action is
recorded in the audit chain as ``cli:<login name>``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import os
import sys
from typing import Any

import psycopg
import pyotp

from rmiot import db
from rmiot.config import Config
from rmiot.security import identity
from rmiot.security.audit import AuditLog, AuditRecord
from rmiot.security.authz import Authorizer
from rmiot.security.passwords import PasswordPolicyError
from rmiot.security.sm4 import Keyring


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    text = "people's accounts (bootstrap; afterwards through the API)"
    parser: argparse.ArgumentParser = subparsers.add_parser("users", help=text, description=text)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="add a user; the password is asked for "
                                "(or read from stdin with --password-stdin)")
    create.add_argument("username")
    create.add_argument("--tenant", type=int, required=True, help="home tenant id")
    create.add_argument("--role", help="grant this role on the home tenant too")
    create.add_argument("--display-name", default="")
    create.add_argument("--password-stdin", action="store_true")
    grant = actions.add_parser("grant", help="grant a role on a tenant and its subtree")
    grant.add_argument("username")
    grant.add_argument("role")
    grant.add_argument("--tenant", type=int, required=True)
    totp = actions.add_parser("totp", help="(re-)enrol the TOTP second factor; prints the secret")
    totp.add_argument("username")
    unlock = actions.add_parser("unlock", help="lift a lockout")
    unlock.add_argument("username")
    return parser


def main(cfg: Config, args: argparse.Namespace) -> int:
    return asyncio.run(_main(cfg, args))


async def _main(cfg: Config, args: argparse.Namespace) -> int:
    dsn = db.app_dsn(cfg)
    audit = AuditLog(dsn, checkpoints=cfg.audit_checkpoints)
    await audit.start()
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            outcome = await _act(cfg, args, conn)
        _audit(audit, args, "ok", outcome)
        return 0
    except (identity.LoginError, PasswordPolicyError, LookupError, ValueError) as exc:
        _audit(audit, args, "error", str(exc))
        print(f"rmiot: {exc}", file=sys.stderr)
        return 1
    finally:
        await audit.stop()


async def _act(cfg: Config, args: argparse.Namespace, conn: psycopg.AsyncConnection[Any]) -> str:
    keyring = Keyring.load(cfg.keyring_dir)
    if args.action == "create":
        password = (sys.stdin.readline().rstrip("\n") if args.password_stdin
                    else _ask_password())
        user_id = await identity.create_user(conn, args.username, password, args.tenant,
                                             args.display_name, must_change=True)
        print(f"user {args.username} created (id {user_id}); the password must be changed "
              "at the first login")
        if args.role:
            await _grant(dsn_of(conn), args.username, args.role, args.tenant)
            if args.role in identity.ADMIN_ROLES:
                await _enroll(conn, keyring, args.username)
        return f"created {args.username}"
    if args.action == "grant":
        await _user_id(conn, args.username)
        await _grant(dsn_of(conn), args.username, args.role, args.tenant)
        return f"granted {args.role}@{args.tenant}"
    if args.action == "totp":
        await _enroll(conn, keyring, args.username)
        return "totp enrolled"
    await conn.execute("UPDATE users SET locked_until = NULL, failed_logins = 0 "
                       "WHERE id = %s", (await _user_id(conn, args.username),))
    print(f"{args.username} unlocked")
    return "unlocked"


def dsn_of(conn: psycopg.AsyncConnection[Any]) -> str:
    return conn.info.dsn


async def _grant(dsn: str, username: str, role: str, tenant: int) -> None:
    authorizer = Authorizer(dsn)
    await authorizer.start()
    try:
        await authorizer.grant(f"user:{username}", role, tenant)
    finally:
        await authorizer.stop()
    print(f"{username} is {role} on tenant {tenant} and its subtree")


async def _enroll(conn: psycopg.AsyncConnection[Any], keyring: Keyring, username: str) -> None:
    secret = await identity.enroll_totp(conn, keyring, await _user_id(conn, username))
    uri = pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name="rmiot")
    print(f"TOTP secret for {username} (shown once; enter it in an authenticator app):\n"
          f"  {secret}\n  {uri}")


async def _user_id(conn: psycopg.AsyncConnection[Any], username: str) -> int:
    cur = await conn.execute("SELECT id FROM users WHERE username = %s", (username,))
    row = await cur.fetchone()
    if row is None:
        raise LookupError(f"no user {username!r}")
    return int(row[0])


def _ask_password() -> str:
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Again: "):
        raise ValueError("the two passwords differ")
    return first


def _audit(audit: AuditLog, args: argparse.Namespace, outcome: str, detail: str) -> None:
    audit.append(AuditRecord(
        ts=dt.datetime.now(dt.UTC), actor=f"cli:{getpass.getuser()}", role=None,
        tenant_id=getattr(args, "tenant", None), method=f"rmiot users {args.action}",
        object=f"user:{args.username}", outcome=outcome, source=f"local:{os.getpid()}",
        request_id="", detail={"result": detail}, patient=None))
