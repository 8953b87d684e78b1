"""Device transport credentials: the user name and password a device logs in
with over MQTT (the broker checks them), HTTP (Basic) and CoAP (the query).

``issue`` makes a credential for a device and returns ``(username, password)``:
the password is shown once, only its hash is stored (migration 0012). A device
may hold several; ``revoke`` ends one or all of a device's at once, and every
ingest process and the broker's password file follow within a second
(NOTIFY on ``rmiot_transport_credentials``). ``verify`` maps a login to its
device id, or None.

Hash format: Mosquitto 2's PBKDF2-SHA512, ``$7$<iterations>$<salt>$<hash>``
with a 12-byte salt and a 64-byte key, both standard base64 — byte for byte
what ``mosquitto_passwd`` writes, so the broker reads the same string the
platform checks. The iteration count is Mosquitto's default, 101: the secret is
32 random bytes (256 bits), which no amount of guessing reaches, so stretching
would buy nothing but CPU per login; the hash only keeps the token itself out
of the database and the broker's files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

import psycopg

from rmiot.registry.store import EXISTS, NOT_FOUND, RegistryError

CHANNEL = "rmiot_transport_credentials"
ITERATIONS = 101
SALT_LEN = 12
KEY_LEN = 64  # SHA-512's output, the whole of it
MAX_ITERATIONS = 1_000_000
# The platform's own broker logins (broker.platform_user) start so; no device's may.
RESERVED_PREFIX = "rmiot-"
USERNAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_HASH = re.compile(r"^\$7\$([0-9]+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")


@dataclass(frozen=True, slots=True)
class Login:
    """One live credential, as the broker's files and the login view need it."""

    username: str
    device_id: int
    password_hash: str


def hash_password(password: str, *, salt: bytes | None = None,
                  iterations: int = ITERATIONS) -> str:
    """The Mosquitto PBKDF2-SHA512 string for ``password``."""
    salt = secrets.token_bytes(SALT_LEN) if salt is None else salt
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def check_password(password: str, password_hash: str) -> bool:
    """True when ``password`` matches the Mosquitto hash (constant time)."""
    match = _HASH.match(password_hash)
    if match is None:
        return False
    try:
        salt = base64.b64decode(match[2], validate=True)
        want = base64.b64decode(match[3], validate=True)
    except binascii.Error:
        return False
    iterations = int(match[1])
    if len(want) != KEY_LEN or not 1 <= iterations <= MAX_ITERATIONS:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return hmac.compare_digest(got, want)


def issue(conn: psycopg.Connection[Any], device_id: int,
          username: str | None = None) -> tuple[str, str]:
    """A new credential for the device; returns (username, password), the
    password shown this once. The default user name is ``d<id>-<8 hex>``; a
    chosen one may not start with ``rmiot-`` (the platform's own logins)."""
    if username is None:
        username = f"d{device_id}-{secrets.token_hex(4)}"
    elif not USERNAME.match(username):
        raise RegistryError("username: 1-64 of letters, digits, '.', '_', '-'")
    elif username.startswith(RESERVED_PREFIX):
        raise RegistryError(f"username: {RESERVED_PREFIX}... is the platform's own")
    password = secrets.token_urlsafe(32)
    try:
        cur = conn.execute(
            "INSERT INTO transport_credentials (device_id, username, password_hash) "
            "SELECT id, %s, %s FROM devices WHERE id = %s",
            (username, hash_password(password), device_id))
    except psycopg.errors.UniqueViolation:
        raise RegistryError(f"username {username!r} is taken", EXISTS) from None
    if cur.rowcount != 1:
        raise RegistryError(f"device {device_id} does not exist", NOT_FOUND)
    return username, password


def verify(conn: psycopg.Connection[Any], username: str, password: str) -> int | None:
    """The device id a live credential belongs to, or None."""
    row = conn.execute("SELECT device_id, password_hash FROM transport_credentials "
                       "WHERE username = %s AND revoked_at IS NULL", (username,)).fetchone()
    if row is None or not check_password(password, row[1]):
        return None
    return int(row[0])


def revoke(conn: psycopg.Connection[Any], *, username: str | None = None,
           device_id: int | None = None) -> int:
    """Revoke one credential (by user name; with ``device_id`` too, only if it
    is that device's) or all of a device's; returns how many were live."""
    if username is None and device_id is None:
        raise RegistryError("revoke: give a username, a device id or both")
    cur = conn.execute("UPDATE transport_credentials SET revoked_at = now() "
                       "WHERE (%(user)s::text IS NULL OR username = %(user)s) "
                       "AND (%(device)s::bigint IS NULL OR device_id = %(device)s) "
                       "AND revoked_at IS NULL", {"user": username, "device": device_id})
    return cur.rowcount


LIVE_SQL = ("SELECT username, device_id, password_hash FROM transport_credentials "
            "WHERE revoked_at IS NULL")


def live(conn: psycopg.Connection[Any]) -> list[Login]:
    """Every credential not revoked, ordered by user name."""
    rows = conn.execute(LIVE_SQL + " ORDER BY username").fetchall()
    return [Login(name, int(device), hashed) for name, device, hashed in rows]
