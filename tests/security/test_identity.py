"""People and platforms through the real gRPC server: login, lockout, one
session per user, idle expiry, password policy and age, TOTP for
administrators, mTLS callers, plaintext refused — and every call audited."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import psycopg
import pyotp
import pytest

from rmiot.config import Config
from rmiot.deploy import certs
from rmiot.grpc_server import GrpcServer, channel
from rmiot.platform import Api
from rmiot.proto import auth_pb2, auth_pb2_grpc
from rmiot.security import identity
from rmiot.security.service import SecurityServices
from rmiot.tenants import store as tenants_store

PASSWORD = "Ward-7-Monitor"
_names = itertools.count(1)


@dataclass
class Platform:
    cfg: Config
    security: SecurityServices
    server: GrpcServer
    tenant: int
    dsn: str

    def stub(self, client_cert: tuple[bytes, bytes] | None = None
             ) -> auth_pb2_grpc.AuthServiceStub:
        cfg = dataclasses.replace(self.cfg, grpc=dataclasses.replace(
            self.cfg.grpc, port=self.server.port, mtls_port=self.server.mtls_port))
        return auth_pb2_grpc.AuthServiceStub(channel(cfg, client_cert=client_cert))

    async def user(self, *, must_change: bool = False, role: str | None = None) -> str:
        name = f"user{next(_names)}-{time.time_ns() % 10**8}"
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await identity.create_user(conn, name, PASSWORD, self.tenant,
                                       must_change=must_change)
        if role:
            await self.security.authorizer.grant(f"user:{name}", role, self.tenant)
        return name

    async def audit_rows(self, actor: str) -> list[tuple[str, str]]:
        await self.security.audit.flush()
        with psycopg.connect(self.dsn) as conn:
            return [(m, o) for m, o in conn.execute(
                "SELECT method, outcome FROM audit_log WHERE actor = %s ORDER BY id",
                (actor,)).fetchall()]


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
async def platform(dev_certs: Config, database: str) -> AsyncIterator[Platform]:
    cfg = dataclasses.replace(
        dev_certs, grpc=dataclasses.replace(dev_certs.grpc, port=0, mtls_port=0),
        security=dataclasses.replace(dev_certs.security, lockout_attempts=5,
                                     session_idle_minutes=15))
    with psycopg.connect(database, autocommit=True) as conn:
        region = tenants_store.create_tenant(conn, f"r-{time.time_ns()}", "Region", "region")
        tenant = tenants_store.create_tenant(conn, f"h-{time.time_ns()}", "Hospital", "hospital",
                                     region)
    security = SecurityServices(cfg)
    await security.start()
    api = Api(security)
    await api.start()
    server = GrpcServer(cfg, services=api.services(), interceptors=[security.interceptor])
    await server.start()
    yield Platform(cfg, security, server, tenant, database)
    await server.stop(0)
    await api.stop()
    await security.stop()


async def test_login_then_calls_carry_the_session(platform: Platform) -> None:
    name = await platform.user()
    stub = platform.stub()
    reply = await stub.Login(auth_pb2.LoginRequest(username=name, password=PASSWORD))
    assert reply.token and not reply.password_change_required
    me = await stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(reply.token))
    assert me.subject == f"user:{name}" and me.tenant_id == platform.tenant
    for metadata in ((), bearer("not-a-token")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    rows = await platform.audit_rows(f"user:{name}")
    assert ("/rmiot.v1.AuthService/Login", "ok") in rows
    assert ("/rmiot.v1.AuthService/WhoAmI", "ok") in rows
    anonymous = await platform.audit_rows("anonymous")
    assert ("/rmiot.v1.AuthService/WhoAmI", "unauthenticated") in anonymous


async def test_five_failures_lock_the_account_and_are_audited(platform: Platform) -> None:
    name = await platform.user()
    stub = platform.stub()
    codes = []
    for _ in range(5):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Login(auth_pb2.LoginRequest(username=name, password="Wrong-pass-1"))
        codes.append(info.value.code())
    assert codes[:4] == [grpc.StatusCode.UNAUTHENTICATED] * 4
    assert codes[4] == grpc.StatusCode.PERMISSION_DENIED  # the fifth failure locks
    with pytest.raises(grpc.aio.AioRpcError) as info:  # even the right password now
        await stub.Login(auth_pb2.LoginRequest(username=name, password=PASSWORD))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "locked" in (info.value.details() or "")
    rows = await platform.audit_rows(f"user:{name}")
    assert [o for _, o in rows] == ["failed_login"] * 6


async def test_unknown_user_and_wrong_password_look_the_same(platform: Platform) -> None:
    name = await platform.user()
    stub = platform.stub()
    details = []
    for user in (name, "nobody-here"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Login(auth_pb2.LoginRequest(username=user, password="Wrong-pass-1"))
        details.append((info.value.code(), info.value.details()))
    assert details[0] == details[1]


async def test_a_new_login_ends_the_previous_session(platform: Platform) -> None:
    name = await platform.user()
    stub = platform.stub()
    first = await stub.Login(auth_pb2.LoginRequest(username=name, password=PASSWORD))
    second = await stub.Login(auth_pb2.LoginRequest(username=name, password=PASSWORD))
    await stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(second.token))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(first.token))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await stub.Logout(auth_pb2.LogoutRequest(), metadata=bearer(second.token))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(second.token))


async def test_idle_session_expires(platform: Platform) -> None:
    name = await platform.user()
    stub = platform.stub()
    reply = await stub.Login(auth_pb2.LoginRequest(username=name, password=PASSWORD))
    # Sixteen minutes of silence, as another process would find it in the database.
    with psycopg.connect(platform.dsn, autocommit=True) as conn:
        conn.execute("UPDATE sessions SET last_seen = now() - interval '16 minutes' "
                     "FROM users WHERE users.id = sessions.user_id AND users.username = %s",
                     (name,))
    platform.security.sessions.cache.clear()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(reply.token))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with psycopg.connect(platform.dsn) as conn:
        reason = conn.execute("SELECT end_reason FROM sessions s JOIN users u ON u.id = s.user_id"
                              " WHERE u.username = %s", (name,)).fetchone()
    assert reason == ("idle",)


async def test_password_change_is_forced_and_checked(platform: Platform) -> None:
    name = await platform.user(must_change=True)
    stub = platform.stub()
    reply = await stub.Login(auth_pb2.LoginRequest(username=name, password=PASSWORD))
    assert reply.password_change_required
    token = bearer(reply.token)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ChangePassword(auth_pb2.ChangePasswordRequest(
            old_password=PASSWORD, new_password="short"), metadata=token)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ChangePassword(auth_pb2.ChangePasswordRequest(
            old_password="Not-the-old-1", new_password="Better-Pass-42"), metadata=token)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await stub.ChangePassword(auth_pb2.ChangePasswordRequest(
        old_password=PASSWORD, new_password="Better-Pass-42"), metadata=token)
    again = await stub.Login(auth_pb2.LoginRequest(username=name, password="Better-Pass-42"))
    assert not again.password_change_required


async def test_old_password_forces_a_change(platform: Platform) -> None:
    name = await platform.user()
    with psycopg.connect(platform.dsn, autocommit=True) as conn:
        conn.execute("UPDATE users SET password_changed_at = now() - interval '91 days' "
                     "WHERE username = %s", (name,))
    reply = await platform.stub().Login(auth_pb2.LoginRequest(username=name, password=PASSWORD))
    assert reply.password_change_required


async def test_administrators_need_totp(platform: Platform) -> None:
    name = await platform.user(role="security_admin")
    stub = platform.stub()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Login(auth_pb2.LoginRequest(username=name, password=PASSWORD))
    assert "TOTP" in (info.value.details() or "")
    async with await psycopg.AsyncConnection.connect(platform.dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT id FROM users WHERE username = %s", (name,))
        row = await cur.fetchone()
        assert row is not None
        secret = await identity.enroll_totp(conn, platform.security.keyring, row[0])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Login(auth_pb2.LoginRequest(username=name, password=PASSWORD, totp="000000"))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = await stub.Login(auth_pb2.LoginRequest(username=name, password=PASSWORD,
                                                   totp=pyotp.TOTP(secret).now()))
    me = await stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(reply.token))
    assert ("security_admin", platform.tenant) in {(r.role, r.tenant_id) for r in me.roles}
    with psycopg.connect(platform.dsn) as conn:
        stored = conn.execute("SELECT totp_secret_enc FROM users WHERE username = %s",
                              (name,)).fetchone()
    assert stored is not None and secret.encode() not in bytes(stored[0])


async def test_client_certificate_identifies_a_hospital_platform(platform: Platform) -> None:
    directory = platform.cfg.data_dir / "certs"
    path = certs.issue_client(directory, "hospital-test", "platform", tenant=platform.tenant)
    cert = (path.with_suffix(".key").read_bytes(), path.read_bytes())
    me = await platform.stub(client_cert=cert).WhoAmI(auth_pb2.WhoAmIRequest())
    assert me.subject == "cert:hospital-test" and me.tenant_id == platform.tenant


async def test_plaintext_and_foreign_certificates_are_refused(platform: Platform,
                                                              tmp_path: object) -> None:
    target = f"127.0.0.1:{platform.server.port}"
    async with grpc.aio.insecure_channel(target) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await auth_pb2_grpc.AuthServiceStub(plain).WhoAmI(auth_pb2.WhoAmIRequest(),
                                                              timeout=3)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # No client certificate on the mTLS port: the handshake fails.
    async with grpc.aio.secure_channel(f"127.0.0.1:{platform.server.mtls_port}",
                                       grpc.ssl_channel_credentials(
                                           platform.cfg.tls_path("ca_file").read_bytes())) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await auth_pb2_grpc.AuthServiceStub(ch).WhoAmI(auth_pb2.WhoAmIRequest(), timeout=3)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # A certificate from another CA: the TLS handshake fails.
    from pathlib import Path

    other = Path(str(tmp_path)) / "other-ca"
    certs.ensure_dev_ca(other)
    path = certs.issue_client(other, "intruder", "platform", tenant=platform.tenant)
    stub = platform.stub(client_cert=(path.with_suffix(".key").read_bytes(), path.read_bytes()))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.WhoAmI(auth_pb2.WhoAmIRequest(), timeout=3)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_floods_are_refused_and_sustained_abuse_audited(platform: Platform) -> None:
    from rmiot.security.limits import RateLimiter

    platform.security.interceptor.per_caller = RateLimiter(5, 5, abuse_threshold=3)
    name = await platform.user()
    stub = platform.stub()
    reply = await stub.Login(auth_pb2.LoginRequest(username=name, password=PASSWORD))
    codes = []
    for _ in range(20):
        try:
            await stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(reply.token))
            codes.append(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code())
    assert codes[:4] == [grpc.StatusCode.OK] * 4
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 10
    rows = await platform.audit_rows(f"user:{name}")
    assert rows.count(("rate_limit", "sustained_abuse")) == 1  # once a minute, not per call
    assert ("/rmiot.v1.AuthService/WhoAmI", "rate_limited") in rows
