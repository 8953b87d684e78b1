"""``rmiot run``: the platform in one process.

``prepare`` brings up what the platform stands on — the private TimescaleDB
cluster (unless ``database.dsn``), the schema, the private broker (unless
``broker.url``) and the dev certificates — and remembers what it started, so
that stopping the platform stops exactly those. ``Platform`` starts the
services of the configured role and stops them in reverse order.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass, field

import psycopg

from rmiot import db
from rmiot.audit_retention import AuditRetention
from rmiot.compliance_alarms import ComplianceAlarms
from rmiot.config import Config
from rmiot.db_metrics import DatabaseMetrics
from rmiot.deploy import broker, certs, cluster, migrate, replica
from rmiot.deploy.broker_auth import BrokerAuthSync
from rmiot.grpc_server import GrpcServer, Service
from rmiot.ingest import alarm_service, push
from rmiot.ingest.alarm_mqtt import AlarmPublisher
from rmiot.ingest.service import IngestService
from rmiot.ingest.simulator import Simulation, report, start_simulation
from rmiot.ingest.uplink import Uplink
from rmiot.ingest.workers import WorkerPool
from rmiot.interop import Interop
from rmiot.observability import Observability
from rmiot.ops_reports import MonthlyReports
from rmiot.outbound import Outbound
from rmiot.periodic import PeriodicJob
from rmiot.query import service as query_service
from rmiot.query.dashboard.demo import simulation_viewer
from rmiot.query.dashboard.server import Dashboard
from rmiot.query.jobs import QueryJobs
from rmiot.query.ops_energy import OpsEnergy
from rmiot.query.service import QueryService
from rmiot.registry import command_service, ops_service
from rmiot.registry import service as registry_service
from rmiot.registry.service import RegistryServicer
from rmiot.rpc_tracing import RpcTracing
from rmiot.security.service import SecurityServices

log = logging.getLogger("rmiot.platform")


@dataclass(frozen=True)
class Endpoint:
    name: str
    address: str
    detail: str = ""


@dataclass
class Infrastructure:
    cfg: Config
    started_cluster: bool = False
    started_broker: bool = False

    def up(self) -> None:
        """Start what is private and missing, migrate, make dev certificates."""
        if self.cfg.database.private:
            self.started_cluster = cluster.Cluster(self.cfg).start()
            replica.start_nodes(self.cfg)  # a standby (or a promoted node), if there is one
        cluster.check_reachable(db.admin_dsn(self.cfg))
        migrate.migrate(db.admin_dsn(self.cfg))
        if self.cfg.broker.private:
            self.started_broker = broker.Broker(self.cfg).start()
        if self.cfg.grpc.tls and not self.cfg.tls.cert_file:
            certs.ensure_dev_ca(self.cfg.data_dir / "certs")

    def down(self) -> None:
        if self.started_broker:
            broker.Broker(self.cfg).stop()
        if self.started_cluster:
            cluster.Cluster(self.cfg).stop()

    def endpoints(self) -> list[Endpoint]:
        found = [Endpoint("database", db.describe(db.app_dsn(self.cfg)),
                          "private cluster" if self.cfg.database.private else "external")]
        host, port = broker.endpoint(self.cfg)
        found.append(Endpoint("mqtt broker", f"mqtt://{host}:{port}",
                              "private" if self.cfg.broker.private else "external"))
        return found


class Api:
    """Every gRPC service of the platform's API beyond security's own, with
    their rules added to the interceptor (a method without a rule is refused).
    The tests mount exactly this, so the access suite covers every service the
    platform serves."""

    def __init__(self, security: SecurityServices, ingest: IngestService | None = None) -> None:
        assert security.pool is not None, "start the security services first"
        self.security = security
        self.ingest = ingest  # hospital platforms push frames into its pipeline
        security.add_rules(push.RULES)
        self.registry = RegistryServicer(security.dsn, security.keyring, security.authorizer)
        security.add_rules(command_service.RULES)
        security.add_rules(registry_service.RULES)
        self.query = QueryService(security.cfg, security.authorizer)
        security.add_rules(query_service.RULES)
        security.add_rules(alarm_service.RULES)
        security.add_rules(ops_service.RULES)
        self.ops = ops_service.OpsServices(security.dsn, OpsEnergy(security.dsn))
        self.alarms = alarm_service.AlarmServices(
            security.dsn, security.pool, security.authorizer, security.keyring, security.audit,
            mqtt=AlarmPublisher(security.cfg),
            outbound=Outbound(security.dsn, security.keyring, security.audit))

    async def start(self) -> None:
        await self.registry.start()
        await self.query.start()
        await self.alarms.start()
        await self.ops.start()

    def services(self) -> list[Service]:
        assert self.security.pool is not None
        out = [*self.security.services(), command_service.service(self.security.pool),
               self.registry.service(), *self.query.services(), self.alarms.service(),
               self.ops.service()]
        if self.ingest is not None:
            out.append(push.service(self.ingest.pipeline, self.security.authorizer))
        return out

    async def stop(self) -> None:
        await self.ops.stop()
        await self.alarms.stop()
        await self.query.stop()
        await self.registry.stop()


@dataclass
class Platform:
    cfg: Config
    grpc: GrpcServer | None = None
    ingest: IngestService | None = None
    workers: WorkerPool | None = None
    uplink: Uplink | None = None
    broker_auth: BrokerAuthSync | None = None
    security: SecurityServices | None = None
    api: Api | None = None
    query_jobs: QueryJobs | None = None
    ops_jobs: list[PeriodicJob] = field(default_factory=list)
    interop: Interop | None = None
    observability: Observability | None = None
    db_metrics: DatabaseMetrics | None = None
    dashboard: Dashboard | None = None
    endpoints: list[Endpoint] = field(default_factory=list)

    async def start(self) -> list[Endpoint]:
        cluster.check_reachable(db.app_dsn(self.cfg))
        self.observability = Observability(self.cfg.otel)  # first: the others report to it
        scrape = await self.observability.start()
        self.security = SecurityServices(self.cfg)
        await self.security.start()
        if self.cfg.mqtt.enabled and self.cfg.broker.private:
            # Device logins and ACLs of the private broker follow the registry.
            self.broker_auth = BrokerAuthSync(self.cfg, db.app_dsn(self.cfg))
            await self.broker_auth.start()
        self.ingest = IngestService(self.cfg)
        self.ingest.pipeline.on_abuse = self.security.ingest_abuse
        tcp_port = await self.ingest.start()
        self.workers = WorkerPool(self.cfg, tcp_port)
        extra = await self.workers.start()
        if self.cfg.platform.role == "hospital":  # forward committed frames to the region
            self.uplink = Uplink(self.cfg)
            await self.uplink.start()
        self.api = Api(self.security, self.ingest)
        await self.api.start()
        self.query_jobs = QueryJobs(self.cfg)  # rollups and retention
        await self.query_jobs.start()
        self.ops_jobs = [MonthlyReports.of(self.cfg),  # after each month; compliance alarms
                         ComplianceAlarms(db.app_dsn(self.cfg), self.cfg.ops.job_period_s)]
        if self.cfg.security.audit_retention_days:
            self.ops_jobs.append(AuditRetention(self.cfg))
        for job in self.ops_jobs:
            await job.start()
        tiers = {f"/{query_service.SERVICE}/{name}": tier.value
                 for name, (tier, _) in query_service.METHODS.items()}
        tiers[f"/{query_service.SERVICE}/Batch"] = "batch"
        self.grpc = GrpcServer(self.cfg, services=self.api.services(),
                               interceptors=[RpcTracing(tiers), self.security.interceptor])
        port = await self.grpc.start()
        scheme = "grpcs" if self.cfg.grpc.tls else "grpc"
        self.endpoints = [
            Endpoint("rmf tcp", f"tcp://{self.cfg.ingest.tcp_host}:{tcp_port}",
                     f"{1 + extra} ingest processes, {len(self.ingest.view.devices)} devices"),
            Endpoint("grpc api", f"{scheme}://{self.cfg.grpc.host}:{port}",
                     "Auth, Policy, Audit, Registry, Command, Query, Alarm, Ingest push; "
                     "health, reflection"),
            Endpoint("grpc mtls", f"grpcs://{self.cfg.grpc.host}:{self.grpc.mtls_port}",
                     "hospital platforms and vendors (client certificate)"),
        ]
        for name, bound in self.ingest.ports.items():  # MQTT, CoAP, HTTP when enabled
            self.endpoints.append(Endpoint(f"{name} devices", f"port {bound}", ""))
        if self.uplink:
            self.endpoints.append(Endpoint("uplink", self.cfg.uplink.target or "(not set)",
                                           "committed frames forwarded to the region"))
        self.interop = Interop(self.cfg, self.security, self.ingest)  # HL7, FHIR, DICOM
        self.endpoints += [Endpoint(*e) for e in await self.interop.start()]
        if self.cfg.dashboard.enabled:  # the API's own users, reach and audit
            self.dashboard = Dashboard(self.cfg, port, self.security.sessions,
                                       self.security.authorizer, self.security.audit,
                                       self._ingest_figures)
            self.endpoints.append(Endpoint("dashboard", await self.dashboard.start(),
                                           "web dashboard: log in as a user"))
        if scrape or self.cfg.otel.exporter != "none":  # alarm latency, outbox backlog
            self.db_metrics = DatabaseMetrics(db.app_dsn(self.cfg), 5.0,
                                              self.cfg.platform.role == "hospital")
            await self.db_metrics.start()
        if scrape:
            self.endpoints.append(Endpoint("metrics", scrape, "Prometheus scrape endpoint"))
        log.info("platform started", extra={"role": self.cfg.platform.role})
        return self.endpoints

    def _ingest_figures(self) -> dict[str, float]:
        """This process's ingest figures, for the dashboard."""
        assert self.ingest is not None
        pipeline = self.ingest.pipeline
        return {"stored": pipeline.stats["stored"], "backlog": pipeline.writer.backlog,
                "pending_rows": pipeline.pending_rows,
                "connections": len(self.ingest.tcp.connections)}

    async def stop(self) -> None:
        if self.dashboard:
            await self.dashboard.stop()
        if self.grpc:
            await self.grpc.stop()
        if self.uplink:
            await self.uplink.stop()
        if self.interop:
            await self.interop.stop()
        for job in self.ops_jobs:
            await job.stop()
        if self.query_jobs:
            await self.query_jobs.stop()
        if self.api:
            await self.api.stop()
        if self.workers:
            await self.workers.stop()
        if self.ingest:
            await self.ingest.stop()
        if self.broker_auth:
            await self.broker_auth.stop()
        if self.db_metrics:
            await self.db_metrics.stop()
        if self.security:
            await self.security.stop()  # last: the audit log flushes what the others wrote
        if self.observability:
            await self.observability.stop()  # flushes the last spans and metrics
        log.info("platform stopped")


async def _has_tenants(cfg: Config) -> bool:
    async with await psycopg.AsyncConnection.connect(db.app_dsn(cfg)) as conn:
        cur = await conn.execute("SELECT EXISTS (SELECT 1 FROM tenants)")
        row = await cur.fetchone()
    return bool(row and row[0])


async def serve(cfg: Config, infra: Infrastructure, on_ready: bool = True,
                simulate: str = "") -> None:
    """Run the platform until SIGINT or SIGTERM; with ``simulate`` (a city's
    size), a simulated city feeds it, with live rates on the terminal."""
    platform = Platform(cfg)
    sim: Simulation | None = None
    progress: asyncio.Task[None] | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        endpoints = infra.endpoints() + await platform.start()
        if on_ready:
            width = max(len(e.name) for e in endpoints)
            print(f"rmiot {cfg.platform.role} platform is up:", flush=True)
            for e in endpoints:
                print(f"  {e.name:<{width}}  {e.address}  {e.detail}".rstrip(), flush=True)
            if not simulate and not await _has_tenants(cfg):
                print("No tenants yet. Create the region and its security administrator:\n"
                      '  R=$(.venv/bin/rmiot tenants create city "City Health Commission" '
                      "--level region)\n"
                      "  .venv/bin/rmiot users create secadmin --tenant $R --role security_admin",
                      flush=True)
        if simulate:
            assert platform.ingest is not None
            sim = await start_simulation(cfg, simulate, port=platform.ingest.tcp.port)
            if platform.api is not None:  # its due dates: tasks and alarms now, not in an hour
                await asyncio.to_thread(platform.api.ops.compliance_pass)
            if platform.query_jobs is not None:  # its devices online in fleet status at once
                platform.query_jobs.refresh_soon()
            print(f"simulating {len(sim.hospitals)} hospitals, {sim.devices} devices "
                  f"(rmiot simulate --help)", flush=True)
            assert platform.security is not None
            viewer = await simulation_viewer(db.app_dsn(cfg), platform.security.authorizer)
            if viewer and platform.dashboard:
                print(f"dashboard {platform.dashboard.url}  log in as {viewer[0]}, password "
                      f"{viewer[1]} (the commission's de-identified view of the simulated "
                      "city)", flush=True)
            progress = asyncio.create_task(report(sim, sys.stdout, 10.0))
        if on_ready:
            print("Ctrl-C stops everything.", flush=True)
        await stop.wait()
    finally:
        if progress is not None:
            progress.cancel()
            await asyncio.gather(progress, return_exceptions=True)
        if sim is not None:
            await sim.finish()
            print(f"\n{sim.summary()}", flush=True)
        await platform.stop()
