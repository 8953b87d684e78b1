"""The ingest service of one platform process: the registry's device view, the
pipeline with its batch writers, the transport adapters (TCP; MQTT, CoAP and
HTTP when enabled: ``ingest.device_transports``), the command dispatcher
that sends devices their commands over those connections, and the alarm rule
engine with its writer (``ingest.alarm_engine``, ``ingest.alarm_writer``),
whose system steps go to the audit chain.

Stopping is orderly so that nothing acknowledged is lost and as little as
possible is left for devices to retransmit: stop accepting, stop reading,
flush the open batch, wait (bounded) for the writers to commit and the acks to
go out, then close the connections.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from rmiot import db, observability
from rmiot.config import Config
from rmiot.ingest.alarm_engine import Engine, RuleBook
from rmiot.ingest.alarm_writer import AlarmWriter, OpenAlarms
from rmiot.ingest.device_transports import DeviceTransports
from rmiot.ingest.outbox import Outbox
from rmiot.ingest.pipeline import Pipeline
from rmiot.ingest.tcp import TcpAdapter
from rmiot.registry.commands import CommandDispatcher
from rmiot.registry.view import DeviceView
from rmiot.security.audit import AuditLog
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
        self.audit = AuditLog(dsn)
        self.open_alarms = OpenAlarms(dsn)
        self.rules = RuleBook(dsn)
        self.alarms = Engine(self.rules, self.open_alarms.is_open)
        self.alarm_writer = AlarmWriter(dsn, self.alarms, self.audit)
        self.pipeline.alarms = self.alarms
        self.tcp = TcpAdapter(cfg.ingest, self.pipeline)
        # MQTT, CoAP, HTTP: each when enabled in its config section.
        self.transports = DeviceTransports(cfg, self.pipeline)
        self.ports: dict[str, int] = {}  # their ports, once started
        self._unwatch: list[Callable[[], None]] = []

    async def start(self) -> int:
        """Start everything; returns the TCP port bound."""
        await self.view.start()
        await self.commands.start()
        await self.audit.start()
        await self.open_alarms.start()
        await self.rules.start()
        await self.alarm_writer.start()
        await self.pipeline.writer.start()
        port = await self.tcp.start()
        self.ports = await self.transports.start()
        self._unwatch = [observability.watch(name, read) for name, read in self._metrics()]
        log.info("ingest started", extra={"tcp_port": port, "devices": len(self.view.devices),
                                          "writers": self.cfg.ingest.writers})
        return port

    def _metrics(self) -> list[tuple[str, Callable[[], Iterable[observability.Sample]]]]:
        """What this process reports at each metrics collection (copies: the
        exporter may read from its own thread)."""
        pipeline, writer = self.pipeline, self.pipeline.writer
        return [
            ("rmiot.ingest.points", lambda: [
                ({"transport": kind, "tenant": tenant}, n)
                for (kind, tenant), n in pipeline.points_in.copy().items()]),
            ("rmiot.ingest.frames", lambda: [({"transport": kind}, n)
                                             for kind, n in pipeline.frames_in.copy().items()]),
            ("rmiot.ingest.rows_committed", lambda: [({}, writer.rows_committed)]),
            ("rmiot.ingest.queue.batches", lambda: [({}, writer.backlog)]),
            ("rmiot.ingest.queue.rows", lambda: [({}, pipeline.pending_rows)]),
            ("rmiot.ingest.connections", lambda: [({"transport": "tcp"},
                                                   len(self.tcp.connections))]),
        ]

    async def stop(self, drain_timeout: float = 10.0) -> None:
        for unwatch in self._unwatch:
            unwatch()
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
        await self.alarm_writer.stop()
        await self.rules.stop()
        await self.open_alarms.stop()
        await self.audit.stop()
        await self.commands.stop()
        await self.view.stop()
