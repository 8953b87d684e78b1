"""The device transports beyond TCP — MQTT, CoAP, HTTP — each on when its
section of the configuration says ``enabled``, all feeding the one pipeline
of the ingest process (``ingest.service``), so checks, limits and
backpressure are the pipeline's and written once.

Stopping follows the service's order: ``stop_taking`` (no new messages or
requests; what is in the pipeline still gets its acks), then, once the
batches are committed, ``stop`` (close listeners and the broker connection,
end the device sessions — the dispatcher queues again the commands no
device confirmed).
"""

from __future__ import annotations

from rmiot import db
from rmiot.config import Config
from rmiot.ingest.coap import CoapAdapter
from rmiot.ingest.http import HttpAdapter
from rmiot.ingest.logins import LoginView
from rmiot.ingest.mqtt import MqttAdapter
from rmiot.ingest.pipeline import Pipeline


class DeviceTransports:
    def __init__(self, cfg: Config, pipeline: Pipeline) -> None:
        self.mqtt = MqttAdapter(cfg, pipeline) if cfg.mqtt.enabled else None
        # CoAP and HTTP check device logins themselves (the broker checks MQTT's).
        needs_logins = cfg.coap.enabled or cfg.http.enabled
        self.logins = LoginView(db.app_dsn(cfg)) if needs_logins else None
        self.coap = CoapAdapter(cfg, pipeline, self.logins) \
            if cfg.coap.enabled and self.logins else None
        self.http = HttpAdapter(cfg, pipeline, self.logins) \
            if cfg.http.enabled and self.logins else None

    async def start(self) -> dict[str, int]:
        """Start the enabled adapters; returns the ports bound by name."""
        ports: dict[str, int] = {}
        if self.logins is not None:
            await self.logins.start()
        if self.mqtt is not None:
            await self.mqtt.start()
        if self.coap is not None:
            ports["coap"] = await self.coap.start()
        if self.http is not None:
            ports["http"] = await self.http.start()
        return ports

    async def stop_taking(self) -> None:
        for adapter in (self.mqtt, self.coap, self.http):
            if adapter is not None:
                await adapter.stop_taking()

    async def stop(self) -> None:
        for adapter in (self.http, self.coap, self.mqtt):
            if adapter is not None:
                await adapter.stop()
        if self.logins is not None:
            await self.logins.stop()
