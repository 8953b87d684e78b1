"""Authorisation figures: one decision against a city-sized policy.

The city, built in its own database (rmiot_bench_authz, created afresh and
migrated; bulk rows by COPY): one region, 10 districts, 200 hospitals, 30
departments each; a third of the departments hold a ward and every tenth
ward a sub-ward (depth 6). 50,000 subjects hold roles at every level:
commission and the three administrators at the region, analysts at districts,
hospital admins and platforms at hospitals, heads, clinicians (a fifth of
them in two departments) and patients in departments and wards, vendors at
the region.

Requests are random (subject, tenant, object, action): half the tenants
uniform over the tree, half inside one of the subject's grants, so both
answers are common. Measured through Authorizer.allowed(), GC on:
- cold: every request distinct, so every one misses the decision cache;
- cached: the same requests again.
Also: reach() cold, start-up load time, how long a grant made by one
Authorizer takes to be in force in another (NOTIFY), and, for comparison,
Casbin's own enforcer holding the whole policy, with the subtree rule as g's
domain matching function (BENCH_CASBIN=0 skips it).

Last line: one JSON object with every figure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from common import fresh_database  # benches/common.py

from rmiot import db
from rmiot.deploy import cluster
from rmiot.security.authz import OBJECTS, Authorizer, casbin_enforcer

DATABASE = "rmiot_bench_authz"
USERS = 50_000
DISTRICTS, HOSPITALS_PER_DISTRICT, DEPARTMENTS_PER_HOSPITAL = 10, 20, 30
REQUESTS = int(os.environ.get("BENCH_REQUESTS", "20000"))
CASBIN_REQUESTS = int(os.environ.get("BENCH_CASBIN_REQUESTS", "200"))
ACTIONS = ("read", "write", "manage")


def say(msg: str) -> None:
    print(msg, flush=True)


def prepare_database() -> tuple[Any, bool]:
    """A fresh, migrated rmiot_bench_authz; True when the private cluster was started here."""
    cfg, _, started = fresh_database(DATABASE)
    return cfg, started


@dataclasses.dataclass
class City:
    tenants: list[tuple[int, int | None, str, list[int]]]   # id, parent, level, path
    grants: list[tuple[str, str, int]]                      # subject, role, tenant
    subtree: dict[int, list[int]]                           # node -> its subtree


def build_city(rng: random.Random) -> City:
    tenants: list[tuple[int, int | None, str, list[int]]] = [(1, None, "region", [1])]
    ids = iter(range(2, 10**9))
    hospitals: list[int] = []
    departments: list[int] = []    # directly under a hospital
    units: list[int] = []          # departments, wards, sub-wards
    hospital_units: dict[int, list[int]] = {}
    for _ in range(DISTRICTS):
        district = next(ids)
        tenants.append((district, 1, "district", [1, district]))
        for _ in range(HOSPITALS_PER_DISTRICT):
            hospital = next(ids)
            hospitals.append(hospital)
            tenants.append((hospital, district, "hospital", [1, district, hospital]))
            hospital_units[hospital] = []
            for d in range(DEPARTMENTS_PER_HOSPITAL):
                dept = next(ids)
                path = [1, district, hospital, dept]
                tenants.append((dept, hospital, "department", path))
                departments.append(dept)
                hospital_units[hospital].append(dept)
                if d % 3 == 0:
                    ward = next(ids)
                    tenants.append((ward, dept, "department", [*path, ward]))
                    hospital_units[hospital].append(ward)
                    if d % 30 == 0:
                        sub = next(ids)
                        tenants.append((sub, ward, "department", [*path, ward, sub]))
                        hospital_units[hospital].append(sub)
    for unit_list in hospital_units.values():
        units.extend(unit_list)
    districts = [t for t, _, level, _ in tenants if level == "district"]

    grants: list[tuple[str, str, int]] = []
    n = iter(range(USERS))

    def person(role: str, tenant: int, kind: str = "user") -> str:
        subject = f"{kind}:{role}-{next(n)}"
        grants.append((subject, role, tenant))
        return subject

    for role, count in (("commission_admin", 5), ("commission_analyst", 10),
                        ("system_admin", 3), ("security_admin", 2), ("audit_admin", 2),
                        ("auditor", 8)):
        for _ in range(count):
            person(role, 1)
    for district in districts:
        for _ in range(2):
            person("commission_analyst", district)
    for _ in range(100):
        person("vendor", 1, kind="cert")
    for hospital in hospitals:
        person("hospital_platform", hospital, kind="cert")
        person("hospital_admin", hospital)
        person("hospital_admin", hospital)
    for dept in departments:
        person("department_head", dept)
    for _ in range(30_000):
        hospital = rng.choice(hospitals)
        first = rng.choice(hospital_units[hospital])
        subject = person("clinician", first)
        second = rng.choice(hospital_units[hospital])
        if rng.random() < 0.2 and second != first:  # also works in a second unit
            grants.append((subject, "clinician", second))
    while True:
        try:
            person("patient", rng.choice(units))
        except StopIteration:
            break

    children: dict[int, list[int]] = {}
    for tenant, parent, _, _ in tenants:
        if parent is not None:
            children.setdefault(parent, []).append(tenant)
    subtree: dict[int, list[int]] = {}
    for tenant, _, _, _ in reversed(tenants):  # children come after their parent
        subtree[tenant] = [tenant, *(m for c in children.get(tenant, ()) for m in subtree[c])]
    return City(tenants, grants, subtree)


def load_city(admin_dsn: str, city: City) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        with conn.transaction(), conn.cursor().copy(
                "COPY tenants (id, parent_id, level, code, name, path) FROM STDIN") as copy:
            for tenant, parent, level, path in city.tenants:
                copy.write_row((tenant, parent, level, f"t{tenant}", f"{level} {tenant}", path))
        with conn.transaction(), conn.cursor().copy(
                "COPY authz_grants (subject, role, tenant_id) FROM STDIN") as copy:
            for row in city.grants:
                copy.write_row(row)
        conn.execute("ANALYZE tenants")
        conn.execute("ANALYZE authz_grants")


def requests(rng: random.Random, city: City, count: int) -> list[tuple[str, int, str, str]]:
    """Distinct random requests: half the tenants anywhere, half under a grant."""
    by_subject: dict[str, list[int]] = {}
    for subject, _, tenant in city.grants:
        by_subject.setdefault(subject, []).append(tenant)
    subjects = list(by_subject)
    all_tenants = [t for t, _, _, _ in city.tenants]
    objects = sorted(OBJECTS)
    seen: set[tuple[str, int, str, str]] = set()
    out: list[tuple[str, int, str, str]] = []
    while len(out) < count:
        subject = rng.choice(subjects)
        if rng.random() < 0.5:
            tenant = rng.choice(all_tenants)
        else:
            tenant = rng.choice(city.subtree[rng.choice(by_subject[subject])])
        req = (subject, tenant, rng.choice(objects), rng.choice(ACTIONS))
        if req not in seen:
            seen.add(req)
            out.append(req)
    return out


def percentiles(samples_ns: list[int]) -> tuple[float, float, float]:
    """p50, p99, max in microseconds."""
    ordered = sorted(samples_ns)
    return (ordered[len(ordered) // 2] / 1000, ordered[int(len(ordered) * 0.99)] / 1000,
            ordered[-1] / 1000)


def timed(call: Callable[..., object], args: list[tuple[Any, ...]]) -> tuple[list[int], int]:
    clock = time.perf_counter_ns
    samples: list[int] = []
    truthy = 0
    for a in args:
        t0 = clock()
        result = call(*a)
        samples.append(clock() - t0)
        truthy += bool(result)
    return samples, truthy


async def propagation_ms(authz: Authorizer, other: Authorizer, tenant: int,
                         rounds: int) -> list[float]:
    """Grant in one Authorizer, poll until the other allows; then revoke likewise."""
    out: list[float] = []
    for i in range(rounds):
        subject = f"user:propagation-{i}"
        for change, want in ((authz.grant, True), (authz.revoke, False)):
            t0 = time.perf_counter()
            await change(subject, "clinician", tenant)
            while other.allowed(subject, tenant, "telemetry", "read") != want:  # noqa: ASYNC110 - the state lives in another Authorizer
                await asyncio.sleep(0.0005)
            out.append((time.perf_counter() - t0) * 1000)
    return out


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run(dsn: str, city: City, rng: random.Random) -> dict[str, Any]:
    rss0 = rss_mb()
    t0 = time.perf_counter()
    authz = Authorizer(dsn)
    await authz.start()
    load_s = time.perf_counter() - t0
    memory = rss_mb() - rss0
    say(f"Authorizer.start(): {len(authz.tree)} tenants, {len(city.grants)} grants "
        f"in {load_s:.2f} s, +{memory:.0f} MB resident")
    other = Authorizer(dsn)
    await other.start()
    try:
        reqs = requests(rng, city, REQUESTS)
        cold, allowed = timed(authz.allowed, reqs)
        warm, allowed_again = timed(authz.allowed, reqs)
        assert allowed == allowed_again
        c50, c99, cmax = percentiles(cold)
        w50, w99, wmax = percentiles(warm)
        say(f"allowed() cold:   p50 {c50:.2f} us  p99 {c99:.2f} us  max {cmax:.1f} us "
            f"({len(reqs)} distinct requests, {allowed} allowed)")
        say(f"allowed() cached: p50 {w50:.2f} us  p99 {w99:.2f} us  max {wmax:.1f} us")

        reach_reqs = list({(s, o, a) for s, _, o, a in reqs})[:5000]
        reach_samples, _ = timed(authz.reach, reach_reqs)
        r50, r99, _ = percentiles(reach_samples)
        say(f"reach() cold:     p50 {r50:.2f} us  p99 {r99:.2f} us ({len(reach_reqs)} requests)")

        delays = await propagation_ms(authz, other, city.tenants[-1][0], rounds=20)
        delays.sort()
        say(f"grant/revoke call to in force in another Authorizer (connect and commit "
            f"included): median {delays[len(delays) // 2]:.1f} ms, max {delays[-1]:.1f} ms")
        figures: dict[str, Any] = {
            "authz_p99_us": round(c99, 2), "authz_p50_us": round(c50, 2),
            "authz_cached_p99_us": round(w99, 2), "authz_cached_p50_us": round(w50, 2),
            "reach_p99_us": round(r99, 2), "load_s": round(load_s, 3),
            "authorizer_rss_mb": round(memory, 1),
            "propagation_max_ms": round(delays[-1], 1),
            "allowed_share": round(allowed / len(reqs), 3),
        }
        if os.environ.get("BENCH_CASBIN", "1") != "0":
            figures.update(run_casbin(authz, city, reqs[:CASBIN_REQUESTS]))
        return figures
    finally:
        await other.stop()
        await authz.stop()


def run_casbin(authz: Authorizer, city: City,
               reqs: list[tuple[str, int, str, str]]) -> dict[str, Any]:
    """Casbin's enforcer with the whole policy and the subtree rule as g's
    domain matching function: the plain hierarchical evaluation."""
    with psycopg.connect(authz.dsn) as conn:
        permissions = conn.execute("SELECT role, object, action FROM authz_permissions").fetchall()
    t0 = time.perf_counter()
    enforcer = casbin_enforcer(authz.tree, permissions, city.grants)
    load_s = time.perf_counter() - t0
    samples, allowed = timed(enforcer.enforce, [(s, o, a, str(t)) for s, t, o, a in reqs])
    expected = sum(authz.allowed(*r) for r in reqs)
    assert allowed == expected, (allowed, expected)
    p50, p99, _ = percentiles(samples)
    say(f"casbin enforce(), whole policy, hierarchical domains: p50 {p50:.0f} us "
        f"p99 {p99:.0f} us ({len(reqs)} requests; loaded in {load_s:.1f} s)")
    return {"casbin_hierarchical_p50_us": round(p50, 1),
            "casbin_hierarchical_p99_us": round(p99, 1), "casbin_load_s": round(load_s, 2)}


def main() -> None:
    rng = random.Random(1122)
    cfg, started = prepare_database()
    try:
        t0 = time.perf_counter()
        city = build_city(rng)
        load_city(db.admin_dsn(cfg), city)
        with psycopg.connect(db.admin_dsn(cfg)) as conn:
            row = conn.execute("SELECT count(*) FROM authz_permissions").fetchone()
            permissions = int(row[0]) if row else 0
        subjects = len({s for s, _, _ in city.grants})
        say(f"city: {len(city.tenants)} tenants, {subjects} subjects, {len(city.grants)} grants, "
            f"{permissions} permissions; built and copied in {time.perf_counter() - t0:.1f} s")
        figures = asyncio.run(run(db.app_dsn(cfg), city, rng))
    finally:
        if started:
            cluster.Cluster(cfg).stop()
    result = {**figures, "users": subjects, "tenants": len(city.tenants),
              "policy_rows": len(city.grants) + permissions}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
