"""Tier deadlines: a query that cannot finish in time (here: waiting for a
lock another session holds) ends in DEADLINE_EXCEEDED at the tier's budget or
the client's deadline, whichever is sooner — and its statement is cancelled in
the database, not left running."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import grpc
import psycopg

from rmiot.proto import query_pb2 as pb
from rmiot.query import calendar
from rmiot.query.tiers import QueryOptions, Tier
from tests.conftest import eventually
from tests.query.conftest import District, serving

FAST = QueryOptions(simple_s=0.3, complex_s=0.3, batch_s=3.0)


@contextlib.contextmanager
def locked(d: District, table: str) -> Iterator[psycopg.Connection[Any]]:
    """``table`` locked by another session until the block ends; yields that
    session (to look at the others from)."""
    with psycopg.connect(d.admin_dsn) as conn:
        conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE".encode())
        try:
            yield conn
        finally:
            conn.rollback()


def waiting(conn: psycopg.Connection[Any]) -> int:
    """Sessions of the platform's role waiting for a lock right now."""
    row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = 'rmiot_app' "
                       "AND wait_event_type = 'Lock' AND datname = current_database()"
                       ).fetchone()
    return int(row[0]) if row else 0


def hourly(d: District) -> pb.AggregateRequest:
    return pb.AggregateRequest(tenant_id=d.district, metrics=[1],
                               from_us=calendar.to_us(d.base), to_us=calendar.to_us(d.end),
                               bucket_s=3600, group_by=pb.GROUP_HOSPITAL)


async def timed_failure(call: object) -> tuple[grpc.StatusCode, str, float]:
    t0 = time.monotonic()
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or "", time.monotonic() - t0
    raise AssertionError("the call succeeded")


async def test_each_tier_ends_at_its_budget_and_cancels_its_statement(
        district: District) -> None:
    d = district
    async with serving(d, FAST) as server:
        client = server.client("admin_d")
        for table, method, request, tier in (
                ("devices", "Latest", pb.LatestRequest(device_id=d.monitors[d.a1][0]), "simple"),
                ("rollup_hour", "Aggregate", hourly(d), "complex")):
            with locked(d, table) as other:
                code, details, took = await timed_failure(client(method, request))
                assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
                assert f"the {tier} tier's deadline (0.3 s)" in details
                assert took < 2.0
                await eventually(lambda other=other: waiting(other) == 0, 2.0)  # type: ignore[misc]
            assert await client(method, request) is not None  # fine again once unlocked


async def test_the_tier_pools_carry_their_statement_timeout(district: District) -> None:
    async with serving(district, FAST) as server:
        for tier in (Tier.SIMPLE, Tier.COMPLEX):
            async with server.query.pools[tier].connection() as conn:
                cur = await conn.execute("SHOW statement_timeout")
                assert await cur.fetchone() == ("300ms",)


async def test_a_client_deadline_sooner_than_the_tier_is_held_too(district: District) -> None:
    d = district
    async with serving(d) as server:  # tiers of 1, 2 and 3 s
        client = server.client("admin_d")
        with locked(d, "devices") as other:
            code, _, took = await timed_failure(
                client("Latest", pb.LatestRequest(device_id=d.monitors[d.a1][0]), timeout=0.2))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED and took < 0.9
            await eventually(lambda: waiting(other) == 0, 2.0)


async def test_a_batch_item_out_of_time_does_not_hold_the_others(district: District) -> None:
    d = district
    async with serving(d, FAST) as server:
        items = [pb.BatchItem(id="latest", latest=pb.LatestRequest(
                     device_id=d.monitors[d.a1][0])),
                 pb.BatchItem(id="slow", aggregate=hourly(d)),
                 pb.BatchItem(id="fleet", fleet=pb.FleetRequest(tenant_id=d.district))]
        with locked(d, "rollup_hour") as other:
            t0 = time.monotonic()
            reply = await server.client("admin_d")("Batch", pb.BatchRequest(items=items))
            took = time.monotonic() - t0
            await eventually(lambda: waiting(other) == 0, 2.0)
        codes = [r.code for r in reply.results]
        assert codes == [0, grpc.StatusCode.DEADLINE_EXCEEDED.value[0], 0]
        assert reply.results[0].latest.values and reply.results[2].fleet.rows
        assert took < 2.0
    # The batch's own deadline bounds every item, whatever their tiers allow.
    async with serving(d, QueryOptions(batch_s=0.4)) as server:
        with locked(d, "rollup_hour"):
            t0 = time.monotonic()
            reply = await server.client("admin_d")("Batch", pb.BatchRequest(
                items=[pb.BatchItem(id=str(i), aggregate=hourly(d)) for i in range(3)]))
            assert time.monotonic() - t0 < 1.5
        assert {r.code for r in reply.results} == {grpc.StatusCode.DEADLINE_EXCEEDED.value[0]}
