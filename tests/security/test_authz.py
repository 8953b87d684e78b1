"""Authorisation over the tenant tree (security/authz.py, migration 0005),
against the real database: subtree reach, the default rights of each role,
separation of duties, fail-closed refusals, changes followed by other
processes within a second (policy and tree), and no stale allow from a cache
after a revoke. Every test builds its own region and subjects, so tests do
not see each other's tenants or grants."""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from rmiot.security.authz import OBJECTS, Authorizer, AuthzError
from rmiot.security.tenant_tree import TenantTree
from tests.conftest import eventually

PATIENT_DATA = ("telemetry", "alarm", "patient", "patient_identity")
ACTIONS = ("read", "write", "manage")
ALL_ROLES = ("commission_admin", "commission_analyst", "hospital_admin", "department_head",
             "clinician", "patient", "vendor", "hospital_platform", "his_interface", "device",
             "auditor", "system_admin", "security_admin", "audit_admin")
# Roles only machine subjects of one kind hold (the rest are granted to user:...).
SUBJECT_KIND = {"device": "device", "his_interface": "mllp"}
UNKNOWN_TENANT = 2**31 - 1


@dataclass
class City:
    """One region: district > hospitals A and B > departments (A1 holds a ward)."""

    admin_dsn: str
    tag: str
    region: int
    district: int
    hospital_a: int
    hospital_b: int
    dept_a1: int
    dept_a2: int
    ward_a1: int
    dept_b1: int

    def subject(self, name: str, kind: str = "user") -> str:
        return f"{kind}:{name}-{self.tag}"

    @property
    def nodes(self) -> list[int]:
        return [self.region, self.district, self.hospital_a, self.hospital_b, self.dept_a1,
                self.dept_a2, self.ward_a1, self.dept_b1]

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run SQL as another process would (its own connection, committed)."""
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            cur = conn.execute(statement.encode(), params)
            return cur.fetchall() if cur.description else []

    def add_tenant(self, level: str, parent: int | None) -> int:
        rows = self.sql("SELECT nextval('tenant_id_seq')")
        tenant = int(rows[0][0])
        path = [tenant]
        if parent is not None:
            path = [*self.sql("SELECT path FROM tenants WHERE id = %s", (parent,))[0][0], tenant]
        self.sql("INSERT INTO tenants (id, parent_id, level, code, name, path) "
                 "VALUES (%s, %s, %s, %s, %s, %s)",
                 (tenant, parent, level, f"{level}-{tenant}-{self.tag}", f"{level} {tenant}",
                  path))
        return tenant


@pytest.fixture
def city(admin_dsn: str) -> City:
    tag = uuid.uuid4().hex[:8]
    c = City(admin_dsn, tag, 0, 0, 0, 0, 0, 0, 0, 0)
    c.region = c.add_tenant("region", None)
    c.district = c.add_tenant("district", c.region)
    c.hospital_a = c.add_tenant("hospital", c.district)
    c.hospital_b = c.add_tenant("hospital", c.district)
    c.dept_a1 = c.add_tenant("department", c.hospital_a)
    c.dept_a2 = c.add_tenant("department", c.hospital_a)
    c.ward_a1 = c.add_tenant("department", c.dept_a1)
    c.dept_b1 = c.add_tenant("department", c.hospital_b)
    return c


async def started(dsn: str) -> Authorizer:
    authz = Authorizer(dsn)
    await authz.start()
    return authz


@pytest.fixture
async def authz(database: str, city: City) -> AsyncIterator[Authorizer]:
    """An Authorizer of the platform (app role), started after the city exists."""
    a = await started(database)
    yield a
    await a.stop()


@pytest.fixture
async def other(database: str, city: City) -> AsyncIterator[Authorizer]:
    """A second, independent Authorizer: another platform process."""
    a = await started(database)
    yield a
    await a.stop()


def within_subtree(city: City, top: int) -> set[int]:
    """What the database's own path column says lies under ``top``."""
    return {r[0] for r in city.sql("SELECT id FROM tenants WHERE %s = ANY(path)", (top,))}


async def test_hospital_admin_reaches_its_departments_not_a_sibling_hospital(
        authz: Authorizer, city: City) -> None:
    admin = city.subject("admin-a")
    await authz.grant(admin, "hospital_admin", city.hospital_a)

    mine = {city.hospital_a, city.dept_a1, city.dept_a2, city.ward_a1}
    for tenant in city.nodes:
        assert authz.allowed(admin, tenant, "device", "manage") == (tenant in mine), tenant
    assert authz.reach(admin, "device", "manage") == mine == within_subtree(city, city.hospital_a)
    assert authz.reach(admin, "policy", "manage") == frozenset()
    assert authz.roles_of(admin) == [("hospital_admin", city.hospital_a)]


async def test_grants_on_two_nodes_reach_both_subtrees(authz: Authorizer, city: City) -> None:
    nurse = city.subject("nurse")
    await authz.grant(nurse, "clinician", city.dept_a1)
    await authz.grant(nurse, "clinician", city.dept_b1)
    assert authz.reach(nurse, "telemetry", "read") == {city.dept_a1, city.ward_a1, city.dept_b1}
    assert not authz.allowed(nurse, city.dept_a2, "telemetry", "read")
    assert not authz.allowed(nurse, city.hospital_a, "telemetry", "read")


async def test_commission_analyst_gets_aggregates_but_no_patient_data(
        authz: Authorizer, city: City) -> None:
    analyst = city.subject("analyst")
    await authz.grant(analyst, "commission_analyst", city.region)
    for tenant in city.nodes:
        assert authz.allowed(analyst, tenant, "aggregate", "read")
        for obj in PATIENT_DATA:
            for act in ACTIONS:
                assert not authz.allowed(analyst, tenant, obj, act), (obj, act)
    assert authz.reach(analyst, "aggregate", "read") == within_subtree(city, city.region)
    assert authz.reach(analyst, "telemetry", "read") == frozenset()
    assert authz.reach(analyst, "patient_identity", "read") == frozenset()


async def test_vendor_never_reaches_patient_data(authz: Authorizer, city: City) -> None:
    vendor = city.subject("acme", kind="cert")
    await authz.grant(vendor, "vendor", city.region)
    assert authz.allowed(vendor, city.dept_b1, "device_model", "manage")
    assert authz.allowed(vendor, city.ward_a1, "device", "write")
    for obj in PATIENT_DATA:
        for act in ACTIONS:
            assert authz.reach(vendor, obj, act) == frozenset(), (obj, act)
            assert not any(authz.allowed(vendor, t, obj, act) for t in city.nodes)
    assert not {obj for obj, _ in authz.permissions_of("vendor")} & set(PATIENT_DATA)


async def test_system_admin_cannot_read_or_change_the_audit_log(
        authz: Authorizer, city: City) -> None:
    operator, auditor, audit_admin = (city.subject(n) for n in ("ops", "auditor", "audadm"))
    await authz.grant(operator, "system_admin", city.region)
    await authz.grant(auditor, "auditor", city.region)
    await authz.grant(audit_admin, "audit_admin", city.region)

    assert authz.allowed(operator, city.hospital_b, "device", "manage")
    for act in ACTIONS:
        assert not authz.allowed(operator, city.region, "audit", act)
        assert not authz.allowed(operator, city.region, "policy", act)
    assert authz.allowed(auditor, city.region, "audit", "read")
    assert not authz.allowed(auditor, city.region, "audit", "manage")
    assert not authz.allowed(auditor, city.region, "telemetry", "read")
    assert authz.allowed(audit_admin, city.region, "audit", "read")
    assert authz.allowed(audit_admin, city.region, "audit", "manage")

    # Neither the API nor a direct write as the platform's role can hand it over.
    with pytest.raises(AuthzError, match="audit"):
        await authz.set_permission("system_admin", "audit", "read", True)
    with pytest.raises(AuthzError, match="audit"):
        await authz.set_permission("auditor", "audit", "write", True)
    with psycopg.connect(authz.dsn, autocommit=True) as conn, \
            pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO authz_permissions VALUES ('system_admin', 'audit', 'read')")
    assert not authz.allowed(operator, city.region, "audit", "read")


async def test_only_security_admin_may_manage_policy(authz: Authorizer, city: City) -> None:
    seeded = {r[0] for r in city.sql("SELECT name FROM authz_roles")}
    assert seeded == set(ALL_ROLES)
    holders = {}
    for role in ALL_ROLES:
        holders[role] = city.subject(role, kind=SUBJECT_KIND.get(role, "user"))
        await authz.grant(holders[role], role, city.region)
    for role, subject in holders.items():
        for act in ("write", "manage"):
            assert authz.allowed(subject, city.dept_a1, "policy", act) == (
                role == "security_admin"), (role, act)

    with pytest.raises(AuthzError, match="security_admin"):
        await authz.set_permission("system_admin", "policy", "manage", True)
    with pytest.raises(AuthzError, match="security_admin"):
        await authz.set_permission("audit_admin", "policy", "read", True)
    rows = city.sql("SELECT DISTINCT role FROM authz_permissions WHERE object = 'policy'")
    assert rows == [("security_admin",)]


async def test_policy_management_cannot_lock_itself_out(authz: Authorizer, city: City) -> None:
    with pytest.raises(AuthzError, match="security_admin keeps"):
        await authz.set_permission("security_admin", "policy", "manage", False)
    assert ("policy", "manage") in authz.permissions_of("security_admin")

    # Start from no security admin at all (other tests' grants are theirs to lose).
    city.sql("DELETE FROM authz_grants WHERE role = 'security_admin'")
    first, second = city.subject("sec1"), city.subject("sec2")
    await authz.grant(first, "security_admin", city.region)
    await authz.grant(second, "security_admin", city.region)
    assert await authz.revoke(first, "security_admin", city.region)
    with pytest.raises(AuthzError, match="last security_admin"):
        await authz.revoke(second, "security_admin", city.region)
    assert authz.roles_of(second) == [("security_admin", city.region)]
    assert authz.allowed(second, city.region, "policy", "manage")


async def test_seeded_rights_keep_patient_data_and_audit_apart(authz: Authorizer) -> None:
    no_patient_data = ("commission_admin", "commission_analyst", "vendor", "hospital_platform",
                       "device", "auditor", "system_admin", "security_admin", "audit_admin")
    for role in no_patient_data:
        held = {obj for obj, _ in authz.permissions_of(role)}
        assert not held & set(PATIENT_DATA), role
    for role in ALL_ROLES:
        audit = {act for obj, act in authz.permissions_of(role) if obj == "audit"}
        assert audit == {"auditor": {"read"}, "audit_admin": {"read", "manage"}}.get(role, set())
    assert authz.permissions_of("device") == [("command", "read"), ("ingest", "write")]
    # A hospital's HIS/EMR interface: ADT writes bindings, ORU feeds telemetry; no reads.
    assert authz.permissions_of("his_interface") == [("ingest", "write"), ("patient", "write")]


async def test_unknown_subject_tenant_object_or_action_is_refused(
        authz: Authorizer, city: City) -> None:
    admin = city.subject("admin")
    await authz.grant(admin, "hospital_admin", city.hospital_a)
    assert authz.allowed(admin, city.hospital_a, "device", "read")

    ghost = city.subject("ghost")
    assert not authz.allowed(ghost, city.hospital_a, "device", "read")
    assert authz.reach(ghost, "device", "read") == frozenset()
    assert authz.roles_of(ghost) == []
    assert not authz.allowed(admin, UNKNOWN_TENANT, "device", "read")
    assert not authz.allowed(admin, -1, "device", "read")
    assert not authz.allowed(admin, city.hospital_a, "spaceship", "read")
    assert not authz.allowed(admin, city.hospital_a, "device", "launch")
    assert authz.explain(ghost, city.hospital_a, "device", "read") is None

    with pytest.raises(AuthzError, match="unknown tenant"):
        await authz.grant(admin, "clinician", UNKNOWN_TENANT)
    with pytest.raises(AuthzError, match="unknown role"):
        await authz.grant(admin, "overlord", city.region)
    with pytest.raises(AuthzError, match="device role"):
        await authz.grant(admin, "device", city.region)
    with pytest.raises(AuthzError, match="his_interface role"):  # a person never holds it
        await authz.grant(admin, "his_interface", city.hospital_a)
    with pytest.raises(AuthzError, match="unknown object"):
        await authz.set_permission("clinician", "spaceship", "read", True)
    with pytest.raises(AuthzError, match="unknown action"):
        await authz.set_permission("clinician", "device", "launch", True)
    assert authz.roles_of(admin) == [("hospital_admin", city.hospital_a)]


async def test_changes_reach_another_instance_within_a_second(
        authz: Authorizer, other: Authorizer, city: City) -> None:
    head = city.subject("head")
    await authz.grant(head, "department_head", city.dept_a1)
    assert authz.allowed(head, city.ward_a1, "patient", "write")  # in force on return
    await eventually(lambda: other.allowed(head, city.ward_a1, "patient", "write"), 1.0)

    # A change written straight into the table by some other process.
    nurse = city.subject("nurse")
    city.sql("INSERT INTO authz_grants (subject, role, tenant_id) VALUES (%s, 'clinician', %s)",
             (nurse, city.dept_b1))
    await eventually(lambda: all(a.allowed(nurse, city.dept_b1, "alarm", "write")
                                 for a in (authz, other)), 1.0)

    # A permission change through the API.
    analyst = city.subject("analyst")
    await authz.grant(analyst, "commission_analyst", city.region)
    await eventually(lambda: other.roles_of(analyst) != [], 1.0)
    assert not other.allowed(analyst, city.hospital_b, "device_model", "read")
    try:
        await authz.set_permission("commission_analyst", "device_model", "read", True)
        await eventually(lambda: other.allowed(analyst, city.hospital_b, "device_model", "read"),
                         1.0)
    finally:
        await authz.set_permission("commission_analyst", "device_model", "read", False)
    await eventually(lambda: not other.allowed(analyst, city.hospital_b, "device_model", "read"),
                     1.0)


async def test_bulk_load_of_many_subjects_is_followed(authz: Authorizer, city: City) -> None:
    # More than 64 subjects in one statement: one 'grant:*' notification.
    patients = [city.subject(f"p{i}") for i in range(150)]
    city.sql("INSERT INTO authz_grants (subject, role, tenant_id) "
             "SELECT s, 'patient', %s FROM unnest(%s::text[]) AS s", (city.dept_a2, patients))
    await eventually(lambda: all(authz.allowed(p, city.dept_a2, "telemetry", "read")
                                 for p in patients), 1.0)
    city.sql("DELETE FROM authz_grants WHERE subject = ANY(%s)", (patients,))
    await eventually(lambda: not any(authz.allowed(p, city.dept_a2, "telemetry", "read")
                                     for p in patients), 1.0)


async def test_tenants_added_moved_and_removed_in_sql_are_followed(
        authz: Authorizer, city: City) -> None:
    admin_a, admin_b = city.subject("admin-a"), city.subject("admin-b")
    await authz.grant(admin_a, "hospital_admin", city.hospital_a)
    await authz.grant(admin_b, "hospital_admin", city.hospital_b)

    icu = city.add_tenant("department", city.hospital_a)
    await eventually(lambda: authz.allowed(admin_a, icu, "device", "write"), 1.0)
    assert not authz.allowed(admin_b, icu, "device", "write")
    assert icu in authz.reach(admin_a, "device", "write")

    # Move department A1 (with its ward) from hospital A to hospital B, the way
    # the tenants package will: parent and every path in the moved subtree.
    city.sql("UPDATE tenants SET parent_id = %s WHERE id = %s", (city.hospital_b, city.dept_a1))
    city.sql("UPDATE tenants SET path = %s || path[array_position(path, %s):] "
             "WHERE %s = ANY(path)",
             (city.sql("SELECT path FROM tenants WHERE id = %s", (city.hospital_b,))[0][0],
              city.dept_a1, city.dept_a1))
    await eventually(lambda: authz.allowed(admin_b, city.ward_a1, "device", "write"), 1.0)
    assert not authz.allowed(admin_a, city.ward_a1, "device", "write")
    assert not authz.allowed(admin_a, city.dept_a1, "device", "write")
    assert authz.reach(admin_b, "device", "write") == within_subtree(city, city.hospital_b)
    assert authz.tree.path(city.ward_a1) == city.sql(
        "SELECT path FROM tenants WHERE id = %s", (city.ward_a1,))[0][0]

    # Removing a tenant removes the grants on it (FK cascade) and the node.
    nurse = city.subject("nurse")
    await authz.grant(nurse, "clinician", icu)
    city.sql("DELETE FROM tenants WHERE id = %s", (icu,))
    await eventually(lambda: icu not in authz.tree and authz.roles_of(nurse) == [], 1.0)
    assert not authz.allowed(admin_a, icu, "device", "write")


async def test_a_revoke_is_never_answered_from_a_stale_cache(
        authz: Authorizer, other: Authorizer, city: City) -> None:
    nurse = city.subject("nurse")

    async def granted_everywhere() -> None:
        await authz.grant(nurse, "clinician", city.dept_a1)
        await eventually(lambda: other.allowed(nurse, city.ward_a1, "telemetry", "read"), 1.0)
        for a in (authz, other):  # fill both caches
            for _ in range(3):
                assert a.allowed(nurse, city.ward_a1, "telemetry", "read")
                assert city.ward_a1 in a.reach(nurse, "telemetry", "read")

    async def refused_for_good(a: Authorizer, check: Callable[[], bool]) -> None:
        """Wait until ``check`` refuses, then it must keep refusing."""
        await eventually(lambda: not check(), 1.0)
        for _ in range(50):
            assert not check()
            await asyncio.sleep(0.002)

    def decision(a: Authorizer) -> Callable[[], bool]:
        return lambda: a.allowed(nurse, city.ward_a1, "telemetry", "read")

    def reached(a: Authorizer) -> Callable[[], bool]:
        return lambda: city.ward_a1 in a.reach(nurse, "telemetry", "read")

    # Through this instance's API: refused the moment revoke returns.
    await granted_everywhere()
    assert await authz.revoke(nurse, "clinician", city.dept_a1)
    assert not decision(authz)() and not reached(authz)()
    await refused_for_good(other, decision(other))
    await refused_for_good(other, reached(other))
    assert not await authz.revoke(nurse, "clinician", city.dept_a1)

    # Straight in the database, by another process.
    await granted_everywhere()
    city.sql("DELETE FROM authz_grants WHERE subject = %s", (nurse,))
    for a in (authz, other):
        await refused_for_good(a, decision(a))
        await refused_for_good(a, reached(a))

    # Taking a right away from the role, not the grant from the subject.
    await granted_everywhere()
    try:
        await authz.set_permission("clinician", "telemetry", "read", False)
        assert not decision(authz)() and not reached(authz)()
        await refused_for_good(other, decision(other))
        await refused_for_good(other, reached(other))
    finally:
        await authz.set_permission("clinician", "telemetry", "read", True)
    await eventually(decision(other), 1.0)


async def test_follows_again_after_losing_its_connection(
        authz: Authorizer, city: City, database: str) -> None:
    nurse = city.subject("nurse")
    # Kill the Authorizer's connections, then change the policy while it is away.
    pids = city.sql("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND usename = 'rmiot_app' AND pid <> pg_backend_pid()")
    assert pids
    city.sql("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid",
             ([p[0] for p in pids],))
    city.sql("INSERT INTO authz_grants (subject, role, tenant_id) VALUES (%s, 'clinician', %s)",
             (nurse, city.dept_b1))
    await eventually(lambda: authz.allowed(nurse, city.dept_b1, "alarm", "read"), 5.0)
    # And it is listening again.
    city.sql("DELETE FROM authz_grants WHERE subject = %s", (nurse,))
    await eventually(lambda: not authz.allowed(nurse, city.dept_b1, "alarm", "read"), 1.0)


async def test_decisions_agree_with_casbin(authz: Authorizer, city: City) -> None:
    """The compiled evaluator and Casbin's evaluation of rbac_model.conf (with
    the subtree rule as g's domain matching function) give the same answers."""
    rng = random.Random(20261122)
    subjects = [city.subject(f"u{i}") for i in range(12)]
    person_roles = [r for r in ALL_ROLES if r not in SUBJECT_KIND]
    for subject in subjects:
        for _ in range(rng.randint(1, 3)):
            await authz.grant(subject, rng.choice(person_roles), rng.choice(city.nodes))
    device = city.subject("7", kind="device")
    await authz.grant(device, "device", city.ward_a1)
    his = city.subject("his", kind="mllp")
    await authz.grant(his, "his_interface", city.hospital_a)
    subjects += [device, his, city.subject("ghost")]
    tenants = [*city.nodes, UNKNOWN_TENANT]
    objects = sorted(OBJECTS)
    allowed = 0
    for subject, tenant, obj, act in itertools.islice(
            ((rng.choice(subjects), rng.choice(tenants), rng.choice(objects), rng.choice(ACTIONS))
             for _ in itertools.count()), 600):
        answer = authz.allowed(subject, tenant, obj, act)
        why = authz.explain(subject, tenant, obj, act)
        assert answer == (why is not None), (subject, tenant, obj, act, why)
        if why:
            role, granted_on = why
            assert (role, granted_on) in authz.roles_of(subject)
            assert granted_on in authz.tree.ancestors(tenant)
            allowed += 1
    assert 30 < allowed < 570  # both answers were exercised


def test_tenant_tree_walks_up_and_down_and_drops_broken_nodes() -> None:
    # 1 > 2 > 3 > 4, 1 > 5; 6 hangs under a missing 99; 7 and 8 form a cycle.
    tree = TenantTree({1: None, 2: 1, 3: 2, 4: 3, 5: 1, 6: 99, 7: 8, 8: 7})
    assert tree.ancestors(4) == (4, 3, 2, 1)
    assert tree.path(4) == [1, 2, 3, 4]
    assert tree.parent(4) == 3 and tree.parent(1) is None
    assert tree.subtree(2) == {2, 3, 4}
    assert tree.subtree(1) == {1, 2, 3, 4, 5}
    assert tree.reaches(2, 4) and tree.reaches(4, 4) and not tree.reaches(4, 2)
    assert not tree.reaches(5, 4)
    for broken in (6, 7, 8, 99):
        assert broken not in tree and tree.ancestors(broken) == () and tree.subtree(broken) == set()
    assert sorted(tree) == [1, 2, 3, 4, 5] and len(tree) == 5

    moved = tree.changed({3: 5}, removed=[4])
    assert moved.ancestors(3) == (3, 5, 1) and 4 not in moved
    assert tree.ancestors(4) == (4, 3, 2, 1)  # the old snapshot is untouched
    healed = tree.changed({99: 1, 8: 1})
    assert healed.ancestors(6) == (6, 99, 1) and healed.ancestors(7) == (7, 8, 1)


async def test_loaded_tree_agrees_with_the_path_column(authz: Authorizer, city: City) -> None:
    for tenant in city.nodes:
        (path,) = city.sql("SELECT path FROM tenants WHERE id = %s", (tenant,))[0]
        assert authz.tree.path(tenant) == path
        assert authz.tree.subtree(tenant) == within_subtree(city, tenant)
