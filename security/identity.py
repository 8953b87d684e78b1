"""People's identities: users, login with lockout and TOTP, password changes.

Login (``login``), in one transaction on the user's row:
1. unknown or disabled user, or wrong password: "invalid user name or
   password" (the same words either way, so names cannot be probed);
2. ``lockout_attempts`` failures in a row lock the account for
   ``lockout_minutes``; while locked every attempt is refused as LOCKED;
3. a user who holds an administrator role (``requires_totp``) must also give
   a valid TOTP code (RFC 6238, 30 s, one step of drift), and must have been
   enrolled by the security administrator; a wrong code counts as a failure;
4. success resets the failures, ends the user's other session (one active
   session per user) and starts a new one. When the password is older than
   ``password_max_age_days`` (or was set by an administrator) the session may
   only change the password.
The caller audits every outcome (``LoginError.code`` says which).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import pyotp

from rmiot.config import SecurityConfig
from rmiot.security import passwords
from rmiot.security.sealed import totp_aad
from rmiot.security.sessions import SessionInfo, new_token, token_hash
from rmiot.security.sm4 import Keyring

ADMIN_ROLES = frozenset({"system_admin", "security_admin", "audit_admin", "commission_admin",
                         "hospital_admin"})
BAD_CREDENTIALS = "invalid user name or password"


class LoginError(Exception):
    """A refused login. ``code``: BAD_CREDENTIALS, LOCKED, TOTP_REQUIRED, TOTP_NOT_ENROLLED."""

    def __init__(self, code: str, message: str, user_id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.user_id = user_id


@dataclass(frozen=True)
class LoginResult:
    token: str
    session: SessionInfo


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def create_user(conn: psycopg.AsyncConnection[Any], username: str, password: str,
                      tenant_id: int | None, display_name: str = "",
                      must_change: bool = True) -> int:
    """Add a user (the password must meet the policy); returns the user id."""
    passwords.check_policy(password, username)
    hashed = await asyncio.to_thread(passwords.hash_password, password)
    cur = await conn.execute(
        "INSERT INTO users (username, display_name, tenant_id, password_hash, "
        "must_change_password) VALUES (%s, %s, %s, %s, %s) RETURNING id",
        (username, display_name, tenant_id, hashed, must_change))
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def enroll_totp(conn: psycopg.AsyncConnection[Any], keyring: Keyring,
                      user_id: int) -> str:
    """Give a user a new TOTP secret (sealed at rest); returns it once, base32."""
    secret = pyotp.random_base32()
    await conn.execute("UPDATE users SET totp_secret_enc = %s WHERE id = %s",
                       (keyring.seal(secret.encode(), totp_aad(user_id)), user_id))
    return secret


async def login(conn: psycopg.AsyncConnection[Any], cfg: SecurityConfig, keyring: Keyring,
                username: str, password: str, totp_code: str, source: str,
                requires_totp: Callable[[str], bool]) -> LoginResult:
    # A refusal is raised after the transaction commits: the failure count must stay.
    async with conn.transaction():
        outcome = await _login(conn, cfg, keyring, username, password, totp_code, source,
                               requires_totp)
    if isinstance(outcome, LoginError):
        raise outcome
    return outcome


async def _login(conn: psycopg.AsyncConnection[Any], cfg: SecurityConfig, keyring: Keyring,
                 username: str, password: str, totp_code: str, source: str,
                 requires_totp: Callable[[str], bool]) -> LoginResult | LoginError:
    cur = await conn.execute(
        "SELECT id, tenant_id, password_hash, password_changed_at, must_change_password, "
        "failed_logins, locked_until, totp_secret_enc, enabled "
        "FROM users WHERE username = %s FOR UPDATE", (username,))
    row = await cur.fetchone()
    if row is None:
        # Spend the same time as a real check so timing does not reveal names.
        await asyncio.to_thread(passwords.verify_password, password, _dummy_hash())
        return LoginError("BAD_CREDENTIALS", BAD_CREDENTIALS)
    (user_id, tenant_id, stored, changed_at, must_change, failures, locked_until,
     totp_enc, enabled) = row
    now = _now()
    if locked_until is not None and locked_until > now:
        return LoginError("LOCKED", f"account locked until {locked_until:%Y-%m-%d %H:%M} UTC",
                          user_id)
    ok = enabled and await asyncio.to_thread(passwords.verify_password, password, stored)
    if ok and requires_totp(username):
        if totp_enc is None:
            return LoginError("TOTP_NOT_ENROLLED", "this account needs a TOTP second factor; "
                              "ask the security administrator to enrol it", user_id)
        secret = keyring.open(bytes(totp_enc), totp_aad(user_id)).decode()
        if not (totp_code and pyotp.TOTP(secret).verify(totp_code, valid_window=1)):
            await _failed(conn, cfg, user_id, failures)
            return LoginError("TOTP_REQUIRED", "a valid TOTP code is required", user_id)
    if not ok:
        locked = await _failed(conn, cfg, user_id, failures)
        return LoginError("LOCKED" if locked else "BAD_CREDENTIALS",
                          "account locked after repeated failures" if locked
                          else BAD_CREDENTIALS, user_id)
    await conn.execute("UPDATE users SET failed_logins = 0, locked_until = NULL "
                       "WHERE id = %s", (user_id,))
    await conn.execute("UPDATE sessions SET ended_at = now(), end_reason = 'replaced' "
                       "WHERE user_id = %s AND ended_at IS NULL", (user_id,))
    token = new_token()
    await conn.execute("INSERT INTO sessions (token_hash, user_id, source) "
                       "VALUES (%s, %s, %s)", (token_hash(token), user_id, source))
    await conn.execute("SELECT pg_notify('rmiot_sessions', %s)", (f"user:{user_id}",))
    expired = changed_at < now - dt.timedelta(days=cfg.password_max_age_days)
    info = SessionInfo(token_hash(token), user_id, username, tenant_id,
                       password_change_only=bool(must_change or expired), last_seen=now)
    return LoginResult(token, info)


async def _failed(conn: psycopg.AsyncConnection[Any], cfg: SecurityConfig, user_id: int,
                  failures: int) -> bool:
    """Count a failure; True when it locked the account."""
    failures += 1
    locked = failures >= cfg.lockout_attempts
    await conn.execute(
        "UPDATE users SET failed_logins = %s, locked_until = %s WHERE id = %s",
        (0 if locked else failures,
         _now() + dt.timedelta(minutes=cfg.lockout_minutes) if locked else None, user_id))
    return locked


async def change_password(conn: psycopg.AsyncConnection[Any], user_id: int, username: str,
                          old: str, new: str) -> None:
    """Change one's own password (old one required); ends no session."""
    passwords.check_policy(new, username)
    cur = await conn.execute("SELECT password_hash FROM users WHERE id = %s", (user_id,))
    row = await cur.fetchone()
    if row is None or not await asyncio.to_thread(passwords.verify_password, old, row[0]):
        raise LoginError("BAD_CREDENTIALS", "the current password is wrong", user_id)
    if old == new:
        raise passwords.PasswordPolicyError("the new password must differ from the old one")
    hashed = await asyncio.to_thread(passwords.hash_password, new)
    await conn.execute("UPDATE users SET password_hash = %s, password_changed_at = now(), "
                       "must_change_password = false WHERE id = %s", (hashed, user_id))


@functools.cache
def _dummy_hash() -> str:
    return passwords.hash_password(secrets.token_urlsafe(12))
