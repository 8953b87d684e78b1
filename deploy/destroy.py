"""Destroying data for good (standard 9.3 h): ``rmiot data destroy tenant|patient|device ID``.

Who: security administrators — the role ``security_admin`` granted on the
target's tenant or an ancestor — each authenticated with password and TOTP.
Two different people: one *requests* (with a reason), another *approves*,
which executes it; a request expires after ``REQUEST_TTL`` and runs once.
Both acts, and the outcome, are in ``destruction_requests`` (migration 0011)
and in the audit chain (actor ``user:<name>``, method ``rmiot data destroy
request|approve``, object ``<kind>:<id>``, the counts in the detail). The
audit chain itself is never touched, so it keeps verifying.

What is removed, in one transaction:

- **device**: its telemetry (every chunk), HMAC keys, commands and their
  events, its RFID/bar codes; it is retired (it may send no more). The
  registry row stays as the asset's record (state history, bindings).
- **patient**: the identity is crypto-shredded — the patient's own data key
  (``patient_keys``) is destroyed, so the sealed identity is unreadable in
  every copy: replicas, base backups and WAL archived before, which cannot be
  edited. Then the patient's row goes, with its device bindings (a bed-only
  binding stays, without the patient), and the telemetry the bound devices
  recorded while bound to the patient.
- **tenant** (with its subtree): every patient and every device of it, as
  above, and all telemetry carrying its ids; the tenants are disabled (their
  rows stay: the audit chain and others' history name them).
- residual copies: the rollups (migration 0010) aggregate cells of devices,
  not devices, so they are recomputed rather than edited: every span of
  telemetry deleted is marked in ``rollup_marks`` in the same statement, and
  the rollup job recomputes those buckets from what is left at its next run
  (the current hour at its next open-hour refresh). Frames waiting in the
  hospital role's uplink ``outbox`` (migration 0013) go too — for a patient,
  those measured while bound (the time read from the frame's header). In-memory
  caches follow the registry's change notifications (a deleted key leaves the
  device view). What the uplink already forwarded lives on at the region: its
  own security administrators destroy it there, with the same command.

The key files are shredded after the rows are deleted and before the commit:
if the commit then fails, the identity is already unreadable and approving
the same request again finishes the job.

What stays, and why: the audit chain (evidence) — its records may carry the
patient's pseudonym, which names nobody without the pseudonym key and a
candidate ID number; telemetry in backups taken before (not encrypted),
which no longer leads to a person and goes when those backups age out
(``backup.keep``); the identity of a patient sealed before per-patient keys
(``legacy``, under a shared KEK) stays readable in older backups until they
age out — the outcome lists such patients.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from rmiot import db
from rmiot.config import Config
from rmiot.security import identity
from rmiot.security.audit import AuditLog, AuditRecord
from rmiot.security.patient_keys import PatientKeys, is_legacy
from rmiot.security.sm4 import Keyring

KINDS = ("tenant", "patient", "device")
ROLE = "security_admin"
REQUEST_TTL = dt.timedelta(days=7)
# The measurement time of an outbox row's RMF frame: ts_us, bytes 24..31 of
# the header, big-endian (../shared/spec/frame-v1.md).
OUTBOX_TS = sql.SQL("to_timestamp(('x' || encode(substring(o.frame FROM 25 FOR 8), 'hex'))"
                    "::bit(64)::bigint / 1000000.0)")


class DestroyError(Exception):
    """The destruction was refused or failed; the message says why."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    totp: str


@dataclass(frozen=True)
class Request:
    id: int
    kind: str
    target: int
    tenant_id: int
    reason: str
    requested_by: str
    requested_at: dt.datetime
    expires_at: dt.datetime
    approved_by: str | None
    executed_at: dt.datetime | None
    outcome: dict[str, Any] | None


# -- the two acts ----------------------------------------------------------------

def request(cfg: Config, who: Credentials, kind: str, target: int, reason: str) -> Request:
    """Record a destruction request by a security administrator of the target."""
    if kind not in KINDS:
        raise DestroyError(f"can destroy a {', a '.join(KINDS)}, not a {kind!r}")
    with db.connect(db.admin_dsn(cfg), autocommit=True) as conn:
        tenant = _tenant_of(conn, kind, target)
        subject = authenticate(cfg, who, tenant)
        row = conn.execute(
            "INSERT INTO destruction_requests (target_kind, target_id, tenant_id, reason, "
            "requested_by, expires_at) VALUES (%s, %s, %s, %s, %s, now() + %s) RETURNING id",
            (kind, target, tenant, reason, subject, REQUEST_TTL)).fetchone()
        assert row is not None
        made = _load(conn, int(row[0]))
        alias = _pseudonym(conn, made)
    _audit(cfg, subject, "request", made, "ok", {"request": made.id, "reason": reason}, alias)
    return made


def approve(cfg: Config, who: Credentials, request_id: int, kind: str, target: int) -> Request:
    """Approve request ``request_id`` (which must name ``kind`` ``target``) as a
    second security administrator, and execute it."""
    with db.connect(db.admin_dsn(cfg), autocommit=True) as conn:
        pending = _load(conn, request_id)
        subject = authenticate(cfg, who, pending.tenant_id)
        alias = _pseudonym(conn, pending)
        try:
            done = _execute(conn, cfg, pending, subject, kind, target)
        except (DestroyError, psycopg.Error) as exc:
            _audit(cfg, subject, "approve", pending, "error",
                   {"request": request_id, "error": str(exc).strip()}, alias)
            raise
    _audit(cfg, subject, "approve", done, "ok", {"request": done.id, **(done.outcome or {})},
           alias)
    return done


def pending_requests(cfg: Config) -> list[Request]:
    """Requests not executed yet, expired ones included, oldest first."""
    with db.connect(db.admin_dsn(cfg), autocommit=True) as conn:
        ids = [r[0] for r in conn.execute(
            "SELECT id FROM destruction_requests WHERE executed_at IS NULL ORDER BY id")]
        return [_load(conn, i) for i in ids]


# -- who may ---------------------------------------------------------------------

def authenticate(cfg: Config, who: Credentials, tenant: int) -> str:
    """Check password and TOTP (a login, with its lockout) and the role on
    ``tenant``; returns the subject ``user:<name>``."""
    subject = f"user:{who.username}"

    async def login() -> None:
        keyring = Keyring.load(cfg.keyring_dir, create=False)
        async with await psycopg.AsyncConnection.connect(db.app_dsn(cfg),
                                                         autocommit=True) as conn:
            result = await identity.login(conn, cfg.security, keyring, who.username,
                                          who.password, who.totp, f"local:{os.getpid()}",
                                          lambda _name: True)
            await conn.execute("UPDATE sessions SET ended_at = now(), end_reason = 'logout' "
                               "WHERE token_hash = %s", (result.session.token_hash,))
            if result.session.password_change_only:
                raise identity.LoginError("PASSWORD_CHANGE", "change your password first")

    try:
        asyncio.run(login())
    except identity.LoginError as exc:
        _audit(cfg, subject, "login", None, "failed_login", {"code": exc.code})
        raise DestroyError(f"{who.username}: {exc}") from None
    with db.connect(db.admin_dsn(cfg), autocommit=True) as conn:
        granted = conn.execute(
            "SELECT 1 FROM authz_grants g JOIN tenants t ON g.tenant_id = ANY (t.path) "
            "WHERE t.id = %s AND g.subject = %s AND g.role = %s", (tenant, subject, ROLE)
        ).fetchone()
    if not granted:
        _audit(cfg, subject, "authorise", None, "denied", {"tenant": tenant})
        raise DestroyError(f"{who.username} is not a security administrator of tenant {tenant}")
    return subject


def _tenant_of(conn: psycopg.Connection[Any], kind: str, target: int) -> int:
    query = {"tenant": "SELECT id FROM tenants WHERE id = %s",
             "patient": "SELECT tenant_id FROM patients WHERE id = %s",
             "device": "SELECT tenant_id FROM devices WHERE id = %s"}[kind]
    row = conn.execute(query.encode(), (target,)).fetchone()
    if row is None:
        raise DestroyError(f"there is no {kind} {target}")
    return int(row[0])


# -- execution -------------------------------------------------------------------

def _execute(conn: psycopg.Connection[Any], cfg: Config, req: Request, subject: str,
             kind: str, target: int) -> Request:
    keys = PatientKeys(Keyring.load(cfg.keyring_dir, create=False))
    with conn.transaction():
        row = conn.execute("SELECT approved_by, executed_at, expires_at < now() "
                           "FROM destruction_requests WHERE id = %s FOR UPDATE",
                           (req.id,)).fetchone()
        assert row is not None
        approved_by, executed_at, expired = row
        if (kind, target) != (req.kind, req.target):
            raise DestroyError(f"request {req.id} is for {req.kind} {req.target}, "
                               f"not {kind} {target}")
        if executed_at is not None:
            raise DestroyError(f"request {req.id} was executed at {executed_at:%Y-%m-%d %H:%M}")
        if subject == req.requested_by:
            raise DestroyError("the request needs a second security administrator: "
                               "nobody approves their own request")
        if approved_by not in (None, subject):
            raise DestroyError(f"request {req.id} was approved by {approved_by}: "
                               "only they can finish it")
        if expired:
            raise DestroyError(f"request {req.id} expired; make a new one")
        conn.execute("SELECT set_config('rmiot.actor', %s, true), "
                     "set_config('rmiot.reason', %s, true)",
                     (subject, f"destruction request {req.id}"))
        conn.execute("UPDATE destruction_requests SET approved_by = %s, approved_at = now() "
                     "WHERE id = %s AND approved_by IS NULL", (subject, req.id))
        outcome = destroy(conn, kind, target)
        shredded = [p for p in outcome["patients"] if keys.shred(p)]
        outcome["keys_shredded"] = len(shredded)
        conn.execute("UPDATE destruction_requests SET executed_at = now(), outcome = %s "
                     "WHERE id = %s", (Jsonb(outcome), req.id))
    return _load(conn, req.id)


def destroy(conn: psycopg.Connection[Any], kind: str, target: int) -> dict[str, Any]:
    """Delete the data of ``kind`` ``target`` inside the caller's transaction
    (no key is shredded here); returns what was removed: counts by table, the
    patient ids whose keys must go, legacy-sealed patients."""
    counts: dict[str, int] = {}
    if kind == "tenant":
        tenants = [r[0] for r in conn.execute(
            "SELECT id FROM tenants WHERE %s = ANY (path)", (target,))]
        devices = [r[0] for r in conn.execute(
            "SELECT id FROM devices WHERE tenant_id = ANY (%s) OR department_id = ANY (%s)",
            (tenants, tenants))]
        patients = [r[0] for r in conn.execute(
            "SELECT id FROM patients WHERE tenant_id = ANY (%s)", (tenants,))]
    else:
        tenants = []
        devices = [target] if kind == "device" else []
        patients = [target] if kind == "patient" else []
    legacy = _destroy_patients(conn, patients, counts)
    _destroy_devices(conn, devices, counts)
    if tenants:
        _delete_telemetry(conn, sql.SQL(""), sql.SQL("t.tenant_id = ANY (%s)"), (tenants,),
                          counts)
        if _exists(conn, "outbox"):
            _count(counts, "outbox", conn.execute(
                "DELETE FROM outbox WHERE tenant_id = ANY (%s)", (tenants,)))
        _count(counts, "tenants disabled", conn.execute(
            "UPDATE tenants SET enabled = false WHERE id = ANY (%s) AND enabled", (tenants,)))
    return {"kind": kind, "target": target, "removed": counts, "patients": patients,
            "legacy_sealed": legacy}


def _destroy_patients(conn: psycopg.Connection[Any], patients: list[int],
                      counts: dict[str, int]) -> list[int]:
    if not patients:
        return []
    rows = conn.execute("SELECT id, identity_enc FROM patients WHERE id = ANY (%s) FOR UPDATE",
                        (patients,)).fetchall()
    legacy = sorted(int(pid) for pid, sealed in rows if is_legacy(bytes(sealed)))
    # What their devices recorded while bound to them, and its copies.
    bound = sql.SQL("b.patient_id = ANY (%s) AND {t}.device_id = b.device_id "
                    "AND {t}.ts >= b.bound_at AND {t}.ts < coalesce(b.unbound_at, 'infinity')")
    _delete_telemetry(conn, sql.SQL("USING device_bindings b"),
                      bound.format(t=sql.Identifier("t")), (patients,), counts)
    if _exists(conn, "outbox"):
        _count(counts, "outbox", conn.execute(sql.SQL(
            "DELETE FROM outbox o USING device_bindings b WHERE b.patient_id = ANY (%s) "
            "AND o.device_id = b.device_id AND {ts} >= b.bound_at "
            "AND {ts} < coalesce(b.unbound_at, 'infinity')").format(ts=OUTBOX_TS), (patients,)))
    _count(counts, "device_bindings", conn.execute(
        "UPDATE device_bindings SET patient_id = NULL WHERE patient_id = ANY (%s) "
        "AND bed IS NOT NULL", (patients,)))
    _count(counts, "device_bindings", conn.execute(
        "DELETE FROM device_bindings WHERE patient_id = ANY (%s)", (patients,)))
    _count(counts, "patients", conn.execute("DELETE FROM patients WHERE id = ANY (%s)",
                                            (patients,)))
    return legacy


def _destroy_devices(conn: psycopg.Connection[Any], devices: list[int],
                     counts: dict[str, int]) -> None:
    if not devices:
        return
    _delete_telemetry(conn, sql.SQL(""), sql.SQL("t.device_id = ANY (%s)"), (devices,), counts)
    if _exists(conn, "outbox"):
        _count(counts, "outbox", conn.execute(
            "DELETE FROM outbox WHERE device_id = ANY (%s)", (devices,)))
    _count(counts, "device_keys", conn.execute(
        "DELETE FROM device_keys WHERE device_id = ANY (%s)", (devices,)))
    if _exists(conn, "commands"):
        _count(counts, "command_events", conn.execute(
            "DELETE FROM command_events e USING commands c "
            "WHERE e.command_id = c.id AND c.device_id = ANY (%s)", (devices,)))
        _count(counts, "commands", conn.execute(
            "DELETE FROM commands WHERE device_id = ANY (%s)", (devices,)))
    if _exists(conn, "device_codes"):
        _count(counts, "device_codes", conn.execute(
            "DELETE FROM device_codes WHERE device_id = ANY (%s)", (devices,)))
    # Retired devices may send nothing more: the device view refuses them.
    _count(counts, "devices retired", conn.execute(
        "UPDATE devices SET state = 'retired' WHERE id = ANY (%s) "
        "AND state NOT IN ('retired', 'scrapped')", (devices,)))


def _delete_telemetry(conn: psycopg.Connection[Any], using: sql.Composable,
                      where: sql.Composable, params: tuple[Any, ...],
                      counts: dict[str, int]) -> None:
    """DELETE FROM telemetry t [using] WHERE where. With the rollups (migration
    0010), the spans deleted are marked in ``rollup_marks`` in the same
    statement, so the rollup job recomputes those buckets without them."""
    if not _exists(conn, "rollup_marks"):
        _count(counts, "telemetry", conn.execute(sql.SQL(
            "DELETE FROM telemetry t {} WHERE {}").format(using, where), params))
        return
    row = conn.execute(sql.SQL(
        "WITH gone AS (DELETE FROM telemetry t {} WHERE {} RETURNING t.device_id, t.ts), "
        "spans AS (SELECT device_id, min(ts) AS lo, max(ts) AS hi, count(*) AS n "
        "          FROM gone GROUP BY device_id), "
        "marked AS (INSERT INTO rollup_marks (device_ids, first_ts, last_ts) "
        "           SELECT array_agg(device_id), array_agg(lo), array_agg(hi) FROM spans "
        "           HAVING count(*) > 0) "
        "SELECT coalesce(sum(n), 0)::bigint, count(*) FROM spans").format(using, where),
        params).fetchone()
    assert row is not None
    for name, value in (("telemetry", int(row[0])), ("rollup spans marked", int(row[1]))):
        if value:
            counts[name] = counts.get(name, 0) + value


def _exists(conn: psycopg.Connection[Any], table: str) -> bool:
    return conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() != (None,)


def _count(counts: dict[str, int], name: str, cur: psycopg.Cursor[Any]) -> None:
    if cur.rowcount > 0:
        counts[name] = counts.get(name, 0) + cur.rowcount


def _pseudonym(conn: psycopg.Connection[Any], req: Request) -> str | None:
    """The patient's pseudonym, so auditors find the destruction by patient."""
    if req.kind != "patient":
        return None
    row = conn.execute("SELECT pseudonym FROM patients WHERE id = %s", (req.target,)).fetchone()
    return str(row[0]) if row else None


def _load(conn: psycopg.Connection[Any], request_id: int) -> Request:
    row = conn.execute(
        "SELECT id, target_kind, target_id, tenant_id, reason, requested_by, requested_at, "
        "expires_at, approved_by, executed_at, outcome FROM destruction_requests "
        "WHERE id = %s", (request_id,)).fetchone()
    if row is None:
        raise DestroyError(f"there is no destruction request {request_id}")
    return Request(*row)


# -- the audit chain ---------------------------------------------------------------

def _audit(cfg: Config, subject: str, act: str, req: Request | None, outcome: str,
           detail: dict[str, Any], patient: str | None = None) -> None:
    async def append() -> None:
        log = AuditLog(db.app_dsn(cfg), checkpoints=cfg.audit_checkpoints)
        await log.start()
        log.append(AuditRecord(
            actor=subject, role=ROLE, tenant_id=req.tenant_id if req else None,
            method=f"rmiot data destroy {act}",
            object=f"{req.kind}:{req.target}" if req else None, outcome=outcome,
            source=f"local:{os.getpid()}", detail=detail, patient=patient))
        await log.stop()

    asyncio.run(append())
