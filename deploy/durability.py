"""The configuration keys of replicas and backups, with their defaults.

| key | default | meaning |
|---|---|---|
| ``database.replica_port`` | 54330 | port of the private standby ``pg-replica`` |
| ``database.replica_sync`` | true | an ack waits for the standby's flush (see ``replica``) |
| ``backup.dir`` | ``<data_dir>/backup`` | base backups and the WAL archive |
| ``backup.keep`` | 7 | verified base backups kept by ``rmiot backup prune`` |
| ``backup.archive_timeout_s`` | 60 | a WAL segment is archived at least this often under load |

"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rmiot.config import Config

DEFAULT_REPLICA_PORT = 54330


@dataclass(frozen=True)
class DurabilitySettings:
    replica_port: int = DEFAULT_REPLICA_PORT
    replica_sync: bool = True
    backup_dir: Path | None = None  # None: <data_dir>/backup, resolved by backup.layout
    keep: int = 7
    archive_timeout_s: int = 60


def settings(cfg: Config) -> DurabilitySettings:
    return DurabilitySettings(
        replica_port=cfg.database.replica_port, replica_sync=cfg.database.replica_sync,
        backup_dir=Path(cfg.backup.dir) if cfg.backup.dir else None,
        keep=cfg.backup.keep, archive_timeout_s=cfg.backup.archive_timeout_s)
