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

from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

from rmiot.config import Config, ConfigError

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
    return make_conninfo(host=socket_dir(cfg), port=db.port, dbname=dbname or db.name,
                         user=APP_ROLE, connect_timeout=int(max(1, db.connect_timeout_s)),
                         application_name="rmiot")


def admin_dsn(cfg: Config, dbname: str | None = None) -> str:
    """DSN for migrations and administration (superuser on the private cluster)."""
    db = cfg.database
    if db.admin_dsn or db.dsn:
        return with_database(db.admin_dsn or db.dsn, dbname)
    return make_conninfo(host=socket_dir(cfg), port=db.port, dbname=dbname or db.name,
                         user=SUPERUSER, connect_timeout=int(max(1, db.connect_timeout_s)),
                         application_name="rmiot-admin")


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
    pool = AsyncConnectionPool(dsn, min_size=min_size, max_size=max_size, open=False,
                               name="rmiot", kwargs={"autocommit": True})
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
