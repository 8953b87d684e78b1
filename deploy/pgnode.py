"""The platform's own PostgreSQL servers beside the one ``rmiot db init`` made
under ``<data_dir>/pg``, how to drive any of them (start, reload, promote,
fence, probe), and the settings file through which each gets its durability
settings.

A *node* is a cluster under ``<data_dir>/<name>`` laid out like the primary's
(``data/``, ``run/`` for the unix socket, ``postgres.log``): ``pg-replica``
(a streaming standby), ``pg-restore-<time>`` (a point-in-time restore),
``pg-drill`` (the scratch cluster of a backup's restore drill). A node is a
copy of the primary (pg_basebackup or a base backup), never an ``initdb``: its
roles and databases came with the copy, so it creates none. It starts like the
primary (``rmiot.conf`` rewritten from ``deploy/postgresql.conf`` with the
node's own port and socket directory) and runs as the same user.

Durability settings — WAL archiving, synchronous standbys, recovery — live in
``<data>/rmiot.durability.conf``, written by ``backup``/``replica`` only and
read through an ``include_if_exists`` line at the end of ``postgresql.conf``
(added here when missing, as ``Cluster.init`` adds the one for ``rmiot.conf``),
so it overrides ``rmiot.conf`` and survives the rewrite of ``rmiot.conf`` at
every start. A base backup copies the file; every copy gets its own at once
(a standby must not wait for a standby of its own; a restored cluster must not
archive into the live archive).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from rmiot import db
from rmiot.config import Config
from rmiot.deploy import cluster, localstate

SETTINGS_FILE = "rmiot.durability.conf"
INCLUDE_LINE = f"include_if_exists = '{SETTINGS_FILE}'"

Setting = str | int | bool


def with_port(cfg: Config, port: int) -> Config:
    """The same configuration for a server on another port."""
    return dataclasses.replace(cfg, database=dataclasses.replace(cfg.database, port=port))


@dataclass
class Node(cluster.Cluster):
    """A copy of the primary under ``<data_dir>/<name>``, on ``cfg.database.port``."""

    name: str = "pg-replica"

    @property
    def root(self) -> Path:
        return (self.cfg.data_dir / self.name).resolve()

    def init(self) -> bool:
        if not self.initialised():
            raise cluster.ClusterError(f"{self.root} holds no cluster")
        return False

    def ensure_database(self, name: str | None = None) -> None:
        """Nothing to create: the roles and databases came with the copy."""

    def prepare(self) -> Path:
        """The node's root, created empty for a copy (owned by the server's user)."""
        root = localstate.state_dir(self.cfg, self.name, self.user)
        if (root / "data").exists():
            raise cluster.ClusterError(f"{root / 'data'} exists: drop that node first")
        return root


def node_for(cfg: Config, name: str, port: int) -> cluster.Cluster:
    """The server ``name`` (``pg`` is the primary's directory) on ``port``."""
    if name == "pg":
        return cluster.Cluster(with_port(cfg, port))
    return Node(with_port(cfg, port), name)


def dsn(server: cluster.Cluster, dbname: str = "postgres", user: str = db.SUPERUSER,
        **extra: str | int) -> str:
    """A DSN reaching ``server`` over its unix socket."""
    params: dict[str, Any] = {"host": str(server.root / "run"), "port": server.cfg.database.port,
                              "dbname": dbname, "user": user, "connect_timeout": 3, **extra}
    return make_conninfo("", **params)


def read_settings(server: cluster.Cluster) -> dict[str, str]:
    """The node's durability settings as written (values unquoted)."""
    path = server.data / SETTINGS_FILE
    found: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                key, value = (part.strip() for part in line.split("=", 1))
                found[key] = value[1:-1].replace("''", "'")
    return found


def update_settings(server: cluster.Cluster, changes: dict[str, Setting | None]) -> None:
    """Set (or, with None, remove) durability settings, keeping the others;
    they apply at the next reload or start."""
    settings: dict[str, str] = read_settings(server)
    for key, value in changes.items():
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = ("on" if value else "off") if isinstance(value, bool) else str(value)
    lines = ["# rmiot durability settings, written by rmiot backup / rmiot db replica.",
             *(f"{key} = '{value.replace(chr(39), chr(39) * 2)}'"
               for key, value in sorted(settings.items()))]
    path = server.data / SETTINGS_FILE
    path.write_text("\n".join(lines) + "\n")
    localstate.chown(server.user, path)
    conf = server.data / "postgresql.conf"
    text = conf.read_text()
    if INCLUDE_LINE not in text:
        conf.write_text(text.rstrip("\n") + f"\n{INCLUDE_LINE}\n")


def pg_ctl(server: cluster.Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """``pg_ctl -D <data> ARGS`` as the server's user."""
    return localstate.run_as(server.user, [str(cluster.PG_BIN / "pg_ctl"), "-D",
                                           str(server.data), *args])


def reload(server: cluster.Cluster) -> None:
    out = pg_ctl(server, "reload")
    if out.returncode != 0:
        raise cluster.ClusterError(f"pg_ctl reload failed: {out.stderr.strip()}")


def restart(server: cluster.Cluster) -> None:
    """Restart a running server (fast: sessions end; clients reconnect)."""
    server.stop()
    server.start()


def promote(server: cluster.Cluster, timeout_s: int = 30) -> None:
    out = pg_ctl(server, "-w", "-t", str(timeout_s), "promote")
    if out.returncode != 0:
        raise cluster.ClusterError(f"pg_ctl promote failed: "
                                   f"{out.stderr.strip() or out.stdout.strip()}")


def postmaster_pid(server: cluster.Cluster) -> int | None:
    """The postmaster's pid while it runs, else None."""
    try:
        pid = int((server.data / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def stop_now(server: cluster.Cluster) -> None:
    """Stop at once (immediate mode; SIGKILL when pg_ctl cannot): a fence, not a shutdown."""
    if not server.running():
        return
    out = pg_ctl(server, "-m", "immediate", "-w", "-t", "10", "stop")
    pid = postmaster_pid(server)
    if out.returncode != 0 and pid is not None:
        os.kill(pid, signal.SIGKILL)


def fence_stop(server: cluster.Cluster, timeout_s: int = 10) -> None:
    """Stop a server that must not take writes any more: fast (its standbys
    receive the WAL written so far), at once when that does not finish in time."""
    if not server.running():
        return
    out = pg_ctl(server, "-m", "fast", "-w", "-t", str(timeout_s), "stop")
    if out.returncode != 0:
        stop_now(server)


def in_recovery(server: cluster.Cluster) -> bool | None:
    """True for a standby, False for a primary, None when it does not answer."""
    try:
        with psycopg.connect(dsn(server), autocommit=True) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    except psycopg.Error:
        return None
    return bool(row[0]) if row else None


def wait_until(check: Callable[[], object], timeout_s: float, what: str,
               interval_s: float = 0.1) -> None:
    """Poll ``check()`` until true; ClusterError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise cluster.ClusterError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def remove(server: cluster.Cluster) -> None:
    """Stop a node and delete its directory (and the link to it, if any); not
    for ``pg``, whose directory also keeps the application role's password."""
    stop_now(server)
    link = server.cfg.data_dir / server.root.name
    shutil.rmtree(server.root, ignore_errors=True)
    if link.is_symlink():
        link.unlink()
