"""A gateway speaks for the devices registered behind it (``devices.gateway_id``)
over MQTT and HTTP as over TCP: their frames, sent with the gateway's login,
are stored and acked to the gateway; a device not behind it stays refused
UNKNOWN_DEVICE, nothing else lost; a child's commands go down the gateway's
topic."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from rmiot.core_ext import ACK_OK, ACK_UNKNOWN_DEVICE, KIND_COMMAND
from rmiot.ingest.client import command_result
from rmiot.ingest.service import IngestService
from rmiot.registry import commands, store, transport_credentials
from tests.commands.conftest import queue, wait_state
from tests.conftest import eventually
from tests.ingest.conftest import Hospital, now_us, vitals
from tests.transports.conftest import DeviceLogin, Logins, stored
from tests.transports.test_http import post

Connect = Callable[..., Any]


@dataclass
class Ward:
    gateway: DeviceLogin
    children: list[int]


@pytest.fixture
def ward(hospital: Hospital, logins: Logins) -> Ward:
    """A ward gateway with two wearables behind it (registered before the
    service starts, so its device view has them)."""
    with hospital.conn() as conn:
        gateway = store.register_device(conn, hospital.tenant, serial_no="ward-gw")
        children = [store.register_device(conn, hospital.tenant, serial_no=f"band-{i}")
                    for i in range(2)]
        conn.execute("UPDATE devices SET gateway_id = %s WHERE id = ANY (%s)",
                     (gateway, children))
        login = DeviceLogin(gateway, *transport_credentials.issue(conn, gateway))
    return Ward(login, children)


@pytest.fixture
async def ward_service(ward: Ward, service: IngestService) -> IngestService:
    await eventually(lambda: all(service.view.get(c) is not None and
                                 service.view.get(c).gateway_id == ward.gateway.device  # type: ignore[union-attr]
                                 for c in ward.children), 5)
    return service


async def test_a_gateway_sends_for_its_children_over_mqtt(
        ward_service: IngestService, mqtt_device: Connect, ward: Ward,
        hospital: Hospital) -> None:
    gateway = await mqtt_device(ward.gateway)
    ts = now_us()
    a, b = ward.children
    await gateway.publish(b"".join([
        vitals(hospital.tenant, a, 1, ts), vitals(hospital.tenant, b, 1, ts),
        vitals(hospital.tenant, hospital.plain, 9, ts),  # a device not behind it
        vitals(hospital.tenant, a, 2, ts + 1)]))
    await gateway.wait(lambda: len(gateway.acks) == 4)
    assert sorted(gateway.acks) == sorted([(a, 1, ACK_OK), (b, 1, ACK_OK),
                                           (hospital.plain, 9, ACK_UNKNOWN_DEVICE),
                                           (a, 2, ACK_OK)])
    assert (stored(hospital.dsn, a), stored(hospital.dsn, b)) == (2, 1)
    assert stored(hospital.dsn, hospital.plain) == 0

    # A command for a child reaches it through its gateway's downlink (sent
    # when the child is next heard from), and its result comes back that way.
    command = await queue(hospital, b)
    await gateway.publish(vitals(hospital.tenant, b, 2, ts + 2))
    await gateway.wait(lambda: any(c.device == b for c in gateway.commands))
    sent = next(c for c in gateway.commands if c.device == b)
    assert (sent.kind, sent.fields()[0]) == (KIND_COMMAND, (0, 4, command.id))
    await gateway.publish(command_result(hospital.tenant, b, 3, now_us(), command.id,
                                         commands.RESULT_SUCCEEDED))
    await wait_state(hospital.dsn, command.id, "succeeded")


async def test_a_gateway_sends_for_its_children_over_http(
        ward_service: IngestService, ward: Ward, hospital: Hospital) -> None:
    ts = now_us()
    a, b = ward.children
    body = b"".join([vitals(hospital.tenant, a, 1, ts), vitals(hospital.tenant, b, 1, ts),
                     vitals(hospital.other_tenant, hospital.foreign, 1, ts)])
    async with aiohttp.ClientSession() as http:
        status, answer = await post(http, ward_service, ward.gateway.device, ward.gateway, body)
    assert status == 200
    assert [(r["seq"], r["status"]) for r in answer["results"]] == [
        (1, "OK"), (1, "OK"), (1, "UNKNOWN_DEVICE")]
    assert (stored(hospital.dsn, a), stored(hospital.dsn, b)) == (1, 1)
    assert stored(hospital.dsn, hospital.foreign) == 0
