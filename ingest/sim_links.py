"""The simulator's links to the platform (``rmiot.ingest.simulator``): a
device's or a gateway's RMF TCP connection (``Link``), and gateways over MQTT
and HTTP — a hospital's building gateway publishes its sensors' and meters'
frames over MQTT, its ward gateway posts its wearables' frames over HTTP, as
such gateways do in hospitals. Each of those is a registered gateway device
with a transport login, its children registered behind it
(``devices.gateway_id``).

Every link keeps the same contract: every frame asks for an ack and is kept
until OK or DUPLICATE (``MAX_UNACKED`` per link: past it the oldest is dropped
and counted); what was not acknowledged is sent again after a reconnect (TCP,
MQTT) or a failed request (HTTP); COMMAND frames are answered with a
COMMAND_RESULT (success), as a device would. MQTT and HTTP gateways send the
frames of a tick in one message or request.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import Counter
from typing import cast

import aiohttp
import aiomqtt

from rmiot.config import Config
from rmiot.core_ext import ACK_DUPLICATE, ACK_OK, KIND_ACK, KIND_COMMAND, Frame, FrameDecoder
from rmiot.ingest import city
from rmiot.ingest.broker_login import client_options
from rmiot.ingest.client import command_result

MAX_UNACKED = 10_000
V5 = aiomqtt.ProtocolVersion.V5
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)


class Link(asyncio.Protocol):
    """One RMF TCP connection: a device's own, or a gateway's for several."""

    def __init__(self, devices: dict[int, city.Device], stats: Counter[str],
                 host: str = "", port: int = 0) -> None:
        self.devices = devices
        self.stats = stats
        self.host, self.port = host, port
        self.unacked: dict[tuple[int, int], bytes] = {}
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder()
        self.connecting = False

    @property
    def up(self) -> bool:
        return self.transport is not None

    async def open(self) -> None:
        try:
            await asyncio.get_running_loop().create_connection(lambda: self, self.host,
                                                               self.port)
        except OSError:
            self.stats["connect_failures"] += 1

    def tick(self) -> None:
        """Once a tick, after the tick's frames (batched links send them now)."""

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.decoder = FrameDecoder()
        self.stats["connects"] += 1
        if self.unacked:
            self.stats["resent"] += len(self.unacked)
            self.transport.write(b"".join(self.unacked.values()))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.stats["disconnects"] += 1

    def keep(self, device: int, seq: int, frame: bytes) -> None:
        if len(self.unacked) >= MAX_UNACKED:
            del self.unacked[next(iter(self.unacked))]
            self.stats["dropped_by_device"] += 1
        self.unacked[(device, seq)] = frame

    def send(self, device: int, seq: int, frame: bytes) -> None:
        self.keep(device, seq, frame)
        if self.transport is not None:
            self.transport.write(frame)

    def data_received(self, data: bytes) -> None:
        for ev in self.decoder.feed(data):
            if type(ev) is not Frame:
                continue
            if ev.kind == KIND_ACK:
                status = int(ev.fields()[0][2])  # type: ignore[call-overload]
                if status in (ACK_OK, ACK_DUPLICATE):
                    self.unacked.pop((ev.device, ev.seq), None)
                    self.stats["ok" if status == ACK_OK else "duplicate"] += 1
                else:
                    self.stats[f"refused_{status}"] += 1
            elif ev.kind == KIND_COMMAND and ev.device in self.devices:
                device = self.devices[ev.device]
                command_id = int(ev.fields()[0][2])  # type: ignore[call-overload]
                seq = device.next_seq()
                self.send(device.id, seq, command_result(
                    device.tenant, device.id, seq, time.time_ns() // 1000, command_id, 0))
                self.stats["commands"] += 1


class BatchedLink(Link):
    """A gateway whose frames leave once a tick, batched (``flush``)."""

    def __init__(self, devices: dict[int, city.Device], stats: Counter[str]) -> None:
        super().__init__(devices, stats)
        self.pending: list[bytes] = []
        self.connected = False
        self._flushing: asyncio.Task[None] | None = None

    def tick(self) -> None:
        if self.pending and self.connected and (self._flushing is None or
                                                self._flushing.done()):
            self._flushing = asyncio.create_task(self.flush(), name="sim-gateway-flush")

    async def flush(self) -> None:
        raise NotImplementedError

    @property
    def up(self) -> bool:
        return self.connected

    def send(self, device: int, seq: int, frame: bytes) -> None:
        self.keep(device, seq, frame)
        self.pending.append(frame)

    def resend_all(self) -> None:
        """After a reconnect or a failed request: everything not acknowledged."""
        if self.unacked:
            self.stats["resent"] += len(self.unacked)
            self.pending = list(self.unacked.values())


class MqttLink(BatchedLink):
    """A gateway on the broker: ``R/up/<gateway>``, acks on ``R/down/<gateway>``."""

    def __init__(self, devices: dict[int, city.Device], stats: Counter[str], cfg: Config,
                 gateway: int, login: tuple[str, str]) -> None:
        super().__init__(devices, stats)
        self.cfg = cfg
        self.gateway = gateway
        self.login = login
        root = cfg.mqtt.topic_root
        self.up_topic, self.down_topic = f"{root}/up/{gateway}", f"{root}/down/{gateway}"
        self.client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        options = client_options(self.cfg)
        options.update(username=self.login[0], password=self.login[1])
        client = aiomqtt.Client(**options, protocol=V5, identifier=self.login[0], timeout=5)
        try:
            await client.__aenter__()
            await client.subscribe(self.down_topic, qos=1)
        except (aiomqtt.MqttError, OSError):
            self.stats["connect_failures"] += 1
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)
            return
        self.client, self.connected = client, True
        self.stats["connects"] += 1
        self.resend_all()
        self._reader = asyncio.create_task(self._read(client), name="sim-mqtt-gateway")

    async def _read(self, client: aiomqtt.Client) -> None:
        try:
            async for message in client.messages:
                if isinstance(message.payload, bytes):
                    self.data_received(message.payload)
        except aiomqtt.MqttError:
            pass
        self.connected = False
        self.stats["disconnects"] += 1

    async def flush(self) -> None:
        if not self.pending or self.client is None or not self.connected:
            return
        payload, self.pending = b"".join(self.pending), []
        try:
            await self.client.publish(self.up_topic, payload, qos=1)
        except aiomqtt.MqttError:
            self.connected = False  # resent from unacked after the reconnect

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.__aexit__(None, None, None)
        self.client, self.connected = None, False


class HttpLink(BatchedLink):
    """A gateway posting to ``/v1/devices/<gateway>/frames``; the answer
    carries the ACK frames (and any COMMAND frames) as TCP would send them."""

    def __init__(self, devices: dict[int, city.Device], stats: Counter[str], cfg: Config,
                 gateway: int, login: tuple[str, str]) -> None:
        super().__init__(devices, stats)
        scheme = "https" if cfg.http.tls else "http"
        self.url = f"{scheme}://{cfg.http.host}:{cfg.http.port}/v1/devices/{gateway}/frames"
        self.auth = aiohttp.encode_basic_auth(*login)
        self.session: aiohttp.ClientSession | None = None
        self.ssl: ssl.SSLContext | bool = True
        if cfg.http.tls:
            self.ssl = ssl.create_default_context(cafile=str(cfg.tls_path("ca_file")))

    async def open(self) -> None:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=HTTP_TIMEOUT)
        self.connected = True
        self.resend_all()

    async def flush(self) -> None:
        if not self.pending or self.session is None:
            return
        body, self.pending = b"".join(self.pending), []
        headers = {"Content-Type": "application/octet-stream",
                   "Accept": "application/octet-stream", "Authorization": self.auth}
        try:
            async with self.session.post(self.url, data=body, headers=headers,
                                         ssl=self.ssl) as answer:
                data = await answer.read()
                ok = answer.status in (200, 202)
        except (aiohttp.ClientError, OSError, TimeoutError):
            ok, data = False, b""
        if ok:
            self.data_received(data)
        else:
            self.stats["connect_failures"] += 1
            self.connected = False  # the reconnect loop resends what is unacked

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        self.session, self.connected = None, False
