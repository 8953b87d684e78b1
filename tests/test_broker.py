"""The private Mosquitto broker: real MQTT v5 traffic, shared subscriptions,
no anonymous clients."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from rmiot.config import Config
from rmiot.ingest.broker_login import read_login

V5 = aiomqtt.ProtocolVersion.V5
Connect = Callable[..., aiomqtt.Client]


@pytest.fixture
def platform_client(base_cfg: Config, mqtt: tuple[str, int]) -> Connect:
    """aiomqtt.Client with the broker address and the platform's login filled in."""
    user, password = read_login(base_cfg)
    return functools.partial(aiomqtt.Client, *mqtt, username=user, password=password,
                             protocol=V5)


async def test_anonymous_and_wrong_logins_are_refused(mqtt: tuple[str, int]) -> None:
    host, port = mqtt
    for login in ({}, {"username": "rmiot-platform", "password": "not-it"}):
        with pytest.raises(aiomqtt.MqttCodeError, match=r"Not authorized|Bad user name"):
            async with aiomqtt.Client(host, port, protocol=V5, identifier="t-anon", **login):
                pass


async def test_publish_reaches_subscriber(platform_client: Connect) -> None:
    async with platform_client(identifier="t-sub") as sub, \
            platform_client(identifier="t-pub") as pub:
        await sub.subscribe("rmiot/test/+/up", qos=1)
        await pub.publish("rmiot/test/7/up", b"\x52\x4d frame", qos=1)
        async with asyncio.timeout(5):
            async for msg in sub.messages:
                assert str(msg.topic) == "rmiot/test/7/up"
                assert msg.payload == b"\x52\x4d frame"
                break


async def test_shared_subscription_splits_the_load(platform_client: Connect) -> None:
    """Two ingest processes in group $share/rmiot each get a part, none twice."""
    got: dict[str, list[bytes]] = {"a": [], "b": []}
    total = 40

    async def consume(name: str, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            assert isinstance(msg.payload, bytes)
            got[name].append(msg.payload)
            if sum(map(len, got.values())) == total:
                return

    async with platform_client(identifier="t-a") as a, \
            platform_client(identifier="t-b") as b, \
            platform_client(identifier="t-p") as pub:
        for client in (a, b):
            await client.subscribe("$share/rmiot/rmiot/share-test/#", qos=1)
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = 30
        for i in range(total):
            await pub.publish(f"rmiot/share-test/{i}", str(i).encode(), qos=1, properties=props)
        tasks = [asyncio.create_task(consume(n, c)) for n, c in (("a", a), ("b", b))]
        async with asyncio.timeout(10):
            _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.sleep(0.2)  # a duplicate would arrive now
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    received = got["a"] + got["b"]
    assert sorted(received, key=int) == [str(i).encode() for i in range(total)]
    assert got["a"] and got["b"], "one subscriber got everything"
