"""Commands down the RMF TCP connection: a real ingest service, a device's
client over loopback, the real database. States move
queued -> sent -> delivered -> succeeded / failed / expired, each change in
the history."""

from __future__ import annotations

import asyncio
import time

from rmiot.core_ext import ACK_OK, KIND_COMMAND
from rmiot.ingest.client import RmfClient, command_result
from rmiot.ingest.service import IngestService
from rmiot.registry import commands
from tests.commands.conftest import SET_RATE, connect, history, queue, state_of, wait_state
from tests.conftest import eventually
from tests.ingest.conftest import Hospital, now_us, vitals


async def hello(client: RmfClient, hospital: Hospital, device: int, seq: int = 1) -> None:
    """The device speaks (an acked telemetry frame): from now on it is online here."""
    client.send(vitals(hospital.tenant, device, seq), device, seq)
    await client.drain()
    assert await client.wait_acked(5)


async def answer(client: RmfClient, hospital: Hospital, device: int, seq: int,
                 command_id: int, code: int) -> None:
    client.send(command_result(hospital.tenant, device, seq, now_us(), command_id, code),
                device, seq)
    await client.drain()
    assert await client.wait_acked(5)


async def test_a_command_waits_for_an_offline_device_then_succeeds(
        ingest: IngestService, hospital: Hospital) -> None:
    command = await queue(hospital, hospital.plain)
    await asyncio.sleep(0.3)
    assert await state_of(hospital.dsn, command.id) == "queued"
    device = RmfClient("127.0.0.1", ingest.tcp.port)
    await device.connect()
    try:
        await hello(device, hospital, hospital.plain)
        assert await device.wait_commands(1, 2)
        frame = device.commands[0]
        assert (frame.kind, frame.tenant, frame.device) == (KIND_COMMAND, hospital.tenant,
                                                            hospital.plain)
        assert frame.fields() == [(0, 4, command.id), *SET_RATE]
        assert await state_of(hospital.dsn, command.id) == "sent"
        await answer(device, hospital, hospital.plain, 2, command.id, commands.RESULT_ACCEPTED)
        await wait_state(hospital.dsn, command.id, "delivered")
        await answer(device, hospital, hospital.plain, 3, command.id, commands.RESULT_SUCCEEDED)
        await wait_state(hospital.dsn, command.id, "succeeded")
    finally:
        await device.close()
    assert await history(hospital.dsn, command.id) == ["queued", "sent", "delivered",
                                                       "succeeded"]
    async with await connect(hospital.dsn) as conn:
        done = await commands.get(conn, hospital.tenant, command.id)
    assert done is not None and done.result_code == 0
    assert done.sent_at and done.delivered_at and done.finished_at
    assert device.statuses == {ACK_OK: 3}
    assert hospital.stored(hospital.plain) == 3  # the results are telemetry too
    assert len(device.commands) == 1


async def test_a_command_reaches_an_online_device_within_a_second(
        client: RmfClient, hospital: Hospital) -> None:
    await hello(client, hospital, hospital.plain)
    start = time.monotonic()
    command = await queue(hospital, hospital.plain)
    assert await client.wait_commands(1, 1.0)
    assert time.monotonic() - start < 1.0
    assert client.commands[0].fields()[0] == (0, 4, command.id)


async def test_a_gateway_gets_the_commands_of_every_device_it_speaks_for(
        client: RmfClient, hospital: Hospital) -> None:
    await hello(client, hospital, hospital.plain)
    client.send(vitals(hospital.tenant, hospital.keyed, 1, key=hospital.key), hospital.keyed, 1)
    await client.drain()
    assert await client.wait_acked(5)
    first = await queue(hospital, hospital.plain)
    second = await queue(hospital, hospital.keyed, params=[])
    assert await client.wait_commands(2, 2)
    got = {(f.device, f.fields()[0][2]) for f in client.commands}
    assert got == {(hospital.plain, first.id), (hospital.keyed, second.id)}


async def test_a_failure_code_fails_and_implies_delivery(
        client: RmfClient, hospital: Hospital) -> None:
    await hello(client, hospital, hospital.plain)
    command = await queue(hospital, hospital.plain)
    assert await client.wait_commands(1, 2)
    await answer(client, hospital, hospital.plain, 2, command.id, 7)
    await wait_state(hospital.dsn, command.id, "failed")
    assert await history(hospital.dsn, command.id) == ["queued", "sent", "delivered", "failed"]
    async with await connect(hospital.dsn) as conn:
        done = await commands.get(conn, hospital.tenant, command.id)
    assert done is not None and done.result_code == 7


async def test_a_queued_command_expires_and_is_never_sent(
        ingest: IngestService, hospital: Hospital) -> None:
    command = await queue(hospital, hospital.plain, ttl_s=1)
    await wait_state(hospital.dsn, command.id, "expired", timeout=4)
    device = RmfClient("127.0.0.1", ingest.tcp.port)
    await device.connect()
    try:
        await hello(device, hospital, hospital.plain)
        assert not await device.wait_commands(1, 0.5)
    finally:
        await device.close()
    assert await history(hospital.dsn, command.id) == ["queued", "expired"]


async def test_a_sent_command_expires_and_a_late_result_is_noted(
        client: RmfClient, hospital: Hospital) -> None:
    await hello(client, hospital, hospital.plain)
    command = await queue(hospital, hospital.plain, ttl_s=1)
    assert await client.wait_commands(1, 2)
    await wait_state(hospital.dsn, command.id, "expired", timeout=4)
    await answer(client, hospital, hospital.plain, 2, command.id, commands.RESULT_SUCCEEDED)
    async with await connect(hospital.dsn) as conn:
        for _ in range(200):
            events = await commands.history(conn, command.id)
            if len(events) == 4:
                break
            await asyncio.sleep(0.02)
    assert [e.state for e in events] == ["queued", "sent", "expired", "expired"]
    assert events[2].detail == {"was": "sent"}
    assert events[3].detail is not None and events[3].detail["late"] is True
    assert await state_of(hospital.dsn, command.id) == "expired"


async def test_a_command_lost_with_its_connection_goes_out_again(
        ingest: IngestService, hospital: Hospital) -> None:
    first = RmfClient("127.0.0.1", ingest.tcp.port)
    await first.connect()
    await hello(first, hospital, hospital.plain)
    command = await queue(hospital, hospital.plain)
    assert await first.wait_commands(1, 2)
    await first.close()  # before answering
    await wait_state(hospital.dsn, command.id, "queued")
    second = RmfClient("127.0.0.1", ingest.tcp.port)
    await second.connect()
    try:
        await hello(second, hospital, hospital.plain, seq=2)
        assert await second.wait_commands(1, 2)
        assert second.commands[0].fields()[0] == (0, 4, command.id)
        assert second.commands[0].seq == first.commands[0].seq  # the same command again
        await answer(second, hospital, hospital.plain, 3, command.id, commands.RESULT_SUCCEEDED)
        await wait_state(hospital.dsn, command.id, "succeeded")
    finally:
        await second.close()
    assert await history(hospital.dsn, command.id) == ["queued", "sent", "queued", "sent",
                                                       "delivered", "succeeded"]


async def test_a_device_cannot_answer_another_devices_command(
        client: RmfClient, hospital: Hospital, ingest: IngestService) -> None:
    await hello(client, hospital, hospital.plain)
    command = await queue(hospital, hospital.plain)
    assert await client.wait_commands(1, 2)
    client.send(command_result(hospital.tenant, hospital.keyed, 5, now_us(), command.id, 0,
                               auth=1, key=hospital.key), hospital.keyed, 5)
    await client.drain()
    assert await client.wait_acked(5)
    await eventually(lambda: ingest.commands.stats["result_for_unknown_command"] == 1, 2)
    assert await state_of(hospital.dsn, command.id) == "sent"
