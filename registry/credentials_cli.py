"""``rmiot credentials``: a device's credentials from the operator's shell.

- ``key DEVICE [--algorithm A] [--overlap-s N]``: a new HMAC key (printed
  once, hex); older keys stay valid ``--overlap-s`` longer (rotation);
- ``revoke-keys DEVICE``: end every HMAC key of the device now;
- ``issue DEVICE [--username U]``: a transport login for MQTT, CoAP and HTTP
  (user name and password printed once; the platform keeps a hash);
- ``revoke DEVICE [--username U]``: end one of its logins, or all;
- ``list [--device ID]``: live transport logins (never a password).

Every action but ``list`` is recorded in the audit chain as
``cli:<login name>``. Exit codes: 0 done, 1 refused (no such device, a name
taken: the message says why), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import os
import sys
from typing import Any

from rmiot import db
from rmiot.config import Config
from rmiot.registry import credentials, store, transport_credentials
from rmiot.security.audit import AuditLog, AuditRecord
from rmiot.security.sm4 import Keyring


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    text = "device credentials: HMAC keys and transport logins (MQTT, CoAP, HTTP)"
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "credentials", help=text, description=f"{text}. Secrets are printed once and never "
        "audited; every change is audited as cli:<login>. Exit codes: 0 done, 1 refused "
        "(no such device, a name taken), 2 bad usage.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    key = actions.add_parser("key", help="a new HMAC key for the device (printed once, hex)")
    key.add_argument("device", type=int)
    key.add_argument("--algorithm", choices=sorted(store.ALGORITHMS), default="hmac-sha256")
    key.add_argument("--overlap-s", type=int, default=credentials.DEFAULT_OVERLAP_S,
                     help="older keys stay valid this long (default: one day)")
    revoke_keys = actions.add_parser("revoke-keys", help="end every HMAC key of the device")
    revoke_keys.add_argument("device", type=int)
    issue = actions.add_parser("issue", help="a transport login (printed once)")
    issue.add_argument("device", type=int)
    issue.add_argument("--username", help="default: d<device>-<8 hex>")
    revoke = actions.add_parser("revoke", help="end one transport login, or all the device's")
    revoke.add_argument("device", type=int)
    revoke.add_argument("--username")
    listing = actions.add_parser("list", help="live transport logins (no passwords)")
    listing.add_argument("--device", type=int)
    return parser


def main(cfg: Config, args: argparse.Namespace) -> int:
    dsn = db.app_dsn(cfg)
    with db.connect(dsn, autocommit=True) as conn:
        if args.action == "list":
            for login in transport_credentials.live(conn):
                if args.device in (None, login.device_id):
                    print(f"{login.username}\t{login.device_id}")
            return 0
        try:
            shown, result = _act(cfg, args, conn)
        except store.RegistryError as exc:
            _audit(cfg, args, "error", str(exc))
            print(f"rmiot: {exc}", file=sys.stderr)
            return 1
    _audit(cfg, args, "ok", result)
    print(shown)
    return 0


def _act(cfg: Config, args: argparse.Namespace, conn: Any) -> tuple[str, str]:
    """(what to print, what to audit): secrets are printed, never audited."""
    if args.action == "key":
        version, key = credentials.rotate_key(conn, Keyring.load(cfg.keyring_dir), args.device,
                                              args.algorithm, args.overlap_s)
        return (f"device {args.device} key v{version} ({args.algorithm}): {key.hex()}",
                f"key v{version}")
    if args.action == "revoke-keys":
        count = store.revoke_keys(conn, args.device)
        return f"{count} key(s) revoked", f"{count} revoked"
    if args.action == "issue":
        username, password = transport_credentials.issue(conn, args.device, args.username)
        return f"username {username}\npassword {password}", f"login {username}"
    count = transport_credentials.revoke(conn, username=args.username, device_id=args.device)
    return f"{count} login(s) revoked", f"{count} revoked"


def _audit(cfg: Config, args: argparse.Namespace, outcome: str, detail: str) -> None:
    async def append() -> None:
        audit = AuditLog(db.app_dsn(cfg), checkpoints=cfg.audit_checkpoints)
        await audit.start()
        try:
            audit.append(AuditRecord(
                ts=dt.datetime.now(dt.UTC), actor=f"cli:{getpass.getuser()}", role=None,
                tenant_id=None, method=f"rmiot credentials {args.action}",
                object=f"device:{args.device}", outcome=outcome, source=f"local:{os.getpid()}",
                request_id="", detail={"result": detail}, patient=None))
        finally:
            await audit.stop()
    asyncio.run(append())
