"""The registry's write side, as plain functions over a database connection:
devices, device keys and lifecycle state. The gRPC RegistryService
and the import tools are built on these; the ingest path only reads
(``registry.view``). Every change is announced to the views by the triggers of
migrations 0002 and 0007.

These are the low-level primitives (no validation beyond the database's);
``registry.devices``, ``registry.lifecycle`` and ``registry.bindings`` check
every field and say what is wrong. Every error is a ``RegistryError`` whose
``code`` tells callers (the gRPC service) what kind of refusal it is.
"""

from __future__ import annotations

import secrets
from typing import Any

import psycopg

from rmiot.security.sealed import device_key_aad
from rmiot.security.sm4 import Keyring

ALGORITHMS = {"hmac-sha256": 1, "hmac-sm3": 2}


INVALID, NOT_FOUND, EXISTS, PRECONDITION = "invalid", "not_found", "exists", "precondition"


class RegistryError(Exception):
    """A registry request that cannot be carried out; the message says why.

    ``code``: ``invalid`` (a field is wrong), ``not_found`` (no such object
    in the caller's reach), ``exists`` (a unique value is taken) or
    ``precondition`` (the object's state does not allow it)."""

    def __init__(self, message: str, code: str = INVALID) -> None:
        super().__init__(message)
        self.code = code


def register_device(conn: psycopg.Connection[Any], tenant_id: int, *, udi: str | None = None,
                    serial_no: str | None = None, state: str = "active",
                    auth_required: bool | None = None, device_id: int | None = None) -> int:
    """Add a device to a tenant; returns its platform id (1 .. 2^63-1)."""
    if device_id is None:
        got = conn.execute("SELECT nextval('device_id_seq')").fetchone()
        assert got is not None
        device_id = int(got[0])
    conn.execute("INSERT INTO devices (id, tenant_id, udi, serial_no, state, auth_required) "
                 "VALUES (%s, %s, %s, %s, %s, %s)",
                 (device_id, tenant_id, udi, serial_no, state, auth_required))
    return device_id


def add_key(conn: psycopg.Connection[Any], keyring: Keyring, device_id: int,
            algorithm: str = "hmac-sha256", key: bytes | None = None) -> tuple[int, bytes]:
    """Give a device a new HMAC key (sealed at rest); returns (version, key).

    The key is returned once, to be handed to the device; the platform keeps
    only the sealed copy."""
    if algorithm not in ALGORITHMS:
        raise RegistryError(f"algorithm must be one of {', '.join(ALGORITHMS)}")
    key = key if key is not None else secrets.token_bytes(32)
    row = conn.execute("SELECT coalesce(max(version), 0) + 1 FROM device_keys "
                       "WHERE device_id = %s", (device_id,)).fetchone()
    assert row is not None
    version = int(row[0])
    conn.execute("INSERT INTO device_keys (device_id, version, alg, key_enc) "
                 "VALUES (%s, %s, %s, %s)",
                 (device_id, version, ALGORITHMS[algorithm],
                  keyring.seal(key, device_key_aad(device_id))))
    return version, key


def revoke_keys(conn: psycopg.Connection[Any], device_id: int) -> int:
    """Revoke every key of a device now; returns how many were revoked."""
    cur = conn.execute("UPDATE device_keys SET revoked_at = now() "
                       "WHERE device_id = %s AND revoked_at IS NULL", (device_id,))
    return cur.rowcount


def set_state(conn: psycopg.Connection[Any], device_id: int, state: str) -> None:
    """Move a device to ``state``. Migration 0007's triggers refuse a move the
    lifecycle does not allow and record it (actor ``db:<role>`` unless the
    transaction set one: ``registry.lifecycle.transition`` does)."""
    try:
        cur = conn.execute("UPDATE devices SET state = %s, updated_at = now() WHERE id = %s",
                           (state, device_id))
    except psycopg.errors.CheckViolation as exc:
        raise RegistryError(exc.diag.message_primary or str(exc), PRECONDITION) from None
    if cur.rowcount != 1:
        raise RegistryError(f"device {device_id} does not exist", NOT_FOUND)
