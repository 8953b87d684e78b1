"""Authorizer: who may do what, where — RBAC with domains over the tenant tree.

The model is ``security/rbac_model.conf`` (Casbin): a role has rights
``(object, action)`` that are the same wherever it is granted
(``authz_permissions``), a subject holds roles on tenants (``authz_grants``),
and a role granted on a tenant reaches that tenant's whole subtree. Roles,
objects, actions and the default rights are in migration 0005.

Decisions (:meth:`Authorizer.allowed`, :meth:`~Authorizer.reach`) are
synchronous, do no I/O and are safe from any thread. A request for tenant T is
allowed when one of T's ancestors (T included; the tree is at most a few
levels deep) carries a grant to the subject of a role holding the right: a
handful of dictionary lookups, about a microsecond, whatever the size of the
policy. Casbin's own evaluation of the same model (a domain matching function
walking the tree) costs milliseconds per request at city scale, so it is used
where speed does not matter: :meth:`~Authorizer.explain` asks Casbin, over one
subject's grants, which rule allows a request, and the tests hold the two to
the same answers.

Fail closed: an unknown subject, a tenant not in the tree (or cut off from the
root), an unknown object or action is refused, and ``reach`` is empty.

Freshness: :meth:`~Authorizer.start` loads the policy and the tree, then
LISTENs on ``rmiot_authz`` (policy changes, migration 0005) and
``rmiot_registry`` (``tenant:<id>``, migration 0002) and re-reads only what a
notification names, typically a few milliseconds after the change commits, in
every process. Changes made through this instance's
:meth:`~Authorizer.grant`, :meth:`~Authorizer.revoke` and
:meth:`~Authorizer.set_permission` are in force here when the call returns.
Each change builds a new immutable snapshot; the decision and reach caches
belong to the snapshot, so a cached answer can never outlive the change that
made it wrong. If the database connection drops, the last snapshot stays in
force (refusing everything would stop the platform for a network blip) and
everything is re-read on reconnection, so no change made meanwhile is missed.

The management methods write as the platform's database role; who may call
them (security_admin only) is decided by the RPC in front of them, and the
separation of duties (policy only for security_admin, the audit log only for
auditor and audit_admin) is also enforced by the table's constraints.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import casbin
import psycopg
from casbin.persist.adapter import Adapter

from rmiot.db import ChangeFollower
from rmiot.security.tenant_tree import TenantTree

log = logging.getLogger("rmiot.security.authz")

CHANNEL = "rmiot_authz"
REGISTRY_CHANNEL = "rmiot_registry"
MODEL_TEXT = Path(__file__).with_name("rbac_model.conf").read_text()

OBJECTS = frozenset({"telemetry", "aggregate", "device", "device_model", "alarm", "patient",
                     "patient_identity", "audit", "policy", "user", "tenant", "command",
                     "ingest"})
ACTIONS = frozenset({"read", "write", "manage"})

# Cache bounds: when full, a cache is emptied rather than aged (cheap, and an
# emptied cache only costs a microsecond per decision to refill).
DECISION_CACHE_MAX = 1 << 15
REACH_CACHE_MAX = 1 << 12
# A batch of notifications naming more subjects or tenants than this reloads
# the whole table: one query beats hundreds.
RELOAD_ALL_OVER = 256
# Advisory lock key taken while revoking a security_admin grant ("rmiotsa").
SECURITY_ADMIN_LOCK = 0x726D696F747361

Grants = Mapping[int, frozenset[str]]          # tenant id -> roles held there
Permission = tuple[str, str, str]              # (role, object, action)


class AuthzError(Exception):
    """A management call was refused; the message says why."""


class PolicySnapshot:
    """One consistent view of tree, grants and permissions; never mutated
    except for its own caches, which die with it."""

    __slots__ = ("decisions", "grants", "permissions", "reaches", "roles_for", "tree")

    def __init__(self, tree: TenantTree, grants: Mapping[str, Grants],
                 permissions: frozenset[Permission]) -> None:
        self.tree = tree
        self.grants = grants
        self.permissions = permissions
        roles_for: dict[tuple[str, str], set[str]] = {}
        for role, obj, act in permissions:
            roles_for.setdefault((obj, act), set()).add(role)
        self.roles_for = {right: frozenset(roles) for right, roles in roles_for.items()}
        self.decisions: dict[tuple[str, int, str, str], bool] = {}
        self.reaches: dict[tuple[str, str, str], frozenset[int]] = {}

    def decide(self, subject: str, tenant_id: int, obj: str, act: str) -> bool:
        granted = self.grants.get(subject)
        roles = self.roles_for.get((obj, act))
        if not granted or not roles:
            return False
        for tenant in self.tree.ancestors(tenant_id):
            held = granted.get(tenant)
            if held is not None and not held.isdisjoint(roles):
                return True
        return False

    def compute_reach(self, subject: str, obj: str, act: str) -> frozenset[int]:
        granted = self.grants.get(subject)
        roles = self.roles_for.get((obj, act))
        if not granted or not roles:
            return frozenset()
        tops = [t for t, held in granted.items() if not held.isdisjoint(roles)]
        if len(tops) == 1:
            return self.tree.subtree(tops[0])  # shared with the tree's cache: no copy
        return frozenset().union(*(self.tree.subtree(t) for t in tops))


class Authorizer(ChangeFollower):
    """Decisions for one platform process (see the module docstring)."""

    channels = (CHANNEL, REGISTRY_CHANNEL)
    name = "authorizer"

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self._policy = PolicySnapshot(TenantTree({}), {}, frozenset())
        self._version = 0
        # Every re-read + swap runs under this lock, so a re-read that started
        # later is applied later: the snapshot never goes back in time.
        self._lock = asyncio.Lock()

    # -- decisions (synchronous, no I/O) ----------------------------------------

    def allowed(self, subject: str, tenant_id: int, obj: str, act: str) -> bool:
        """May ``subject`` do ``act`` on resource type ``obj`` in tenant ``tenant_id``?"""
        policy = self._policy
        key = (subject, tenant_id, obj, act)
        decided = policy.decisions.get(key)
        if decided is None:
            decided = policy.decide(subject, tenant_id, obj, act)
            if len(policy.decisions) >= DECISION_CACHE_MAX:
                policy.decisions.clear()
            policy.decisions[key] = decided
        return decided

    def reach(self, subject: str, obj: str, act: str) -> frozenset[int]:
        """Every tenant id where ``subject`` may do ``act`` on ``obj`` (the
        query layer filters rows with it; row-level rules come on top)."""
        policy = self._policy
        key = (subject, obj, act)
        found = policy.reaches.get(key)
        if found is None:
            found = policy.compute_reach(subject, obj, act)
            if len(policy.reaches) >= REACH_CACHE_MAX:
                policy.reaches.clear()
            policy.reaches[key] = found
        return found

    def roles_of(self, subject: str) -> list[tuple[str, int]]:
        """The subject's grants as (role, tenant id), sorted."""
        granted = self._policy.grants.get(subject, {})
        return sorted((role, tenant) for tenant, roles in granted.items() for role in roles)

    def grants_in(self, tenants: frozenset[int]) -> list[tuple[str, str, int]]:
        """Every grant held on one of these tenants, as (subject, role, tenant),
        sorted; walks all subjects — for administrators' listings, not RPC checks."""
        return sorted((subject, role, tenant)
                      for subject, granted in self._policy.grants.items()
                      for tenant, roles in granted.items() if tenant in tenants
                      for role in roles)

    def permissions_of(self, role: str) -> list[tuple[str, str]]:
        """The role's rights as (object, action), sorted."""
        return sorted((obj, act) for r, obj, act in self._policy.permissions if r == role)

    def explain(self, subject: str, tenant_id: int, obj: str, act: str) -> tuple[str, int] | None:
        """The (role, granting tenant) that allows the request, as Casbin finds
        it over this subject's grants; None when refused. Milliseconds: for the
        security admin and for checking, not for every call."""
        policy = self._policy
        granted = policy.grants.get(subject)
        if not granted or tenant_id not in policy.tree:
            return None
        grants = [(subject, role, tenant) for tenant, roles in granted.items() for role in roles]
        enforcer = casbin_enforcer(policy.tree, policy.permissions, grants)
        ok, rule = enforcer.enforce_ex(subject, obj, act, str(tenant_id))
        if not ok:
            return None
        role = str(rule[0])
        for tenant in policy.tree.ancestors(tenant_id):
            if role in granted.get(tenant, ()):
                return role, tenant
        raise AuthzError(f"Casbin allows {subject} {act} {obj} in {tenant_id} through {role}, "
                         "but no ancestor holds that grant")

    @property
    def version(self) -> int:
        """Bumped on every change applied (policy or tree)."""
        return self._version

    @property
    def tree(self) -> TenantTree:
        return self._policy.tree

    # -- management (the security admin's RPC) ----------------------------------

    async def grant(self, subject: str, role: str, tenant_id: int) -> None:
        """Give ``subject`` ``role`` on ``tenant_id`` and its subtree (no-op if held)."""
        async def insert(conn: psycopg.AsyncConnection[Any]) -> int:
            cur = await conn.execute(b"INSERT INTO authz_grants (subject, role, tenant_id) "
                                     b"VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                                     (subject, role, tenant_id))
            return cur.rowcount

        await self._write(insert, subjects=[subject])

    async def revoke(self, subject: str, role: str, tenant_id: int) -> bool:
        """Take the grant away; False when the subject did not hold it. The
        last security_admin grant cannot go: nobody could manage policy again."""
        async def delete(conn: psycopg.AsyncConnection[Any]) -> int:
            if role == "security_admin":
                # The lock serialises such revokes, so two admins cannot each
                # remove the other; the count is read after it is taken.
                await conn.execute(b"SELECT pg_advisory_xact_lock(%s)", (SECURITY_ADMIN_LOCK,))
                cur = await conn.execute(b"SELECT subject, tenant_id FROM authz_grants "
                                         b"WHERE role = 'security_admin'")
                if await cur.fetchall() == [(subject, tenant_id)]:
                    raise AuthzError("the last security_admin grant cannot be revoked; "
                                     "grant the role to someone else first")
            cur = await conn.execute(b"DELETE FROM authz_grants "
                                     b"WHERE subject = %s AND role = %s AND tenant_id = %s",
                                     (subject, role, tenant_id))
            return cur.rowcount

        return await self._write(delete, subjects=[subject]) > 0

    async def set_permission(self, role: str, obj: str, act: str, allow: bool) -> None:
        """Give (``allow``) or take away a role's right to ``act`` on ``obj``."""
        if obj not in OBJECTS:
            raise AuthzError(f"unknown object {obj!r}; one of {', '.join(sorted(OBJECTS))}")
        if act not in ACTIONS:
            raise AuthzError(f"unknown action {act!r}; one of {', '.join(sorted(ACTIONS))}")
        if not allow and (role, obj, act) == ("security_admin", "policy", "manage"):
            raise AuthzError("security_admin keeps the right to manage policy")
        if allow:
            sql = (b"INSERT INTO authz_permissions (role, object, action) VALUES (%s, %s, %s) "
                   b"ON CONFLICT DO NOTHING")
        else:
            sql = b"DELETE FROM authz_permissions WHERE role = %s AND object = %s AND action = %s"

        async def change(conn: psycopg.AsyncConnection[Any]) -> int:
            return (await conn.execute(sql, (role, obj, act))).rowcount

        await self._write(change, permissions=True)

    async def _write(self, body: Callable[[psycopg.AsyncConnection[Any]], Awaitable[int]], *,
                     subjects: Iterable[str] = (), permissions: bool = False) -> int:
        """Run ``body`` in one transaction, then put the change in force here
        before returning (other processes follow the NOTIFY)."""
        try:
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                async with conn.transaction():
                    changed = await body(conn)
                async with self._lock:
                    await self._apply(conn, Changes(subjects=set(subjects),
                                                    permissions=permissions))
        except psycopg.errors.IntegrityError as exc:
            raise AuthzError(_refusal(exc)) from None
        return changed

    # -- following the database --------------------------------------------------

    async def load_all(self, conn: psycopg.AsyncConnection[Any]) -> None:
        async with self._lock:
            await self._apply(conn, Changes(everything=True))

    async def apply(self, conn: psycopg.AsyncConnection[Any],
                    notes: list[psycopg.Notify]) -> None:
        changes = Changes()
        for note in notes:  # a moved subtree notifies once a row: one re-read covers it
            changes.note(note.channel, note.payload)
        if changes:
            async with self._lock:
                await self._apply(conn, changes)

    async def _apply(self, conn: psycopg.AsyncConnection[Any], changes: Changes) -> None:
        """Re-read what ``changes`` names and swap in the new snapshot (under the lock)."""
        old = self._policy
        if changes.everything:
            tree = await TenantTree.load(conn)
            grants: Mapping[str, Grants] = await _load_grants(conn, None)
            permissions = await _load_permissions(conn)
        else:
            tree = old.tree
            if len(changes.tenants) > RELOAD_ALL_OVER:
                tree = await TenantTree.load(conn)
            elif changes.tenants:
                tree = await tree.reloaded(conn, changes.tenants)
            grants = old.grants
            if changes.all_grants or len(changes.subjects) > RELOAD_ALL_OVER:
                grants = await _load_grants(conn, None)
            elif changes.subjects:
                fresh = await _load_grants(conn, changes.subjects)
                merged = dict(old.grants)
                for subject in changes.subjects:
                    if subject in fresh:
                        merged[subject] = fresh[subject]
                    else:
                        merged.pop(subject, None)
                grants = merged
            permissions = await _load_permissions(conn) if changes.permissions else old.permissions
        self._policy = PolicySnapshot(tree, grants, permissions)
        self._version += 1


class Changes:
    """What a batch of notifications asks to re-read."""

    __slots__ = ("all_grants", "everything", "permissions", "subjects", "tenants")

    def __init__(self, *, everything: bool = False, subjects: set[str] | None = None,
                 permissions: bool = False) -> None:
        self.everything = everything
        self.all_grants = False
        self.permissions = permissions
        self.subjects: set[str] = subjects or set()
        self.tenants: set[int] = set()

    def note(self, channel: str, payload: str) -> None:
        kind, _, ident = payload.partition(":")
        if channel == REGISTRY_CHANNEL:
            if kind == "tenant":
                self.tenant(ident)
            return  # devices, models...: not ours
        if kind == "grant":
            if ident == "*":
                self.all_grants = True
            else:
                self.subjects.add(ident)
        elif kind == "permission":
            self.permissions = True
        else:
            # Unknown payload: re-read everything rather than guess.
            log.warning("unexpected authorisation notification", extra={"payload": payload})
            self.everything = True

    def tenant(self, ident: str) -> None:
        try:
            self.tenants.add(int(ident))
        except ValueError:
            self.everything = True

    def __bool__(self) -> bool:
        return bool(self.everything or self.all_grants or self.permissions
                    or self.subjects or self.tenants)


async def _load_grants(conn: psycopg.AsyncConnection[Any],
                       subjects: Iterable[str] | None) -> dict[str, Grants]:
    sql = "SELECT subject, role, tenant_id FROM authz_grants"
    params: tuple[Any, ...] = ()
    if subjects is not None:
        sql += " WHERE subject = ANY(%s)"
        params = (list(subjects),)
    cur = await conn.execute(sql.encode(), params)
    held: dict[str, dict[int, set[str]]] = {}
    for subject, role, tenant in await cur.fetchall():
        held.setdefault(subject, {}).setdefault(tenant, set()).add(role)
    # Most subjects hold one role: share one frozenset per distinct role set.
    shared: dict[frozenset[str], frozenset[str]] = {}
    return {subject: {tenant: shared.setdefault(frozenset(roles), frozenset(roles))
                      for tenant, roles in by_tenant.items()}
            for subject, by_tenant in held.items()}


async def _load_permissions(conn: psycopg.AsyncConnection[Any]) -> frozenset[Permission]:
    cur = await conn.execute(b"SELECT role, object, action FROM authz_permissions")
    return frozenset((role, obj, act) for role, obj, act in await cur.fetchall())


# Integrity errors of the authz tables, in words (constraint names: migration 0005).
_REFUSALS = {
    "authz_grants_role_fkey": "unknown role",
    "authz_permissions_role_fkey": "unknown role",
    "authz_grants_tenant_id_fkey": "unknown tenant",
    "authz_grants_subject_check": "a subject is <kind>:<name> without spaces",
    "authz_device_role_only_for_devices":
        "the device role is for device:<id> subjects only, and they hold nothing else",
    "authz_his_interface_only_for_interfaces":  # migration 0015
        "the his_interface role is for mllp:<facility> and cert:<name> subjects only",
    "authz_policy_only_security_admin": "only security_admin may hold rights on policy",
    "authz_audit_only_auditors":
        "only auditor and audit_admin may read the audit log; only audit_admin manages it",
}


def _refusal(exc: psycopg.errors.IntegrityError) -> str:
    constraint = exc.diag.constraint_name or ""
    return _REFUSALS.get(constraint) or (exc.diag.message_primary or str(exc))


class PolicyRows(Adapter):  # type: ignore[misc]
    """Casbin adapter over rows already read from authz_permissions and
    authz_grants: p = role, object, action; g = subject, role, tenant id."""

    def __init__(self, permissions: Iterable[Permission],
                 grants: Iterable[tuple[str, str, int]]) -> None:
        self.permissions = permissions
        self.grants = grants

    def load_policy(self, model: Any) -> None:
        # Appended directly: Model.add_policy scans the list for duplicates,
        # quadratic at 50,000 grants; the primary keys already rule them out.
        p_lines = model.model["p"]["p"].policy
        p_lines.extend([role, obj, act] for role, obj, act in self.permissions)
        g_lines = model.model["g"]["g"].policy
        g_lines.extend([subject, role, str(tenant)] for subject, role, tenant in self.grants)


def casbin_enforcer(tree: TenantTree, permissions: Iterable[Permission],
                    grants: Iterable[tuple[str, str, int]]) -> Any:
    """A Casbin enforcer for the model with these rows, the tree's subtree
    rule as g's domain matching function. Requests: (sub, obj, act, str(tenant))."""
    enforcer = casbin.Enforcer(casbin.Enforcer.new_model(text=MODEL_TEXT),
                               PolicyRows(permissions, grants))

    def grant_covers(request_tenant: str, grant_tenant: str) -> bool:
        return tree.reaches(int(grant_tenant), int(request_tenant))

    enforcer.add_named_domain_matching_func("g", grant_covers)
    return enforcer
