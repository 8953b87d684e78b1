"""Numbered SQL migrations: ``deploy/migrations/NNNN_name.sql``, applied in
order, each in its own transaction, recorded in ``schema_migrations`` with a
checksum. A recorded migration whose file has since changed is an error (write
a new migration instead). An advisory lock keeps two migrators apart.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from rmiot import db

log = logging.getLogger("rmiot.db")

MIGRATIONS = Path(__file__).with_name("migrations")
LOCK_KEY = 0x726D696F74  # "rmiot"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(Exception):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text()

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def available(directory: Path = MIGRATIONS) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(f"migration file {path.name} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a number")
    return found


def migrate(dsn: str, directory: Path = MIGRATIONS) -> list[Migration]:
    """Apply every migration not yet recorded; returns those applied now."""
    applied_now: list[Migration] = []
    with db.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            conn.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                                version integer PRIMARY KEY, name text NOT NULL,
                                checksum text NOT NULL,
                                applied_at timestamptz NOT NULL DEFAULT now())""")
            recorded = {v: c for v, c in conn.execute(
                "SELECT version, checksum FROM schema_migrations").fetchall()}
            for mig in available(directory):
                if mig.version in recorded:
                    if recorded[mig.version] != mig.checksum:
                        raise MigrationError(
                            f"migration {mig.path.name} changed after it was applied; "
                            "add a new migration instead")
                    continue
                with conn.transaction():
                    conn.execute(mig.sql.encode())
                    conn.execute("INSERT INTO schema_migrations (version, name, checksum) "
                                 "VALUES (%s, %s, %s)", (mig.version, mig.name, mig.checksum))
                log.info("applied migration", extra={"migration": mig.path.name})
                applied_now.append(mig)
            # The platform reports its schema version, so its role may read the record.
            conn.execute(f"""DO $$ BEGIN
                IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{db.APP_ROLE}') THEN
                    GRANT SELECT ON schema_migrations TO {db.APP_ROLE};
                END IF; END $$""".encode())
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    return applied_now


def current_version(dsn: str) -> int:
    with db.connect(dsn) as conn:
        row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
        if not row or not row[0]:
            return 0
        latest = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
        return int(latest[0]) if latest else 0
