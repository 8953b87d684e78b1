"""What every benchmark shares: a fresh database of its own, so a benchmark
never touches the platform's data or another benchmark's."""

from __future__ import annotations

import dataclasses

from rmiot import db
from rmiot.config import Config, load
from rmiot.deploy import cluster, migrate


def fresh_database(name: str) -> tuple[Config, str, bool]:
    """Drop, create and migrate database ``name`` (starting the private cluster
    if needed). Returns the configuration pointing at it, its application DSN,
    and True when the cluster was started here (the caller stops it)."""
    cfg = load()
    cfg = dataclasses.replace(cfg, database=dataclasses.replace(cfg.database, name=name))
    started = cluster.recreate_database(cfg)
    migrate.migrate(db.admin_dsn(cfg))
    return cfg, db.app_dsn(cfg), started
