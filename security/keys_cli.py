"""``rmiot keys list|rotate``: the SM4 key-encryption keys of the keyring.

rotate adds a key and re-seals every sealed value (device keys, TOTP secrets,
legacy patient identities, and the patients' own key files) under it; older
keys stay in the keyring until no backup needs them. Audited as ``cli:<login name>``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import os
from typing import Any

from rmiot import db
from rmiot.config import Config
from rmiot.security.audit import AuditLog, AuditRecord
from rmiot.security.patient_keys import PatientKeys
from rmiot.security.sealed import reseal_all
from rmiot.security.sm4 import Keyring


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    text = "the SM4 keys that seal secrets at rest: list them, rotate them"
    parser: argparse.ArgumentParser = subparsers.add_parser("keys", help=text, description=text)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="key ids in the keyring (the newest seals new values)")
    actions.add_parser("rotate", help="add a key and re-seal every sealed value under it")
    return parser


def main(cfg: Config, args: argparse.Namespace) -> int:
    keyring = Keyring.load(cfg.keyring_dir)
    if args.action == "list":
        newest = max(keyring.keys)
        for key_id in sorted(keyring.keys):
            print(f"{key_id}{'  (seals new values)' if key_id == newest else ''}")
        return 0
    new_id = keyring.rotate()
    with db.connect(db.app_dsn(cfg), autocommit=True) as conn:
        counts = reseal_all(conn, keyring)
    counts["patient key files"] = PatientKeys(keyring).rewrap_all()
    print(f"key {new_id} added; re-sealed: " + ", ".join(f"{t} {n}" for t, n in counts.items()))
    asyncio.run(_audit(cfg, new_id, counts))
    return 0


async def _audit(cfg: Config, key_id: int, counts: dict[str, int]) -> None:
    log = AuditLog(db.app_dsn(cfg), checkpoints=cfg.audit_checkpoints)
    await log.start()
    log.append(AuditRecord(
        ts=dt.datetime.now(dt.UTC), actor=f"cli:{getpass.getuser()}", method="rmiot keys rotate",
        object=f"kek:{key_id}", outcome="ok", source=f"local:{os.getpid()}",
        detail={"resealed": counts}))
    await log.stop()
