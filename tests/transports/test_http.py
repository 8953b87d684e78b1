"""RMF and the JSON form over HTTP end to end: an aiohttp client against the
ingest service's HTTP server (and HTTPS with the dev CA), the real database."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from rmiot.config import Config
from rmiot.core_ext import ACK_DUPLICATE, ACK_OK, ACK_UNKNOWN_DEVICE
from rmiot.ingest.http import basic_login
from rmiot.ingest.service import IngestService
from rmiot.ingest.sessions import read_downlink
from rmiot.registry import transport_credentials
from tests.commands.conftest import queue, wait_state
from tests.conftest import eventually
from tests.ingest.conftest import Hospital, now_us, vitals
from tests.transports.conftest import DeviceLogin, Logins, stored

OCTETS = "application/octet-stream"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def url(service: IngestService, device: int, scheme: str = "http") -> str:
    assert service.transports.http is not None
    return f"{scheme}://127.0.0.1:{service.transports.http.port}/v1/devices/{device}/frames"


async def post(http: aiohttp.ClientSession, service: IngestService, device: int,
               login: DeviceLogin | None, body: bytes, content_type: str = OCTETS,
               accept: str = "application/json", password: str = "") -> tuple[int, Any]:
    headers = {"Content-Type": content_type, "Accept": accept}
    if login is not None:
        headers["Authorization"] = aiohttp.encode_basic_auth(login.username,
                                                             password or login.password)
    async with http.post(url(service, device), data=body, headers=headers) as r:
        return r.status, (await r.read() if accept == OCTETS else await r.json())


async def test_rmf_answered_per_frame_after_commit(http: aiohttp.ClientSession,
                                                   service: IngestService, logins: Logins,
                                                   hospital: Hospital) -> None:
    ts = now_us()
    frames = [vitals(hospital.tenant, hospital.plain, s, ts + s) for s in range(20)]
    frames.append(vitals(hospital.tenant, hospital.plain, 20, ts + 20, ack=False))
    status, body = await post(http, service, hospital.plain, logins.plain, b"".join(frames))
    assert status == 200
    assert body["results"] == [{"seq": s, "status": "OK"} for s in range(20)] + [
        {"seq": 20, "status": "ACCEPTED"}]  # it did not ask for an ack
    assert stored(hospital.dsn, hospital.plain) >= 20  # answered means committed
    # The binary answer: the ACK frames TCP would have sent (a resend: DUPLICATE).
    status, raw = await post(http, service, hospital.plain, logins.plain, frames[0],
                             accept=OCTETS)
    assert status == 200 and read_downlink(raw) == ([(hospital.plain, 0, ACK_DUPLICATE)], [])
    await eventually(lambda: stored(hospital.dsn, hospital.plain) == 21, 5)


async def test_json_form(http: aiohttp.ClientSession, service: IngestService, logins: Logins,
                         hospital: Hospital) -> None:
    ts = now_us()
    body = json.dumps([{"seq": 1, "ts_us": ts, "kind": 1, "fields": [[1, 71], [2, 97.5]]},
                       {"seq": 2, "ts_us": ts + 1, "kind": 2, "fields": [[303, "E42"]]}])
    status, answer = await post(http, service, hospital.plain, logins.plain, body.encode(),
                                "application/json")
    assert status == 200
    assert answer == {"device": hospital.plain, "commands": [],
                      "results": [{"seq": 1, "status": "OK"}, {"seq": 2, "status": "OK"}]}
    assert stored(hospital.dsn, hospital.plain) == 2


async def test_frames_of_other_devices_are_refused_and_spare_the_rest(
        http: aiohttp.ClientSession, service: IngestService, logins: Logins,
        hospital: Hospital) -> None:
    ts = now_us()
    body = b"".join([vitals(hospital.other_tenant, hospital.foreign, 1, ts),
                     vitals(hospital.tenant, hospital.plain, 2, ts),
                     b"garbage!",
                     vitals(hospital.tenant, hospital.plain, 3, ts + 1)])
    status, raw = await post(http, service, hospital.plain, logins.plain, body, accept=OCTETS)
    assert status == 200
    assert read_downlink(raw)[0] == [(hospital.foreign, 1, ACK_UNKNOWN_DEVICE),
                                     (hospital.plain, 2, ACK_OK), (hospital.plain, 3, ACK_OK)]
    assert stored(hospital.dsn, hospital.plain) == 2
    assert stored(hospital.dsn, hospital.foreign) == 0


@pytest.mark.parametrize(("case", "status", "code"), [
    ("no login", 401, "AUTH_FAILED"),
    ("wrong password", 401, "AUTH_FAILED"),
    ("revoked login", 401, "AUTH_FAILED"),
    ("another device's login", 403, "UNKNOWN_DEVICE"),
    ("another tenant's device", 403, "UNKNOWN_DEVICE"),
    ("not the JSON form", 400, "MALFORMED"),
    ("a JSON body too large", 413, "TOO_LARGE"),
    ("text/plain", 415, "UNSUPPORTED_MEDIA"),
])
async def test_refused_requests_say_why(http: aiohttp.ClientSession, service: IngestService,
                                        logins: Logins, hospital: Hospital, case: str,
                                        status: int, code: str) -> None:
    frame = vitals(hospital.tenant, hospital.plain, 1, now_us())
    device, login, body, ctype, password = {
        "no login": (hospital.plain, None, frame, OCTETS, ""),
        "wrong password": (hospital.plain, logins.plain, frame, OCTETS, "x" * 43),
        "revoked login": (hospital.plain, logins.plain, frame, OCTETS, ""),
        "another device's login": (hospital.plain, logins.keyed, frame, OCTETS, ""),
        "another tenant's device": (hospital.foreign, logins.plain, frame, OCTETS, ""),
        "not the JSON form": (hospital.plain, logins.plain,
                              b'[{"seq": 1, "ts_us": 1, "kind": 1, "fields": [[1, 2]],'
                              b' "device": 7}]', "application/json", ""),
        "a JSON body too large": (hospital.plain, logins.plain, b"[" + b" " * 100_000 + b"]",
                                  "application/json", ""),
        "text/plain": (hospital.plain, logins.plain, frame, "text/plain", ""),
    }[case]
    if case == "revoked login":
        with hospital.conn() as conn:
            transport_credentials.revoke(conn, username=logins.plain.username)
        logins_view = service.transports.logins
        assert logins_view is not None
        await eventually(lambda: logins.plain.username not in logins_view.logins, 2)
    got, answer = await post(http, service, device, login, body, ctype, password=password)
    assert (got, answer["error"]["code"]) == (status, code), answer
    if code == "MALFORMED":
        assert answer["error"]["path"] == "[0].device"
    assert stored(hospital.dsn, hospital.plain) == 0


async def test_commands_ride_on_answers(http: aiohttp.ClientSession, service: IngestService,
                                        logins: Logins, hospital: Hospital) -> None:
    command = await queue(hospital, hospital.plain)
    found: list[Any] = []
    seq = 0
    async with asyncio.timeout(5):
        while not found:
            seq += 1
            status, answer = await post(http, service, hospital.plain, logins.plain,
                                        vitals(hospital.tenant, hospital.plain, seq, now_us()))
            assert status == 200
            found = answer["commands"]
    assert found == [{"id": command.id, "seq": command.id & 0xFFFFFFFF,
                      "params": [[10, 1, 12.5], [11, 3, 250], [6, 6, "bolus"]]}]
    await wait_state(hospital.dsn, command.id, "sent")


def test_basic_login_parsing() -> None:
    assert basic_login("Basic ZDEtYWI6cDpx") == ("d1-ab", "p:q")
    for header in (None, "", "Bearer x", "Basic !!!", "Basic bm9jb2xvbg=="):
        assert basic_login(header) == (None, None)


@pytest.fixture
def https_cfg(transports_cfg: Config, dev_certs: Config) -> Config:
    return dataclasses.replace(transports_cfg, http=dataclasses.replace(
        transports_cfg.http, tls=True), platform=dev_certs.platform)


async def test_https_with_the_dev_ca(https_cfg: Config, hospital: Hospital, logins: Logins,
                                     http: aiohttp.ClientSession) -> None:
    svc = IngestService(https_cfg)
    await svc.start()
    try:
        context = ssl.create_default_context(cafile=str(https_cfg.tls_path("ca_file")))
        login = aiohttp.encode_basic_auth(logins.plain.username, logins.plain.password)
        async with http.post(url(svc, hospital.plain, "https"), ssl=context,
                             data=vitals(hospital.tenant, hospital.plain, 1, now_us()),
                             headers={"Content-Type": OCTETS, "Authorization": login}) as response:
            assert response.status == 200
            assert (await response.json())["results"] == [{"seq": 1, "status": "OK"}]
    finally:
        await svc.stop(drain_timeout=5)
