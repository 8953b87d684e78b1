"""Database access shared by every package: where the database is, and how to
connect to it (one connection, or an async pool).

With no ``database.dsn`` the platform uses its private cluster (see
``rmiot.deploy.cluster``): the application connects over the cluster's unix
socket as the unprivileged role ``rmiot_app``; migrations and cluster
administration use the superuser. With ``database.dsn`` (``RMIOT_DSN``) the
platform uses that server; ``database.admin_dsn`` (default: the same DSN) runs
migrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

from rmiot.config import Config, ConfigError
from rmiot.deploy import topology

log = logging.getLogger("rmiot.db")

SUPERUSER = "postgres"
# The unprivileged role the platform connects as (migration 0001 grants its rights).
APP_ROLE = "rmiot_app"


def socket_dir(cfg: Config) -> str:
    """The private cluster's socket directory, symlinks resolved: the server,
    running as another user, may not be able to pass through the checkout."""
    return str((cfg.data_dir / "pg").resolve() / "run")


def app_dsn(cfg: Config, dbname: str | None = None) -> str:
    """DSN for the platform's own connections."""
    db = cfg.database
    if db.dsn:
        return with_database(db.dsn, dbname)
    # Every node of the private cluster (primary first; with a replica, libpq
    # finds the read-write one, so a failover needs no change of DSN).
    return make_conninfo(**topology.endpoints(cfg), dbname=dbname or db.name, user=APP_ROLE,
                         connect_timeout=int(max(1, db.connect_timeout_s)),
                         application_name="rmiot")


def admin_dsn(cfg: Config, dbname: str | None = None) -> str:
    """DSN for migrations and administration (superuser on the private cluster)."""
    db = cfg.database
    if db.admin_dsn or db.dsn:
        return with_database(db.admin_dsn or db.dsn, dbname)
    return make_conninfo(**topology.endpoints(cfg), dbname=dbname or db.name, user=SUPERUSER,
                         connect_timeout=int(max(1, db.connect_timeout_s)),
                         application_name="rmiot-admin")


def read_dsn(cfg: Config, dbname: str | None = None) -> str:
    """DSN for read-only queries that accept a standby's lag: ``database.read_dsn``
    with an external server (else the primary's DSN), else every node of the
    private cluster, a standby first."""
    db = cfg.database
    if db.dsn:
        return with_database(db.read_dsn or db.dsn, dbname)
    return make_conninfo(**topology.read_endpoints(cfg), dbname=dbname or db.name,
                         user=APP_ROLE, connect_timeout=int(max(1, db.connect_timeout_s)),
                         application_name="rmiot-read")


# How far behind its primary the server answering may be, in seconds: 0 for a
# primary, or a standby streaming with everything it received replayed; else
# the age of the last transaction it replayed (infinity when it has none).
STALENESS_SQL = (
    b"SELECT CASE WHEN NOT pg_is_in_recovery() THEN 0.0 "
    b"WHEN (SELECT status FROM pg_stat_wal_receiver) = 'streaming' "
    b" AND pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0.0 "
    b"ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8, "
    b"'Infinity'::float8) END, pg_is_in_recovery()")


def with_database(dsn: str, dbname: str | None) -> str:
    """The same DSN naming another database (unchanged when dbname is None)."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"database.dsn is not a valid PostgreSQL DSN: {exc}") from None
    if dbname:
        parts["dbname"] = dbname
    parts.setdefault("connect_timeout", 5)
    return make_conninfo("", **parts)


def describe(dsn: str) -> str:
    """host:port/dbname of a DSN, for messages (never the password)."""
    parts = conninfo_to_dict(dsn)
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


def connect(dsn: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """One connection, with a clear error naming the endpoint when it fails."""
    try:
        return psycopg.connect(dsn, **kwargs)
    except psycopg.OperationalError as exc:
        raise DatabaseUnreachable(dsn, exc) from None


async def open_pool(dsn: str, min_size: int, max_size: int) -> AsyncConnectionPool:
    """An async pool, opened and checked (fails fast with DatabaseUnreachable)."""
    # Autocommit: every piece of code that needs a transaction says so explicitly.
    # check: a connection broken by a failover is replaced before it is handed out.
    pool = AsyncConnectionPool(dsn, min_size=min_size, max_size=max_size, open=False,
                               name="rmiot", kwargs={"autocommit": True},
                               check=AsyncConnectionPool.check_connection)
    try:
        await pool.open(wait=True, timeout=10)
    except Exception as exc:
        await pool.close()
        raise DatabaseUnreachable(dsn, exc) from None
    return pool


class DatabaseUnreachable(Exception):
    """The database could not be reached; the message names the endpoint."""

    def __init__(self, dsn: str, cause: BaseException) -> None:
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(f"cannot reach the database at {describe(dsn)}: {reason}")


class ChangeFollower:
    """Base of the in-memory views kept fresh by LISTEN/NOTIFY (the registry's
    device view, the Authorizer).

    Two connections: one LISTENs (it cannot run queries while it waits for
    notifications), the other re-reads. LISTEN comes before the full load, so a
    change committed in between is both loaded and notified (harmless), never
    missed. A burst of notifications is drained and handed over in one call.
    When the connection is lost the view keeps what it has, reconnects with
    backoff (0.1 s to 1 s) and loads everything again; before the first load, a
    database that is not there is retried a few times, then reported.

    Subclasses set ``channels`` and ``name`` and implement ``load_all`` and
    ``apply``.
    """

    channels: tuple[str, ...] = ()
    name = "view"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def load_all(self, conn: psycopg.AsyncConnection[Any]) -> None:
        raise NotImplementedError

    async def apply(self, conn: psycopg.AsyncConnection[Any],
                    notes: list[psycopg.Notify]) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        """Load everything and keep following; returns once loaded."""
        self._task = asyncio.create_task(self._follow(), name=self.name)
        waiter = asyncio.create_task(self._ready.wait())
        done, _ = await asyncio.wait({self._task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            waiter.cancel()
            self._task.result()  # raises the reason it could not load

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _follow(self) -> None:
        delay = 0.1
        while True:
            try:
                listen = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
                query = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
                async with listen, query:
                    for channel in self.channels:
                        await listen.execute(f"LISTEN {channel}".encode())
                    await self.load_all(query)
                    self._ready.set()
                    delay = 0.1
                    while True:
                        notes = [n async for n in listen.notifies(stop_after=1)]
                        notes += [n async for n in listen.notifies(timeout=0.0)]
                        if notes:
                            await self.apply(query, notes)
            except psycopg.Error as exc:
                lost = isinstance(exc, psycopg.OperationalError)
                if not self._ready.is_set() and (delay > 2 or not lost):
                    raise
                log.warning(f"{self.name} lost its database connection; keeping what it has "
                            "and retrying" if lost else f"{self.name} could not re-read; "
                            "keeping what it has and retrying",
                            extra={"error": str(exc).strip(), "retry_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
