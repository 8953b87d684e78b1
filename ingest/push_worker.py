"""A region process for hospital platforms' pushes: the ingest service (device
view, pipeline, batch writers, the RMF TCP listener) and a gRPC server with
IngestService behind the security interceptor (mTLS on ``grpc.mtls_port``,
every call authorised and audited), sharing one pipeline — what the platform
process serves, without the people-facing services. For regions that give
hospital uplinks processes (or hosts) of their own, and for the federation
tests and benchmark.

``python -m rmiot.ingest.push_worker`` with the usual configuration. Prints
``PORT <tcp port>`` then ``MTLS <mtls port>`` once listening; stops cleanly
(drains its batches, answers pending pushes) on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop

from rmiot import logs
from rmiot.config import load
from rmiot.grpc_server import GrpcServer
from rmiot.ingest import push
from rmiot.ingest.service import IngestService
from rmiot.security.service import SecurityServices


async def main() -> None:
    cfg = load()
    logs.setup(cfg.log.level, "json")
    security = SecurityServices(cfg)
    await security.start()
    ingest = IngestService(cfg)
    ingest.pipeline.on_abuse = security.ingest_abuse
    port = await ingest.start()
    security.add_rules(push.RULES)
    server = GrpcServer(cfg, services=[push.service(ingest.pipeline, security.authorizer)],
                        interceptors=[security.interceptor])
    await server.start()
    print(f"PORT {port}", flush=True)
    print(f"MTLS {server.mtls_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    await ingest.stop()
    await security.stop()
    print(f"STATS {dict(ingest.pipeline.stats)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    uvloop.run(main())
