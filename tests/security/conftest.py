"""Fixtures for the audit chain: an emptied chain per test, and a fault proxy
in front of the database's unix socket (absent = database unreachable; it can
cut every connection at once)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from rmiot import db
from rmiot.config import Config
from rmiot.security.audit import GENESIS, AuditRecord

BASE_TS = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)


def make_record(i: int, actor: str = "alice", ts: datetime | None = None) -> AuditRecord:
    """The i-th record of a test chain: every field set, values varying with i."""
    return AuditRecord(
        ts=ts or BASE_TS + timedelta(microseconds=137 * i),
        actor=actor, role="doctor" if i % 4 else None, tenant_id=1000 + i % 3 if i % 5 else None,
        method="/rmiot.QueryService/Latest", object=f"device:{i}",
        outcome="ok" if i % 7 else "denied", source=f"ipv4:10.0.{i % 250}.1",
        request_id=f"{actor}-{i}", detail={"i": i, "rows": i % 13, "ratio": i / 8},
        patient=f"P{i % 11:04d}" if i % 2 else None)


@pytest.fixture
def chain(admin_dsn: str, database: str) -> str:
    """An empty chain (genesis head); yields the application's DSN."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE audit_log")
        conn.execute("UPDATE audit_head SET last_id = 0, last_hash = %s, count = 0", (GENESIS,))
    return database


@pytest.fixture
def checkpoint_file(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "checkpoints.jsonl"


class SocketProxy:
    """A unix-socket forwarder named like PostgreSQL's socket in a directory of
    its own: a DSN with ``host=<directory>`` reaches the database through it
    while it listens, and finds nothing when it does not.

    ``cut()`` aborts every connection at once. ``lose_commit_replies = n``
    makes the next n COMMITs reach the server while their replies never reach
    the client, whose connection then dies: a commit of unknown outcome."""

    def __init__(self, target: str, directory: Path, port: int) -> None:
        self.target = target
        self.path = directory / f".s.PGSQL.{port}"
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0
        self.lose_commit_replies = 0
        self.commit_replies_lost = 0

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
            self.path.unlink(missing_ok=True)
        self.cut()
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def cut(self) -> None:
        """Abort every proxied connection (both sides) at once."""
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers.update((writer, up_writer))
        replies = asyncio.Event()  # cleared: the server's replies are swallowed
        replies.set()
        pipes = [asyncio.create_task(self._upstream(reader, up_writer, replies)),
                 asyncio.create_task(self._downstream(up_reader, writer, replies))]
        self.tasks.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipes:
                task.cancel()
                self.tasks.discard(task)
            for w in (writer, up_writer):
                w.transport.abort()
                self.writers.discard(w)

    async def _upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        replies: asyncio.Event) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                losing = self.lose_commit_replies > 0 and b"COMMIT\x00" in data
                if losing:
                    self.lose_commit_replies -= 1
                    replies.clear()
                writer.write(data)
                await writer.drain()
                if losing:
                    await asyncio.sleep(0.2)  # the server commits meanwhile
                    self.commit_replies_lost += 1
                    return  # ends the connection

    @staticmethod
    async def _downstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          replies: asyncio.Event) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if replies.is_set():
                    writer.write(data)
                    await writer.drain()


@pytest.fixture
def proxy_dir() -> Iterator[Path]:
    # Short: a unix socket path must fit in 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="rmiot-audit-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def db_proxy(base_cfg: Config, chain: str, proxy_dir: Path) -> AsyncIterator[SocketProxy]:
    """A stopped proxy to the private cluster (start it to let connections through)."""
    if not base_cfg.database.private:
        pytest.skip("the fault proxy forwards the private cluster's unix socket")
    port = int(conninfo_to_dict(chain).get("port") or base_cfg.database.port)
    target = str(Path(db.socket_dir(base_cfg)) / f".s.PGSQL.{port}")
    proxy = SocketProxy(target, proxy_dir, port)
    yield proxy
    await proxy.stop()


def via(dsn: str, directory: Path) -> str:
    """The same DSN, reaching the server through the socket in ``directory``."""
    return make_conninfo(dsn, host=str(directory), connect_timeout=2)
