"""Data destruction: two security administrators, the patient's identity
crypto-shredded everywhere — a backup taken before included — telemetry gone
and the rollups recomputed without it, the audit chain still verifying."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pyotp
import pytest

from rmiot.core_ext import encode_frame
from rmiot.deploy import backup, destroy, pgnode, restore
from rmiot.deploy.destroy import Credentials, DestroyError
from rmiot.ingest.marks import MARK_SQL
from rmiot.query.rollups import JobSettings, RollupJob
from rmiot.registry import store
from rmiot.security import identity, patient_keys, patients
from rmiot.security.audit_verify import verify
from rmiot.security.patient_keys import PatientKeys
from rmiot.security.patients import PatientIdentity
from rmiot.security.sealed import patient_aad
from rmiot.security.sm4 import SealError
from rmiot.tenants import store as tenants_store
from tests.durability.conftest import Site

pytestmark = pytest.mark.slow
PASSWORD = "Correct-Horse1"
ZHANG = PatientIdentity("张三", "110101199003071234", "13812345678")
LI = PatientIdentity("李四", "110101198502021111", "13900001111")
WANG = PatientIdentity("王五", "110101197001013333")


def person(site: Site, name: str, tenant: int, role: str | None) -> str:
    """A user with a TOTP secret and, maybe, a role on ``tenant``; returns the secret."""
    async def create() -> str:
        async with await psycopg.AsyncConnection.connect(site.dsn(), autocommit=True) as conn:
            user_id = await identity.create_user(conn, name, PASSWORD, tenant, must_change=False)
            return await identity.enroll_totp(conn, site.keyring, user_id)

    secret = asyncio.run(create())
    if role:
        with site.admin() as conn:
            conn.execute("INSERT INTO authz_grants (subject, role, tenant_id) VALUES (%s, %s, %s)",
                         (f"user:{name}", role, tenant))
    return secret


def roll_up(site: Site) -> None:
    """One run of the rollup job, refreshing the open hour too."""
    asyncio.run(RollupJob(site.dsn(), JobSettings(open_refresh_s=0)).run_once())


def rolled_up(site: Site, tenant: int) -> int:
    """Points of the hospital's cell in the hour rollups."""
    with site.app() as conn:
        row = conn.execute("SELECT coalesce(sum(n), 0) FROM rollup_hour WHERE home_id = %s",
                           (tenant,)).fetchone()
    return int(row[0]) if row else 0


def test_patient_destroyed_for_good_by_two_admins(site: Site) -> None:
    keys = PatientKeys(site.keyring)
    pseudo = patients.pseudonym_key(site.cfg.keyring_dir)
    with site.app() as conn:
        region = tenants_store.create_tenant(conn, "d-r", "Region", "region")
        tenant = tenants_store.create_tenant(conn, "d-h", "Hospital", "hospital", region)
        bedside, other = store.register_device(conn, tenant), store.register_device(conn, tenant)
        zhang, alias = patient_keys.register_patient(conn, keys, pseudo, tenant, ZHANG)
        li, _ = patient_keys.register_patient(conn, keys, pseudo, tenant, LI)
        # A patient sealed the old way, under the shared KEK ("legacy").
        row = conn.execute("INSERT INTO patients (tenant_id, pseudonym, identity_enc) "
                           "VALUES (%s, 'legacy', '\\x00') RETURNING id", (tenant,)).fetchone()
        assert row is not None
        wang = int(row[0])
        conn.execute("UPDATE patients SET identity_enc = %s WHERE id = %s",
                     (site.keyring.seal(WANG.to_json(), patient_aad(wang)), wang))
    with site.admin() as conn:
        conn.execute("INSERT INTO device_bindings (device_id, tenant_id, patient_id, bound_at, "
                     "bound_by) VALUES (%s, %s, %s, now() - interval '55 minutes', 'test')",
                     (bedside, tenant, zhang))
        conn.execute(
            "INSERT INTO telemetry (ts, device_id, tenant_id, seq, kind, metrics, vals) "
            "SELECT now() - make_interval(mins => m), d, %s, m, 1, '{1}', '{72.0}' "
            "FROM unnest(%s::bigint[]) d, generate_series(10, 100, 10) m",
            (tenant, [bedside, other]))
        # Stored behind the batch writer's back: mark them as it would have.
        lo, hi = datetime.now(UTC) - timedelta(hours=2), datetime.now(UTC)
        conn.execute(MARK_SQL, ([bedside, other], [lo, lo], [hi, hi]))
        # Frames of the bedside device waiting for the uplink (hospital role):
        # measured 30 and 70 minutes ago, i.e. while bound and before.
        now_us = time.time_ns() // 1000
        for seq, minutes in ((1, 30), (2, 70)):
            frame = encode_frame(1, tenant, bedside, seq, now_us - minutes * 60_000_000,
                                 [(1, 1, 72.0)])
            conn.execute("INSERT INTO outbox (device_id, tenant_id, frame) VALUES (%s, %s, %s)",
                         (bedside, tenant, frame))
    roll_up(site)  # the residual copies: the cell's rollups hold every point
    assert rolled_up(site, tenant) == 20
    secrets = {n: person(site, n, region, "security_admin") for n in ("alice", "bob")}
    secrets["carol"] = person(site, "carol", tenant, "clinician")

    def who(name: str) -> Credentials:
        return Credentials(name, PASSWORD, pyotp.TOTP(secrets[name]).now())

    before = backup.create(site.cfg)   # the backup taken before: holds the sealed identity
    time.sleep(0.2)
    moment = datetime.now(UTC)

    with pytest.raises(DestroyError, match="not a security administrator"):
        destroy.request(site.cfg, who("carol"), "patient", zhang, "asked by the patient")
    with pytest.raises(DestroyError, match="invalid user name or password"):
        destroy.request(site.cfg, Credentials("alice", "Wrong-Horse1", "000000"), "patient",
                        zhang, "a wrong password")
    req = destroy.request(site.cfg, who("alice"), "patient", zhang, "court order 2026-17")
    with pytest.raises(DestroyError, match="second security administrator"):
        destroy.approve(site.cfg, who("alice"), req.id, "patient", zhang)
    with pytest.raises(DestroyError, match=f"is for patient {zhang}"):
        destroy.approve(site.cfg, who("bob"), req.id, "patient", li)
    assert keys.exists(zhang)  # nothing happened yet
    done = destroy.approve(site.cfg, who("bob"), req.id, "patient", zhang)
    assert done.approved_by == "user:bob" and done.outcome is not None
    assert done.outcome["keys_shredded"] == 1 and done.outcome["legacy_sealed"] == []
    assert done.outcome["removed"]["telemetry"] == 5       # the 50 minutes while bound
    assert done.outcome["removed"]["rollup spans marked"] == 1
    assert done.outcome["removed"]["outbox"] == 1          # the frame measured while bound
    with pytest.raises(DestroyError, match="was executed"):
        destroy.approve(site.cfg, who("bob"), req.id, "patient", zhang)

    # Live: the row, the key, the bound telemetry and its share of the rollups are gone.
    roll_up(site)
    assert rolled_up(site, tenant) == 15
    assert not keys.exists(zhang)
    with site.admin() as conn:
        assert conn.execute("SELECT count(*) FROM patients WHERE id = %s",
                            (zhang,)).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM device_bindings WHERE patient_id = %s",
                            (zhang,)).fetchone() == (0,)
        counts = dict(conn.execute("SELECT device_id, count(*) FROM telemetry GROUP BY 1"))
        assert counts == {bedside: 5, other: 10}  # before the binding; another device
        row = conn.execute("SELECT identity_enc FROM patients WHERE id = %s", (li,)).fetchone()
    assert row is not None
    assert patient_keys.open_identity(keys, li, bytes(row[0])) == LI  # others untouched

    # The act is in the audit chain, which still verifies.
    report = verify(site.dsn(), site.cfg.audit_checkpoints)
    assert report.ok, report.problem
    with site.app() as conn:
        acts = conn.execute("SELECT actor, method, outcome, patient FROM audit_log "
                            "WHERE object = %s ORDER BY id", (f"patient:{zhang}",)).fetchall()
    assert ("user:alice", "rmiot data destroy request", "ok", alias) in acts
    assert ("user:bob", "rmiot data destroy approve", "ok", alias) in acts

    # The backup taken before still holds the sealed identity, which opens no more.
    old = restore.point_in_time(site.cfg, moment)
    try:
        assert old.backup == before.label
        with psycopg.connect(pgnode.dsn(old.server, site.cfg.database.name)) as conn:
            rows = dict(conn.execute("SELECT id, identity_enc FROM patients"))
    finally:
        pgnode.remove(old.server)
    with pytest.raises(SealError, match="shredded"):
        patient_keys.open_identity(keys, zhang, bytes(rows[zhang]))
    assert patient_keys.open_identity(keys, li, bytes(rows[li])) == LI
    for secret in ("张三", "110101199003071234", "13812345678"):
        assert secret.encode() not in bytes(rows[zhang])

    # A legacy patient (shared key) and a device, approved the other way round.
    req = destroy.request(site.cfg, who("bob"), "patient", wang, "patient request")
    done = destroy.approve(site.cfg, who("alice"), req.id, "patient", wang)
    assert done.outcome is not None and done.outcome["legacy_sealed"] == [wang]
    req = destroy.request(site.cfg, who("bob"), "device", other, "device scrapped")
    done = destroy.approve(site.cfg, who("alice"), req.id, "device", other)
    with site.admin() as conn:
        assert conn.execute("SELECT count(*) FROM telemetry WHERE device_id = %s",
                            (other,)).fetchone() == (0,)
        assert conn.execute("SELECT state FROM devices WHERE id = %s",
                            (other,)).fetchone() == ("retired",)
    roll_up(site)
    assert rolled_up(site, tenant) == 5  # what the bedside device sent before the binding

    # A hospital leaving: its patients, devices and telemetry, its subtree disabled.
    with site.app() as conn:
        leaving = tenants_store.create_tenant(conn, "d-h2", "Leaving", "hospital", region)
        ward = tenants_store.create_tenant(conn, "d-h2-w", "Ward", "department", leaving)
        monitor = store.register_device(conn, leaving)
        chen, _ = patient_keys.register_patient(conn, keys, pseudo, ward, LI)
    with site.admin() as conn:
        conn.execute("INSERT INTO telemetry (ts, device_id, tenant_id, seq, kind, metrics, vals) "
                     "SELECT now() - make_interval(mins => m), %s, %s, m, 1, '{1}', '{1}' "
                     "FROM generate_series(1, 30) m", (monitor, leaving))
    req = destroy.request(site.cfg, who("alice"), "tenant", leaving, "left the region")
    done = destroy.approve(site.cfg, who("bob"), req.id, "tenant", leaving)
    assert done.outcome is not None and done.outcome["patients"] == [chen]
    assert not keys.exists(chen) and keys.exists(li)
    with site.admin() as conn:
        assert conn.execute("SELECT count(*) FROM telemetry WHERE tenant_id = %s",
                            (leaving,)).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM tenants WHERE id = ANY (%s) AND enabled",
                            ([leaving, ward],)).fetchone() == (0,)
        assert conn.execute("SELECT enabled FROM tenants WHERE id = %s",
                            (tenant,)).fetchone() == (True,)
    assert verify(site.dsn(), site.cfg.audit_checkpoints).ok
    assert destroy.pending_requests(site.cfg) == []
