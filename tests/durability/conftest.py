"""Fixtures for durability: a private primary cluster of the test's own, with
WAL archiving on, under a temporary ``data_dir`` on free ports — replicas,
restored and scratch clusters go beside it — stopped and deleted afterwards.
The platform's shared cluster is never touched: these tests kill, promote and
restore servers.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from rmiot import db
from rmiot.config import Config
from rmiot.deploy import backup, cluster, migrate, pgnode, topology
from rmiot.security.sm4 import Keyring
from tests.conftest import free_port


@dataclass
class Site:
    """One platform's database side: its configuration and its primary."""

    cfg: Config
    primary: cluster.Cluster
    keyring: Keyring

    def dsn(self, user: str = db.APP_ROLE) -> str:
        """What ``rmiot.db.app_dsn`` gives once it follows the replication
        topology: every node, the current primary found by libpq."""
        return make_conninfo(**topology.endpoints(self.cfg), dbname=self.cfg.database.name,
                             user=user, connect_timeout=2)

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(db.SUPERUSER), autocommit=True)

    def app(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(), autocommit=True)


@pytest.fixture
def site(base_cfg: Config) -> Iterator[Site]:
    if not base_cfg.database.private:
        pytest.skip("builds private clusters; RMIOT_DSN points at an external server")
    home = Path(tempfile.mkdtemp(prefix="rmiot-durability-"))
    home.chmod(0o755)  # the postgres user must reach its directories below
    cfg = dataclasses.replace(
        base_cfg,
        platform=dataclasses.replace(base_cfg.platform, data_dir=str(home)),
        database=dataclasses.replace(base_cfg.database, port=free_port(),
                                     shared_buffers="128MB"),
        security=dataclasses.replace(base_cfg.security, keyring_dir=str(home / "keys"),
                                     audit_checkpoints=str(home / "audit.jsonl")))
    primary = cluster.Cluster(cfg)
    try:
        primary.init()
        backup.enable(cfg)
        primary.start()
        migrate.migrate(db.admin_dsn(cfg))
        yield Site(cfg, primary, Keyring.load(cfg.keyring_dir))
    finally:
        for data in home.glob("*/data"):
            server = pgnode.Node(cfg, data.parent.name)
            pgnode.stop_now(server)
        shutil.rmtree(home, ignore_errors=True)


def ingest_worker(site: Site, port: int) -> subprocess.Popen[str]:
    """A real ingest process (``rmiot.ingest.worker``) whose DSN lists every node."""
    env = {**os.environ, "RMIOT_DSN": site.dsn(),
           "RMIOT_PLATFORM_DATA_DIR": str(site.cfg.data_dir),
           "RMIOT_SECURITY_KEYRING_DIR": str(site.cfg.keyring_dir),
           "RMIOT_INGEST_TCP_PORT": str(port), "RMIOT_INGEST_BATCH_MAX_ROWS": "200",
           "RMIOT_INGEST_BATCH_MAX_MS": "5", "RMIOT_INGEST_DEVICE_RATE_PER_S": "1000000",
           "RMIOT_INGEST_PROCESSES": "1", "RMIOT_LOG_LEVEL": "error"}
    proc = subprocess.Popen([sys.executable, "-m", "rmiot.ingest.worker"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("PORT "), f"the ingest worker did not start: {line!r}"
    return proc


def stop_worker(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout:
        proc.stdout.close()


def kill_postmaster(server: cluster.Cluster) -> None:
    """kill -9 the server's postmaster: the machine's database dies mid-write."""
    pid = pgnode.postmaster_pid(server)
    assert pid is not None, "the server is not running"
    os.kill(pid, signal.SIGKILL)

