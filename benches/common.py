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
    started = False
    if cfg.database.private:
        pg = cluster.Cluster(cfg)
        started = pg.start()
        pg.drop_database(name)
        pg.ensure_database()
    else:
        with db.connect(db.admin_dsn(cfg, "postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
    migrate.migrate(db.admin_dsn(cfg))
    return cfg, db.app_dsn(cfg), started
