"""The ingest service of one platform process: the registry's device view, the
pipeline with its batch writers, the transport adapters (TCP; MQTT, CoAP and
HTTP when enabled: ``ingest.device_transports``), and the command dispatcher
that sends devices their commands over those connections.

Stopping is orderly so that nothing acknowledged is lost and as little as
possible is left for devices to retransmit: stop accepting, stop reading,
flush the open batch, wait (bounded) for the writers to commit and the acks to
go out, then close the connections.
"""

from __future__ import annotations

import logging

from rmiot import db
from rmiot.config import Config
from rmiot.ingest.device_transports import DeviceTransports
from rmiot.ingest.outbox import Outbox
from rmiot.ingest.pipeline import Pipeline
from rmiot.ingest.tcp import TcpAdapter
from rmiot.registry.commands import CommandDispatcher
from rmiot.registry.view import DeviceView
from rmiot.security.sm4 import Keyring

log = logging.getLogger("rmiot.ingest")


class IngestService:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        dsn = db.app_dsn(cfg)
        self.view = DeviceView(dsn, Keyring.load(cfg.keyring_dir))
        self.pipeline = Pipeline(cfg.ingest, self.view, dsn)
        if cfg.platform.role == "hospital":  # committed frames also queue for the region
            self.pipeline.writer.outbox = Outbox(cfg.uplink)
        self.commands = CommandDispatcher(dsn)
        self.pipeline.dispatcher = self.commands
        self.tcp = TcpAdapter(cfg.ingest, self.pipeline)
        # MQTT, CoAP, HTTP: each when enabled in its config section.
        self.transports = DeviceTransports(cfg, self.pipeline)
        self.ports: dict[str, int] = {}  # their ports, once started

    async def start(self) -> int:
        """Start everything; returns the TCP port bound."""
        await self.view.start()
        await self.commands.start()
        await self.pipeline.writer.start()
        port = await self.tcp.start()
        self.ports = await self.transports.start()
        log.info("ingest started", extra={"tcp_port": port, "devices": len(self.view.devices),
                                          "writers": self.cfg.ingest.writers})
        return port

    async def stop(self, drain_timeout: float = 10.0) -> None:
        await self.tcp.stop_accepting()
        self.tcp.pause_all()
        await self.transports.stop_taking()
        self.pipeline.flush()
        if not await self.pipeline.writer.drain(drain_timeout):
            log.warning("stopping with uncommitted batches; devices will retransmit them",
                        extra={"batches": self.pipeline.writer.backlog})
        await self.tcp.close_all()
        await self.transports.stop()
        await self.pipeline.writer.stop()
        await self.commands.stop()
        await self.view.stop()
