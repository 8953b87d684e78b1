"""Read routing with bounded staleness: with a streaming standby and
``query.replica_max_staleness_s`` set, the complex tier reads from the
standby and the simple tier from the primary; with the standby gone, the
complex tier reads from the primary again, and nothing fails for it."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from rmiot import status
from rmiot.deploy import pgnode, replica
from rmiot.query.service import QueryService
from rmiot.query.tiers import Deadline, Tier
from rmiot.security.service import SecurityServices
from rmiot.tenants import store as tenants_store
from tests.durability.conftest import Site

pytestmark = pytest.mark.slow


async def in_recovery(service: QueryService, tier: Tier) -> bool:
    """Is the server a query of ``tier`` reaches now a standby?"""
    assert service.servicer is not None
    deadline = Deadline(tier, service.options.budget(tier))
    async with service.servicer._connection(tier, deadline) as conn:
        cur = await conn.execute("SELECT pg_is_in_recovery()")
        row = await cur.fetchone()
    assert row is not None
    return bool(row[0])


async def test_complex_queries_read_from_a_fresh_standby_and_fall_back(site: Site) -> None:
    standby = await asyncio.to_thread(replica.create, site.cfg, False)  # asynchronous
    cfg = dataclasses.replace(site.cfg, query=dataclasses.replace(
        site.cfg.query, replica_max_staleness_s=5.0))
    security = SecurityServices(cfg)
    await security.start()
    service = QueryService(cfg, security.authorizer)
    await service.start()
    try:
        route = service.read_route
        assert route is not None
        # A standby that has replayed nothing yet has no age to tell: a write
        # on the primary gives it one, and the watcher finds it fresh.
        with site.app() as conn:
            tenants_store.create_tenant(conn, "rr-region", "Region", "region")
        for _ in range(50):
            if await route.check():
                break
            await asyncio.sleep(0.2)
        assert route.usable and route.standby
        assert route.staleness_s <= 5.0
        seen = await asyncio.to_thread(status.check_replica, site.cfg)  # rmiot status
        assert seen is not None and seen.ok and "asynchronous standby" in seen.detail
        assert await in_recovery(service, Tier.COMPLEX)
        assert await in_recovery(service, Tier.BATCH)
        assert not await in_recovery(service, Tier.SIMPLE)

        await asyncio.to_thread(pgnode.stop_now, replica.server_of(site.cfg, standby))
        route.failed()  # what a failing query does; the watcher confirms below
        assert not await in_recovery(service, Tier.COMPLEX)
        for _ in range(50):  # the watcher: the read DSN now finds the primary, lag 0
            if await route.check() and not route.standby:
                break
            await asyncio.sleep(0.2)
        assert route.usable and not route.standby
        seen = await asyncio.to_thread(status.check_replica, site.cfg)
        assert seen is not None and not seen.ok and "no standby answers" in seen.detail
        assert not await in_recovery(service, Tier.COMPLEX)
    finally:
        await service.stop()
        await security.stop()
