"""Checkpoints of the audit chain: its head (last id, hash, count) written to a
file outside the database — one JSON object a line, appended and fsynced — so
that a chain rewritten or cut off inside the database is still caught by
``audit_verify.verify``. Keep a copy of the file off the platform's host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson
import psycopg


class AuditIntegrityError(Exception):
    """The chain failed verification where an operation needs it intact."""


class CheckpointFileError(Exception):
    """The checkpoint file cannot be read or has a malformed line."""


@dataclass(frozen=True)
class Checkpoint:
    """One line of the checkpoint file: the chain's record ``id`` had ``hash``."""

    ts: str
    id: int
    hash: bytes
    count: int
    reason: str = ""
    line: int = 0


def checkpoint_line(id: int, hash: bytes, count: int, reason: str) -> bytes:
    now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return orjson.dumps({"ts": now, "id": id, "hash": hash.hex(), "count": count,
                         "reason": reason}) + b"\n"


def append_line(path: Path, line: bytes) -> None:
    """Append one line durably. O_APPEND with a single write keeps lines whole
    when several processes share the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def export_checkpoint(dsn: str, path: Path, reason: str = "manual") -> Checkpoint:
    """Append the chain's current head as a checkpoint line to ``path``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT last_id, last_hash, count FROM audit_head").fetchone()
    if row is None:
        raise AuditIntegrityError("audit_head has no row (migration 0004 not applied?)")
    line = checkpoint_line(row[0], bytes(row[1]), row[2], reason)
    append_line(path, line)
    return _parse_checkpoint(line, 0)


def _parse_checkpoint(line: bytes, number: int) -> Checkpoint:
    data = orjson.loads(line)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    raw = bytes.fromhex(data["hash"])
    if len(raw) != 32:
        raise ValueError("hash is not 32 bytes")
    ident, count = data["id"], data["count"]
    if not isinstance(ident, int) or not isinstance(count, int) or ident < 0:
        raise ValueError("id and count must be non-negative integers")
    return Checkpoint(str(data["ts"]), ident, raw, count, str(data.get("reason", "")), number)


def read_checkpoints(path: Path) -> list[Checkpoint]:
    """Every checkpoint in the file, in file order."""
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise CheckpointFileError(f"cannot read checkpoint file {path}: "
                                  f"{exc.strerror or exc}") from None
    out = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(_parse_checkpoint(line, number))
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointFileError(f"{path} line {number} is not a checkpoint: {exc}") from None
    return out
