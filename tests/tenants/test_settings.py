"""Tenant settings: validated, inherited down the tree, enforced where they
cannot be bypassed (the device quota in the database, HMAC policy and the
late-arrival window on the ingest path)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from rmiot.registry import store as registry
from rmiot.registry.view import DeviceView
from rmiot.security.sm4 import Keyring
from rmiot.tenants import settings, store
from tests.conftest import eventually


def tree(conn: psycopg.Connection) -> tuple[int, int, int]:  # type: ignore[type-arg]
    stamp = time.time_ns()
    region = store.create_tenant(conn, f"sr-{stamp}", "Region", "region")
    hospital = store.create_tenant(conn, f"sh-{stamp}", "Hospital", "hospital", region)
    ward = store.create_tenant(conn, f"sw-{stamp}", "Ward", "department", hospital)
    return region, hospital, ward


@pytest.mark.parametrize(("changes", "message"), [
    ({"require_hmac": "yes"}, "require_hmac"),
    ({"max_devices": -1}, "max_devices"),
    ({"late_window_s": 5}, "late_window_s"),
    ({"retention_days": {"audit": 90}}, "at least 180"),
    ({"retention_days": {"vitals": 30}}, "unknown data class"),
    ({"colour": "blue"}, "unknown tenant setting"),
])
def test_bad_settings_are_refused_by_name(changes: dict[str, object], message: str) -> None:
    with pytest.raises(settings.SettingsError, match=message):
        settings.validate(changes)


def test_settings_are_inherited_and_overridden(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        region, hospital, ward = tree(conn)
        settings.update(conn, region, {"require_hmac": True, "late_window_s": 86400})
        settings.update(conn, hospital, {"late_window_s": 3600})
        assert settings.effective(conn, ward) == {"require_hmac": True, "late_window_s": 3600}
        settings.update(conn, hospital, {"late_window_s": None})  # unset: inherit again
        assert settings.effective(conn, ward)["late_window_s"] == 86400


def test_device_quota_holds_for_single_and_bulk_inserts(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        _, hospital, ward = tree(conn)
        settings.update(conn, hospital, {"max_devices": 3})  # inherited by the ward
        for _ in range(3):
            registry.register_device(conn, ward)
        with pytest.raises(psycopg.errors.CheckViolation, match="device quota"):
            registry.register_device(conn, ward)
        with pytest.raises(psycopg.errors.CheckViolation):  # one statement, many rows
            conn.execute("INSERT INTO devices (id, tenant_id) SELECT nextval('device_id_seq'), "
                         "%s FROM generate_series(1, 5)", (hospital,))
        count = conn.execute("SELECT count(*) FROM devices WHERE tenant_id = ANY(%s)",
                             ([hospital, ward],)).fetchone()
    assert count == (3,)  # nothing half-made


async def test_the_ingest_view_follows_inherited_settings(database: str,
                                                           tmp_path: Path) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        region, _, ward = tree(conn)
        device = registry.register_device(conn, ward)
    view = DeviceView(database, Keyring.load(tmp_path / "keys"))
    await view.start()
    try:
        entry = view.get(device)
        assert entry is not None and not entry.auth_required and entry.late_window_us is None
        with psycopg.connect(database, autocommit=True) as conn:
            settings.update(conn, region, {"require_hmac": True, "late_window_s": 600})
        # The region's change reaches a ward's device within a second.
        await eventually(lambda: view.devices[device].auth_required, 1.0)
        assert view.devices[device].late_window_us == 600_000_000
    finally:
        await view.stop()


def test_tenants_command_sets_and_shows(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        _, hospital, ward = tree(conn)
    import os

    dbname = psycopg.conninfo.conninfo_to_dict(database)["dbname"]
    env = {**os.environ, "RMIOT_DATABASE_NAME": str(dbname)}
    rmiot = [sys.executable, "-m", "rmiot.cli", "tenants"]
    out = subprocess.run([*rmiot, "set", str(hospital), "max_devices=50",
                          'retention_days={"telemetry": 400}'], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    shown = subprocess.run([*rmiot, "show", str(ward)], env=env, capture_output=True, text=True,
                           timeout=60)
    assert '"max_devices": 50' in shown.stdout and '"telemetry": 400' in shown.stdout
    bad = subprocess.run([*rmiot, "set", str(hospital), "max_devices=lots"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "not JSON" in bad.stderr
