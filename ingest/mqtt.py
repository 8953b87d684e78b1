"""RMF and the JSON form over MQTT: the ingest side of the broker.

Topics, with R = ``mqtt.topic_root``:

=========================  ================================================
``R/up/<device id>``       RMF frames, one or more back to back (QoS 1)
``R/up/<device id>/json``  the spec's JSON form (QoS 1)
``R/down/<device id>``     ACK frames, after commit (a batch's acks for the
                           device in one message), and COMMAND frames (QoS 1)
``R/down/<device id>/json``  the same for a device that sent the JSON form:
                           ``{"acks": [{"seq", "status"}]}``,
                           ``{"commands": [{"id", "seq", "params"}]}``, or
                           ``{"error": {...}}`` for a payload not in the form
=========================  ================================================

The broker proves who publishes where: a device's login may publish only
under its own up topic (``rmiot.deploy.broker_auth``), so the topic's device id
is the sender's. A frame naming another device is refused UNKNOWN_DEVICE and
its NACK goes to the sender's downlink (``ingest.payload``); the tenant,
state, HMAC policy, window, rate and duplicate checks are the pipeline's.

One MQTT v5 client per ingest process, logged in as the platform
(``broker.platform_user``, ``ingest.broker_login``), subscribes with QoS 1 to
``$share/<mqtt.share_group>/R/up/+`` and ``.../+/json``: the broker hands each
message to one member of the group, so the ingest processes split the load.

Flow control. The client asks the broker for at most ``mqtt.receive_maximum``
unacknowledged messages in flight and sends each PUBACK itself once the message
is taken into the pipeline. While the pipeline is paused (``ReadGate``) it takes
nothing: what arrives is held, unacknowledged, so the broker stops at that
many and keeps the rest (QoS 1): backpressure, never drops. A PUBACK says
"taken", not "stored": the device's proof is the ACK frame on its downlink,
sent only after commit; frames lost with a crashed process have no ack and are
sent again.

Connection: started in the background and retried with backoff (0.1 s to 5 s)
while the broker is away; ingest over the other transports goes on meanwhile.
Every connect is a clean start: what the broker held for the lost session goes
with it, and devices resend what was not acknowledged.

A device's downlink is a ``DeviceSession`` per (device, form), ending
``ingest.idle_timeout_s`` after its last message (``ingest.sessions``); the
command dispatcher sends commands to the one the device used last.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections import deque

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from rmiot.config import Config
from rmiot.core_ext.jsonform import JsonFormError
from rmiot.ingest.answers import STATUS_NAMES, commands_json
from rmiot.ingest.broker_login import NoBrokerLogin, client_options
from rmiot.ingest.payload import device_id, json_events, rmf_events
from rmiot.ingest.pipeline import Pipeline
from rmiot.ingest.sessions import DeviceSession, ReadGate, Sessions, read_downlink

log = logging.getLogger("rmiot.ingest.mqtt")

V5 = aiomqtt.ProtocolVersion.V5


class MqttDownlink(DeviceSession):
    kind = "mqtt"  # the transport's name in metrics and traces
    """The sink of one device's messages in one form: publishes what the
    pipeline and the dispatcher send it on the device's down topic."""

    def __init__(self, adapter: MqttAdapter, device: int, json_form: bool) -> None:
        super().__init__(device)
        self.adapter = adapter
        self.json_form = json_form

    def send(self, data: bytes) -> None:
        if not self.json_form:
            self.adapter.publish(f"{self.adapter.down}{self.device}", data)
            return
        acks, commands = read_downlink(data)
        topic = f"{self.adapter.down}{self.device}/json"
        if acks:
            self.adapter.publish(topic, json.dumps({"acks": [
                {"seq": seq, "status": STATUS_NAMES.get(status, str(status))}
                for _, seq, status in acks]}).encode())
        if commands:
            self.adapter.publish(topic, json.dumps({"commands": commands_json(commands)},
                                                   ensure_ascii=False).encode())


class MqttAdapter:
    def __init__(self, cfg: Config, pipeline: Pipeline) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        root = cfg.mqtt.topic_root
        self.up = f"{root}/up/"
        self.down = f"{root}/down/"
        group = cfg.mqtt.share_group
        self.subscriptions = (f"$share/{group}/{root}/up/+", f"$share/{group}/{root}/up/+/json")
        self.stats = pipeline.stats
        self.gate = ReadGate()
        self.sessions: Sessions[tuple[int, bool], MqttDownlink] = Sessions(
            pipeline, lambda key: MqttDownlink(self, *key))
        self.connected = asyncio.Event()
        self._taking = asyncio.Event()
        self._taking.set()
        self._paho: paho.Client | None = None
        self._task: asyncio.Task[None] | None = None
        # Messages received while not taking, unacknowledged (so at most
        # mqtt.receive_maximum of them), in order, and the task that takes them.
        self._held: deque[paho.MQTTMessage] = deque()
        self._release: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start taking messages (connects in the background)."""
        self.pipeline.register(self.gate)
        self.sessions.start()
        self._task = asyncio.create_task(self._run(), name="mqtt-ingest")

    @property
    def held(self) -> int:
        """Messages received but not taken (the pipeline is paused)."""
        return len(self._held)

    async def stop_taking(self) -> None:
        """Stop taking messages for good (the pipeline's resume does not undo it);
        acks of what was taken still go out until ``stop``."""
        self._taking.clear()

    async def stop(self) -> None:
        for task in (self._task, self._release):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._release = None
        await self.sessions.stop()
        self.pipeline.unregister(self.gate)

    # -- the broker connection ------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.ReceiveMaximum = self.cfg.mqtt.receive_maximum
        return aiomqtt.Client(
            **client_options(self.cfg), protocol=V5, properties=props,
            identifier=f"rmiot-ingest-{socket.gethostname()}-{os.getpid()}-{id(self):x}",
            clean_start=True, keepalive=30, max_inflight_messages=1000,
            # Acks go out at once, not after Nagle's wait for the broker's delayed ACK.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                async with self._client() as client:
                    # aiomqtt connects, subscribes and reconnects; messages are
                    # taken from paho, under it, in its callback: no task and
                    # queue hop per message, and PUBACKs sent by us once a
                    # message is taken (aiomqtt has no manual acks).
                    self._paho = client._client
                    self._paho.manual_ack_set(True)
                    self._paho.on_message = self._on_message
                    self._held.clear()  # a clean start: the broker forgot them too
                    for topic in self.subscriptions:
                        await client.subscribe(topic, qos=1)
                    self.connected.set()
                    delay = 0.1
                    log.info("mqtt ingest subscribed", extra={"topics": self.subscriptions})
                    async for _ in client.messages:  # none come this way; ends on a disconnect
                        pass
            except (aiomqtt.MqttError, NoBrokerLogin) as exc:
                self.stats["mqtt_disconnects"] += 1
                log.warning("mqtt ingest lost the broker; retrying",
                            extra={"error": str(exc), "retry_s": delay})
            finally:
                self.connected.clear()
                self._paho = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    # -- messages ---------------------------------------------------------------------

    def _on_message(self, client: paho.Client, userdata: object,
                    message: paho.MQTTMessage) -> None:
        if self._held or not (self.gate.open.is_set() and self._taking.is_set()):
            self._held.append(message)
            if self._release is None or self._release.done():
                self._release = asyncio.get_running_loop().create_task(
                    self._take_held(), name="mqtt-held")
            return
        self._take_and_ack(message)

    async def _take_held(self) -> None:
        """Take the held messages, in order, once taking is allowed again."""
        while self._held:
            await self.gate.wait()
            await self._taking.wait()
            if self._held:
                self._take_and_ack(self._held.popleft())

    def _take_and_ack(self, message: paho.MQTTMessage) -> None:
        """``take``, then the PUBACK. A message that breaks ``take`` is logged
        and dropped, so one bad message cannot stop the others (its device has
        no ack for it: it sends it again)."""
        try:
            self.take(message.topic, bytes(message.payload))
        except Exception:
            self.stats["mqtt_failed_messages"] += 1
            log.exception("mqtt message could not be taken", extra={"topic": message.topic})
        if self._paho is not None:
            self._paho.ack(message.mid, message.qos)

    def take(self, topic: str, payload: bytes) -> None:
        """Hand one device message to the pipeline."""
        ident, _, form = topic.removeprefix(self.up).partition("/")
        device = device_id(ident) if topic.startswith(self.up) else None
        if device is None or form not in ("", "json"):
            self.stats["mqtt_bad_topic"] += 1
            return
        view = self.pipeline.view
        if form:
            try:
                events = json_events(payload, device, view)
            except JsonFormError as exc:
                self.stats[exc.code] += 1
                self.publish(f"{self.down}{device}/json", json.dumps({"error": {
                    "code": exc.code, "reason": exc.reason, "path": exc.path,
                    "detail": exc.detail}}).encode())
                return
        else:
            events = rmf_events(payload, device, view)
        if events:
            self.pipeline.accept(events, self.sessions.get((device, bool(form))))

    def publish(self, topic: str, payload: bytes) -> None:
        """QoS 1, without waiting for the broker's PUBACK; lost with the
        connection if it drops (the device resends, and is answered DUPLICATE)."""
        if self._paho is None:
            self.stats["mqtt_downlink_dropped"] += 1
            return
        self._paho.publish(topic, payload, qos=1)
