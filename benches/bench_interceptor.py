"""Interceptor overhead: a trivial RPC (AuthService.WhoAmI) through the full
security interceptor (session lookup, rate limits, Casbin decision, audit
append) versus the same servicer on a server without it, same process, same
run, over TLS on loopback. Prints figures; last line one JSON object with
``interceptor_overhead_p50_ms`` (and p99)."""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import psycopg
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ingest import prepare_database

from rmiot.grpc_server import GrpcServer, Service, channel
from rmiot.proto import auth_pb2, auth_pb2_grpc
from rmiot.security import identity
from rmiot.security.service import SecurityServices
from rmiot.tenants import store as tenants

CALLS = 3000


async def timed(stub: auth_pb2_grpc.AuthServiceStub, metadata: tuple[tuple[str, str], ...],
                calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=metadata)
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def main() -> None:
    cfg, dsn, _ = prepare_database()
    # Limits out of the way: one caller issues thousands of calls a second here.
    cfg = dataclasses.replace(
        cfg, grpc=dataclasses.replace(cfg.grpc, port=0, mtls_port=0),
        security=dataclasses.replace(cfg.security, caller_rate_per_s=1e6,
                                     tenant_rate_per_s=1e6))
    with psycopg.connect(dsn, autocommit=True) as conn:
        region = tenants.create_tenant(conn, "bench-r", "Region", "region")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
        await identity.create_user(aconn, "bench-user", "Bench-Pass-1", region,
                                   must_change=False)
    security = SecurityServices(cfg)
    await security.start()
    await security.authorizer.grant("user:bench-user", "clinician", region)
    guarded = GrpcServer(cfg, services=security.services(), interceptors=[security.interceptor])
    plain = GrpcServer(cfg, services=[Service(s.name, s.add, s.servicer)
                                      for s in security.services()])
    await guarded.start()
    await plain.start()
    try:
        def stub(port: int) -> auth_pb2_grpc.AuthServiceStub:
            c = dataclasses.replace(cfg, grpc=dataclasses.replace(cfg.grpc, port=port))
            return auth_pb2_grpc.AuthServiceStub(channel(c))

        with_stub, without_stub = stub(guarded.port), stub(plain.port)
        token = (await with_stub.Login(auth_pb2.LoginRequest(
            username="bench-user", password="Bench-Pass-1"))).token
        meta = (("authorization", f"Bearer {token}"),)
        await timed(with_stub, meta, 300)  # warm both paths
        await timed(without_stub, (), 300)
        with_ms, without_ms = [], []
        for _ in range(5):  # interleaved rounds so machine noise hits both alike
            with_ms += await timed(with_stub, meta, CALLS // 5)
            without_ms += await timed(without_stub, (), CALLS // 5)
        await security.audit.flush()
    finally:
        await guarded.stop(0)
        await plain.stop(0)
        await security.stop()

    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100)[int(q) - 1]

    result = {
        "with_p50_ms": round(statistics.median(with_ms), 4),
        "without_p50_ms": round(statistics.median(without_ms), 4),
        "interceptor_overhead_p50_ms": round(statistics.median(with_ms)
                                             - statistics.median(without_ms), 4),
        "interceptor_overhead_p99_ms": round(pct(with_ms, 99) - pct(without_ms, 99), 4),
        "calls": len(with_ms),
    }
    print(f"WhoAmI p50: {result['with_p50_ms']} ms with the interceptor, "
          f"{result['without_p50_ms']} ms without")
    print(json.dumps(result))


if __name__ == "__main__":
    uvloop.run(main())
