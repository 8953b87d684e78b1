"""AlarmPublisher: the notifier's MQTT channel — one connection of the
platform's own login (``broker_login``) to its broker, kept in the background.

``publish(topic, payload)`` sends at QoS 1 and returns once the broker's
PUBACK came back: that is the delivery's receipt. While the broker is away it
raises ``MqttUnavailable`` at once (fails closed for that delivery: the
notifier records the error and retries with its backoff, then dead-letters);
the connection is retried every 0.1 s to 5 s meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

import aiomqtt

from rmiot.config import Config
from rmiot.ingest.broker_login import NoBrokerLogin, client_options

log = logging.getLogger("rmiot.ingest.alarms")

PUBLISH_TIMEOUT_S = 5.0


class MqttUnavailable(OSError):
    """No broker connection right now."""


class AlarmPublisher:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect in the background (returns at once)."""
        self._task = asyncio.create_task(self._run(), name="alarm-mqtt")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def publish(self, topic: str, payload: bytes) -> None:
        """QoS 1; returns on the broker's PUBACK."""
        client = self._client
        if client is None:
            raise MqttUnavailable("no MQTT connection to the broker")
        try:
            await client.publish(topic, payload, qos=1, timeout=PUBLISH_TIMEOUT_S)
        except aiomqtt.MqttError as exc:
            raise MqttUnavailable(f"MQTT publish: {exc}") from exc

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                async with aiomqtt.Client(
                        **client_options(self.cfg), keepalive=30,
                        identifier=f"rmiot-alarms-{socket.gethostname()}-{os.getpid()}-"
                                   f"{id(self):x}") as client:
                    self._client = client
                    self.connected.set()
                    delay = 0.1
                    async for _ in client.messages:  # none: ends on a disconnect
                        pass
            except (aiomqtt.MqttError, NoBrokerLogin) as exc:
                log.warning("alarm notifications: MQTT broker unavailable; retrying",
                            extra={"error": str(exc), "retry_s": delay})
            finally:
                self._client = None
                self.connected.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
