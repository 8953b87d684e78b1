"""RMF and the JSON form over CoAP end to end: an aiocoap client against the
ingest service's CoAP server, the real database; commands by Observe."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code

from rmiot.core_ext import ACK_OK, ACK_STALE, ACK_UNKNOWN_DEVICE, KIND_COMMAND, Frame
from rmiot.ingest.client import command_result
from rmiot.ingest.service import IngestService
from rmiot.ingest.sessions import read_downlink
from rmiot.registry import commands
from tests.commands.conftest import queue, wait_state
from tests.ingest.conftest import Hospital, now_us, vitals
from tests.transports.conftest import DeviceLogin, Logins, stored


@pytest.fixture
async def coap() -> AsyncIterator[Any]:
    context = await aiocoap.Context.create_client_context()
    yield context
    await context.shutdown()


def uri(service: IngestService, path: str, login: DeviceLogin, password: str = "") -> str:
    assert service.transports.coap is not None
    return (f"coap://127.0.0.1:{service.transports.coap.port}/{path}"
            f"?u={login.username}&p={password or login.password}")


async def post(coap: Any, service: IngestService, path: str, login: DeviceLogin,
               payload: bytes, *, password: str = "", content_format: int | None = None
               ) -> Any:
    request = aiocoap.Message(code=aiocoap.POST, uri=uri(service, path, login, password),
                              payload=payload)
    if content_format is not None:
        request.opt.content_format = content_format
    return await coap.request(request).response


async def test_rmf_frames_answered_with_their_acks_after_commit(
        coap: Any, service: IngestService, logins: Logins, hospital: Hospital) -> None:
    ts = now_us()
    frames = b"".join(vitals(hospital.tenant, hospital.plain, s, ts + s) for s in range(10))
    response = await post(coap, service, f"rmf/{hospital.plain}", logins.plain, frames,
                          content_format=42)
    assert response.code == Code.CHANGED
    acks, commands_sent = read_downlink(response.payload)
    assert acks == [(hospital.plain, s, ACK_OK) for s in range(10)] and not commands_sent
    assert stored(hospital.dsn, hospital.plain) == 10  # answered means committed


async def test_bad_frames_are_refused_per_frame_and_spare_the_rest(
        coap: Any, service: IngestService, logins: Logins, hospital: Hospital) -> None:
    ts = now_us()
    frames = b"".join([
        vitals(hospital.other_tenant, hospital.foreign, 1, ts),   # another tenant's device
        vitals(hospital.tenant, hospital.plain, 2, ts - 30 * 86400 * 10**6),  # too old
        vitals(hospital.tenant, hospital.plain, 3, ts),
    ])
    response = await post(coap, service, f"rmf/{hospital.plain}", logins.plain, frames)
    acks, _ = read_downlink(response.payload)
    assert acks == [(hospital.foreign, 1, ACK_UNKNOWN_DEVICE), (hospital.plain, 2, ACK_STALE),
                    (hospital.plain, 3, ACK_OK)]
    assert stored(hospital.dsn, hospital.plain) == 1
    assert stored(hospital.dsn, hospital.foreign) == 0


async def test_json_form(coap: Any, service: IngestService, logins: Logins,
                         hospital: Hospital) -> None:
    ts = now_us()
    body = json.dumps([{"seq": s, "ts_us": ts + s, "kind": 1, "fields": [[4, 36.6]]}
                       for s in range(3)]).encode()
    response = await post(coap, service, f"json/{hospital.plain}", logins.plain, body,
                          content_format=50)
    assert response.code == Code.CHANGED
    assert json.loads(response.payload) == {
        "results": [{"seq": s, "status": "OK"} for s in range(3)], "commands": []}
    assert stored(hospital.dsn, hospital.plain) == 3


@pytest.mark.parametrize(("case", "code", "error"), [
    ("wrong password", Code.UNAUTHORIZED, "AUTH_FAILED"),
    ("another device's login", Code.FORBIDDEN, "UNKNOWN_DEVICE"),
    ("not the JSON form", Code.BAD_REQUEST, "MALFORMED"),
    ("JSON to the RMF resource", Code.UNSUPPORTED_CONTENT_FORMAT, "UNSUPPORTED_MEDIA"),
])
async def test_refused_requests_say_why(coap: Any, service: IngestService, logins: Logins,
                                        hospital: Hospital, case: str, code: Code,
                                        error: str) -> None:
    good = json.dumps({"seq": 1, "ts_us": now_us(), "kind": 1, "fields": [[1, 70]]}).encode()
    path, login, payload, password, fmt = {
        "wrong password": (f"json/{hospital.plain}", logins.plain, good, "x" * 43, None),
        "another device's login": (f"json/{hospital.plain}", logins.keyed, good, "", None),
        "not the JSON form": (f"json/{hospital.plain}", logins.plain,
                              b'{"seq": 1, "ts_us": 0, "kind": 9, "fields": []}', "", None),
        "JSON to the RMF resource": (f"rmf/{hospital.plain}", logins.plain, good, "", 50),
    }[case]
    response = await post(coap, service, path, login, payload, password=password,
                          content_format=fmt)
    assert response.code == code
    assert json.loads(response.payload)["error"]["code"] == error
    assert stored(hospital.dsn, hospital.plain) == 0


async def test_commands_by_observe_and_in_answers(coap: Any, service: IngestService,
                                                  logins: Logins, hospital: Hospital) -> None:
    request = coap.request(aiocoap.Message(code=aiocoap.GET, observe=0,
                                           uri=uri(service, f"cmd/{hospital.plain}",
                                                   logins.plain)))
    first = await request.response
    assert first.code == Code.CONTENT and first.payload == b""
    command = await queue(hospital, hospital.plain)
    got: list[Frame] = []
    async for note in request.observation:
        got += read_downlink(note.payload)[1]
        if got:
            break
    request.observation.cancel()
    assert (got[0].kind, got[0].device, got[0].fields()[0]) == (KIND_COMMAND, hospital.plain,
                                                                (0, 4, command.id))
    result = command_result(hospital.tenant, hospital.plain, 1, now_us(), command.id,
                            commands.RESULT_SUCCEEDED)
    response = await post(coap, service, f"rmf/{hospital.plain}", logins.plain, result)
    assert read_downlink(response.payload)[0] == [(hospital.plain, 1, ACK_OK)]
    await wait_state(hospital.dsn, command.id, "succeeded")


async def test_commands_ride_on_answers_to_polls(coap: Any, service: IngestService,
                                                 logins: Logins, hospital: Hospital) -> None:
    """Without an observation a command waits for the device's next answer; an
    empty POST is a poll."""
    command = await queue(hospital, hospital.keyed)
    waiting: list[Frame] = []
    async with asyncio.timeout(5):
        while not waiting:
            response = await post(coap, service, f"rmf/{hospital.keyed}", logins.keyed, b"")
            assert response.code == Code.CHANGED
            if not (waiting := read_downlink(response.payload)[1]):
                await asyncio.sleep(0.02)
    assert [c.fields()[0][2] for c in waiting] == [command.id]
    await wait_state(hospital.dsn, command.id, "sent")
