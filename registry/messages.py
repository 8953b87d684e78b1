"""RegistryService's messages and the registry's values, converted both
ways: requests become the import's text columns (``registry.fields``), so a
device sent over gRPC passes exactly the checks a CSV row does; replies are
built from ``registry.devices``, ``models``, ``bindings`` and ``approvals``.
Absent values are empty strings and zeros, as proto3 has them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from rmiot.proto import registry_pb2 as pb
from rmiot.registry import approvals, bindings, models
from rmiot.registry.assets import book_value
from rmiot.registry.devices import Device
from rmiot.registry.fields import CODE_KINDS


def metric_dict(metric: pb.MetricSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"id": metric.id, "name": metric.name, "unit": metric.unit}
    if metric.HasField("min"):
        out["min"] = metric.min
    if metric.HasField("max"):
        out["max"] = metric.max
    return out


def new_device_fields(device: pb.NewDevice, tenant: int) -> dict[str, str]:
    """A NewDevice as the import's columns (one set of checks for both)."""
    asset = device.asset
    fields = {
        "tenant": str(tenant), "department": _id(device.department_id),
        "model": _id(device.model_id), "serial": device.serial_no, "udi": device.udi,
        "rfid": device.rfid, "barcode": device.barcode, "qr": device.qr,
        "location": device.location, "gateway": _id(device.gateway_id),
        "state": "active" if device.activate else "registered",
        "asset_class": asset.asset_class, "asset_grade": asset.asset_grade,
        "purchase_date": asset.purchase_date, "purchase_cost": asset.purchase_cost,
        "depreciation_method": asset.depreciation_method,
        "useful_life_years": _id(asset.useful_life_years),
        "calibration_due": asset.calibration_due, "inspection_due": asset.inspection_due}
    if device.HasField("auth_required"):
        fields["auth_required"] = str(device.auth_required).lower()
    return fields


def update_fields(request: pb.UpdateDeviceRequest) -> dict[str, str]:
    """The fields present in an update, as the import's columns."""
    changes: dict[str, str] = {}
    numbers = {"department_id": "department", "gateway_id": "gateway",
               "useful_life_years": "useful_life_years"}
    for name, column in numbers.items():
        if request.HasField(name):  # type: ignore[arg-type]
            changes[column] = _id(getattr(request, name))
    for name in ("location", *CODE_KINDS, "asset_class", "asset_grade", "purchase_date",
                 "purchase_cost", "depreciation_method", "calibration_due", "inspection_due"):
        if request.HasField(name):  # type: ignore[arg-type]
            changes[name] = getattr(request, name)
    if request.HasField("auth_required"):
        changes["auth_required"] = str(request.auth_required).lower()
    return changes


def _id(value: int) -> str:
    return str(value) if value else ""


def model_pb(model: models.DeviceModel) -> pb.DeviceModel:
    return pb.DeviceModel(
        id=model.id, vendor_code=model.vendor_code, name=model.name, kind=model.kind,
        metrics=[pb.MetricSpec(id=m.id, name=m.name, unit=m.unit, min=m.min, max=m.max)
                 for m in model.metrics],
        description=model.description, created_us=model.created_at_us)


def _text(value: object) -> str:
    return "" if value is None else str(value)


def device_pb(device: Device) -> pb.Device:
    a = device.asset
    value = book_value(a, dt.date.today())
    asset = pb.AssetData(
        asset_class=_text(a.asset_class), asset_grade=_text(a.asset_grade),
        purchase_date=_text(a.purchase_date), purchase_cost=_text(a.purchase_cost),
        depreciation_method=_text(a.depreciation_method),
        useful_life_years=a.useful_life_years or 0, calibration_due=_text(a.calibration_due),
        inspection_due=_text(a.inspection_due), book_value=_text(value))
    return pb.Device(
        id=device.id, tenant_id=device.tenant_id, department_id=device.department_id or 0,
        model_id=device.model_id or 0, vendor_code=device.vendor_code, udi=_text(device.udi),
        serial_no=_text(device.serial_no), state=device.state,
        rfid=device.codes.get("rfid", ""), barcode=device.codes.get("barcode", ""),
        qr=device.codes.get("qr", ""), location=_text(device.location),
        gateway_id=device.gateway_id or 0, auth_required=device.auth_required, asset=asset,
        registered_by=device.registered_by, created_us=device.created_at_us,
        updated_us=device.updated_at_us)


def binding_pb(b: bindings.Binding) -> pb.Binding:
    return pb.Binding(
        id=b.id, device_id=b.device_id, tenant_id=b.tenant_id, patient_id=b.patient_id or 0,
        bed=_text(b.bed), episode=_text(b.episode), bound_us=b.bound_at_us,
        bound_by=b.bound_by, reason=b.reason, unbound_us=b.unbound_at_us or 0,
        unbound_by=_text(b.unbound_by), end_kind=_text(b.end_kind), end_reason=b.end_reason)


def approval_pb(a: approvals.Approval) -> pb.VendorApproval:
    return pb.VendorApproval(tenant_id=a.tenant_id, vendor_code=a.vendor_code,
                             approved_by=a.approved_by, approved_us=a.approved_at_us,
                             note=a.note)
