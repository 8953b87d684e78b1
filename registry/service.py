"""RegistryService: vendors, models, devices, lifecycle, bindings, vendor
approvals and device keys over gRPC (proto/registry.proto).

Authorisation, in two layers:

1. ``RULES``: every method names its object and action, authorised by the
   interceptor on the request's ``tenant_id`` (0: the caller's home tenant):

   | methods | right |
   |---|---|
   | CreateVendor | device_model manage |
   | CreateModel | device_model write |
   | GetModel, ListModels | device_model read |
   | RegisterDevice, ImportDevices, UpdateDevice, IssueKey, RevokeKeys | device write |
   | IssueTransportCredential, RevokeTransportCredentials | device write |
   | GetDevice, FindDevices, ListDevices, StateHistory, ListVendorApprovals | device read |
   | Transition, ApproveVendor, RevokeVendor | device manage |
   | Bind, Transfer, Unbind | patient write (and device read, checked here) |
   | BindingHistory | patient read (and device read, checked here) |

   Registering a device already active (``activate``) is a lifecycle step:
   it also needs device manage (checked here).

2. Rows, here: a caller sees the devices homed in the request tenant's
   subtree (``registry.devices.Scope``). A vendor — a ``vendor`` client
   certificate, subject ``cert:<vendor code>``, or a person whose only role is
   ``vendor`` — sees and touches only its own models and devices, never
   bindings or patients, and registers into a hospital only once that
   hospital approved it. Anything out of reach is NOT_FOUND, exactly like an
   id that does not exist.

The registry's functions are synchronous (the CSV importer and the command
line share them); they run on worker threads over a connection pool of this
service's own.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
import psycopg
from psycopg_pool import ConnectionPool

from rmiot.grpc_server import Context, Service
from rmiot.proto import registry_pb2 as pb
from rmiot.proto import registry_pb2_grpc
from rmiot.registry import (
    approvals,
    bindings,
    devices,
    lifecycle,
    messages,
    models,
    store,
    transport_credentials,
)
from rmiot.registry.devices import Device, Scope
from rmiot.registry.importer import import_specs, parse_rows
from rmiot.registry.store import RegistryError
from rmiot.security.authz import Authorizer
from rmiot.security.interceptor import Caller, MethodRule, current_caller
from rmiot.security.sm4 import Keyring

SERVICE = pb.DESCRIPTOR.services_by_name["RegistryService"].full_name


def _rule(obj: str, act: str, object_field: str | None = None) -> MethodRule:
    return MethodRule(obj, act, "tenant_id", object_field)


RULES = {f"/{SERVICE}/{method}": rule for method, rule in {
    "CreateVendor": _rule("device_model", "manage", "code"),
    "CreateModel": _rule("device_model", "write", "name"),
    "GetModel": _rule("device_model", "read", "model_id"),
    "ListModels": _rule("device_model", "read"),
    "RegisterDevice": _rule("device", "write"),
    "ImportDevices": _rule("device", "write"),
    "GetDevice": _rule("device", "read", "device_id"),
    "FindDevices": _rule("device", "read"),
    "ListDevices": _rule("device", "read"),
    "UpdateDevice": _rule("device", "write", "device_id"),
    "Transition": _rule("device", "manage", "device_id"),
    "StateHistory": _rule("device", "read", "device_id"),
    "Bind": _rule("patient", "write", "device_id"),
    "Transfer": _rule("patient", "write", "device_id"),
    "Unbind": _rule("patient", "write", "device_id"),
    "BindingHistory": _rule("patient", "read", "device_id"),
    "ApproveVendor": _rule("device", "manage", "vendor_code"),
    "RevokeVendor": _rule("device", "manage", "vendor_code"),
    "ListVendorApprovals": _rule("device", "read"),
    "IssueKey": _rule("device", "write", "device_id"),
    "RevokeKeys": _rule("device", "write", "device_id"),
    "IssueTransportCredential": _rule("device", "write", "device_id"),
    "RevokeTransportCredentials": _rule("device", "write", "device_id"),
}.items()}

MAX_PAGE = 1000
MAX_BATCH = 10_000
# A vendor certificate whose vendor is not registered yet owns nothing: no
# vendor has id 0, so every vendor-scoped query comes back empty.
NO_VENDOR = 0
_STATUS = {store.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
           store.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
           store.EXISTS: grpc.StatusCode.ALREADY_EXISTS,
           store.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION}
T = TypeVar("T")


class Refusal(Exception):
    """Refused here (not by the interceptor); becomes the call's status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Acting:
    """Who calls, where, and what they may see."""

    caller: Caller
    tenant: int
    vendor_code: str | None       # set for vendors

    @property
    def actor(self) -> str:
        return self.caller.subject


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    """The service over a connection pool of its own, opened by ``start()`` or
    else by the first call; ``stop()`` closes it (after the server stopped)."""

    def __init__(self, dsn: str, keyring: Keyring, authorizer: Authorizer,
                 pool_size: int = 8) -> None:
        self.keyring = keyring
        self.authorizer = authorizer
        self.pool = ConnectionPool(dsn, min_size=1, max_size=pool_size, open=False,
                                   name="rmiot-registry", kwargs={"autocommit": True})
        self._opening = threading.Lock()
        self._open = False

    async def start(self) -> None:
        await asyncio.to_thread(self._ensure_open)

    async def stop(self) -> None:
        if self._open:
            await asyncio.to_thread(self.pool.close)
            self._open = False

    def _ensure_open(self) -> None:
        with self._opening:
            if not self._open:
                self.pool.open(wait=True, timeout=10.0)
                self._open = True

    def service(self) -> Service:
        return Service(SERVICE, registry_pb2_grpc.add_RegistryServiceServicer_to_server, self)

    # -- plumbing ------------------------------------------------------------------

    def _acting(self, request: Any) -> Acting:
        caller = current_caller()
        tenant = int(request.tenant_id) or caller.tenant_id or 0  # as the interceptor does
        vendor = None
        if caller.kind == "vendor":
            vendor = caller.subject.partition(":")[2]
        elif caller.roles == ("vendor",):
            vendor = ""  # a person holding only the vendor role: no vendor of its own
        return Acting(caller, tenant, vendor)

    def _scope(self, conn: psycopg.Connection[Any], who: Acting) -> Scope:
        return Scope(who.tenant, _vendor_id(conn, who))

    async def _run(self, context: Context, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run ``work`` on a pooled connection in a worker thread; registry
        errors become the call's status."""
        def in_thread() -> T:
            self._ensure_open()
            with self.pool.connection() as conn:
                return work(conn)
        try:
            return await asyncio.to_thread(in_thread)
        except RegistryError as exc:
            await _abort(context, _STATUS.get(exc.code, grpc.StatusCode.INVALID_ARGUMENT),
                         str(exc))
        except Refusal as exc:
            await _abort(context, exc.code, str(exc))
        except psycopg.OperationalError:  # the database is away (or the pool exhausted)
            await _abort(context, grpc.StatusCode.UNAVAILABLE,
                         "the registry's database is unavailable: try again shortly")

    def _no_vendor(self, who: Acting, what: str) -> None:
        if who.vendor_code is not None:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, f"vendors do not see {what}")

    def _may_commission(self, who: Acting) -> None:
        """Registering a device active is a lifecycle step: device:manage."""
        if not self.authorizer.allowed(who.caller.subject, who.tenant, "device", "manage"):
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED,
                          f"{who.actor} may register devices but not activate them in tenant "
                          f"{who.tenant} (that needs device:manage): leave activate unset")

    def _device_right(self, who: Acting) -> None:
        """Bindings touch devices too: the caller needs device:read there."""
        if not self.authorizer.allowed(who.caller.subject, who.tenant, "device", "read"):
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED,
                          f"{who.actor} may not read device in tenant {who.tenant}")

    # -- vendors and models ----------------------------------------------------------

    async def CreateVendor(self, request: pb.CreateVendorRequest,
                           context: Context) -> pb.Vendor:
        who = self._acting(request)
        if who.vendor_code is not None and request.code != who.vendor_code:
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED,
                         "a vendor creates its own record only (code = its certificate's name)")
        vendor = await self._run(context, lambda conn: models.create_vendor(
            conn, request.code, request.name))
        return pb.Vendor(id=vendor.id, code=vendor.code, name=vendor.name)

    async def CreateModel(self, request: pb.CreateModelRequest,
                          context: Context) -> pb.DeviceModel:
        who = self._acting(request)

        def create(conn: psycopg.Connection[Any]) -> models.DeviceModel:
            if who.vendor_code is not None:
                if request.vendor_code not in ("", who.vendor_code):
                    raise Refusal(grpc.StatusCode.PERMISSION_DENIED,
                                  "a vendor creates models of its own only")
                vendor_id = _vendor_id(conn, who) or NO_VENDOR
                if vendor_id == NO_VENDOR:
                    raise RegistryError("register the vendor first (CreateVendor)",
                                        store.PRECONDITION)
            else:
                if not request.vendor_code:
                    raise RegistryError("vendor_code: required")
                vendor_id = models.vendor_by_code(conn, request.vendor_code).id
            return models.create_model(conn, vendor_id, request.name, request.kind,
                                       [messages.metric_dict(m) for m in request.metrics],
                                       request.description, who.actor)
        return messages.model_pb(await self._run(context, create))

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.DeviceModel:
        who = self._acting(request)
        return messages.model_pb(await self._run(context, lambda conn: models.get_model(
            conn, request.model_id, _vendor_id(conn, who))))

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: Context) -> pb.ListModelsReply:
        who = self._acting(request)
        size = _page(request.page_size)

        def page(conn: psycopg.Connection[Any]) -> list[models.DeviceModel]:
            vendor_id = _vendor_id(conn, who)
            if request.vendor_code:
                named = models.vendor_by_code(conn, request.vendor_code).id
                if vendor_id is not None and named != vendor_id:
                    return []
                vendor_id = named
            return models.list_models(conn, vendor_id=vendor_id, kind=request.kind,
                                      after_id=request.after_id, limit=size)
        found = await self._run(context, page)
        return pb.ListModelsReply(models=[messages.model_pb(m) for m in found],
                                  next_after_id=found[-1].id if len(found) == size else 0)

    # -- devices ---------------------------------------------------------------------

    async def RegisterDevice(self, request: pb.RegisterDeviceRequest,
                             context: Context) -> pb.Device:
        who = self._acting(request)

        def register(conn: psycopg.Connection[Any]) -> Device:
            if request.device.activate:
                self._may_commission(who)
            fields = messages.new_device_fields(request.device, who.tenant)
            [(_, spec, errors)] = list(parse_rows([fields]))
            if errors:
                raise devices.refusal(errors)
            return devices.register(conn, spec, who.actor, self._scope(conn, who))
        return messages.device_pb(await self._run(context, register))

    async def ImportDevices(self, request: pb.ImportDevicesRequest,
                            context: Context) -> pb.ImportDevicesReply:
        who = self._acting(request)
        if len(request.devices) > MAX_BATCH:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"at most {MAX_BATCH} devices a call")

        def batch(conn: psycopg.Connection[Any]) -> pb.ImportDevicesReply:
            if any(d.activate for d in request.devices):
                self._may_commission(who)
            parsed = list(parse_rows(messages.new_device_fields(d, who.tenant)
                                     for d in request.devices))
            result = import_specs(conn, parsed, who.actor, self._scope(conn, who),
                                  source=f"ImportDevices by {who.actor}", noun="device")
            return pb.ImportDevicesReply(
                imported=result.imported, device_ids=result.device_ids,
                errors=[pb.RowError(index=int(e.row), field=e.column, reason=e.reason)
                        for e in result.errors])
        return await self._run(context, batch)

    async def GetDevice(self, request: pb.GetDeviceRequest, context: Context) -> pb.Device:
        who = self._acting(request)
        return messages.device_pb(await self._run(context, lambda conn: devices.get(
            conn, request.device_id, self._scope(conn, who))))

    async def FindDevices(self, request: pb.FindDevicesRequest,
                          context: Context) -> pb.DeviceList:
        who = self._acting(request)
        found = await self._run(context, lambda conn: devices.find(
            conn, self._scope(conn, who), code=request.code, kind=request.code_kind,
            udi=request.udi, serial=request.serial_no))
        return pb.DeviceList(devices=[messages.device_pb(d) for d in found])

    async def ListDevices(self, request: pb.ListDevicesRequest,
                          context: Context) -> pb.DeviceList:
        who = self._acting(request)
        size = _page(request.page_size)

        def page(conn: psycopg.Connection[Any]) -> list[Device]:
            due = None
            if request.due_before:
                try:
                    due = dt.date.fromisoformat(request.due_before)
                except ValueError:
                    raise RegistryError("due_before: a date, YYYY-MM-DD") from None
            if request.state and request.state not in lifecycle.STATES:
                raise RegistryError(f"state must be one of {', '.join(lifecycle.STATES)}")
            return devices.list_devices(conn, self._scope(conn, who), state=request.state,
                                        model_id=request.model_id,
                                        gateway_id=request.gateway_id, due_before=due,
                                        after_id=request.after_id, limit=size)
        found = await self._run(context, page)
        return pb.DeviceList(devices=[messages.device_pb(d) for d in found],
                             next_after_id=found[-1].id if len(found) == size else 0)

    async def UpdateDevice(self, request: pb.UpdateDeviceRequest,
                           context: Context) -> pb.Device:
        who = self._acting(request)
        changes = messages.update_fields(request)
        return messages.device_pb(await self._run(context, lambda conn: devices.update(
            conn, request.device_id, changes, who.actor, self._scope(conn, who))))

    async def Transition(self, request: pb.TransitionRequest, context: Context) -> pb.Device:
        who = self._acting(request)

        def move(conn: psycopg.Connection[Any]) -> Device:
            scope = self._scope(conn, who)
            devices.get(conn, request.device_id, scope)
            lifecycle.transition(conn, request.device_id, request.to_state, who.actor,
                                 request.reason)
            return devices.get(conn, request.device_id, scope)
        return messages.device_pb(await self._run(context, move))

    async def StateHistory(self, request: pb.StateHistoryRequest,
                           context: Context) -> pb.StateHistoryReply:
        who = self._acting(request)

        def read(conn: psycopg.Connection[Any]) -> list[lifecycle.StateChange]:
            devices.get(conn, request.device_id, self._scope(conn, who))
            return lifecycle.history(conn, request.device_id)
        changes = await self._run(context, read)
        return pb.StateHistoryReply(changes=[pb.StateChange(
            from_state=c.from_state or "", to_state=c.to_state, actor=c.actor, reason=c.reason,
            at_us=c.at_us) for c in changes])

    # -- bindings --------------------------------------------------------------------

    async def Bind(self, request: pb.BindRequest, context: Context) -> pb.Binding:
        return await self._bind(request, context, bindings.bind)

    async def Transfer(self, request: pb.BindRequest, context: Context) -> pb.Binding:
        return await self._bind(request, context, bindings.transfer)

    async def _bind(self, request: pb.BindRequest, context: Context,
                    how: Callable[..., bindings.Binding]) -> pb.Binding:
        who = self._acting(request)
        target = bindings.Target(request.patient_id or None, request.bed or None,
                                 request.episode or None)

        def bind(conn: psycopg.Connection[Any]) -> bindings.Binding:
            self._no_vendor(who, "bindings")
            self._device_right(who)
            return how(conn, request.device_id, target, who.actor, request.reason,
                       Scope(who.tenant))
        return messages.binding_pb(await self._run(context, bind))

    async def Unbind(self, request: pb.UnbindRequest, context: Context) -> pb.Binding:
        who = self._acting(request)

        def unbind(conn: psycopg.Connection[Any]) -> bindings.Binding:
            self._no_vendor(who, "bindings")
            self._device_right(who)
            return bindings.unbind(conn, request.device_id, who.actor, request.reason,
                                   Scope(who.tenant))
        return messages.binding_pb(await self._run(context, unbind))

    async def BindingHistory(self, request: pb.BindingHistoryRequest,
                             context: Context) -> pb.BindingHistoryReply:
        who = self._acting(request)

        def read(conn: psycopg.Connection[Any]) -> list[bindings.Binding]:
            self._no_vendor(who, "bindings")
            self._device_right(who)
            return bindings.history(conn, Scope(who.tenant), device_id=request.device_id,
                                    patient_id=request.patient_id)
        found = await self._run(context, read)
        return pb.BindingHistoryReply(bindings=[messages.binding_pb(b) for b in found])

    # -- vendor approvals ------------------------------------------------------------------

    async def ApproveVendor(self, request: pb.ApproveVendorRequest,
                            context: Context) -> pb.VendorApproval:
        who = self._acting(request)
        approval = await self._run(context, lambda conn: approvals.approve(
            conn, who.tenant, models.vendor_by_code(conn, request.vendor_code).id, who.actor,
            request.note))
        return messages.approval_pb(approval)

    async def RevokeVendor(self, request: pb.RevokeVendorRequest,
                           context: Context) -> pb.RevokeVendorReply:
        who = self._acting(request)
        revoked = await self._run(context, lambda conn: approvals.revoke(
            conn, who.tenant, models.vendor_by_code(conn, request.vendor_code).id, who.actor))
        return pb.RevokeVendorReply(revoked=revoked)

    async def ListVendorApprovals(self, request: pb.ListVendorApprovalsRequest,
                                  context: Context) -> pb.ListVendorApprovalsReply:
        who = self._acting(request)

        def read(conn: psycopg.Connection[Any]) -> list[approvals.Approval]:
            hospital, _ = approvals.hospital_of(conn, who.tenant)
            vendor_id = _vendor_id(conn, who)  # a vendor sees its own approval only
            return approvals.approvals(conn, hospital, vendor_id)
        found = await self._run(context, read)
        return pb.ListVendorApprovalsReply(approvals=[messages.approval_pb(a) for a in found])

    # -- credentials ---------------------------------------------------------------------

    async def IssueKey(self, request: pb.IssueKeyRequest, context: Context) -> pb.IssueKeyReply:
        who = self._acting(request)
        algorithm = request.algorithm or "hmac-sha256"

        def issue(conn: psycopg.Connection[Any]) -> tuple[int, bytes]:
            device = devices.get(conn, request.device_id, self._scope(conn, who))
            _may_hold_credentials(device)
            with conn.transaction():
                version, key = store.add_key(conn, self.keyring, device.id, algorithm)
                # The older keys end after the overlap (now, by default).
                conn.execute("UPDATE device_keys SET not_after = now() + make_interval("
                             "secs => %s) WHERE device_id = %s AND version < %s AND "
                             "revoked_at IS NULL AND (not_after IS NULL OR not_after > "
                             "now() + make_interval(secs => %s))",
                             (request.overlap_s, device.id, version, request.overlap_s))
            return version, key
        version, key = await self._run(context, issue)
        return pb.IssueKeyReply(device_id=request.device_id, version=version,
                                algorithm=algorithm, key=key)

    async def RevokeKeys(self, request: pb.RevokeKeysRequest,
                         context: Context) -> pb.RevokeKeysReply:
        who = self._acting(request)

        def revoke(conn: psycopg.Connection[Any]) -> int:
            devices.get(conn, request.device_id, self._scope(conn, who))
            return store.revoke_keys(conn, request.device_id)
        return pb.RevokeKeysReply(revoked=await self._run(context, revoke))

    async def IssueTransportCredential(self, request: pb.IssueTransportCredentialRequest,
                                       context: Context) -> pb.IssueTransportCredentialReply:
        who = self._acting(request)

        def issue(conn: psycopg.Connection[Any]) -> tuple[str, str]:
            device = devices.get(conn, request.device_id, self._scope(conn, who))
            _may_hold_credentials(device)
            return transport_credentials.issue(conn, device.id, request.username or None)
        username, password = await self._run(context, issue)
        return pb.IssueTransportCredentialReply(device_id=request.device_id, username=username,
                                                password=password)

    async def RevokeTransportCredentials(self, request: pb.RevokeTransportCredentialsRequest,
                                         context: Context
                                         ) -> pb.RevokeTransportCredentialsReply:
        who = self._acting(request)

        def revoke(conn: psycopg.Connection[Any]) -> int:
            devices.get(conn, request.device_id, self._scope(conn, who))
            revoked = transport_credentials.revoke(conn, device_id=request.device_id,
                                                   username=request.username or None)
            if request.username and not revoked:  # not this device's, or revoked before
                raise RegistryError(f"no live login {request.username!r} of device "
                                    f"{request.device_id}", store.NOT_FOUND)
            return revoked
        return pb.RevokeTransportCredentialsReply(revoked=await self._run(context, revoke))


# -- helpers ---------------------------------------------------------------------------

async def _abort(context: Context, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("abort returned")  # it raises; this tells the type checker


def _may_hold_credentials(device: Device) -> None:
    """Retired and scrapped devices get no keys and no logins."""
    if device.state in ("retired", "scrapped"):
        raise RegistryError(f"device {device.id} is {device.state}: it gets no credentials",
                            store.PRECONDITION)


def _vendor_id(conn: psycopg.Connection[Any], who: Acting) -> int | None:
    """The calling vendor's id; None for callers who are not vendors."""
    if who.vendor_code is None:
        return None
    if not who.vendor_code:
        return NO_VENDOR
    row = conn.execute("SELECT id FROM vendors WHERE code = %s", (who.vendor_code,)).fetchone()
    return int(row[0]) if row else NO_VENDOR


def _page(size: int) -> int:
    return max(1, min(size or 100, MAX_PAGE))
