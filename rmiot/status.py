"""``rmiot status``: is each part of the platform reachable and healthy?

Checks, from the configuration alone (no running process is asked where it is):
the database (reachable, TimescaleDB extension, schema version), its standby
when there is one (answering, lag), the MQTT
broker (a real MQTT CONNECT), the RMF TCP listener (a TCP connect), and every
gRPC server (the standard health check over TLS). Exit code 0 when all pass, 3 when any fails.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiomqtt
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rmiot import db
from rmiot.config import Config
from rmiot.deploy import broker, cluster, migrate, topology
from rmiot.grpc_server import channel


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_database(cfg: Config) -> Check:
    dsn = db.app_dsn(cfg)
    try:
        version = cluster.timescaledb_version(dsn)
        schema = migrate.current_version(dsn)
    except db.DatabaseUnreachable as exc:
        return Check("database", False, str(exc))
    if version is None:
        return Check("database", False, f"{db.describe(dsn)}: TimescaleDB extension missing "
                                        "(run rmiot db migrate)")
    return Check("database", True, f"{db.describe(dsn)} TimescaleDB {version}, schema v{schema}")


async def check_broker(cfg: Config) -> Check:
    from rmiot.ingest.broker_login import NoBrokerLogin, read_login

    host, port = broker.endpoint(cfg)
    try:
        user, password = read_login(cfg)  # the platform's own login: anonymous is refused
    except NoBrokerLogin as exc:
        return Check("mqtt broker", False, f"mqtt://{host}:{port}: {exc}")
    try:
        async with aiomqtt.Client(host, port, timeout=3, identifier="rmiot-status",
                                  username=user, password=password):
            pass
    except (aiomqtt.MqttError, OSError) as exc:
        return Check("mqtt broker", False, f"mqtt://{host}:{port}: {exc}")
    return Check("mqtt broker", True, f"mqtt://{host}:{port} accepts connections")


async def check_grpc(cfg: Config, mtls: bool = False) -> Check:
    name = "grpc mtls" if mtls else "grpc api"
    port = cfg.grpc.mtls_port if mtls else cfg.grpc.port
    target = f"{cfg.grpc.host}:{port}"
    cert = None
    if mtls:
        key_path = cfg.data_dir / "certs" / "operator.key"
        if not key_path.exists():
            return Check(name, False, f"{target}: no operator certificate ({key_path})")
        cert = (key_path.read_bytes(), key_path.with_suffix(".crt").read_bytes())
    try:
        async with channel(cfg, port=port, client_cert=cert) as chan:
            stub = health_pb2_grpc.HealthStub(chan)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
    except (grpc.RpcError, OSError) as exc:
        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        return Check(name, False, f"{target}: {detail}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return Check(name, reply.status == health_pb2.HealthCheckResponse.SERVING,
                 f"{target} {status}")


async def check_tcp(cfg: Config) -> Check:
    host, port = cfg.ingest.tcp_host, cfg.ingest.tcp_port
    try:
        async with asyncio.timeout(3):
            _, writer = await asyncio.open_connection(host, port)
        writer.close()
        await writer.wait_closed()
    except (OSError, TimeoutError) as exc:
        return Check("rmf tcp", False, f"{host}:{port}: {exc or 'timed out'}")
    return Check("rmf tcp", True, f"{host}:{port} accepts device connections")


async def check_uplink(cfg: Config) -> Check:
    from rmiot.ingest import outbox

    ok, detail = await outbox.status(cfg)
    return Check("uplink", ok, detail)


def check_replica(cfg: Config) -> Check | None:
    """The standby, when there is one (private cluster's replica, or
    ``database.read_dsn``): answering, and how far behind."""
    if cfg.database.private:
        standbys = topology.load(cfg).standbys
        if not standbys:
            return None
        mode = "synchronous" if standbys[0].sync else "asynchronous"
    elif cfg.database.read_dsn:
        mode = "external"
    else:
        return None
    dsn = db.read_dsn(cfg)
    try:
        with db.connect(dsn, autocommit=True) as conn:
            row = conn.execute(db.STALENESS_SQL).fetchone()
    except db.DatabaseUnreachable as exc:
        return Check("replica", False, str(exc))
    if row is None or not row[1]:
        return Check("replica", False, f"{db.describe(dsn)}: no standby answers "
                                       "(reads go to the primary)")
    lag = float(row[0])
    return Check("replica", lag < 60, f"{db.describe(dsn)} {mode} standby, "
                                      f"{lag:.1f} s behind")


async def run_checks(cfg: Config) -> list[Check]:
    database = await asyncio.to_thread(check_database, cfg)
    replica = await asyncio.to_thread(check_replica, cfg)
    checks = [check_broker(cfg), check_tcp(cfg), check_grpc(cfg)]
    if cfg.grpc.tls:
        checks.append(check_grpc(cfg, mtls=True))
    if cfg.platform.role == "hospital":
        checks.append(check_uplink(cfg))
    rest = await asyncio.gather(*checks)
    return [database, *([replica] if replica else []), *rest]
