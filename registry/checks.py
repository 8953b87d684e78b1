"""The checks a device needs the database for, made for a whole batch at once
(one query per kind of reference, whatever the batch's size), so one device
through the API and 100,000 from a CSV file pass exactly the same checks.

For each device: the tenant (and department) exist and hold devices, and lie
in the caller's reach; the model exists (for a vendor: is its own); the
hospital approved the model's vendor; the UDI, the serial number (per model)
and each code are not taken in the hospital — neither in the database nor by
an earlier device of the batch; the gateway is a gateway device of the same
hospital, in service. References another caller may not see are answered
exactly like references that do not exist.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from rmiot.registry.approvals import approved_pairs
from rmiot.registry.fields import DeviceSpec, FieldError
from rmiot.registry.store import EXISTS, NOT_FOUND, PRECONDITION

OUT_OF_SERVICE = ("retired", "scrapped")


@dataclass(frozen=True)
class TenantRef:
    id: int
    code: str
    level: str
    path: tuple[int, ...]
    hospital: int | None


@dataclass(frozen=True)
class ModelRef:
    id: int
    vendor_id: int
    vendor_code: str
    kind: str


@dataclass(frozen=True)
class Checked:
    """A device that passed: references resolved, ready to insert."""

    spec: DeviceSpec
    hospital: int
    department: int | None
    model: ModelRef


class Checker:
    """``vendor_id``: the caller is that vendor (sees only its own models and
    devices). ``within``: the tenant the caller is authorised on; devices must
    land in its subtree."""

    def __init__(self, conn: psycopg.Connection[Any], vendor_id: int | None = None,
                 within: int | None = None) -> None:
        self.conn = conn
        self.vendor_id = vendor_id
        self.within = within
        self.tenants: dict[str, TenantRef] = {}
        self.models: dict[str, ModelRef] = {}
        self.gateways: dict[int, tuple[int, str, str | None, int | None]] = {}
        self.approved: set[tuple[int, int]] = set()
        self.taken: dict[tuple[Any, ...], int] = {}   # (what, hospital, value...) -> device id

    # -- a batch ---------------------------------------------------------------

    def check(self, specs: Sequence[DeviceSpec],
              labels: Sequence[str] | None = None) -> list[tuple[Checked | None, list[FieldError]]]:
        """Each device's outcome, in order. ``labels`` name the devices in
        messages about duplicates inside the batch (default: #1, #2, ...)."""
        self.load_tenants([s.tenant for s in specs] + [s.department for s in specs])
        self.load_models(s.model for s in specs)
        self.load_gateways(s.gateway_id for s in specs if s.gateway_id)
        places = [self._place(s) for s in specs]
        hospitals = sorted({p[0] for p, _ in places if p})
        self.approved = approved_pairs(self.conn, hospitals)
        self._load_taken(specs, places)
        seen: dict[tuple[Any, ...], str] = {}
        out: list[tuple[Checked | None, list[FieldError]]] = []
        for n, (spec, (place, errors)) in enumerate(zip(specs, places, strict=True)):
            label = labels[n] if labels else f"#{n + 1}"
            model, model_error = self.model(spec.model)
            if model_error:
                errors.append(model_error)
            if place and model:
                hospital = place[0]
                errors += self._approval(hospital, model)
                errors += self._unique(spec, hospital, model.id, seen, label)
                if spec.gateway_id:
                    errors += self.gateway_errors(spec.gateway_id, hospital)
            checked = None
            if place is not None and model is not None and not errors:
                checked = Checked(spec, place[0], place[1], model)
            out.append((checked, errors))
        return out

    # -- references ------------------------------------------------------------

    def load_tenants(self, refs: Iterable[str]) -> None:
        wanted = {r for r in refs if r and r not in self.tenants}
        if not wanted:
            return
        ids = [int(r) for r in wanted if r.isdigit() and int(r) < 2**31]
        rows = self.conn.execute(
            "SELECT t.id, t.code, t.level, t.path, (SELECT h.id FROM tenants h "
            "WHERE h.id = ANY(t.path) AND h.level = 'hospital') FROM tenants t "
            "WHERE t.id = ANY(%s) OR t.code = ANY(%s)", (ids, list(wanted))).fetchall()
        by_id = {int(r[0]): r for r in rows}
        by_code = {r[1]: r for r in rows}
        for ref in wanted:
            row = by_id.get(int(ref)) if ref.isdigit() and int(ref) in by_id else by_code.get(ref)
            if row is not None:
                self.tenants[ref] = TenantRef(int(row[0]), row[1], row[2], tuple(row[3]),
                                              int(row[4]) if row[4] is not None else None)

    def load_models(self, refs: Iterable[str]) -> None:
        wanted = {r for r in refs if r and r not in self.models}
        if not wanted:
            return
        ids = [int(r) for r in wanted if r.isdigit() and int(r) < 2**63]
        named = [r.split("/", 1) for r in wanted if "/" in r]
        rows = self.conn.execute(
            "SELECT m.id, m.vendor_id, v.code, m.kind, m.name FROM device_models m "
            "JOIN vendors v ON v.id = m.vendor_id WHERE m.id = ANY(%s) OR (v.code, m.name) IN "
            "(SELECT * FROM unnest(%s::text[], %s::text[]))",
            (ids, [v for v, _ in named], [m for _, m in named])).fetchall()
        for model_id, vendor_id, vendor_code, kind, name in rows:
            ref = ModelRef(int(model_id), int(vendor_id), vendor_code, kind)
            for key in (str(model_id), f"{vendor_code}/{name}"):
                if key in wanted:
                    self.models[key] = ref

    def load_gateways(self, ids: Iterable[int]) -> None:
        wanted = [i for i in set(ids) if i not in self.gateways]
        if wanted:
            rows = self.conn.execute(
                "SELECT d.id, d.tenant_id, d.state, m.kind, m.vendor_id FROM devices d "
                "LEFT JOIN device_models m ON m.id = d.model_id WHERE d.id = ANY(%s)",
                (wanted,)).fetchall()
            for dev, tenant, state, kind, vendor in rows:
                self.gateways[int(dev)] = (int(tenant), state, kind, vendor)

    def tenant(self, ref: str, column: str = "tenant") -> tuple[TenantRef | None,
                                                                FieldError | None]:
        found = self.tenants.get(ref)
        if found is None:
            return None, FieldError(column, f"no tenant {ref}", NOT_FOUND)
        if self.within is not None and self.within not in found.path:
            return None, FieldError(column, f"no tenant {ref}", NOT_FOUND)
        return found, None

    def model(self, ref: str) -> tuple[ModelRef | None, FieldError | None]:
        found = self.models.get(ref)
        if found is None or (self.vendor_id is not None and found.vendor_id != self.vendor_id):
            return None, FieldError("model", f"no device model {ref}", NOT_FOUND)
        return found, None

    def department(self, ref: str, tenant: TenantRef) -> tuple[int | None, FieldError | None]:
        """The department ``ref`` under ``tenant`` (None: ``ref`` empty and
        ``tenant`` a hospital)."""
        if not ref:
            return (tenant.id if tenant.level == "department" else None), None
        found, error = self.tenant(ref, "department")
        if error or found is None:
            return None, error
        if found.level != "department" or tenant.id not in found.path:
            return None, FieldError("department", f"{ref} is not a department of "
                                                  f"{tenant.code}")
        return found.id, None

    def gateway_errors(self, gateway_id: int, hospital: int,
                       device_id: int | None = None) -> list[FieldError]:
        found = self.gateways.get(gateway_id)
        if found is None or (self.vendor_id is not None and found[3] != self.vendor_id) \
                or found[0] != hospital:
            return [FieldError("gateway", f"no device {gateway_id} in this hospital", NOT_FOUND)]
        if gateway_id == device_id:
            return [FieldError("gateway", "a device cannot be its own gateway")]
        if found[2] != "gateway":
            return [FieldError("gateway", f"device {gateway_id} is not a gateway "
                                          f"(its model is a {found[2] or 'unknown kind'})")]
        if found[1] in OUT_OF_SERVICE:
            return [FieldError("gateway", f"gateway {gateway_id} is {found[1]}", PRECONDITION)]
        return []

    # -- the per-device checks -----------------------------------------------------

    def _place(self, spec: DeviceSpec) -> tuple[tuple[int, int | None] | None,
                                                list[FieldError]]:
        tenant, error = self.tenant(spec.tenant)
        if error or tenant is None:
            return None, [error] if error else []
        if tenant.hospital is None:
            return None, [FieldError("tenant", f"{spec.tenant} is a {tenant.level}: devices "
                                               "belong to a hospital or one of its departments")]
        department, error = self.department(spec.department, tenant)
        if error:
            return None, [error]
        return (tenant.hospital, department), []

    def _approval(self, hospital: int, model: ModelRef) -> list[FieldError]:
        if (hospital, model.vendor_id) in self.approved:
            return []
        return [FieldError("model", f"hospital {hospital} has not approved vendor "
                                    f"{model.vendor_code}: its administrator approves the "
                                    "vendor first", PRECONDITION)]

    def _unique(self, spec: DeviceSpec, hospital: int, model_id: int,
                seen: dict[tuple[Any, ...], str], label: str) -> list[FieldError]:
        keys: list[tuple[str, tuple[Any, ...], str]] = []
        if spec.udi:
            keys.append(("udi", ("udi", hospital, spec.udi), f"UDI {spec.udi}"))
        if spec.serial_no:
            keys.append(("serial", ("serial", hospital, spec.serial_no, model_id),
                         f"serial number {spec.serial_no} of this model"))
        for kind, code in spec.codes.items():
            keys.append((kind, (kind, hospital, code), f"{kind} code {code}"))
        errors = []
        for column, key, what in keys:
            if key in self.taken:
                errors.append(FieldError(column, f"{what} is already registered in hospital "
                                                 f"{hospital} (device {self.taken[key]})",
                                         EXISTS))
            elif key in seen:
                errors.append(FieldError(column, f"{what} is also given for {seen[key]}",
                                         EXISTS))
            else:
                seen[key] = label
        return errors

    def _load_taken(self, specs: Sequence[DeviceSpec],
                    places: list[tuple[tuple[int, int | None] | None, list[FieldError]]]) -> None:
        udis: list[tuple[int, str]] = []
        serials: list[tuple[int, str, int]] = []
        codes: list[tuple[int, str, str]] = []
        for spec, (place, _) in zip(specs, places, strict=True):
            model = self.models.get(spec.model)
            if place is None:
                continue
            if spec.udi:
                udis.append((place[0], spec.udi))
            if spec.serial_no and model:
                serials.append((place[0], spec.serial_no, model.id))
            codes += [(place[0], code, kind) for kind, code in spec.codes.items()]
        # %b: binary parameters; a 100,000-element array is dumped twice as fast.
        if udis:
            for tenant, udi, dev in self.conn.execute(
                    "SELECT tenant_id, udi, id FROM devices WHERE (tenant_id, udi) IN "
                    "(SELECT * FROM unnest(%b::int[], %b::text[]))",
                    ([u[0] for u in udis], [u[1] for u in udis])).fetchall():
                self.taken[("udi", tenant, udi)] = dev
        if serials:
            for tenant, serial, model, dev in self.conn.execute(
                    "SELECT tenant_id, serial_no, model_id, id FROM devices "
                    "WHERE (tenant_id, serial_no, model_id) IN "
                    "(SELECT * FROM unnest(%b::int[], %b::text[], %b::bigint[]))",
                    ([s[0] for s in serials], [s[1] for s in serials],
                     [s[2] for s in serials])).fetchall():
                self.taken[("serial", tenant, serial, model)] = dev
        if codes:
            self.note_taken_codes(codes)

    def note_taken_codes(self, codes: list[tuple[int, str, str]]) -> None:
        """Record which of these (hospital, code, kind) are held, and by whom."""
        for tenant, code, kind, dev in self.conn.execute(
                "SELECT tenant_id, code, kind, device_id FROM device_codes "
                "WHERE (tenant_id, code, kind) IN "
                "(SELECT * FROM unnest(%b::int[], %b::text[], %b::text[]))",
                ([c[0] for c in codes], [c[1] for c in codes],
                 [c[2] for c in codes])).fetchall():
            self.taken[(kind, tenant, code)] = dev
