"""RegistryService.IssueTransportCredential / RevokeTransportCredentials
through the real TLS gRPC server and the security interceptor: a hospital
administrator or the device's vendor gets a login (shown once, kept only as a
hash), ids out of reach are NOT_FOUND, callers without device:write are
refused, every call is audited, and a revoked login no longer logs in."""

from __future__ import annotations

import grpc
import psycopg

from rmiot.proto import registry_pb2
from rmiot.registry import transport_credentials as creds
from tests.registry.test_service import Platform, code_of, new_device, platform

__all__ = ["platform"]  # the fixture, used by name

Issue = registry_pb2.IssueTransportCredentialRequest
Revoke = registry_pb2.RevokeTransportCredentialsRequest


async def test_issue_and_revoke_transport_credentials(platform: Platform) -> None:
    w = platform.world
    admin = await platform.person("hospital_admin")
    device = await admin.RegisterDevice(registry_pb2.RegisterDeviceRequest(
        tenant_id=w.hospital, device=new_device(w.monitor, "TC-1")))
    issued = await admin.IssueTransportCredential(Issue(tenant_id=w.hospital,
                                                        device_id=device.id))
    assert issued.device_id == device.id and issued.username.startswith(f"d{device.id}-")
    assert len(issued.password) >= 40
    chosen = await admin.IssueTransportCredential(Issue(
        tenant_id=w.hospital, device_id=device.id, username=f"bed-7-{w.stamp}"))
    assert chosen.username == f"bed-7-{w.stamp}"
    with w.conn() as conn:
        assert creds.verify(conn, issued.username, issued.password) == device.id
        assert creds.verify(conn, chosen.username, chosen.password) == device.id
        assert creds.verify(conn, issued.username, chosen.password) is None
        stored = conn.execute("SELECT password_hash FROM transport_credentials "
                              "WHERE device_id = %s", (device.id,)).fetchall()
        foreign = w.device(conn, "TC-FOREIGN").id
        conn.execute("UPDATE devices SET tenant_id = %s WHERE id = %s",
                     (w.other_hospital, foreign))
    assert all(issued.password not in h and h.startswith("$7$") for (h,) in stored)

    # The vendor whose device it is may give it a login; another vendor sees nothing.
    vendor = await platform.vendor(w.vendor, w.hospital)
    by_vendor = await vendor.IssueTransportCredential(Issue(tenant_id=w.hospital,
                                                            device_id=device.id))
    other = await platform.vendor(w.other_vendor, w.hospital)
    clinician = await platform.person("clinician")
    cases = [
        # Out of reach: exactly like an id that does not exist.
        (admin.IssueTransportCredential(Issue(tenant_id=w.hospital, device_id=foreign)),
         grpc.StatusCode.NOT_FOUND),
        (admin.IssueTransportCredential(Issue(tenant_id=w.hospital, device_id=2**62)),
         grpc.StatusCode.NOT_FOUND),
        (other.IssueTransportCredential(Issue(tenant_id=w.hospital, device_id=device.id)),
         grpc.StatusCode.NOT_FOUND),
        (admin.RevokeTransportCredentials(Revoke(tenant_id=w.hospital, device_id=foreign)),
         grpc.StatusCode.NOT_FOUND),
        # Another device's login (or one that does not exist) is not this device's.
        (admin.RevokeTransportCredentials(Revoke(tenant_id=w.hospital, device_id=device.id,
                                                 username="nobody-here")),
         grpc.StatusCode.NOT_FOUND),
        # Not in the caller's subtree; no device:write.
        (admin.IssueTransportCredential(Issue(tenant_id=w.other_hospital, device_id=foreign)),
         grpc.StatusCode.PERMISSION_DENIED),
        (clinician.IssueTransportCredential(Issue(tenant_id=w.hospital, device_id=device.id)),
         grpc.StatusCode.PERMISSION_DENIED),
        # Names: taken, reserved for the platform, or not a name.
        (admin.IssueTransportCredential(Issue(tenant_id=w.hospital, device_id=device.id,
                                              username=chosen.username)),
         grpc.StatusCode.ALREADY_EXISTS),
        (admin.IssueTransportCredential(Issue(tenant_id=w.hospital, device_id=device.id,
                                              username="rmiot-platform")),
         grpc.StatusCode.INVALID_ARGUMENT),
        (admin.IssueTransportCredential(Issue(tenant_id=w.hospital, device_id=device.id,
                                              username="a:b")),
         grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for call, code in cases:
        assert await code_of(call) == code

    one = await admin.RevokeTransportCredentials(Revoke(
        tenant_id=w.hospital, device_id=device.id, username=chosen.username))
    assert one.revoked == 1
    rest = await admin.RevokeTransportCredentials(Revoke(tenant_id=w.hospital,
                                                         device_id=device.id))
    assert rest.revoked == 2  # the generated one and the vendor's
    with w.conn() as conn:
        for login in (issued, chosen, by_vendor):
            assert creds.verify(conn, login.username, login.password) is None
    # A retired device gets no new login.
    for state in ("active", "retired"):
        await admin.Transition(registry_pb2.TransitionRequest(
            tenant_id=w.hospital, device_id=device.id, to_state=state, reason="test"))
    assert await code_of(admin.IssueTransportCredential(Issue(
        tenant_id=w.hospital, device_id=device.id))) == grpc.StatusCode.FAILED_PRECONDITION

    await platform.security.audit.flush()
    with psycopg.connect(w.dsn) as conn:
        audited = conn.execute(
            "SELECT split_part(method, '/', 3), outcome, count(*) FROM audit_log "
            "WHERE method LIKE '%%TransportCredential%%' AND tenant_id IN (%s, %s) "
            "GROUP BY 1, 2", (w.hospital, w.other_hospital)).fetchall()
        leaked = conn.execute("SELECT count(*) FROM audit_log WHERE detail::text LIKE %s",
                              (f"%{issued.password}%",)).fetchone()
    outcomes = {(method, outcome): n for method, outcome, n in audited}
    assert outcomes[("IssueTransportCredential", "ok")] == 3
    assert outcomes[("RevokeTransportCredentials", "ok")] == 2
    assert outcomes[("IssueTransportCredential", "denied")] == 2
    assert leaked == (0,)
