"""OpsService (proto/ops.proto): hospital operations over gRPC — the asset
ledger and KPIs, work orders, location and dispatch, compliance, energy and
monthly reports.

Authorised by ``RULES`` on the request's ``tenant_id`` (0: the caller's home
tenant), audited by the interceptor; rows are those of that tenant's subtree
and anything outside it is NOT_FOUND. Vendors are refused: operations are
the hospital's business. The registry's functions are synchronous and run on
worker threads over this service's own pool; energy comes from an
``EnergySource`` the platform hands in (the query package reads it).

``OpsServices`` is what a platform process runs for operations: the servicer,
the device status tracker and the daily compliance pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
import psycopg
from psycopg_pool import ConnectionPool

from rmiot.grpc_server import Context, Service
from rmiot.proto import ops_pb2 as pb
from rmiot.proto import ops_pb2_grpc
from rmiot.registry import compliance, dispatch, kpis, ledger, ops_report, work_orders
from rmiot.registry.devices import Scope
from rmiot.registry.ops_report import EnergyLine
from rmiot.registry.ops_tracker import StatusTracker
from rmiot.registry.store import NOT_FOUND, PRECONDITION, RegistryError
from rmiot.security.interceptor import MethodRule, current_caller

log = logging.getLogger("rmiot.registry.ops")
SERVICE = pb.DESCRIPTOR.services_by_name["OpsService"].full_name


def _rule(obj: str, act: str, object_field: str | None = None) -> MethodRule:
    return MethodRule(obj, act, "tenant_id", object_field)


RULES = {f"/{SERVICE}/{method}": rule for method, rule in {
    "RecordAssetEvent": _rule("device", "write", "device_id"),
    "GetLedger": _rule("device", "read", "device_id"),
    "Kpis": _rule("aggregate", "read", "group"),
    "ReportFault": _rule("device", "read", "device_id"),
    "UpdateWorkOrder": _rule("device", "write", "work_order_id"),
    "ListWorkOrders": _rule("device", "read", "device_id"),
    "Locate": _rule("device", "read", "device_id"),
    "Available": _rule("device", "read", "kind"),
    "Reserve": _rule("device", "write", "device_id"),
    "Release": _rule("device", "write", "reservation_id"),
    "ComplianceTasks": _rule("device", "read"),
    "ComplianceView": _rule("device", "read"),
    "SetCompliancePolicy": _rule("device", "manage"),
    "Energy": _rule("aggregate", "read", "metric"),
    "HeatingCooling": _rule("aggregate", "read"),
    "MonthlyReport": _rule("aggregate", "read", "month"),
}.items()}

_STATUS = {"invalid": grpc.StatusCode.INVALID_ARGUMENT, NOT_FOUND: grpc.StatusCode.NOT_FOUND,
           "exists": grpc.StatusCode.ALREADY_EXISTS,
           PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION}
T = TypeVar("T")


class EnergySource(Protocol):
    async def energy(self, scope: int, first: dt.date, end: dt.date,
                     metric: int) -> Sequence[EnergyLine]: ...
    async def heating_cooling(self, scope: int, lo: dt.datetime,
                              hi: dt.datetime) -> Sequence[Any]: ...


async def _abort(context: Context, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")


def _date(text: str, name: str, default: dt.date | None = None) -> dt.date:
    if not text:
        if default is None:
            raise RegistryError(f"{name}: required (YYYY-MM-DD)")
        return default
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise RegistryError(f"{name}: YYYY-MM-DD") from None


def _money(text: str, name: str) -> Decimal | None:
    if not text:
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        raise RegistryError(f"{name}: a decimal amount") from None


def _us(at: dt.datetime | None) -> int:
    return int(at.timestamp() * 1_000_000) if at is not None else 0


def _iso(day: dt.date | None) -> str:
    return day.isoformat() if day is not None else ""


def _or(value: float | None, missing: float = -1.0) -> float:
    return missing if value is None else value


def event_pb(e: ledger.AssetEvent) -> pb.AssetEvent:
    return pb.AssetEvent(id=e.id, device_id=e.device_id, kind=e.kind, at_us=_us(e.at),
                         cost="" if e.cost is None else str(e.cost),
                         document_ref=e.document_ref, detail=e.detail,
                         work_order_id=e.work_order_id or 0, actor=e.actor)


def order_pb(w: work_orders.WorkOrder) -> pb.WorkOrder:
    return pb.WorkOrder(
        id=w.id, device_id=w.device_id, tenant_id=w.tenant_id, state=w.state, fault=w.fault,
        reported_by=w.reported_by, reported_us=_us(w.reported_at), assignee=w.assignee,
        closed_us=_us(w.closed_at), resolution=w.resolution,
        cost="" if w.cost is None else str(w.cost), alarm_ids=w.alarm_ids,
        events=[pb.WorkOrderEvent(at_us=_us(e.at), actor=e.actor, kind=e.kind, state=e.state,
                                  note=e.note) for e in w.events])


def position_pb(p: dispatch.Position) -> pb.Position:
    return pb.Position(
        device_id=p.device_id, hospital_id=p.hospital_id, home_id=p.home_id, kind=p.kind,
        use_state=-1 if p.use_state is None else p.use_state, battery=_or(p.battery),
        zone_id=p.zone_id or 0, floor=p.floor or 0, x=p.x or 0.0, y=p.y or 0.0,
        last_seen_us=_us(p.last_seen), rank=p.rank, reserved=p.reserved)


def reservation_pb(r: dispatch.Reservation) -> pb.Reservation:
    return pb.Reservation(id=r.id, device_id=r.device_id, tenant_id=r.tenant_id,
                          request=r.request, to_zone=r.to_zone or 0, reserved_by=r.reserved_by,
                          reserved_us=_us(r.reserved_at), released_us=_us(r.released_at),
                          released_by=r.released_by)


def kpi_pb(k: kpis.Kpi) -> pb.Kpi:
    return pb.Kpi(key=str(k.key), name=k.name, devices=k.devices, uptime=_or(k.uptime),
                  utilisation=_or(k.utilisation), mtbf_h=_or(k.mtbf_h), mttr_h=_or(k.mttr_h),
                  maintenance_cost=f"{k.maintenance_cost:.2f}",
                  depreciation=f"{k.depreciation:.2f}",
                  cost_per_use="" if k.cost_per_use is None else str(k.cost_per_use),
                  uses=k.uses, usage_hours=k.usage_hours, failures=k.failures)


class OpsServicer(ops_pb2_grpc.OpsServiceServicer):
    def __init__(self, dsn: str, energy: EnergySource | None = None, pool_size: int = 4) -> None:
        self.energy_source = energy
        self.pool = ConnectionPool(dsn, min_size=1, max_size=pool_size, open=False,
                                   name="rmiot-ops", kwargs={"autocommit": True})
        self._open = False

    async def start(self) -> None:
        if not self._open:
            await asyncio.to_thread(self.pool.open, True, 10.0)
            self._open = True

    async def stop(self) -> None:
        if self._open:
            await asyncio.to_thread(self.pool.close)
            self._open = False

    def service(self) -> Service:
        return Service(SERVICE, ops_pb2_grpc.add_OpsServiceServicer_to_server, self)

    def _scope(self, request: Any) -> tuple[Scope, str]:
        caller = current_caller()
        if caller.kind == "vendor" or caller.roles == ("vendor",):
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED,
                           "operations are the hospital's: vendors have no access")
        tenant = int(request.tenant_id) or caller.tenant_id or 0
        return Scope(tenant), caller.subject

    async def _run(self, context: Context, request: Any,
                   work: Callable[[psycopg.Connection[Any], Scope, str], T]) -> T:
        try:
            scope, actor = self._scope(request)
            await self.start()

            def in_thread() -> T:
                with self.pool.connection() as conn:
                    return work(conn, scope, actor)
            return await asyncio.to_thread(in_thread)
        except RegistryError as exc:
            await _abort(context, _STATUS.get(exc.code, grpc.StatusCode.INVALID_ARGUMENT),
                         str(exc))
        except _Refused as exc:
            await _abort(context, exc.code, str(exc))
        except psycopg.OperationalError:
            await _abort(context, grpc.StatusCode.UNAVAILABLE,
                         "the operations database is unavailable: try again shortly")

    # -- ledger and KPIs ---------------------------------------------------------------

    async def RecordAssetEvent(self, request: pb.AssetEventRequest,
                               context: Context) -> pb.AssetEvent:
        def work(conn: psycopg.Connection[Any], scope: Scope, actor: str) -> ledger.AssetEvent:
            at = (dt.datetime.fromtimestamp(request.at_us / 1e6, dt.UTC) if request.at_us
                  else dt.datetime.now(dt.UTC))
            return ledger.record(
                conn, scope, request.device_id, request.kind, at, actor,
                cost=_money(request.cost, "cost"), document_ref=request.document_ref,
                detail=request.detail,
                next_due=_date(request.next_due, "next_due") if request.next_due else None)
        return event_pb(await self._run(context, request, work))

    async def GetLedger(self, request: pb.LedgerRequest, context: Context) -> pb.Ledger:
        def work(conn: psycopg.Connection[Any], scope: Scope, actor: str) -> ledger.Ledger:
            return ledger.ledger(conn, scope, request.device_id,
                                 _date(request.on, "on", dt.date.today()))
        book = await self._run(context, request, work)
        a = book.device.asset
        return pb.Ledger(
            device_id=book.device.id, state=book.device.state, purchase_date=_iso(a.purchase_date),
            purchase_cost="" if a.purchase_cost is None else str(a.purchase_cost),
            depreciation_method=a.depreciation_method or "",
            useful_life_years=a.useful_life_years or 0,
            book_value="" if book.book_value is None else str(book.book_value),
            on=book.on.isoformat(), calibration_due=_iso(a.calibration_due),
            metrology_due=_iso(book.metrology_due), inspection_due=_iso(a.inspection_due),
            maintenance_cost=f"{book.maintenance_cost:.2f}",
            events=[event_pb(e) for e in book.events])

    async def Kpis(self, request: pb.KpiRequest, context: Context) -> pb.KpiReply:
        def work(conn: psycopg.Connection[Any], scope: Scope, actor: str) -> list[kpis.Kpi]:
            lo = dt.datetime.combine(_date(request.from_date, "from_date"), dt.time(), dt.UTC)
            hi = dt.datetime.combine(_date(request.to_date, "to_date"), dt.time(), dt.UTC)
            return kpis.kpis(conn, scope.tenant_id, lo, hi, request.group or "kind",
                             request.kind)
        return pb.KpiReply(kpis=[kpi_pb(k) for k in await self._run(context, request, work)])

    # -- work orders ---------------------------------------------------------------------

    async def ReportFault(self, request: pb.ReportFaultRequest,
                          context: Context) -> pb.WorkOrder:
        return order_pb(await self._run(context, request, lambda conn, scope, actor:
                                        work_orders.report(conn, scope, actor, request.fault,
                                                           device_id=request.device_id,
                                                           code=request.code)))

    async def UpdateWorkOrder(self, request: pb.WorkOrderStep,
                              context: Context) -> pb.WorkOrder:
        return order_pb(await self._run(context, request, lambda conn, scope, actor:
                                        work_orders.step(
                                            conn, scope, request.work_order_id, request.action,
                                            actor, note=request.note, assignee=request.assignee,
                                            cost=_money(request.cost, "cost"),
                                            document_ref=request.document_ref)))

    async def ListWorkOrders(self, request: pb.ListWorkOrdersRequest,
                             context: Context) -> pb.ListWorkOrdersReply:
        found = await self._run(context, request, lambda conn, scope, actor:
                                work_orders.list_orders(conn, scope, device_id=request.device_id,
                                                        open_only=request.open_only,
                                                        limit=request.limit or 100))
        return pb.ListWorkOrdersReply(work_orders=[order_pb(w) for w in found])

    # -- location and dispatch -----------------------------------------------------------

    async def Locate(self, request: pb.LocateRequest, context: Context) -> pb.Positions:
        found = await self._run(context, request, lambda conn, scope, actor: dispatch.locate(
            conn, scope, device_id=request.device_id, kind=request.kind,
            zone_id=request.zone_id, limit=request.limit or 200))
        return pb.Positions(positions=[position_pb(p) for p in found])

    @staticmethod
    def _need(request: Any) -> dispatch.Need:
        return dispatch.Need(
            kind=getattr(request, "kind", ""), zone_id=getattr(request, "zone_id", 0),
            floor=getattr(request, "floor", 0) or None, x=getattr(request, "x", 0.0) or None,
            y=getattr(request, "y", 0.0) or None, min_battery=request.min_battery or 50.0,
            fresh_s=getattr(request, "fresh_s", 0) or dispatch.DEFAULT_FRESH_S,
            limit=getattr(request, "limit", 0) or 50)

    async def Available(self, request: pb.AvailableRequest, context: Context) -> pb.Positions:
        found = await self._run(context, request, lambda conn, scope, actor:
                                dispatch.available(conn, scope, self._need(request)))
        return pb.Positions(positions=[position_pb(p) for p in found])

    async def Reserve(self, request: pb.ReserveRequest, context: Context) -> pb.Reservation:
        return reservation_pb(await self._run(context, request, lambda conn, scope, actor:
                                              dispatch.reserve(
                                                  conn, scope, request.device_id,
                                                  scope.tenant_id or 0, request.request, actor,
                                                  request.to_zone, self._need(request))))

    async def Release(self, request: pb.ReleaseRequest, context: Context) -> pb.Reservation:
        return reservation_pb(await self._run(context, request, lambda conn, scope, actor:
                                              dispatch.release(conn, scope,
                                                               request.reservation_id, actor,
                                                               request.note, request.to_zone)))

    # -- compliance ----------------------------------------------------------------------

    async def ComplianceTasks(self, request: pb.ComplianceRequest,
                              context: Context) -> pb.ComplianceTasksReply:
        found = await self._run(context, request, lambda conn, scope, actor: compliance.tasks(
            conn, scope.tenant_id, open_only=not request.include_done))
        return pb.ComplianceTasksReply(tasks=[pb.ComplianceTask(
            id=t.id, device_id=t.device_id, tenant_id=t.tenant_id, kind=t.kind,
            due_on=t.due_on.isoformat(), owner=t.owner, state=t.state, reminders=t.reminders,
            escalation_level=t.escalation_level) for t in found])

    async def ComplianceView(self, request: pb.ComplianceRequest,
                             context: Context) -> pb.ComplianceViewReply:
        found = await self._run(context, request, lambda conn, scope, actor:
                                compliance.by_department(
                                    conn, scope.tenant_id,
                                    _date(request.today, "today", dt.date.today())))
        return pb.ComplianceViewReply(departments=[pb.DepartmentCompliance(
            home_id=v.home_id, name=v.name, tracked=v.tracked, overdue=v.overdue,
            due_soon=v.due_soon, open_tasks=v.open_tasks, escalated=v.escalated,
            compliant_pct=_or(v.compliant_pct)) for v in found])

    async def SetCompliancePolicy(self, request: pb.CompliancePolicy,
                                  context: Context) -> pb.CompliancePolicy:
        def work(conn: psycopg.Connection[Any], scope: Scope, actor: str) -> compliance.Policy:
            assert scope.tenant_id is not None
            compliance.set_policy(conn, scope.tenant_id, compliance.Policy(
                tuple(request.lead_days) or compliance.DEFAULT.lead_days,
                tuple(request.escalate_days) or compliance.DEFAULT.escalate_days,
                request.owner), actor)
            return compliance.policy_for(conn, scope.tenant_id)
        got = await self._run(context, request, work)
        return pb.CompliancePolicy(tenant_id=request.tenant_id, lead_days=got.lead_days,
                                   escalate_days=got.escalate_days, owner=got.owner)

    # -- energy and reports --------------------------------------------------------------

    async def _energy(self, context: Context, scope: int, first: dt.date, end: dt.date,
                      metric: int) -> Sequence[EnergyLine]:
        if self.energy_source is None:
            await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "no energy source here")
        try:
            return await self.energy_source.energy(scope, first, end, metric)
        except (ValueError, RegistryError) as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def Energy(self, request: pb.ZoneEnergyRequest, context: Context) -> pb.ZoneEnergyReply:
        scope, first, end = await self._period(context, request)
        rows = await self._energy(context, scope, first, end, request.metric or 201)
        nan = float("nan")
        return pb.ZoneEnergyReply(zones=[pb.EnergyLine(
            zone_id=r.zone_id, zone=r.zone, used=r.energy, previous_month=_or(r.previous_month),
            last_year=_or(r.last_year),
            mom_pct=(r.energy - r.previous_month) / r.previous_month * 100
            if r.previous_month else nan,
            yoy_pct=(r.energy - r.last_year) / r.last_year * 100 if r.last_year else nan)
            for r in rows])

    async def _period(self, context: Context, request: Any) -> tuple[int, dt.date, dt.date]:
        try:
            scope, _ = self._scope(request)
            first = _date(request.from_date, "from_date")
            end = _date(request.to_date, "to_date")
        except RegistryError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except _Refused as exc:
            await _abort(context, exc.code, str(exc))
        if end <= first:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "to_date after from_date")
        return scope.tenant_id or 0, first, end

    async def HeatingCooling(self, request: pb.ZoneEnergyRequest,
                             context: Context) -> pb.HeatingCoolingReply:
        scope, first, end = await self._period(context, request)
        if self.energy_source is None:
            await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "no energy source here")
        rows = await self.energy_source.heating_cooling(
            scope, dt.datetime.combine(first, dt.time(), dt.UTC),
            dt.datetime.combine(end, dt.time(), dt.UTC))
        return pb.HeatingCoolingReply(zones=[pb.HeatCool(
            zone_id=r.zone_id, zone=r.zone, hours=r.hours, heating_hours=r.heating_hours,
            cooling_hours=r.cooling_hours, both_hours=r.both_hours) for r in rows])

    async def MonthlyReport(self, request: pb.ReportRequest, context: Context) -> pb.Report:
        if request.format not in ("", "csv", "html"):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "format: csv or html")
        try:
            first, end = ops_report.month_bounds(request.month)
            scope, _ = self._scope(request)
        except RegistryError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except _Refused as exc:
            await _abort(context, exc.code, str(exc))
        energy = (await self._energy(context, scope.tenant_id or 0, first, end, 201)
                  if self.energy_source is not None else [])
        built = await self._run(context, request, lambda conn, scope, actor: ops_report.build(
            conn, scope.tenant_id or 0, request.month, request.regional, energy))
        html = request.format == "html"
        text = ops_report.to_html(built) if html else ops_report.to_csv(built)
        kind = "regional" if request.regional else "hospital"
        return pb.Report(filename=f"ops-{kind}-{built.tenant_id}-{request.month}."
                                  f"{'html' if html else 'csv'}",
                         content_type="text/html; charset=utf-8" if html
                         else "text/csv; charset=utf-8",
                         content=text.encode())


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class OpsServices:
    """The servicer, the device status tracker and the daily compliance pass."""

    def __init__(self, dsn: str, energy: EnergySource | None = None,
                 compliance_period_s: float = 3600.0) -> None:
        self.dsn = dsn
        self.servicer = OpsServicer(dsn, energy)
        self.tracker = StatusTracker(dsn)
        self.compliance_period_s = compliance_period_s
        self._task: asyncio.Task[None] | None = None

    def service(self) -> Service:
        return self.servicer.service()

    async def start(self) -> None:
        await self.servicer.start()
        await self.tracker.start()
        self._task = asyncio.create_task(self._compliance_loop(), name="rmiot-compliance")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.tracker.stop()
        await self.servicer.stop()

    def compliance_pass(self) -> compliance.RunReport:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return compliance.run(conn, dt.date.today())

    async def _compliance_loop(self) -> None:
        while True:
            try:
                done = await asyncio.to_thread(self.compliance_pass)
                if done.created or done.escalations:
                    log.info("compliance: %d tasks opened, %d reminders, %d escalations",
                             done.created, done.reminders, done.escalations)
            except psycopg.Error as exc:
                log.warning("compliance pass failed: %s", exc)
            await asyncio.sleep(self.compliance_period_s)
