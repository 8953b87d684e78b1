"""Server-side sessions: a bearer token per login, found by its SM3 hash.

Each process keeps the sessions it has seen in memory, so checking a token on
an RPC costs a dict lookup, not a query. ``last_seen`` is kept in memory and
written back every few seconds. Sessions end on logout, on a new login of the
same user (one active session per user), and after ``session_idle_minutes``
without use. A login or logout anywhere is announced on channel
``rmiot_sessions`` ('user:<id>'); every process forgets that user's cached
sessions at once, so an ended session is refused everywhere on its next use.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import secrets
from dataclasses import dataclass, replace
from typing import Any

import psycopg

log = logging.getLogger("rmiot.security.sessions")
CHANNEL = "rmiot_sessions"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> bytes:
    return hashlib.new("sm3", token.encode()).digest()


@dataclass(frozen=True)
class SessionInfo:
    token_hash: bytes
    user_id: int
    username: str
    tenant_id: int | None
    password_change_only: bool
    last_seen: dt.datetime


class SessionStore:
    def __init__(self, dsn: str, idle_minutes: int, password_max_age_days: int,
                 flush_interval_s: float = 5.0) -> None:
        self.dsn = dsn
        self.password_max_age_days = password_max_age_days
        self.idle = dt.timedelta(minutes=idle_minutes)
        self.flush_interval_s = flush_interval_s
        self.cache: dict[bytes, SessionInfo] = {}
        self._touched: set[bytes] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        self._tasks = [asyncio.create_task(self._follow(), name="sessions-follow"),
                       asyncio.create_task(self._flush_loop(), name="sessions-flush")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._flush()
        if self._conn is not None:
            await self._conn.close()

    def remember(self, info: SessionInfo) -> None:
        """A session this process just created (login)."""
        self.cache[info.token_hash] = info

    async def resolve(self, token: str) -> SessionInfo | None:
        """The live session of a token, or None (unknown, ended or idle too long)."""
        key = token_hash(token)
        now = dt.datetime.now(dt.UTC)
        info = self.cache.get(key)
        if info is None:
            info = await self._load(key)
            if info is None:
                return None
        if now - info.last_seen > self.idle:
            await self.end(info, "idle")
            return None
        self.cache[key] = replace(info, last_seen=now)
        self._touched.add(key)
        return self.cache[key]

    def clear_password_change(self, info: SessionInfo) -> None:
        """The user changed the password: the session is no longer restricted."""
        current = self.cache.get(info.token_hash)
        if current is not None:
            self.cache[info.token_hash] = replace(current, password_change_only=False)

    async def end(self, info: SessionInfo, reason: str) -> None:
        self.cache.pop(info.token_hash, None)
        async with self._lock:
            assert self._conn is not None
            await self._conn.execute(
                "UPDATE sessions SET ended_at = now(), end_reason = %s "
                "WHERE token_hash = %s AND ended_at IS NULL", (reason, info.token_hash))
            await self._conn.execute("SELECT pg_notify(%s, %s)",
                                     (CHANNEL, f"user:{info.user_id}"))

    async def _load(self, key: bytes) -> SessionInfo | None:
        async with self._lock:
            assert self._conn is not None
            cur = await self._conn.execute(
                "SELECT s.user_id, u.username, u.tenant_id, s.last_seen, "
                "u.must_change_password OR u.password_changed_at < now() - "
                "make_interval(days => %s) "
                "FROM sessions s JOIN users u ON u.id = s.user_id "
                "WHERE s.token_hash = %s AND s.ended_at IS NULL AND u.enabled",
                (self.password_max_age_days, key))
            row = await cur.fetchone()
        if row is None:
            return None
        user_id, username, tenant_id, last_seen, change_only = row
        return SessionInfo(key, user_id, username, tenant_id, bool(change_only), last_seen)

    async def _follow(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.dsn,
                                                                 autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.cache.clear()  # whatever happened while away is reloaded
                    async for note in conn.notifies():
                        user_id = int(note.payload.partition(":")[2])
                        for key, info in list(self.cache.items()):
                            if info.user_id == user_id:
                                self.cache.pop(key, None)
            except psycopg.OperationalError:
                self.cache.clear()
                await asyncio.sleep(1.0)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            with contextlib.suppress(psycopg.OperationalError):
                await self._flush()

    async def _flush(self) -> None:
        touched, self._touched = self._touched, set()
        rows = [(self.cache[k].last_seen, k) for k in touched if k in self.cache]
        if not rows or self._conn is None or self._conn.closed:
            return
        async with self._lock, self._conn.cursor() as cur:
            await cur.executemany("UPDATE sessions SET last_seen = %s "
                                  "WHERE token_hash = %s AND ended_at IS NULL", rows)
