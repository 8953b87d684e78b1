"""Failover under load: nothing acknowledged is lost.

Devices stream frames with ACK_REQ through a real ingest process whose DSN
lists the primary and its synchronous replica. The primary's postmaster is
killed with SIGKILL mid-load, the replica is promoted (``rmiot db
failover``), and the ingest process — its batch writers and its registry
view — reconnects to it on its own while the devices keep their TCP
connections. Every frame a device holds an OK or DUPLICATE ack for is then on
the new primary, exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from rmiot.core_ext import ACK_UNKNOWN_DEVICE
from rmiot.deploy import pgnode, replica, topology
from rmiot.ingest.client import RmfClient
from rmiot.registry import store
from rmiot.tenants import store as tenants_store
from tests.conftest import eventually, free_port
from tests.durability.conftest import Site, ingest_worker, kill_postmaster, stop_worker
from tests.ingest.conftest import now_us, vitals

pytestmark = pytest.mark.slow
DEVICES = 4
FRAMES = 2000


async def send_all(client: RmfClient, tenant: int, device: int, first_ts: int) -> None:
    """A device sending FRAMES frames in bursts of 50."""
    for start in range(0, FRAMES, 50):
        for seq in range(start, start + 50):
            client.send(vitals(tenant, device, seq, first_ts + seq), device, seq)
        with contextlib.suppress(OSError):
            await client.drain()
        await asyncio.sleep(0.01)


def stored_rows(site: Site) -> dict[tuple[int, int], int]:
    with site.app() as conn:
        rows = conn.execute("SELECT device_id, seq, count(*) FROM telemetry "
                            "GROUP BY 1, 2").fetchall()
    return {(d, s): n for d, s, n in rows}


def rows_now(site: Site) -> int:
    with site.app() as conn:
        row = conn.execute("SELECT count(*) FROM telemetry").fetchone()
    return int(row[0]) if row else 0


async def test_primary_killed_under_load_fails_over_losing_no_ack(site: Site) -> None:
    with site.app() as conn:
        region = tenants_store.create_tenant(conn, "fo-region", "Region", "region")
        hospital = tenants_store.create_tenant(conn, "fo-h", "Hospital", "hospital", region)
        devices = [store.register_device(conn, hospital) for _ in range(DEVICES)]
    standby = await asyncio.to_thread(replica.create, site.cfg, True)
    assert standby.sync
    port = free_port()
    worker = await asyncio.to_thread(ingest_worker, site, port)
    clients = [RmfClient("127.0.0.1", port) for _ in devices]
    try:
        for c in clients:
            await c.connect()
        ts = now_us()
        tasks = [asyncio.create_task(send_all(c, hospital, d, ts))
                 for c, d in zip(clients, devices, strict=True)]
        await eventually(lambda: sum(len(c.acked) for c in clients) >= 1500, 60)

        await asyncio.to_thread(kill_postmaster, site.primary)
        killed = time.monotonic()
        acked_at_kill = set().union(*(c.acked for c in clients))
        assert len(acked_at_kill) < FRAMES * DEVICES  # killed mid-load, as intended
        result = await asyncio.to_thread(replica.failover, site.cfg)
        assert (result.old_primary, result.new_primary) == ("pg", "pg-replica")
        before = await asyncio.to_thread(rows_now, site)
        await eventually(lambda: rows_now(site) > before, 30, interval=0.02)
        recovery_s = time.monotonic() - killed

        await asyncio.gather(*tasks)
        for c in clients:
            assert c.connected, "a device lost its connection to the ingest process"
            assert await c.wait_acked(60)
        stored = await asyncio.to_thread(stored_rows, site)
        acked = set().union(*(c.acked for c in clients))

        # The ingest process's registry view follows the new primary too: a
        # device suspended there is refused within seconds.
        with site.app() as conn:
            store.set_state(conn, devices[0], "suspended")
        probe, seq = clients[0], FRAMES
        while not probe.statuses[ACK_UNKNOWN_DEVICE]:
            assert seq < FRAMES + 500, "the registry view did not follow the failover"
            probe.send(vitals(hospital, devices[0], seq, now_us()), devices[0], seq)
            seq += 1
            await asyncio.sleep(0.02)
    finally:
        for c in clients:
            await c.close()
        await asyncio.to_thread(stop_worker, worker)

    assert all(n == 1 for n in stored.values()), "a frame was stored twice"
    assert not acked_at_kill - set(stored), "acknowledged frames lost in the failover"
    assert acked <= set(stored)
    assert len(stored) == FRAMES * DEVICES  # retransmissions filled in the rest
    assert recovery_s < 10, f"first commit on the new primary {recovery_s:.1f} s after the kill"
    # The DSN reaches the promoted node; the old primary is fenced for good.
    topo = topology.load(site.cfg)
    old = topo.find("pg")
    assert topo.primary.name == "pg-replica" and old is not None and old.role == "fenced"
    assert (site.primary.data / "standby.signal").exists()
    with site.app() as conn:
        assert conn.info.port == standby.port
    assert pgnode.in_recovery(replica.server_of(site.cfg, topo.primary)) is False
