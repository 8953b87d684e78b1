"""Schema v1 and the migration runner, against the real TimescaleDB."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from rmiot import db
from rmiot.deploy import migrate


def test_timescaledb_and_schema_version(database: str) -> None:
    with psycopg.connect(database) as conn:
        ext = conn.execute("SELECT extversion FROM pg_extension WHERE extname='timescaledb'")
        assert ext.fetchone() is not None
        rows = conn.execute("SELECT hypertable_name FROM timescaledb_information.hypertables "
                            "ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == ["audit_log", "telemetry"]
    assert migrate.current_version(database) == max(m.version for m in migrate.available())


def test_telemetry_chunking_and_single_unique_index(admin_dsn: str) -> None:
    with psycopg.connect(admin_dsn) as conn:
        interval = conn.execute(
            "SELECT time_interval FROM timescaledb_information.dimensions "
            "WHERE hypertable_name = 'telemetry'").fetchone()
        indexes = conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'telemetry'"
                               ).fetchall()
    assert interval is not None and interval[0] == dt.timedelta(days=1)
    assert len(indexes) == 1 and "UNIQUE" in indexes[0][0]
    assert "(device_id, ts DESC, seq)" in indexes[0][0]


# Far above the device id sequence: other suites' devices never get this id.
UNREGISTERED = (1 << 62) + 42


def test_retransmission_cannot_store_twice(database: str) -> None:
    row = ("2026-11-01 00:00:00+00", UNREGISTERED, 7, 1, 1, [1, 2], [72.0, 98.0])
    insert = ("INSERT INTO telemetry (ts, device_id, tenant_id, seq, kind, metrics, vals) "
              "VALUES (%s, %s, %s, %s, %s, %s, %s)")
    with psycopg.connect(database) as conn:
        conn.execute(insert, row)
        conn.commit()
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(insert, row)
        conn.rollback()
        count = conn.execute("SELECT count(*) FROM telemetry WHERE device_id = %s",
                             (UNREGISTERED,)).fetchone()
    assert count == (1,)


def test_app_role_cannot_rewrite_the_audit_log(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("INSERT INTO audit_log (ts, id, actor, method, outcome, prev_hash, hash) "
                     "VALUES (now(), 1, 'test', 'Test', 'ok', '\\x00', '\\x01')")
        for statement in ("UPDATE audit_log SET outcome = 'denied'", "DELETE FROM audit_log",
                          "TRUNCATE audit_log"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_migrations_apply_once_in_order_and_refuse_edits(admin_dsn: str, tmp_path: Path,
                                                          database: str) -> None:
    scratch = tmp_path / "migrations"
    scratch.mkdir()
    (scratch / "0001_a.sql").write_text("CREATE TABLE mig_a (x int);")
    (scratch / "0002_b.sql").write_text("INSERT INTO mig_a VALUES (2);")
    # A throwaway database so the suite's own schema is untouched.
    name = conninfo_to_dict(admin_dsn)["dbname"] + "_mig"
    with db.connect(db.with_database(admin_dsn, "postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    dsn = db.with_database(admin_dsn, name)
    try:
        assert [m.version for m in migrate.migrate(dsn, scratch)] == [1, 2]
        assert migrate.migrate(dsn, scratch) == []
        (scratch / "0003_bad.sql").write_text("INSERT INTO nope VALUES (1);")
        with pytest.raises(psycopg.errors.UndefinedTable):
            migrate.migrate(dsn, scratch)
        assert migrate.current_version(dsn) == 2  # the failed one left nothing behind
        (scratch / "0003_bad.sql").unlink()
        shutil.copy(scratch / "0002_b.sql", scratch / "tmp")
        (scratch / "0002_b.sql").write_text("INSERT INTO mig_a VALUES (3);")
        with pytest.raises(migrate.MigrationError, match="changed after it was applied"):
            migrate.migrate(dsn, scratch)
        (scratch / "bad-name.sql").write_text("")
        with pytest.raises(migrate.MigrationError, match=r"NNNN_name\.sql"):
            migrate.available(scratch)
    finally:
        with db.connect(db.with_database(admin_dsn, "postgres"), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
