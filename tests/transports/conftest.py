"""Fixtures for the device transports beyond TCP: the ingest fixtures (a small
hospital, its devices), transport logins for its devices, the broker's login
files kept by a real ``BrokerAuthSync``, and an IngestService with MQTT,
CoAP and HTTP enabled — against the real database, the private Mosquitto
process and real clients (aiomqtt, aiocoap, aiohttp)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiomqtt
import psycopg
import pytest
import uvloop

from rmiot.config import Config
from rmiot.core_ext import Frame, FrameDecoder
from rmiot.deploy import broker_auth
from rmiot.ingest.service import IngestService
from rmiot.registry import transport_credentials
from tests.conftest import eventually
from tests.ingest import conftest as ingest_fixtures
from tests.ingest.conftest import Hospital

# The ingest path's fixtures, offered here under the same names.
keyring = ingest_fixtures.keyring
hospital = ingest_fixtures.hospital
ingest_cfg = ingest_fixtures.ingest_cfg
loop_errors_fail_the_test = ingest_fixtures.loop_errors_fail_the_test

V5 = aiomqtt.ProtocolVersion.V5


def pytest_asyncio_loop_factories(config: pytest.Config,
                                   item: pytest.Item) -> dict[str, Any] | None:
    """Adapters are protocol code: on the stock loop and on uvloop, production's."""
    if item.path.name.startswith("test_") and "transports" in item.path.parts:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return None


@dataclass(frozen=True)
class DeviceLogin:
    device: int
    username: str
    password: str


@dataclass(frozen=True)
class Logins:
    """A login for each of the hospital's devices."""

    plain: DeviceLogin
    keyed: DeviceLogin
    foreign: DeviceLogin


@pytest.fixture(scope="session")
def topic_root(base_cfg: Config, database: str) -> Iterator[str]:
    """This run's own topics on the shared broker (a running platform and other
    test runs use theirs); its broker logins are dropped at the end."""
    root = f"t-{base_cfg.database.name}"
    yield root
    broker_auth.remove_realm(dataclasses.replace(
        base_cfg, mqtt=dataclasses.replace(base_cfg.mqtt, topic_root=root)))


@pytest.fixture
def transports_cfg(ingest_cfg: Config, topic_root: str, mqtt: tuple[str, int]) -> Config:
    return dataclasses.replace(
        ingest_cfg,
        mqtt=dataclasses.replace(ingest_cfg.mqtt, enabled=True, topic_root=topic_root,
                                 share_group=topic_root),
        coap=dataclasses.replace(ingest_cfg.coap, enabled=True, port=0, answer_timeout_s=5.0),
        http=dataclasses.replace(ingest_cfg.http, enabled=True, port=0, answer_timeout_s=5.0,
                                 max_body_bytes=65536))


@pytest.fixture
def logins(hospital: Hospital) -> Logins:
    with hospital.conn() as conn:
        made = [DeviceLogin(d, *transport_credentials.issue(conn, d))
                for d in (hospital.plain, hospital.keyed, hospital.foreign)]
    return Logins(*made)


@pytest.fixture
async def broker_logins(transports_cfg: Config, logins: Logins,
                        database: str) -> AsyncIterator[broker_auth.BrokerAuthSync]:
    """The broker's login files, kept current from the registry."""
    sync = broker_auth.BrokerAuthSync(transports_cfg, database)
    await sync.start()
    yield sync
    await sync.stop()


@pytest.fixture
async def service(transports_cfg: Config, hospital: Hospital, logins: Logins,
                  broker_logins: broker_auth.BrokerAuthSync) -> AsyncIterator[IngestService]:
    svc = IngestService(transports_cfg)
    await svc.start()
    assert svc.transports.mqtt is not None
    await asyncio.wait_for(svc.transports.mqtt.connected.wait(), 10)
    yield svc
    await svc.stop(drain_timeout=5)


# -- a device on MQTT ---------------------------------------------------------------

class MqttDevice:
    """A device's MQTT client: its login, its down topic subscribed."""

    def __init__(self, client: aiomqtt.Client, root: str, device: int) -> None:
        self.client = client
        self.root = root
        self.device = device
        self.acks: list[tuple[int, int, int]] = []   # (device, seq, status)
        self.commands: list[Frame] = []
        self.json: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def listen(self) -> None:
        await self.client.subscribe(f"{self.root}/down/{self.device}/#", qos=1)
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        decoder = FrameDecoder()
        async for msg in self.client.messages:
            assert isinstance(msg.payload, bytes)
            if str(msg.topic).endswith("/json"):
                self.json.append(json.loads(msg.payload))
            else:
                for ev in decoder.feed(msg.payload):
                    assert type(ev) is Frame, ev
                    if ev.kind == 0x81:
                        self.acks.append((ev.device, ev.seq, int(ev.fields()[0][2])))  # type: ignore[call-overload]
                    else:
                        self.commands.append(ev)
            self._changed.set()

    async def publish(self, payload: bytes, json_form: bool = False) -> None:
        suffix = "/json" if json_form else ""
        await self.client.publish(f"{self.root}/up/{self.device}{suffix}", payload, qos=1)

    async def wait(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def login_client(mqtt: tuple[str, int], login: DeviceLogin, *,
                       password: str | None = None) -> aiomqtt.Client:
    """A connected client for ``login``; retried briefly while the broker
    reloads its files (a SIGHUP is handled a moment after it is sent)."""
    client_of = functools.partial(aiomqtt.Client, *mqtt, username=login.username,
                                  password=login.password if password is None else password,
                                  protocol=V5, identifier=f"{login.username}-{id(login):x}")
    for _ in range(40):
        client = client_of()
        try:
            await client.__aenter__()
        except aiomqtt.MqttCodeError:
            await asyncio.sleep(0.05)
            continue
        return client
    raise AssertionError(f"the broker does not take {login.username}'s login")


@pytest.fixture
async def mqtt_device(service: IngestService, mqtt: tuple[str, int], logins: Logins,
                      topic_root: str) -> AsyncIterator[Callable[..., Any]]:
    """Connects devices (by login) to the broker; closes them at the end."""
    made: list[tuple[MqttDevice, aiomqtt.Client]] = []

    async def connect(login: DeviceLogin) -> MqttDevice:
        client = await login_client(mqtt, login)
        device = MqttDevice(client, topic_root, login.device)
        await device.listen()
        made.append((device, client))
        return device

    yield connect
    for device, client in made:
        await device.stop()
        await client.__aexit__(None, None, None)


def stored(dsn: str, device: int) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM telemetry WHERE device_id = %s",
                           (device,)).fetchone()
    return int(row[0]) if row else 0


async def wait_stored(dsn: str, device: int, count: int, timeout: float = 5.0) -> None:
    await eventually(lambda: stored(dsn, device) >= count, timeout, interval=0.05)
