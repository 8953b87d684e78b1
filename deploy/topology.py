"""Which of the platform's private PostgreSQL servers is the primary, and the
connection parameters that find it — after a failover too.

The record is ``<data_dir>/replication.json``, written only by ``rmiot db
replica create|drop`` and ``rmiot db failover``::

    {"nodes": [{"name": "pg", "port": 54329, "role": "primary"},
               {"name": "pg-replica", "port": 54330, "role": "standby", "sync": true}]}

``name`` is the node's directory under ``data_dir`` (``pg`` is the one
``rmiot db init`` made; its port is always ``database.port``). Roles:
``primary``; ``standby`` (streams from the primary; ``sync``: listed in the
primary's ``synchronous_standby_names``); ``fenced`` (a former primary after
a failover: it may hold transactions nobody acknowledged, so it is never
offered to clients again, and is only ever rebuilt as a standby). No file: the
single primary ``pg``.

Clients find the primary without knowing which node it is: ``endpoints``
lists every unfenced node, primary first, with
``target_session_attrs=read-write``, so libpq (and psycopg, which tries the
hosts in turn) skips a standby and a dead server; after a failover the same
DSN reaches the promoted standby. Every reconnecting client of the platform
(the batch writers, the LISTEN/NOTIFY views, the audit appender, the pools)
gets there on its own. ``read_endpoints`` prefers a standby, for read-only
queries that tolerate its lag.

This module imports nothing of the platform but its configuration, so
``rmiot.db`` can build its DSNs from it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rmiot.config import Config

FILE = "replication.json"
PRIMARY, STANDBY, FENCED = "primary", "standby", "fenced"


@dataclass
class NodeRecord:
    name: str
    port: int
    role: str
    sync: bool = False


@dataclass
class Topology:
    nodes: list[NodeRecord] = field(default_factory=list)

    @property
    def primary(self) -> NodeRecord:
        for node in self.nodes:
            if node.role == PRIMARY:
                return node
        raise LookupError("the replication record names no primary")

    @property
    def standbys(self) -> list[NodeRecord]:
        return [n for n in self.nodes if n.role == STANDBY]

    def find(self, name: str) -> NodeRecord | None:
        return next((n for n in self.nodes if n.name == name), None)


def path(cfg: Config) -> Path:
    return cfg.data_dir / FILE


def load(cfg: Config) -> Topology:
    """The record (the single primary ``pg`` when there is none)."""
    try:
        raw = json.loads(path(cfg).read_text())
    except FileNotFoundError:
        return Topology([NodeRecord("pg", cfg.database.port, PRIMARY)])
    nodes = [NodeRecord(**n) for n in raw["nodes"]]
    for node in nodes:
        if node.name == "pg":
            node.port = cfg.database.port
    return Topology(nodes)


def save(cfg: Config, topology: Topology) -> None:
    """Write the record atomically (a reader sees the old one or the new one)."""
    target = path(cfg)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({"nodes": [asdict(n) for n in topology.nodes]}, indent=2) + "\n")
    os.replace(tmp, target)


def socket_dir(cfg: Config, name: str) -> str:
    return str((cfg.data_dir / name).resolve() / "run")


def endpoints(cfg: Config) -> dict[str, str]:
    """``host``/``port`` (and ``target_session_attrs`` when there are several
    nodes) for a DSN that reaches the current primary of the private cluster.

    For ``rmiot.db.app_dsn``/``admin_dsn`` (see the module docstring)."""
    topo = load(cfg)
    ordered = [topo.primary, *topo.standbys]
    params = {"host": ",".join(socket_dir(cfg, n.name) for n in ordered),
              "port": ",".join(str(n.port) for n in ordered)}
    if len(ordered) > 1:
        params["target_session_attrs"] = "read-write"
    return params


def read_endpoints(cfg: Config) -> dict[str, str]:
    """Like ``endpoints`` but preferring a standby (read-only queries that
    accept replication lag; check it with ``replica.staleness_s``)."""
    topo = load(cfg)
    ordered = [*topo.standbys, topo.primary]
    params = {"host": ",".join(socket_dir(cfg, n.name) for n in ordered),
              "port": ",".join(str(n.port) for n in ordered)}
    if len(ordered) > 1:
        params["target_session_attrs"] = "prefer-standby"
    return params
