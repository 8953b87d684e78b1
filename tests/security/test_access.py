"""Access across the whole gRPC surface: for every method with a tenant-scoped
rule and every role, a call aimed at another hospital is denied; inside its own
tenant a role gets exactly what the policy gives it; a method without a rule is
closed; every one of these calls is in the audit chain.

The methods come from the running server's rules, so each new service is
covered here the day it is added.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import psycopg
import pyotp
import pytest
from google.protobuf import descriptor_pool, message_factory

from rmiot.config import Config
from rmiot.grpc_server import GrpcServer, channel
from rmiot.platform import Api
from rmiot.proto import audit_pb2, auth_pb2, auth_pb2_grpc, policy_pb2
from rmiot.security import identity
from rmiot.security.service import SecurityServices
from rmiot.tenants import store as tenants

PASSWORD = "Access-Test-9"
ROLES = ("commission_admin", "commission_analyst", "hospital_admin", "department_head",
         "clinician", "patient", "vendor", "auditor", "system_admin", "security_admin",
         "audit_admin")
_run = itertools.count()
# Requests that a permitted caller may send without side effects worth undoing.
SAFE_FIELDS: dict[str, dict[str, Any]] = {
    "/rmiot.v1.PolicyService/Grant": {"subject": "user:nobody-x", "role": "clinician"},
    "/rmiot.v1.PolicyService/Revoke": {"subject": "user:nobody-x", "role": "clinician"},
    "/rmiot.v1.PolicyService/SetPermission": {"role": "clinician", "object": "telemetry",
                                              "action": "read", "allow": True},
}


@dataclass
class City:
    security: SecurityServices
    server: GrpcServer
    cfg: Config
    hospital_a: int
    hospital_b: int
    tokens: dict[str, str]

    def call(self, method: str, request: Any, token: str) -> Any:
        out_type = descriptor_pool.Default().FindMethodByName(
            method.strip("/").replace("/", ".")).output_type
        cfg = dataclasses.replace(self.cfg, grpc=dataclasses.replace(self.cfg.grpc,
                                                                     port=self.server.port))
        chan = channel(cfg)
        rpc = chan.unary_unary(method, request_serializer=type(request).SerializeToString,
                               response_deserializer=message_factory.GetMessageClass(
                                   out_type).FromString)
        return chan, rpc(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)


@pytest.fixture
async def city(dev_certs: Config, database: str) -> AsyncIterator[City]:
    run = f"{next(_run)}{time.time_ns() % 10**9}"
    cfg = dataclasses.replace(
        dev_certs, grpc=dataclasses.replace(dev_certs.grpc, port=0, mtls_port=0),
        security=dataclasses.replace(dev_certs.security, caller_rate_per_s=1e5,
                                     tenant_rate_per_s=1e5))
    with psycopg.connect(database, autocommit=True) as conn:
        region = tenants.create_tenant(conn, f"ar-{run}", "Region", "region")
        district = tenants.create_tenant(conn, f"ad-{run}", "District", "district", region)
        hospital_a = tenants.create_tenant(conn, f"aa-{run}", "Hospital A", "hospital",
                                           district)
        hospital_b = tenants.create_tenant(conn, f"ab-{run}", "Hospital B", "hospital",
                                           district)
    security = SecurityServices(cfg)
    await security.start()
    api = Api(security)
    await api.start()
    server = GrpcServer(cfg, services=api.services(), interceptors=[security.interceptor])
    await server.start()
    tokens = {}
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        for role in ROLES:
            name = f"{role.replace('_', '-')}-{run}"
            user_id = await identity.create_user(conn, name, PASSWORD, hospital_a,
                                                 must_change=False)
            await security.authorizer.grant(f"user:{name}", role, hospital_a)
            code = ""
            if role in identity.ADMIN_ROLES:
                code = pyotp.TOTP(await identity.enroll_totp(conn, security.keyring,
                                                             user_id)).now()
            cfg_port = dataclasses.replace(cfg, grpc=dataclasses.replace(cfg.grpc,
                                                                         port=server.port))
            async with channel(cfg_port) as chan:
                reply = await auth_pb2_grpc.AuthServiceStub(chan).Login(auth_pb2.LoginRequest(
                    username=name, password=PASSWORD, totp=code))
            tokens[role] = reply.token
    yield City(security, server, cfg, hospital_a, hospital_b, tokens)
    await server.stop(0)
    await api.stop()
    await security.stop()


def tenant_scoped(security: SecurityServices) -> list[tuple[str, str]]:
    """(method, tenant field) for every rule that authorises against a tenant."""
    found = [(m, r.tenant_field) for m, r in sorted(security.rules.items())
             if r.tenant_field and not (r.public or r.any_caller)]
    assert found, "no tenant-scoped method: this suite would check nothing"
    return found


def request_for(method: str, field: str, tenant: int) -> Any:
    desc = descriptor_pool.Default().FindMethodByName(method.strip("/").replace("/", "."))
    message = message_factory.GetMessageClass(desc.input_type)()
    for name, value in SAFE_FIELDS.get(method, {}).items():
        setattr(message, name, value)
    setattr(message, field, tenant)
    return message


async def code_of(city: City, method: str, request: Any, role: str) -> grpc.StatusCode:
    chan, call = city.call(method, request, city.tokens[role])
    async with chan:
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_no_role_reaches_into_another_hospital(city: City) -> None:
    for method, field in tenant_scoped(city.security):
        for role in ROLES:
            code = await code_of(city, method, request_for(method, field, city.hospital_b), role)
            assert code == grpc.StatusCode.PERMISSION_DENIED, (method, role, code)


async def test_inside_its_tenant_a_role_gets_what_the_policy_gives(city: City) -> None:
    expect_allowed = {
        "/rmiot.v1.AuditService/Query": {"auditor", "audit_admin"},
        "/rmiot.v1.PolicyService/Grant": {"security_admin"},
        "/rmiot.v1.PolicyService/Revoke": {"security_admin"},
        "/rmiot.v1.PolicyService/ListGrants": {"security_admin"},
    }
    for method, field in tenant_scoped(city.security):
        if method not in expect_allowed:
            continue
        for role in ROLES:
            code = await code_of(city, method, request_for(method, field, city.hospital_a), role)
            if role in expect_allowed[method]:
                assert code == grpc.StatusCode.OK, (method, role, code)
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (method, role, code)


async def test_the_system_administrator_cannot_read_the_audit_log(city: City) -> None:
    request = audit_pb2.AuditQuery(tenant_id=city.hospital_a)
    code = await code_of(city, "/rmiot.v1.AuditService/Query", request, "system_admin")
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_an_auditor_finds_the_denied_calls(city: City) -> None:
    denied = policy_pb2.ListGrantsRequest(tenant_id=city.hospital_b)
    assert await code_of(city, "/rmiot.v1.PolicyService/ListGrants", denied,
                         "clinician") == grpc.StatusCode.PERMISSION_DENIED
    await city.security.audit.flush()
    chan, call = city.call("/rmiot.v1.AuditService/Query",
                           audit_pb2.AuditQuery(tenant_id=city.hospital_b, page_size=50),
                           city.tokens["auditor"])
    async with chan:
        with pytest.raises(grpc.aio.AioRpcError):  # hospital A's auditor: not B's records
            await call
    name = next(s for s, _, _ in city.security.authorizer.grants_in(
        frozenset([city.hospital_a])) if s.startswith("user:clinician"))
    chan, call = city.call("/rmiot.v1.AuditService/Query",
                           audit_pb2.AuditQuery(tenant_id=city.hospital_a, actor=name),
                           city.tokens["auditor"])
    async with chan:
        page = await call
    # The clinician's login is recorded under its home tenant, A; the denied
    # call named hospital B, so it is recorded under B, out of this auditor's reach.
    seen = {(e.method, e.outcome, e.tenant_id) for e in page.entries}
    assert ("/rmiot.v1.AuthService/Login", "ok", city.hospital_a) in seen
    assert all(e.tenant_id == city.hospital_a for e in page.entries)
    with psycopg.connect(city.security.dsn) as conn:
        row = conn.execute("SELECT tenant_id FROM audit_log WHERE actor = %s AND outcome = "
                           "'denied' AND method LIKE '%%ListGrants'", (name,)).fetchone()
    assert row == (city.hospital_b,)


async def test_a_method_without_a_rule_is_closed(city: City) -> None:
    method = "/rmiot.v1.PolicyService/ListGrants"
    rule = city.security.rules.pop(method)
    try:
        code = await code_of(city, method, request_for(method, "tenant_id", city.hospital_a),
                             "security_admin")
    finally:
        city.security.rules[method] = rule
    assert code == grpc.StatusCode.PERMISSION_DENIED
