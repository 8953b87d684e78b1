"""The command store and its state machine, on the real database, with an
injected clock: validation, tenant scope, expiry, refused state changes."""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
import pytest

from rmiot.registry import commands
from rmiot.registry.commands import CommandError, CommandNotFound
from tests.commands.conftest import SET_RATE, connect
from tests.ingest.conftest import Hospital

LATER = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)  # clear of the real clock


async def test_expiry_follows_the_injected_clock(hospital: Hospital) -> None:
    async with await connect(hospital.dsn) as conn:
        command = await commands.queue(conn, hospital.tenant, hospital.plain, "locate", [], 60,
                                       "user:test", now=LATER)
        assert command.expires_at - command.created_at == dt.timedelta(seconds=60)
        assert command.id not in await commands.expire_due(conn, LATER + dt.timedelta(seconds=59))
        assert command.id in await commands.expire_due(conn, LATER + dt.timedelta(seconds=60))
        assert not await commands.claim_queued(conn, hospital.plain, LATER)
        for _ in range(2):  # a retransmission is noted once
            assert await commands.record_result(conn, hospital.plain, command.id, 0) \
                == "expired"
        events = await commands.history(conn, command.id)
    assert [e.state for e in events] == ["queued", "expired", "expired"]
    assert events[1].at == LATER + dt.timedelta(seconds=60)
    assert events[2].detail == {"result_code": 0, "late": True}


async def test_results_move_the_state_machine(hospital: Hospital) -> None:
    async with await connect(hospital.dsn) as conn:
        command = await commands.queue(conn, hospital.tenant, hospital.plain, "set_rate",
                                       SET_RATE, 60, "user:test", now=LATER)
        claimed = await commands.claim_queued(conn, hospital.plain, LATER)
        assert [c.id for c in claimed] == [command.id] and claimed[0].state == "sent"
        assert claimed[0].params == SET_RATE
        assert await commands.record_result(conn, hospital.plain, command.id, 1) == "delivered"
        assert await commands.record_result(conn, hospital.plain, command.id, 1) == "delivered"
        assert await commands.record_result(conn, hospital.foreign, command.id, 0) is None
        assert await commands.record_result(conn, hospital.plain, command.id, 0) == "succeeded"
        assert await commands.record_result(conn, hospital.plain, command.id, 3) == "succeeded"
        assert [e.state for e in await commands.history(conn, command.id)] == [
            "queued", "sent", "delivered", "succeeded"]


async def test_the_database_refuses_a_move_the_machine_does_not_make(
        hospital: Hospital) -> None:
    async with await connect(hospital.dsn) as conn:
        command = await commands.queue(conn, hospital.tenant, hospital.plain, "locate", [], 60,
                                       "user:test")
        with pytest.raises(psycopg.errors.CheckViolation):
            await conn.execute("UPDATE commands SET state = 'succeeded', result_code = 0 "
                               "WHERE id = %s", (command.id,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute("DELETE FROM command_events WHERE command_id = %s",
                               (command.id,))


async def test_another_tenants_device_or_command_is_not_found(hospital: Hospital) -> None:
    async with await connect(hospital.dsn) as conn:
        with pytest.raises(CommandNotFound):
            await commands.queue(conn, hospital.tenant, hospital.foreign, "locate", [], 60,
                                 "user:test")
        theirs = await commands.queue(conn, hospital.other_tenant, hospital.foreign, "locate",
                                      [], 60, "user:test")
        assert await commands.get(conn, hospital.tenant, theirs.id) is None
        assert await commands.get(conn, hospital.other_tenant, theirs.id) is not None
        ours = await commands.find(conn, hospital.tenant)
        assert theirs.id not in {c.id for c in ours}


@pytest.mark.parametrize(("name", "params", "ttl_s", "reason"), [
    ("Set Rate", [], 60, "name"),
    ("set_rate", [(0, 4, 1)], 60, "metric 0"),
    ("set_rate", [(10, 1, float("nan"))], 60, "finite"),
    ("set_rate", [(10, 1, 1e39)], 60, "float32"),
    ("set_rate", [(10, 3, 2**31)], 60, "parameters"),
    ("set_rate", [(10, 6, "x" * 256)], 60, "parameters"),
    ("set_rate", [(m, 5, True) for m in range(1, 256)], 60, "at most"),
    ("set_rate", [], 8 * 86400, "ttl_s"),
])
async def test_a_command_a_frame_cannot_carry_is_refused(
        hospital: Hospital, name: str, params: list[Any], ttl_s: int, reason: str) -> None:
    async with await connect(hospital.dsn) as conn:
        with pytest.raises(CommandError, match=reason):
            await commands.queue(conn, hospital.tenant, hospital.plain, name, params, ttl_s,
                                 "user:test")
