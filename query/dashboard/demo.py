"""A login for the simulated city (``rmiot run --simulate``), so the dashboard
shows it at once: ``city-viewer``, a commission analyst of the simulated
region (de-identified regional views; not an administrator, so no TOTP). Its
password is new at every start and printed once; the account and its grant
are audited like any other (the grant goes through the Authorizer)."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import psycopg

from rmiot.security import identity, passwords
from rmiot.security.authz import Authorizer

VIEWER = "city-viewer"
ROLE = "commission_analyst"


def _password() -> str:
    # Meets the policy (three classes of characters, 8 or more).
    return f"Sim-{secrets.token_hex(6)}-{secrets.randbelow(90) + 10}"


async def simulation_viewer(dsn: str, authorizer: Authorizer,
                            region_code: str = "sim-city") -> tuple[str, str] | None:
    """(user name, password) for the simulated region; None when it is missing."""
    password = _password()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT id FROM tenants WHERE code = %s", (region_code,))
        row = await cur.fetchone()
        if row is None:
            return None
        region = int(row[0])
        cur = await conn.execute("SELECT id FROM users WHERE username = %s", (VIEWER,))
        found: Any = await cur.fetchone()
        if found is None:
            await identity.create_user(conn, VIEWER, password, region, "Simulated city viewer",
                                       must_change=False)
        else:
            hashed = await asyncio.to_thread(passwords.hash_password, password)
            await conn.execute(
                "UPDATE users SET password_hash = %s, password_changed_at = now(), "
                "must_change_password = false, failed_logins = 0, locked_until = NULL "
                "WHERE id = %s", (hashed, found[0]))
    await authorizer.grant(f"user:{VIEWER}", ROLE, region)
    return VIEWER, password
