"""The city simulator over a mix of transports: with the MQTT and HTTP
adapters enabled, each hospital's building gateway publishes over MQTT and its
ward gateway posts over HTTP (fresh logins, the broker's files following the
registry), the rest over RMF TCP; every device behind a gateway reports and
is acknowledged, nothing is refused."""

from __future__ import annotations

import dataclasses

import psycopg

from rmiot.config import Config
from rmiot.ingest import city, simulator
from rmiot.ingest.service import IngestService
from rmiot.ingest.sim_links import HttpLink, MqttLink
from tests.conftest import eventually


async def test_gateways_report_over_mqtt_and_http(transports_cfg: Config,
                                                  service: IngestService,
                                                  database: str) -> None:
    assert service.transports.http is not None and service.tcp is not None
    cfg = dataclasses.replace(transports_cfg, http=dataclasses.replace(
        transports_cfg.http, port=service.transports.http.port))
    sim = await simulator.start_simulation(cfg, "small", hospitals=1, port=service.tcp.port,
                                           speed=30)
    try:
        own = sum(k.per_hospital for k in city.KINDS if not k.gateway)  # one link each
        over = {"building": "mqtt", "ward": "http"}
        tcp_gateways = {k.gateway for k in city.KINDS if k.gateway and k.gateway not in over}
        assert sim.transports() == {"tcp": own + len(tcp_gateways), "mqtt": 1, "http": 1}
        gateways = [link for link in sim.links if isinstance(link, MqttLink | HttpLink)]
        children = [d for link in gateways for d in link.devices]
        assert len(children) == sum(k.per_hospital for k in city.KINDS if k.gateway in over)
        await eventually(lambda: all(link.up for link in gateways), 10, 0.1)
        with psycopg.connect(database, autocommit=True) as conn:
            def reported() -> int:
                row = conn.execute("SELECT count(DISTINCT device_id) FROM telemetry "
                                   "WHERE device_id = ANY (%s)", (children,)).fetchone()
                return int(row[0]) if row else 0

            await eventually(lambda: reported() == len(children), 20, 0.2)
        await eventually(lambda: sim.stats["ok"] >= 500, 20, 0.1)
    finally:
        await sim.finish()
    assert not any(k.startswith("refused_") for k in sim.stats), sim.stats
    assert all(not link.unacked for link in gateways)
