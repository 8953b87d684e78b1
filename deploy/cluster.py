"""The private TimescaleDB cluster: ``rmiot db init|start|stop|status``.

Layout under ``<data_dir>/pg`` (see ``localstate`` for who owns it)::

    data/        the cluster (initdb); data/rmiot.conf is rewritten from
                 deploy/postgresql.conf at every start
    run/         the unix socket directory (mode 0770)
    postgres.log the server log
    app.password the password of the application role for loopback TCP clients

The server listens on the unix socket and on ``database.host:database.port``
(loopback by default). Local socket connections are trusted (the socket
directory is private); TCP connections need a password (scram-sha-256).
"""

from __future__ import annotations

import logging
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from rmiot import db
from rmiot.config import Config
from rmiot.deploy import localstate

log = logging.getLogger("rmiot.db")

PG_BIN = Path("/usr/lib/postgresql/15/bin")
TEMPLATE = Path(__file__).with_name("postgresql.conf")


class ClusterError(Exception):
    """The private cluster could not be set up or started; the message says why."""


@dataclass
class Cluster:
    cfg: Config

    def __post_init__(self) -> None:
        self.user = localstate.service_user("postgres")

    @property
    def root(self) -> Path:
        # Resolved: the server may reach its state only by the real path.
        return (self.cfg.data_dir / "pg").resolve()

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "postgres.log"

    def _pg(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        return localstate.run_as(self.user, [str(PG_BIN / tool), *args])

    def initialised(self) -> bool:
        return (self.data / "PG_VERSION").is_file()

    def init(self) -> bool:
        """Create the cluster if it does not exist; True when it was created."""
        if self.cfg.database.dsn:
            raise ClusterError("database.dsn is set: the platform uses that server, "
                               "not a private cluster")
        root = localstate.state_dir(self.cfg, "pg", self.user)
        if self.initialised():
            return False
        control = Path("/usr/share/postgresql/15/extension/timescaledb.control")
        if not control.is_file():
            raise ClusterError("the TimescaleDB extension is not installed: "
                               "run deploy/setup-system.sh (make run / make test do)")
        localstate.own(root / "data", self.user)
        out = self._pg("initdb", "-D", str(root / "data"), "-U", db.SUPERUSER, "-E", "UTF8",
                       "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256")
        if out.returncode != 0:
            raise ClusterError(f"initdb failed: {out.stderr.strip() or out.stdout.strip()}")
        with (root / "data" / "postgresql.conf").open("a") as fh:
            fh.write("\ninclude_if_exists = 'rmiot.conf'\n")
        log.info("initialised private cluster", extra={"data": str(root / "data")})
        return True

    def running(self) -> bool:
        if not self.initialised():
            return False
        return self._pg("pg_ctl", "-D", str(self.data), "status").returncode == 0

    def start(self) -> bool:
        """Start the cluster (initialising it first); True when it was started now."""
        self.init()
        if self.running():
            self.ensure_database()
            return False
        dbc = self.cfg.database
        run = localstate.own(self.root / "run", self.user, 0o770)
        conf = TEMPLATE.read_text().format(
            listen=dbc.host, port=dbc.port, socket_dir=run, shared_buffers=dbc.shared_buffers)
        (self.data / "rmiot.conf").write_text(conf)
        self.logfile.touch()
        localstate.chown(self.user, self.data / "rmiot.conf", self.logfile)
        if localstate.port_open(dbc.host, dbc.port):
            raise ClusterError(f"cannot start the private cluster: {dbc.host}:{dbc.port} is "
                               "already in use (set database.port or RMIOT_DATABASE_PORT)")
        out = self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w",
                       "-t", "60", "start")
        if out.returncode != 0:
            tail = self.logfile.read_text(errors="replace").strip().splitlines()[-5:]
            tail += out.stderr.strip().splitlines()[-3:]
            raise ClusterError("the private cluster did not start:\n  " + "\n  ".join(tail))
        log.info("private cluster started", extra={"port": dbc.port, "socket": str(run)})
        self.ensure_database()
        return True

    def stop(self) -> bool:
        if not self.running():
            return False
        out = self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        if out.returncode != 0:
            raise ClusterError(f"pg_ctl stop failed: {out.stderr.strip()}")
        log.info("private cluster stopped")
        return True

    def ensure_database(self, name: str | None = None) -> None:
        """Create the application role and the database if missing."""
        name = name or self.cfg.database.name
        app = db.APP_ROLE
        with db.connect(db.admin_dsn(self.cfg, "postgres"), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (app,)).fetchone():
                password = secrets.token_urlsafe(24)
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(app), sql.Literal(password)))
                pw_file = self.root / "app.password"
                pw_file.write_text(password + "\n")
                pw_file.chmod(0o600)
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                log.info("created database", extra={"database": name})

    def drop_database(self, name: str) -> None:
        with db.connect(db.admin_dsn(self.cfg, "postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def timescaledb_version(dsn: str) -> str | None:
    """The TimescaleDB extension's version in that database, or None."""
    with db.connect(dsn) as conn:
        row = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
    return row[0] if row else None


def check_reachable(dsn: str) -> None:
    """Raise DatabaseUnreachable naming the endpoint unless a query succeeds."""
    try:
        with db.connect(dsn) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        raise db.DatabaseUnreachable(dsn, exc) from None


def recreate_database(cfg: Config) -> bool:
    """Drop and create ``cfg.database.name`` empty (starting the private
    cluster if needed; True when it was started here). Migrate it next."""
    name = cfg.database.name
    started = False
    if cfg.database.private:
        pg = Cluster(cfg)
        started = pg.start()
        pg.drop_database(name)
        pg.ensure_database()
    else:
        with db.connect(db.admin_dsn(cfg, "postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
    return started
