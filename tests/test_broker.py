"""The private Mosquitto broker: real MQTT v5 traffic, shared subscriptions."""

from __future__ import annotations

import asyncio

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

V5 = aiomqtt.ProtocolVersion.V5


async def test_publish_reaches_subscriber(mqtt: tuple[str, int]) -> None:
    host, port = mqtt
    async with aiomqtt.Client(host, port, protocol=V5, identifier="t-sub") as sub, \
            aiomqtt.Client(host, port, protocol=V5, identifier="t-pub") as pub:
        await sub.subscribe("rmiot/test/+/up", qos=1)
        await pub.publish("rmiot/test/7/up", b"\x52\x4d frame", qos=1)
        async with asyncio.timeout(5):
            async for msg in sub.messages:
                assert str(msg.topic) == "rmiot/test/7/up"
                assert msg.payload == b"\x52\x4d frame"
                break


async def test_shared_subscription_splits_the_load(mqtt: tuple[str, int]) -> None:
    """Two ingest processes in group $share/rmiot each get a part, none twice."""
    host, port = mqtt
    got: dict[str, list[bytes]] = {"a": [], "b": []}
    total = 40

    async def consume(name: str, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            assert isinstance(msg.payload, bytes)
            got[name].append(msg.payload)
            if sum(map(len, got.values())) == total:
                return

    async with aiomqtt.Client(host, port, protocol=V5, identifier="t-a") as a, \
            aiomqtt.Client(host, port, protocol=V5, identifier="t-b") as b, \
            aiomqtt.Client(host, port, protocol=V5, identifier="t-p") as pub:
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
