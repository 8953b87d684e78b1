"""Every gRPC server: TLS, the standard health service, server reflection."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rmiot.config import Config
from rmiot.grpc_server import GrpcServer, channel


@pytest.fixture
async def server(dev_certs: Config) -> GrpcServer:
    cfg = dataclasses.replace(dev_certs, grpc=dataclasses.replace(dev_certs.grpc, port=0,
                                                                  mtls_port=0))
    srv = GrpcServer(cfg)
    await srv.start()
    yield srv  # type: ignore[misc]
    await srv.stop(0)


def _cfg(server: GrpcServer) -> Config:
    return dataclasses.replace(server.cfg,
                               grpc=dataclasses.replace(server.cfg.grpc, port=server.port))


async def test_health_over_tls(server: GrpcServer) -> None:
    async with channel(_cfg(server)) as chan:
        reply = await health_pb2_grpc.HealthStub(chan).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_services(server: GrpcServer) -> None:
    async with channel(_cfg(server)) as chan:
        stub = reflection_pb2_grpc.ServerReflectionStub(chan)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([req]), timeout=5):
            names = {s.name for s in reply.list_services_response.service}
            break
    assert {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


async def test_plaintext_client_is_refused(server: GrpcServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health_pb2_grpc.HealthStub(chan).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=3)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_graceful_stop_reports_not_serving(server: GrpcServer) -> None:
    await server.health.enter_graceful_shutdown()
    async with channel(_cfg(server)) as chan:
        reply = await health_pb2_grpc.HealthStub(chan).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
