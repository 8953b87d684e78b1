"""RMF and the JSON form over MQTT end to end: the private Mosquitto with the
logins and ACLs generated from the registry, devices with aiomqtt, the
ingest service's shared subscription, the real database."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiomqtt
import psycopg
import pytest

from rmiot.core_ext import (
    ACK_DUPLICATE,
    ACK_OK,
    ACK_TENANT_MISMATCH,
    ACK_UNKNOWN_DEVICE,
    KIND_COMMAND,
)
from rmiot.ingest.client import command_result
from rmiot.ingest.service import IngestService
from rmiot.registry import commands, transport_credentials
from tests.commands.conftest import queue, wait_state
from tests.conftest import eventually
from tests.ingest.conftest import Hospital, now_us, vitals
from tests.transports.conftest import Logins, login_client, stored, wait_stored

Connect = Callable[..., Any]


async def test_frames_batched_per_message_are_acked_after_commit(
        mqtt_device: Connect, logins: Logins, hospital: Hospital) -> None:
    device = await mqtt_device(logins.plain)
    ts = now_us()
    for message in range(4):
        frames = b"".join(vitals(hospital.tenant, hospital.plain, message * 50 + i,
                                 ts + message * 50 + i) for i in range(50))
        await device.publish(frames)
    await device.wait(lambda: len(device.acks) == 200)
    assert {status for _, _, status in device.acks} == {ACK_OK}
    assert sorted(seq for _, seq, _ in device.acks) == list(range(200))
    assert stored(hospital.dsn, hospital.plain) == 200  # acked means committed


async def test_a_resent_message_is_stored_once(mqtt_device: Connect, logins: Logins,
                                               hospital: Hospital) -> None:
    device = await mqtt_device(logins.plain)
    frames = b"".join(vitals(hospital.tenant, hospital.plain, s, now_us() + s) for s in range(5))
    await device.publish(frames)
    await device.wait(lambda: len(device.acks) == 5)
    await device.publish(frames)  # its acks were "lost"
    await device.wait(lambda: len(device.acks) == 10)
    assert [s for _, _, s in device.acks[5:]] == [ACK_DUPLICATE] * 5
    assert stored(hospital.dsn, hospital.plain) == 5


async def test_frames_naming_another_device_are_refused_and_spare_the_rest(
        mqtt_device: Connect, logins: Logins, hospital: Hospital) -> None:
    device = await mqtt_device(logins.plain)
    ts = now_us()
    message = b"".join([
        vitals(hospital.tenant, hospital.plain, 1, ts),
        vitals(hospital.other_tenant, hospital.foreign, 2, ts),  # another tenant's device
        vitals(hospital.tenant, hospital.keyed, 3, ts, key=hospital.key),  # a sibling, signed
        vitals(hospital.other_tenant, hospital.plain, 4, ts),  # itself, the wrong tenant
        vitals(hospital.tenant, hospital.plain, 5, ts + 1),
    ])
    await device.publish(message)
    await device.wait(lambda: len(device.acks) == 5)
    assert sorted(device.acks) == sorted([
        (hospital.plain, 1, ACK_OK), (hospital.foreign, 2, ACK_UNKNOWN_DEVICE),
        (hospital.keyed, 3, ACK_UNKNOWN_DEVICE), (hospital.plain, 4, ACK_TENANT_MISMATCH),
        (hospital.plain, 5, ACK_OK)])
    assert stored(hospital.dsn, hospital.plain) == 2
    assert stored(hospital.dsn, hospital.foreign) == stored(hospital.dsn, hospital.keyed) == 0


async def test_json_form_and_a_body_that_is_not_it(mqtt_device: Connect, logins: Logins,
                                                   hospital: Hospital) -> None:
    device = await mqtt_device(logins.plain)
    ts = now_us()
    readings = [{"seq": s, "ts_us": ts + s, "kind": 1, "fields": [[1, 72.5], [2, 98]]}
                for s in range(3)]
    await device.publish(json.dumps({"seq": 9, "ts_us": ts, "kind": 1,
                                     "fields": [[1, "x", 3]]}).encode(), json_form=True)
    await device.publish(json.dumps(readings).encode(), json_form=True)
    await device.wait(lambda: sum(len(m.get("acks", ())) for m in device.json) == 3
                      and any("error" in m for m in device.json))
    error = next(m["error"] for m in device.json if "error" in m)
    assert error["code"] == "MALFORMED" and error["path"] == ".fields[0][1]"
    acks = [a for m in device.json for a in m.get("acks", ())]
    assert sorted(acks, key=lambda a: a["seq"]) == [{"seq": s, "status": "OK"} for s in range(3)]
    with psycopg.connect(hospital.dsn) as conn:
        rows = conn.execute("SELECT seq, metrics, vals FROM telemetry WHERE device_id = %s "
                            "ORDER BY seq", (hospital.plain,)).fetchall()
    assert rows == [(s, [1, 2], [72.5, 98.0]) for s in range(3)]


async def test_the_broker_keeps_devices_to_their_own_topics(
        mqtt_device: Connect, mqtt: tuple[str, int], logins: Logins, hospital: Hospital,
        topic_root: str) -> None:
    plain = await mqtt_device(logins.plain)
    keyed = await mqtt_device(logins.keyed)
    # plain also listens on every down topic: the broker delivers it only its own.
    await plain.client.subscribe(f"{topic_root}/down/#", qos=1)
    ts = now_us()
    # Publishing as another device: the broker refuses it (PUBACK "not authorized").
    await plain.client.publish(f"{topic_root}/up/{hospital.keyed}",
                               vitals(hospital.tenant, hospital.keyed, 1, ts), qos=1)
    await plain.client.publish(f"{topic_root}/up/{hospital.keyed}/json", b"[]", qos=1)
    await keyed.publish(vitals(hospital.tenant, hospital.keyed, 2, ts, key=hospital.key))
    await keyed.wait(lambda: len(keyed.acks) == 1)
    assert keyed.acks == [(hospital.keyed, 2, ACK_OK)]
    await asyncio.sleep(0.3)
    assert not plain.acks  # keyed's ack never reached plain
    assert stored(hospital.dsn, hospital.keyed) == 1
    # A wrong password, and a login revoked while connected (the broker drops it).
    with pytest.raises(AssertionError, match="does not take"):
        await login_client(mqtt, logins.foreign, password="wrong")
    with hospital.conn() as conn:
        assert transport_credentials.revoke(conn, device_id=hospital.plain) == 1

    async def dropped() -> None:
        async for _ in plain.client.messages:
            pass

    try:
        async with asyncio.timeout(5):
            await dropped()
    except aiomqtt.MqttError:
        pass  # disconnected by the broker once it reloaded its files
    else:
        raise AssertionError("the revoked login stayed connected")


async def test_commands_go_down_the_device_topic(mqtt_device: Connect, logins: Logins,
                                                 hospital: Hospital) -> None:
    command = await queue(hospital, hospital.plain)
    device = await mqtt_device(logins.plain)
    await device.publish(vitals(hospital.tenant, hospital.plain, 1, now_us()))
    await device.wait(lambda: bool(device.commands) and bool(device.acks))
    frame = device.commands[0]
    assert (frame.kind, frame.device, frame.fields()[0]) == (KIND_COMMAND, hospital.plain,
                                                             (0, 4, command.id))
    await device.publish(command_result(hospital.tenant, hospital.plain, 2, now_us(),
                                        command.id, commands.RESULT_SUCCEEDED))
    await wait_state(hospital.dsn, command.id, "succeeded")


async def test_backpressure_leaves_messages_at_the_broker(
        mqtt_device: Connect, logins: Logins, hospital: Hospital,
        service: IngestService) -> None:
    device = await mqtt_device(logins.plain)
    ts = now_us()
    messages = 300  # 15,000 frames: above the pipeline's high-water mark
    with psycopg.connect(hospital.dsn.replace("user=rmiot_app", "user=postgres")) as lock:
        lock.execute("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")  # the database "stalls"
        for m in range(messages):
            await device.publish(b"".join(vitals(hospital.tenant, hospital.plain, m * 50 + i,
                                                 ts + m * 50 + i) for i in range(50)))
        await eventually(lambda: service.pipeline.paused, 20)
        await asyncio.sleep(0.5)
        assert not device.acks  # nothing acked while nothing is committed
        adapter = service.transports.mqtt
        assert adapter is not None and not adapter.gate.open.is_set()
        # What arrived meanwhile waits unacknowledged; the broker keeps the rest.
        assert 0 < adapter.held <= service.cfg.mqtt.receive_maximum
        lock.rollback()
    await device.wait(lambda: len(device.acks) == messages * 50, timeout=60)
    assert {s for _, _, s in device.acks} == {ACK_OK}
    await wait_stored(hospital.dsn, hospital.plain, messages * 50)
    assert not service.pipeline.paused
