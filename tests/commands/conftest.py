"""Fixtures for device commands: the ingest fixtures (a small hospital, a
started IngestService, a connected RmfClient), and helpers to queue commands
and follow their state in the real database."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
import uvloop

from rmiot.registry import commands
from rmiot.registry.commands import Command, Param
from tests.ingest import conftest as ingest_fixtures
from tests.ingest.conftest import Hospital

# The ingest path's fixtures, offered here under the same names.
keyring = ingest_fixtures.keyring
hospital = ingest_fixtures.hospital
ingest_cfg = ingest_fixtures.ingest_cfg
ingest = ingest_fixtures.ingest
client = ingest_fixtures.client
loop_errors_fail_the_test = ingest_fixtures.loop_errors_fail_the_test

def pytest_asyncio_loop_factories(config: pytest.Config,
                                   item: pytest.Item) -> dict[str, Any] | None:
    """The downlink is protocol code: on the stock loop and on uvloop, production's."""
    if item.path.name == "test_downlink.py":
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return None  # the suite's default


SET_RATE: list[Param] = [(10, 1, 12.5), (11, 3, 250), (6, 6, "bolus")]


async def connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


async def queue(hospital: Hospital, device: int, *, ttl_s: int = 60,
                params: list[Param] | None = None, name: str = "set_rate") -> Command:
    async with await connect(hospital.dsn) as conn:
        return await commands.queue(conn, hospital.tenant, device, name,
                                    SET_RATE if params is None else params, ttl_s, "user:test")


async def state_of(dsn: str, command_id: int) -> str:
    async with await connect(dsn) as conn:
        cur = await conn.execute("SELECT state FROM commands WHERE id = %s", (command_id,))
        row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def history(dsn: str, command_id: int) -> list[str]:
    async with await connect(dsn) as conn:
        return [e.state for e in await commands.history(conn, command_id)]


async def wait_state(dsn: str, command_id: int, state: str, timeout: float = 3.0) -> None:
    """Wait until the command is in ``state`` (its state lives in the database)."""
    seen = ""
    try:
        async with asyncio.timeout(timeout):
            while (seen := await state_of(dsn, command_id)) != state:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"command {command_id} is {seen!r}, not {state!r}, "
                             f"after {timeout} s") from None
