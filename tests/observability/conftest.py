"""The ingest path's fixtures (a small hospital, the ingest configuration) for
the observability tests."""

from tests.ingest.conftest import hospital, ingest_cfg, keyring

__all__ = ["hospital", "ingest_cfg", "keyring"]
