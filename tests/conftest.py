"""Shared fixtures: the real private TimescaleDB cluster and Mosquitto broker.

A fixture starts a service only when it is not already running, and stops at
the end only what it started (``RMIOT_TEST_KEEP=1`` leaves them up for the
next run). Tests use their own database, ``<database.name>_test`` (or
``$RMIOT_TEST_DATABASE``, so runs side by side do not collide), dropped and
migrated afresh at the start of each session, so a running platform's data is
never touched. ``RMIOT_DSN`` / ``RMIOT_MQTT_URL`` point the suite at external
servers instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop

# The suite forks subprocesses (rmiot run, rmiot status) while gRPC threads run.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from rmiot import db
from rmiot.config import Config, load
from rmiot.deploy import broker, certs, cluster, migrate


def _keep() -> bool:
    return os.environ.get("RMIOT_TEST_KEEP") == "1"


@pytest.fixture(scope="session")
def base_cfg() -> Config:
    """The configuration the suite runs under (env overrides apply)."""
    cfg = load()
    name = os.environ.get("RMIOT_TEST_DATABASE") or cfg.database.name + "_test"
    return dataclasses.replace(cfg, database=dataclasses.replace(cfg.database, name=name))


@pytest.fixture(scope="session")
def database(base_cfg: Config) -> Iterator[str]:
    """A freshly migrated test database on the real server; yields the app DSN."""
    started = False
    private = cluster.Cluster(base_cfg) if base_cfg.database.private else None
    if private:
        started = private.start()
        private.drop_database(base_cfg.database.name)
        private.ensure_database()
    else:
        with db.connect(db.admin_dsn(base_cfg, "postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{base_cfg.database.name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{base_cfg.database.name}"')
    migrate.migrate(db.admin_dsn(base_cfg))
    yield db.app_dsn(base_cfg)
    if private and started and not _keep():
        private.stop()


@pytest.fixture(scope="session")
def admin_dsn(base_cfg: Config, database: str) -> str:
    return db.admin_dsn(base_cfg)


@pytest.fixture(scope="session")
def mqtt(base_cfg: Config) -> Iterator[tuple[str, int]]:
    """The real broker (private one started if needed); yields (host, port)."""
    started = False
    if base_cfg.broker.private:
        started = broker.Broker(base_cfg).start()
    yield broker.endpoint(base_cfg)
    if started and not _keep():
        broker.Broker(base_cfg).stop()


@pytest.fixture(scope="session")
def dev_certs(base_cfg: Config) -> Config:
    certs.ensure_dev_ca(base_cfg.data_dir / "certs")
    return base_cfg


def pytest_report_header(config: pytest.Config) -> str:
    from tests.core_ext.conftest import twins_line

    return twins_line()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests.core_ext.conftest import twins_line

    terminalreporter.write_line(twins_line())


def pytest_asyncio_loop_factories(config: pytest.Config,
                                   item: pytest.Item) -> dict[str, Any]:
    """Protocol code (tests/ingest) runs on the stock loop and on uvloop, production's."""
    if item.path.parent.name == "ingest":
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


async def eventually(condition: Callable[[], object], timeout: float,
                     interval: float = 0.01) -> None:
    """Wait until ``condition()`` is true: for state another process or task
    changes (the database, a server) where no event can be awaited."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - the state lives outside this loop
            await asyncio.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def fail_on_loop_exceptions(request: pytest.FixtureRequest) -> Iterator[None]:
    """Any exception an event loop reports as unhandled fails the test."""
    errors: list[dict[str, Any]] = []
    original = asyncio.BaseEventLoop.call_exception_handler

    def record(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        errors.append(context)
        original(loop, context)  # type: ignore[arg-type]

    asyncio.BaseEventLoop.call_exception_handler = record  # type: ignore[assignment, method-assign]
    try:
        yield
    finally:
        asyncio.BaseEventLoop.call_exception_handler = original  # type: ignore[method-assign]
    if errors:
        pytest.fail(f"unhandled event-loop exception(s): {[e.get('message') for e in errors]}")
