"""QueryService (proto/query.proto): the tiered queries, over gRPC.

Every method is in a tier (``query.tiers``) and answers within its deadline:
the tier's database pool carries the tier's ``statement_timeout``, and the
handler runs under the remaining time (the tier's budget, or the client's
deadline when sooner); out of time is DEADLINE_EXCEEDED.

Authorisation, in two steps:
1. the interceptor, by ``RULES``: simple-tier methods need ``telemetry:read``
   (bindings: ``patient:read``) in the caller's home tenant; complex-tier ones
   ``aggregate:read`` in the tenant the request names (0: the caller's home).
   Batch is open to any authenticated caller, and each of its items is checked
   here against the rule its method would have — an item refused is
   PERMISSION_DENIED in its result, the others still run;
2. rows (``query.access``): a device, patient or tenant outside the caller's
   reach is NOT_FOUND; clinicians get their patients' data only; commission
   roles get small groups suppressed.

The Batch call runs its items concurrently (``batch_parallel`` at once) on
the pools of their own tiers, each within its tier's budget and the batch's.

Wiring (``QueryService``): ``security.add_rules(query.service.RULES)`` before
the server starts, then mount ``QueryService(cfg, security.authorizer)`` after
``start()`` like the security services.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from rmiot import db
from rmiot.config import Config
from rmiot.grpc_server import Context, Service
from rmiot.proto import query_pb2 as pb
from rmiot.proto import query_pb2_grpc
from rmiot.query import aggregates, calendar, fleet, simple, sketch
from rmiot.query.access import Access, Scope
from rmiot.query.replica import ReadRoute
from rmiot.query.tiers import Deadline, DeadlineExceeded, QueryError, QueryOptions, Tier
from rmiot.security.authz import Authorizer
from rmiot.security.interceptor import Caller, MethodRule, current_caller

log = logging.getLogger("rmiot.query")
SERVICE = pb.DESCRIPTOR.services_by_name["QueryService"].full_name


def _rule(obj: str, tenant_field: str | None = None, object_field: str | None = None,
          ) -> MethodRule:
    return MethodRule(obj=obj, act="read", tenant_field=tenant_field, object_field=object_field)


# Per method: its tier and its rule (a Batch item is checked against the same rule).
METHODS: dict[str, tuple[Tier, MethodRule]] = {
    "Latest": (Tier.SIMPLE, _rule("telemetry", object_field="device_id")),
    "Raw": (Tier.SIMPLE, _rule("telemetry", object_field="device_id")),
    "RawStream": (Tier.SIMPLE, _rule("telemetry", object_field="device_id")),
    "Binding": (Tier.SIMPLE, _rule("patient")),
    "Aggregate": (Tier.COMPLEX, _rule("aggregate", tenant_field="tenant_id")),
    "AggregateStream": (Tier.COMPLEX, _rule("aggregate", tenant_field="tenant_id")),
    "FleetStatus": (Tier.COMPLEX, _rule("aggregate", tenant_field="tenant_id")),
    "Energy": (Tier.COMPLEX, _rule("aggregate", tenant_field="tenant_id")),
}
RULES: dict[str, MethodRule] = {
    **{f"/{SERVICE}/{name}": rule for name, (_, rule) in METHODS.items()},
    f"/{SERVICE}/Batch": MethodRule(any_caller=True),
}
# Batch item field -> method.
BATCH_METHODS = {"latest": "Latest", "raw": "Raw", "binding": "Binding",
                 "aggregate": "Aggregate", "fleet": "FleetStatus", "energy": "Energy"}
STATE_TTL_S = 1.0
# The minute rollups are used from this long after their recorded horizon on,
# so a horizon read up to STATE_TTL_S ago is never past the rows still there.
HORIZON_MARGIN = dt.timedelta(minutes=10)


def _pool(dsn: str, tier: Tier, options: QueryOptions, name: str) -> AsyncConnectionPool:
    """A pool whose connections carry the tier's statement_timeout. Simple-tier
    statements are prepared on first use with generic plans: over a hypertable
    of many chunks, planning costs more than running them. Complex-tier
    statements are never prepared: their plans depend on the values (a scope or
    none, a week or a month), and planning is cheap next to running them."""
    settings = f"-c statement_timeout={int(options.budget(tier) * 1000)}"
    kwargs: dict[str, Any] = {"autocommit": True}
    if tier is Tier.SIMPLE:
        settings += " -c plan_cache_mode=force_generic_plan"
        kwargs["prepare_threshold"] = 0
    else:
        kwargs["prepare_threshold"] = None
    kwargs["options"] = settings
    return AsyncConnectionPool(dsn, min_size=1, max_size=options.pool_max, open=False,
                               name=name, kwargs=kwargs)


async def open_pools(dsn: str, options: QueryOptions) -> dict[Tier, AsyncConnectionPool]:
    """One pool per tier (batch items use their own tier's)."""
    pools: dict[Tier, AsyncConnectionPool] = {}
    for tier in (Tier.SIMPLE, Tier.COMPLEX):
        pool = _pool(dsn, tier, options, f"rmiot-query-{tier.value}")
        try:
            await pool.open(wait=True, timeout=10)
        except Exception as exc:
            await pool.close()
            for opened in pools.values():
                await opened.close()
            raise db.DatabaseUnreachable(dsn, exc) from None
        pools[tier] = pool
    return pools


async def open_read_route(dsn: str, options: QueryOptions) -> ReadRoute:
    """The complex tier's pool on the read DSN (opened in the background: a
    standby that is down only means reading from the primary)."""
    pool = _pool(dsn, Tier.COMPLEX, options, "rmiot-query-read")
    await pool.open(wait=False)
    route = ReadRoute(pool, options.replica_max_staleness_s)
    await route.start()
    return route


class QueryServicer(query_pb2_grpc.QueryServiceServicer):
    def __init__(self, pools: dict[Tier, AsyncConnectionPool], authorizer: Authorizer,
                 options: QueryOptions, read_route: ReadRoute | None = None) -> None:
        self.pools = pools
        self.read_route = read_route  # complex tier on a standby, while fresh enough
        self.authorizer = authorizer
        self.options = options
        # The tree's current snapshot at each call: a bound method would keep
        # the snapshot of today forever.
        self.access = Access(authorizer, lambda tenant: authorizer.tree.subtree(tenant))
        self._state: dict[str, dt.datetime] = {}
        self._state_at = 0.0
        self._levels: dict[int, str] = {}
        self._levels_version = -1

    # -- the RPCs ------------------------------------------------------------------

    async def Latest(self, request: pb.LatestRequest, context: Context) -> pb.LatestReply:
        return await self._answer("Latest", request, context)  # type: ignore[no-any-return]

    async def Raw(self, request: pb.RawRequest, context: Context) -> pb.RawPage:
        return await self._answer("Raw", request, context)  # type: ignore[no-any-return]

    async def Binding(self, request: pb.BindingRequest, context: Context) -> pb.BindingReply:
        return await self._answer("Binding", request, context)  # type: ignore[no-any-return]

    async def Aggregate(self, request: pb.AggregateRequest,
                        context: Context) -> pb.AggregateReply:
        return await self._answer("Aggregate", request, context)  # type: ignore[no-any-return]

    async def FleetStatus(self, request: pb.FleetRequest, context: Context) -> pb.FleetReply:
        return await self._answer("FleetStatus", request, context)  # type: ignore[no-any-return]

    async def Energy(self, request: pb.EnergyRequest, context: Context) -> pb.EnergyReply:
        return await self._answer("Energy", request, context)  # type: ignore[no-any-return]

    async def RawStream(self, request: pb.RawRequest,
                        context: Context) -> AsyncIterator[pb.RawPage]:
        """Every page of a window, each page within the simple tier's budget."""
        caller = current_caller()
        page = pb.RawRequest()
        page.CopyFrom(request)
        page.page_size = request.page_size or self.options.page_max
        while True:
            try:
                reply = await self._raw(page, caller, self._deadline(Tier.SIMPLE, context),
                                        streaming=True)
            except QueryError as exc:
                await context.abort(exc.code, str(exc))
            yield reply
            if not reply.next_page_token:
                return
            page.page_token = reply.next_page_token

    async def AggregateStream(self, request: pb.AggregateRequest,
                              context: Context) -> AsyncIterator[pb.AggregateReply]:
        """Every page of an aggregate, each page within the complex tier's budget."""
        caller = current_caller()
        page = pb.AggregateRequest()
        page.CopyFrom(request)
        page.page_size = request.page_size or self.options.page_max
        while True:
            try:
                reply = await self._aggregate(page, caller,
                                              self._deadline(Tier.COMPLEX, context))
            except QueryError as exc:
                await context.abort(exc.code, str(exc))
            yield reply
            if not reply.next_page_token:
                return
            page.page_token = reply.next_page_token

    async def Batch(self, request: pb.BatchRequest, context: Context) -> pb.BatchReply:
        if len(request.items) > self.options.batch_max_items:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"at most {self.options.batch_max_items} items in a batch")
        caller = current_caller()
        batch = self._deadline(Tier.BATCH, context)
        gate = asyncio.Semaphore(self.options.batch_parallel)

        async def one(item: pb.BatchItem) -> pb.BatchResult:
            result = pb.BatchResult(id=item.id)
            which = item.WhichOneof("query")
            if which is None:
                result.code, result.message = (grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                               "the item names no query")
                return result
            method = BATCH_METHODS[which]
            tier, rule = METHODS[method]
            query = getattr(item, which)
            async with gate:
                try:
                    self._authorise(caller, rule, query)
                    deadline = batch.narrowed(tier, self.options.budget(tier))
                    reply = await HANDLERS[method](self, query, caller, deadline)
                    getattr(result, which).CopyFrom(reply)
                except QueryError as exc:
                    result.code, result.message = exc.code.value[0], str(exc)
                except Exception:
                    # One item's failure is its own; the others still answer.
                    log.exception("batch item failed", extra={"method": method})
                    result.code, result.message = (grpc.StatusCode.INTERNAL.value[0],
                                                   "internal error")
            return result

        return pb.BatchReply(results=await asyncio.gather(*(one(i) for i in request.items)))

    # -- plumbing ------------------------------------------------------------------

    async def _answer(self, method: str, request: Any, context: Context) -> Any:
        tier, _ = METHODS[method]
        try:
            return await HANDLERS[method](self, request, current_caller(),
                                          self._deadline(tier, context))
        except QueryError as exc:
            await context.abort(exc.code, str(exc))

    def _deadline(self, tier: Tier, context: Context) -> Deadline:
        remaining = context.time_remaining()
        return Deadline(tier, self.options.budget(tier), remaining)

    def _authorise(self, caller: Caller, rule: MethodRule, request: Any) -> None:
        """A batch item: the check the interceptor makes for the method itself."""
        tenant = caller.tenant_id
        if rule.tenant_field:
            tenant = int(getattr(request, rule.tenant_field)) or tenant
        if tenant is None or not self.authorizer.allowed(caller.subject, tenant, rule.obj,
                                                         rule.act):
            raise QueryError(grpc.StatusCode.PERMISSION_DENIED,
                             f"{caller.subject} may not {rule.act} {rule.obj} in tenant {tenant}")

    @contextlib.asynccontextmanager
    async def _connection(self, tier: Tier,
                          deadline: Deadline) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection of the tier's pool, the body held to the deadline."""
        pool = self.pools[Tier.COMPLEX if tier is Tier.BATCH else tier]
        route = self.read_route
        if tier is not Tier.SIMPLE and route is not None and route.usable:
            pool = route.pool
        else:
            route = None
        try:
            async with deadline.held(), pool.connection(
                    timeout=max(deadline.remaining(), 0.001)) as conn:
                yield conn
        except (PoolTimeout, psycopg.errors.QueryCanceled):
            # No connection in time, or the tier's statement_timeout fired.
            raise DeadlineExceeded(deadline.tier, deadline.budget) from None
        except psycopg.OperationalError as exc:
            if route is not None:
                route.failed()  # the next calls read from the primary
            log.warning("query failed: database unavailable", extra={"error": str(exc).strip()})
            raise QueryError(grpc.StatusCode.UNAVAILABLE,
                             "the database is unavailable; try again") from None
        except simple.NotFound as exc:
            raise QueryError(grpc.StatusCode.NOT_FOUND, str(exc)) from None
        except aggregates.BadQuery as exc:
            raise QueryError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    def _scope(self, caller: Caller, obj: str) -> Scope:
        return self.access.scope(caller.subject, obj, "read")

    def _homes(self, caller: Caller, tenant_id: int) -> tuple[int, tuple[int, ...] | None]:
        """The scope tenant of a complex request and its subtree (None: the
        whole tree, no filter needed)."""
        tenant = tenant_id or caller.tenant_id or 0
        tree = self.authorizer.tree
        if tenant not in tree:
            raise QueryError(grpc.StatusCode.NOT_FOUND, f"tenant {tenant} not found")
        if tree.parent(tenant) is None:
            return tenant, None
        return tenant, tuple(sorted(tree.subtree(tenant)))

    async def _whole_hospitals(self, conn: psycopg.AsyncConnection[Any], tenant: int) -> bool:
        """Is ``tenant`` a region, district or hospital (its subtree holds whole
        hospitals)? Levels re-read when the policy or the tree changed."""
        if self._levels_version != self.authorizer.version:
            cur = await conn.execute(b"SELECT id, level FROM tenants")
            self._levels = dict(await cur.fetchall())
            self._levels_version = self.authorizer.version
        return self._levels.get(tenant) in ("region", "district", "hospital")

    async def _rollup_state(self, conn: psycopg.AsyncConnection[Any]) -> dict[str, dt.datetime]:
        """rollup_state, re-read at most every STATE_TTL_S (a stale copy only
        makes as_of earlier and the minute horizon later: both safe)."""
        if time.monotonic() - self._state_at > STATE_TTL_S:
            cur = await conn.execute(b"SELECT key, value FROM rollup_state")
            self._state = {k: v for k, v in await cur.fetchall()}
            self._state_at = time.monotonic()
        return self._state

    # -- simple tier ------------------------------------------------------------------

    async def _latest(self, request: pb.LatestRequest, caller: Caller,
                      deadline: Deadline) -> pb.LatestReply:
        scope = self._scope(caller, "telemetry")
        async with self._connection(Tier.SIMPLE, deadline) as conn:
            values = await simple.latest(conn, scope, request.device_id, request.metrics)
        return pb.LatestReply(device_id=request.device_id, values=[
            pb.MetricValue(metric=v.metric, value=v.value, ts_us=calendar.to_us(v.ts))
            for v in values])

    async def _raw(self, request: pb.RawRequest, caller: Caller, deadline: Deadline,
                   streaming: bool = False) -> pb.RawPage:
        """One page; a unary call's window is at most ``raw_window_max_s``."""
        if request.to_us <= request.from_us:
            raise QueryError(grpc.StatusCode.INVALID_ARGUMENT, "to_us must be after from_us")
        widest = self.options.raw_window_max_s
        if not streaming and request.to_us - request.from_us > widest * 10**6:
            raise QueryError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"Raw reads at most {widest} s; use RawStream or Aggregate")
        size = min(request.page_size or 1000, self.options.page_max)
        try:
            after = simple.parse_page_token(request.page_token)
        except ValueError:
            raise QueryError(grpc.StatusCode.INVALID_ARGUMENT, "bad page_token") from None
        scope = self._scope(caller, "telemetry")
        async with self._connection(Tier.SIMPLE, deadline) as conn:
            frames = await simple.raw(conn, scope, request.device_id,
                                      calendar.from_us(request.from_us),
                                      calendar.from_us(request.to_us), size + 1, after,
                                      request.metrics)
        page = pb.RawPage(device_id=request.device_id, frames=[
            pb.RawFrame(ts_us=calendar.to_us(f.ts), seq=f.seq, metrics=f.metrics,
                        values=f.values) for f in frames[:size]])
        if len(frames) > size:
            page.next_page_token = simple.page_token(frames[size - 1])
        return page

    async def _binding(self, request: pb.BindingRequest, caller: Caller,
                       deadline: Deadline) -> pb.BindingReply:
        if request.WhichOneof("target") is None:
            raise QueryError(grpc.StatusCode.INVALID_ARGUMENT, "name a device or a patient")
        scope = self._scope(caller, "patient")
        async with self._connection(Tier.SIMPLE, deadline) as conn:
            found = await simple.bindings(conn, scope, device=request.device_id,
                                          patient=request.patient_id)
        return pb.BindingReply(bindings=[pb.OpenBinding(
            binding_id=b.id, device_id=b.device_id, patient_id=b.patient_id or 0,
            patient_pseudonym=b.pseudonym, bed=b.bed, episode=b.episode, tenant_id=b.tenant_id,
            bound_at_us=calendar.to_us(b.bound_at)) for b in found])

    # -- complex tier -----------------------------------------------------------------

    async def _aggregate(self, request: pb.AggregateRequest, caller: Caller,
                         deadline: Deadline) -> pb.AggregateReply:
        tenant, homes = self._homes(caller, request.tenant_id)
        scope = self._scope(caller, "aggregate")
        inside = set(homes) if homes is not None else None
        full = scope.full if inside is None else scope.full & inside
        deid = scope.deid if inside is None else scope.deid & inside
        query = aggregates.AggregateQuery(
            metrics=tuple(request.metrics), lo=calendar.from_us(request.from_us),
            hi=calendar.from_us(request.to_us),
            bucket=dt.timedelta(seconds=request.bucket_s) if request.bucket_s else None,
            months=request.bucket_months, group_by=_group_by(request.group_by),
            kinds=tuple(request.kinds), models=tuple(request.model_ids),
            percentiles=tuple(request.percentiles), homes=homes,
            deid_all=bool(deid) and not full, deid_homes=tuple(sorted(deid)) if full else (),
            min_group_size=self.options.min_group_size,
            after=_aggregate_keyset(request.page_token),
            limit=min(request.page_size or 1000, self.options.page_max))
        async with self._connection(Tier.COMPLEX, deadline) as conn:
            state = await self._rollup_state(conn)
            horizon = state.get("minute.horizon")
            query = dataclasses.replace(
                query, whole_hospitals=await self._whole_hospitals(conn, tenant))
            answer = await aggregates.aggregate(
                conn, query, horizon + HORIZON_MARGIN if horizon else None)
        raw = answer.resolution == "raw"
        as_of = dt.datetime.now(dt.UTC) if raw else state.get(f"{answer.resolution}.as_of")
        reply = pb.AggregateReply(
            resolution=answer.resolution, percentiles_exact=raw,
            percentile_relative_error=0.0 if raw else sketch.ALPHA,
            as_of_us=calendar.to_us(as_of) if as_of else 0, from_us=calendar.to_us(answer.lo),
            to_us=calendar.to_us(answer.hi), min_group_size=self.options.min_group_size)
        add = reply.rows.add
        for r in answer.rows:
            add(bucket_us=r.bucket_us, group_id=r.group_id, group=r.group, metric=r.metric,
                count=r.count, sum=r.total, avg=r.total / r.count if r.count else 0.0,
                min=r.lo, max=r.hi, percentiles=r.percentiles, devices=r.devices,
                suppressed=r.suppressed)
        if answer.more and answer.rows:
            last = answer.rows[-1]
            reply.next_page_token = f"{last.bucket_us}.{last.group_id}.{last.metric}"
        return reply

    async def _fleet(self, request: pb.FleetRequest, caller: Caller,
                     deadline: Deadline) -> pb.FleetReply:
        _, homes = self._homes(caller, request.tenant_id)
        within = dt.timedelta(seconds=request.online_within_s or self.options.online_within_s)
        group_by = _group_by(request.group_by)
        async with self._connection(Tier.COMPLEX, deadline) as conn:
            state = await self._rollup_state(conn)
            rows = await fleet.fleet_status(conn, homes, group_by, within)
        as_of = state.get("minute.as_of")
        return pb.FleetReply(as_of_us=calendar.to_us(as_of) if as_of else 0, rows=[
            pb.FleetRow(group_id=r.group_id, group=r.group, total=r.total, online=r.online,
                        offline=r.offline, never_seen=r.never_seen, in_fault=r.in_fault,
                        inactive=r.inactive) for r in rows])

    async def _energy(self, request: pb.EnergyRequest, caller: Caller,
                      deadline: Deadline) -> pb.EnergyReply:
        tenant, homes = self._homes(caller, request.tenant_id)
        today = calendar.local_date(dt.datetime.now(dt.UTC))
        try:
            first = (dt.date.fromisoformat(request.from_date) if request.from_date
                     else today.replace(day=1))
            end = (dt.date.fromisoformat(request.to_date) if request.to_date
                   else today + dt.timedelta(days=1))
        except ValueError:
            raise QueryError(grpc.StatusCode.INVALID_ARGUMENT,
                             "dates are YYYY-MM-DD") from None
        async with self._connection(Tier.COMPLEX, deadline) as conn:
            state = await self._rollup_state(conn)
            rows = await fleet.energy(conn, homes, fleet.periods(first, end),
                                      request.metric or fleet.ENERGY_METRIC, request.by_hospital,
                                      await self._whole_hospitals(conn, tenant))
        as_of = state.get("day.as_of")
        return pb.EnergyReply(
            from_date=first.isoformat(), to_date=end.isoformat(),
            as_of_us=calendar.to_us(as_of) if as_of else 0,
            rows=[pb.EnergyRow(zone_id=r.zone_id, zone=r.zone, energy=r.energy,
                               previous_month=r.previous_month, last_year=r.last_year,
                               mom_pct=r.mom_pct, yoy_pct=r.yoy_pct) for r in rows])


# Method -> its handler, for the unary RPCs and for Batch items alike.
Handler = Callable[[QueryServicer, Any, Caller, Deadline], Awaitable[Any]]
HANDLERS: dict[str, Handler] = {
    "Latest": QueryServicer._latest, "Raw": QueryServicer._raw,
    "Binding": QueryServicer._binding, "Aggregate": QueryServicer._aggregate,
    "FleetStatus": QueryServicer._fleet, "Energy": QueryServicer._energy}


def _group_by(value: int) -> aggregates.GroupBy:
    try:
        return aggregates.GroupBy(value)
    except ValueError:
        raise QueryError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown group_by {value}") from None


def _aggregate_keyset(token: str) -> aggregates.Keyset | None:
    if not token:
        return None
    try:
        bucket, group, metric = (int(part) for part in token.split("."))
    except ValueError:
        raise QueryError(grpc.StatusCode.INVALID_ARGUMENT, "bad page_token") from None
    return aggregates.Keyset(calendar.from_us(bucket), group, metric)


class QueryService:
    """The query service of one platform process: its pools and servicer."""

    def __init__(self, cfg: Config, authorizer: Authorizer,
                 options: QueryOptions | None = None) -> None:
        self.dsn = db.app_dsn(cfg)
        self.authorizer = authorizer
        self.options = options or QueryOptions.of(cfg.query)
        self.read_dsn = db.read_dsn(cfg)
        self.pools: dict[Tier, AsyncConnectionPool] = {}
        self.read_route: ReadRoute | None = None
        self.servicer: QueryServicer | None = None

    async def start(self) -> None:
        self.pools = await open_pools(self.dsn, self.options)
        if self.options.replica_max_staleness_s > 0:
            self.read_route = await open_read_route(self.read_dsn, self.options)
        self.servicer = QueryServicer(self.pools, self.authorizer, self.options,
                                      self.read_route)

    def services(self) -> list[Service]:
        assert self.servicer is not None, "start() first"
        return [Service(SERVICE, query_pb2_grpc.add_QueryServiceServicer_to_server,
                        self.servicer)]

    async def stop(self) -> None:
        if self.read_route is not None:
            await self.read_route.stop()
            self.read_route = None
        for pool in self.pools.values():
            await pool.close()
        self.pools = {}
