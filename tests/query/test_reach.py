"""Who sees what: ids of another tenant are NOT_FOUND exactly like ids that do
not exist, the interceptor refuses tenants and rights outside a caller's grants,
commission roles get small groups suppressed, clinicians see their bound
patients' data only — and a batch checks each of its items."""

from __future__ import annotations

import datetime as dt

import grpc

from rmiot.proto import query_pb2 as pb
from rmiot.query import calendar
from rmiot.security.patient_access import patient_access
from tests.query.conftest import Server, refused

MISSING = 9_000_000_000_000


async def test_another_tenants_ids_are_not_found_like_missing_ones(server: Server) -> None:
    d = server.district
    admin_a = server.client("admin_a")
    foreign, own = d.monitors[d.b1][0], d.monitors[d.a1][0]
    lo = calendar.to_us(d.base)
    for device in (foreign, MISSING):
        for method, request in (("Latest", pb.LatestRequest(device_id=device)),
                                ("Raw", pb.RawRequest(device_id=device, from_us=lo,
                                                      to_us=lo + 3600 * 10**6)),
                                ("Binding", pb.BindingRequest(device_id=device))):
            assert await refused(admin_a(method, request)) == grpc.StatusCode.NOT_FOUND
    assert await refused(admin_a("Latest", pb.LatestRequest(device_id=own))) \
        == grpc.StatusCode.OK
    admin_b = server.client("admin_b")
    for patient in (d.patient, MISSING):
        assert await refused(admin_b("Binding", pb.BindingRequest(patient_id=patient))) \
            == grpc.StatusCode.NOT_FOUND
    binding = await admin_a("Binding", pb.BindingRequest(patient_id=d.patient))
    assert [(b.device_id, b.bed) for b in binding.bindings] == [(d.bound_device, "A1-07")]
    assert len(binding.bindings[0].patient_pseudonym) == 64


async def test_tenants_and_rights_outside_the_grants_are_refused(server: Server) -> None:
    d = server.district
    request = pb.AggregateRequest(tenant_id=d.hospital_b, metrics=[1], from_us=0,
                                  to_us=calendar.to_us(d.end))
    assert await refused(server.client("admin_a")("Aggregate", request)) \
        == grpc.StatusCode.PERMISSION_DENIED
    for method, req in (("FleetStatus", pb.FleetRequest(tenant_id=d.hospital_b)),
                        ("Energy", pb.EnergyRequest(tenant_id=d.hospital_b))):
        assert await refused(server.client("admin_a")(method, req)) \
            == grpc.StatusCode.PERMISSION_DENIED
    # Commission roles read aggregates, never a device's telemetry.
    latest = pb.LatestRequest(device_id=d.monitors[d.a1][0])
    assert await refused(server.client("analyst")("Latest", latest)) \
        == grpc.StatusCode.PERMISSION_DENIED
    # Clinicians have no aggregate right.
    request = pb.AggregateRequest(tenant_id=d.a1, metrics=[1], from_us=0,
                                  to_us=calendar.to_us(d.end))
    assert await refused(server.client("clinician_a1")("Aggregate", request)) \
        == grpc.StatusCode.PERMISSION_DENIED


async def test_commission_roles_get_small_groups_suppressed(server: Server) -> None:
    d = server.district
    request = pb.AggregateRequest(
        tenant_id=d.region, metrics=[1], kinds=["monitor"], from_us=calendar.to_us(d.base),
        to_us=calendar.to_us(d.end), bucket_s=86400, group_by=pb.GROUP_DEPARTMENT,
        percentiles=[0.5])
    analyst = await server.client("analyst")("Aggregate", request)
    mine = [r for r in analyst.rows if r.group_id in (d.a1, d.a2, d.b1)]
    assert len(mine) == 6 and analyst.min_group_size == 11
    for row in mine:
        if row.group_id == d.a1:  # 12 devices report
            assert not row.suppressed and row.devices == 12 and row.count > 0
        else:  # 3 and 4 devices: withheld
            assert row.suppressed
            assert (row.count, row.sum, row.avg, row.min, row.max, row.devices) == (0,) * 6
            assert list(row.percentiles) == [0.0]
    request.group_by = pb.GROUP_HOSPITAL  # read from the hospitals' own day rows
    by_hospital = await server.client("analyst")("Aggregate", request)
    sizes = {(r.group_id, r.suppressed, r.devices) for r in by_hospital.rows
             if r.group_id in (d.hospital_a, d.hospital_b)}
    assert sizes == {(d.hospital_a, False, 15), (d.hospital_b, True, 0)}
    request.tenant_id, request.group_by = d.hospital_a, pb.GROUP_DEPARTMENT
    admin = await server.client("admin_a")("Aggregate", request)
    assert not any(r.suppressed for r in admin.rows)
    assert {r.group_id for r in admin.rows} == {d.a1, d.a2}
    request.tenant_id, request.group_by = d.district, pb.GROUP_DEVICE
    request.ClearField("bucket_s")
    request.from_us = calendar.to_us(d.base + dt.timedelta(hours=3))
    request.to_us = request.from_us + 3600 * 10**6
    by_device = await server.client("analyst")("Aggregate", request)
    assert by_device.rows and all(r.suppressed for r in by_device.rows)


async def test_a_clinician_sees_bound_patients_data_only(server: Server) -> None:
    d = server.district
    clinician = server.client("clinician_a1")
    # The bound device lives in A2, but the patient was bound by A1, the clinician's ward.
    latest = await clinician("Latest", pb.LatestRequest(device_id=d.bound_device))
    assert latest.values and all(v.ts_us >= calendar.to_us(d.bound_at) for v in latest.values)
    window = pb.RawRequest(device_id=d.bound_device,
                           from_us=calendar.to_us(d.bound_at - dt.timedelta(hours=4)),
                           to_us=calendar.to_us(d.bound_at + dt.timedelta(hours=4)))
    frames = (await clinician("Raw", window)).frames
    assert len(frames) == 24 and frames[0].ts_us >= calendar.to_us(d.bound_at)
    everything = (await server.client("admin_a")("Raw", window)).frames
    assert len(everything) == 48
    # An A1 device with no patient bound, and an A2 device: not the clinician's.
    for device in (d.monitors[d.a1][0], d.monitors[d.a2][1]):
        assert await refused(clinician("Latest", pb.LatestRequest(device_id=device))) \
            == grpc.StatusCode.NOT_FOUND
    binding = await clinician("Binding", pb.BindingRequest(patient_id=d.patient))
    assert [b.device_id for b in binding.bindings] == [d.bound_device]


async def test_a_batch_checks_and_answers_each_item(server: Server) -> None:
    d = server.district
    items = [
        pb.BatchItem(id="own", latest=pb.LatestRequest(device_id=d.monitors[d.a1][0])),
        pb.BatchItem(id="foreign", latest=pb.LatestRequest(device_id=d.monitors[d.b1][0])),
        pb.BatchItem(id="other-hospital", aggregate=pb.AggregateRequest(
            tenant_id=d.hospital_b, metrics=[1], from_us=0, to_us=calendar.to_us(d.end))),
        pb.BatchItem(id="fleet", fleet=pb.FleetRequest(tenant_id=d.hospital_a,
                                                       group_by=pb.GROUP_DEPARTMENT)),
        pb.BatchItem(id="bad", aggregate=pb.AggregateRequest(tenant_id=d.hospital_a)),
        pb.BatchItem(id="empty"),
    ]
    reply = await server.client("admin_a")("Batch", pb.BatchRequest(items=items))
    codes = {r.id: _code(r.code) for r in reply.results}
    assert codes == {"own": grpc.StatusCode.OK, "foreign": grpc.StatusCode.NOT_FOUND,
                     "other-hospital": grpc.StatusCode.PERMISSION_DENIED,
                     "fleet": grpc.StatusCode.OK, "bad": grpc.StatusCode.INVALID_ARGUMENT,
                     "empty": grpc.StatusCode.INVALID_ARGUMENT}
    assert [r.id for r in reply.results] == [i.id for i in items]
    own = reply.results[0].latest
    assert own.device_id == d.monitors[d.a1][0] and len(own.values) == 4
    assert {r.group_id for r in reply.results[3].fleet.rows} == {d.a1, d.a2}


def _code(number: int) -> grpc.StatusCode:
    return next(c for c in grpc.StatusCode if c.value[0] == number)


async def test_reads_of_a_patients_data_are_in_the_audit_with_the_pseudonym(
        server: Server) -> None:
    d = server.district
    clinician, admin = server.client("clinician_a1"), server.client("admin_a")
    start = dt.datetime.now(dt.UTC)  # the module's other tests read the patient's data too
    window = pb.RawRequest(device_id=d.bound_device,
                           from_us=calendar.to_us(d.bound_at - dt.timedelta(hours=1)),
                           to_us=calendar.to_us(d.bound_at + dt.timedelta(hours=1)))
    await clinician("Latest", pb.LatestRequest(device_id=d.bound_device))
    await admin("Raw", window)
    await clinician("Binding", pb.BindingRequest(patient_id=d.patient))
    await admin("Batch", pb.BatchRequest(items=[
        pb.BatchItem(id="1", latest=pb.LatestRequest(device_id=d.bound_device))]))
    # A device with no patient bound is no patient's data.
    await admin("Latest", pb.LatestRequest(device_id=d.monitors[d.a1][0]))
    before = pb.RawRequest(device_id=d.bound_device,
                           from_us=calendar.to_us(d.bound_at - dt.timedelta(hours=3)),
                           to_us=calendar.to_us(d.bound_at - dt.timedelta(hours=2)))
    await admin("Raw", before)  # before the binding: not the patient's either
    await server.security.audit.flush()
    seen = [(a.method.rsplit("/", 1)[-1], a.actor.split("-")[0])
            for a in patient_access(d.dsn, str(d.patient)) if a.ts >= start]
    assert sorted(seen) == sorted([("Latest", "user:clinician_a1"), ("Raw", "user:admin_a"),
                                   ("Binding", "user:clinician_a1"), ("Batch", "user:admin_a")])
