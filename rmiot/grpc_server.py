"""Conventions every rmiot gRPC server follows, written once.

- two listeners with the same services: ``grpc.port`` with TLS (1.2+, the
  configured or dev-CA certificate) for people, who log in; and
  ``grpc.mtls_port`` with mutual TLS for hospital platforms and vendors, whose
  client certificate from the platform's CA is required and verified in the
  handshake (gRPC cannot ask for a certificate without requiring one, hence two
  ports). ``grpc.tls = false`` (local development only) makes the first
  plaintext and leaves the second closed.
- The standard ``grpc.health.v1.Health`` service, with a status per service
  (``""`` is the whole server), and server reflection listing every service.
- ``SO_REUSEPORT`` so several processes on one host can share the port.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # what grpc_health.v1.health.aio names
from grpc_reflection.v1alpha import reflection

from rmiot.config import Config

log = logging.getLogger("rmiot.grpc")

# The stubs make these generic; at run time they are plain classes.
if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
    ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Context = grpc.aio.ServicerContext
    ServerInterceptor = grpc.aio.ServerInterceptor

HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


@dataclass(frozen=True)
class Service:
    """A servicer to mount: its full proto name, the generated ``add_*_to_server``
    function and the implementation."""

    name: str
    add: Callable[[Any, grpc.aio.Server], None]
    servicer: Any


@dataclass
class GrpcServer:
    cfg: Config
    services: Sequence[Service] = ()
    interceptors: Sequence[ServerInterceptor] = ()
    server: grpc.aio.Server | None = None
    health: HealthServicer = field(default_factory=HealthServicer)
    port: int = 0
    mtls_port: int = 0

    async def start(self) -> int:
        """Bind and start; returns the bound port (useful when configured as 0)."""
        server = grpc.aio.server(interceptors=list(self.interceptors), options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 60_000),
        ])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [HEALTH_NAME, reflection.SERVICE_NAME]
        for svc in self.services:
            svc.add(svc.servicer, server)
            names.append(svc.name)
        reflection.enable_server_reflection(names, server)
        address = f"{self.cfg.grpc.host}:{self.cfg.grpc.port}"
        if self.cfg.grpc.tls:
            self.port = server.add_secure_port(address, server_credentials(self.cfg))
            self.mtls_port = server.add_secure_port(
                f"{self.cfg.grpc.host}:{self.cfg.grpc.mtls_port}",
                server_credentials(self.cfg, require_client_cert=True))
        else:
            log.warning("gRPC listener is PLAINTEXT (grpc.tls = false): development only")
            self.port = server.add_insecure_port(address)
        await server.start()
        self.server = server
        for name in ["", *(svc.name for svc in self.services)]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        if self.server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.server = None


def server_credentials(cfg: Config, require_client_cert: bool = False) -> grpc.ServerCredentials:
    key, cert, ca = (_tls_file(cfg, k) for k in ("key_file", "cert_file", "ca_file"))
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=require_client_cert)


def _tls_file(cfg: Config, key: str) -> bytes:
    path = cfg.tls_path(key)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"TLS file {path} (tls.{key}) does not exist: set tls.{key}, "
                                "or run 'rmiot certs dev' for development") from None


def channel(cfg: Config, host: str | None = None, port: int | None = None,
            client_cert: tuple[bytes, bytes] | None = None) -> grpc.aio.Channel:
    """An async channel to a platform gRPC server, with TLS when the server uses it.

    ``client_cert`` is (key PEM, certificate PEM) for mTLS callers; they reach
    ``grpc.mtls_port`` unless ``port`` says otherwise."""
    default = cfg.grpc.mtls_port if client_cert else cfg.grpc.port
    target = f"{host or cfg.grpc.host}:{port or default}"
    if not cfg.grpc.tls:
        return grpc.aio.insecure_channel(target)
    key, cert = client_cert or (None, None)
    creds = grpc.ssl_channel_credentials(_tls_file(cfg, "ca_file"), key, cert)
    return grpc.aio.secure_channel(target, creds)
