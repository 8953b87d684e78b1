"""LoginView: the devices' transport credentials in memory, for the adapters
that check a login themselves (HTTP Basic, the CoAP query; the broker checks
MQTT's).

Loaded at start, then kept by NOTIFY on ``rmiot_transport_credentials``
(migration 0012) through ``rmiot.db.ChangeFollower``: a revoked login fails on
the next request of every ingest process, typically within milliseconds.

``verify(username, password)`` is the device id or None. The stored hash is
PBKDF2 (see ``registry.transport_credentials``); a login proven once is
remembered as a SHA-256 of its password, so a device's later requests cost one
hash, not a PBKDF2 run. A change to that login forgets it. Fails closed: an
unknown user name, a revoked login or a wrong password are all None.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import psycopg

from rmiot.db import ChangeFollower
from rmiot.registry.transport_credentials import CHANNEL, LIVE_SQL, Login, check_password


class LoginView(ChangeFollower):
    channels = (CHANNEL,)
    name = "login view"

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self.logins: dict[str, Login] = {}
        self._proven: dict[str, bytes] = {}

    def verify(self, username: str, password: str) -> int | None:
        login = self.logins.get(username)
        if login is None:
            return None
        digest = hashlib.sha256(password.encode()).digest()
        proven = self._proven.get(username)
        if proven is not None and hmac.compare_digest(proven, digest):
            return login.device_id
        if not check_password(password, login.password_hash):
            return None
        self._proven[username] = digest
        return login.device_id

    async def load_all(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cur = await conn.execute(LIVE_SQL)
        self.logins = {name: Login(name, int(device), hashed)
                       for name, device, hashed in await cur.fetchall()}
        self._proven = {}

    async def apply(self, conn: psycopg.AsyncConnection[Any],
                    notes: list[psycopg.Notify]) -> None:
        names = {n.payload.partition(":")[2] for n in notes}
        if "*" in names:
            await self.load_all(conn)
            return
        cur = await conn.execute(LIVE_SQL + " AND username = ANY(%s)", (list(names),))
        found = {name: Login(name, int(device), hashed)
                 for name, device, hashed in await cur.fetchall()}
        for name in names:
            self._proven.pop(name, None)
            if name in found:
                self.logins[name] = found[name]
            else:
                self.logins.pop(name, None)
