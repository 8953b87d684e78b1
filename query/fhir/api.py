"""The FHIR R4 read API over HTTP(S) (aiohttp), JSON only, at ``/fhir``.

Interactions:

- ``GET /fhir/metadata`` — the CapabilityStatement (no login needed);
- ``GET /fhir/Device/<id>``, ``GET /fhir/Device?organization=<tenant>|patient=<id>``;
- ``GET /fhir/DeviceMetric?source=Device/<id>`` (the metrics of its model);
- ``GET /fhir/Patient/<id>``;
- ``GET /fhir/Observation/<id>``, ``GET /fhir/Observation?patient=|subject=|device=``
  with ``code`` (``[system|]code``, comma-separated: LOINC, MDC or
  ``urn:rmiot:metric``), ``date`` (``ge``/``gt``/``le``/``lt``/``eq`` + an ISO
  date or date-time, repeatable), ``category=vital-signs``, ``_count`` (Observations a
  page, at most ``fhir.page_max``) and the ``next`` link's ``_page``;
- ``GET /fhir/DocumentReference?patient=<id>`` and ``/<id>`` — results shared
  between hospitals; ``POST /fhir/DocumentReference`` publishes one.

Every request but metadata needs ``Authorization: Bearer <token>`` (a session
of ``AuthService.Login``); it is rate-limited per caller and tenant
(``security.caller_rate_per_s``, ``tenant_rate_per_s``), authorised row by row
(``query.fhir.reads``) and audited: one record per request in the audit chain
— and one per patient whose data it returned, with that patient's pseudonym,
so "who looked at this patient's records" is one query
(``rmiot audit patient``). Errors are OperationOutcomes: 400 invalid, 401 no
or an ended session, 403 no right to the resource type at all, 404 not found
(or not in reach: the same answer), 429 too many requests, 503 audit trail
unavailable (fails closed).
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from rmiot import db
from rmiot.catalogue import BY_CODE, LOINC, MDC, RMIOT_METRIC
from rmiot.config import Config
from rmiot.query.fhir import resources as fhir
from rmiot.query.fhir.reads import Invalid, NotFound, ObservationQuery, Read, Reader
from rmiot.security.audit import AuditRecord, AuditUnavailable
from rmiot.security.interceptor import Caller
from rmiot.security.limits import RateLimiter, Refusal
from rmiot.security.patient_keys import PatientKeys
from rmiot.security.service import SecurityServices

log = logging.getLogger("rmiot.query.fhir")
FHIR_JSON = "application/fhir+json"
Handler = Callable[[web.Request, Caller], Awaitable[Read]]
# Resource type -> the object its reads need some reach on (else 403).
OBJECTS = {"Device": "device", "DeviceMetric": "device", "Observation": "telemetry",
           "Patient": "patient", "DocumentReference": "patient"}
SEARCH_PARAMS = {
    "Observation": {"patient", "subject", "device", "code", "date", "category", "_count",
                    "_page"},
    "Device": {"organization", "patient", "_count", "_page"},
    "DeviceMetric": {"source", "_count"},
    "DocumentReference": {"patient", "subject", "_count"},
}
_SYSTEMS = {LOINC, MDC, RMIOT_METRIC}


def _response(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=FHIR_JSON)


class Refused(Exception):
    def __init__(self, status: int, code: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.code = code


class FhirApi:
    def __init__(self, cfg: Config, security: SecurityServices) -> None:
        self.cfg = cfg
        self.security = security
        self.reader = Reader(security.authorizer, PatientKeys(security.keyring))
        self.per_caller = RateLimiter(cfg.security.caller_rate_per_s,
                                      cfg.security.caller_rate_per_s * 2)
        self.per_tenant = RateLimiter(cfg.security.tenant_rate_per_s,
                                      cfg.security.tenant_rate_per_s * 2)
        self.pool: AsyncConnectionPool | None = None
        self.app = web.Application(client_max_size=2 << 20)
        route = self.app.router
        route.add_get("/fhir/metadata", self.metadata)
        for path, handler in (("/fhir/Device/{id}", self.read_device),
                              ("/fhir/Device", self.search_devices),
                              ("/fhir/DeviceMetric", self.search_metrics),
                              ("/fhir/Patient/{id}", self.read_patient),
                              ("/fhir/Observation/{id}", self.read_observation),
                              ("/fhir/Observation", self.search_observations),
                              ("/fhir/DocumentReference/{id}", self.read_result),
                              ("/fhir/DocumentReference", self.search_results)):
            route.add_get(path, self._guarded(handler))
        route.add_post("/fhir/DocumentReference", self._guarded(self.publish, "write"))
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> int:
        self.pool = await db.open_pool(db.app_dsn(self.cfg), 1, self.cfg.database.pool_max)
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.cfg.fhir.host, self.cfg.fhir.port,
                           reuse_port=True, ssl_context=self._tls())
        await site.start()
        self.port = int(self.runner.addresses[0][1])
        return self.port

    def _tls(self) -> ssl.SSLContext | None:
        if not self.cfg.fhir.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cfg.tls_path("cert_file"), self.cfg.tls_path("key_file"))
        return context

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    # -- the guard: authenticate, limit, authorise, audit ------------------------------

    async def _caller(self, request: web.Request) -> Caller:
        header = request.headers.get("Authorization", "")
        if not header.lower().startswith("bearer "):
            raise Refused(401, "login", "send Authorization: Bearer <token> (AuthService.Login)")
        info = await self.security.sessions.resolve(header[7:].strip())
        if info is None:
            raise Refused(401, "login", "the session has ended or expired: log in again")
        if info.password_change_only:
            raise Refused(403, "forbidden", "the password must be changed first")
        subject = f"user:{info.username}"
        roles = tuple(sorted({r for r, _ in self.security.authorizer.roles_of(subject)}))
        caller = Caller(subject, info.tenant_id, "user", info, roles)
        for limiter, key in ((self.per_caller, subject), (self.per_tenant, info.tenant_id)):
            if limiter.take(key) is not Refusal.NONE:
                raise Refused(429, "throttled", "too many requests: slow down")
        return caller

    def _guarded(self, handler: Handler, act: str = "read") -> Callable[[web.Request],
                                                                         Awaitable[web.Response]]:
        async def guarded(request: web.Request) -> web.Response:
            kind = request.path.split("/")[2]
            caller: Caller | None = None
            read: Read | None = None
            status, body = 200, None
            try:
                caller = await self._caller(request)
                scope = self.reader.scope(caller.subject, OBJECTS[kind], act)
                if not (scope.full or scope.bound or scope.deid) and not (
                        kind == "Patient" and self.reader.scope(caller.subject,
                                                                "aggregate").deid):
                    raise Refused(403, "forbidden", f"{caller.subject} may not {act} {kind}")
                unknown = set(request.query) - SEARCH_PARAMS.get(kind, set()) \
                    if "id" not in request.match_info and request.method == "GET" else set()
                if unknown:
                    raise Refused(400, "not-supported", f"unsupported search parameter(s): "
                                  f"{', '.join(sorted(unknown))}")
                read = await handler(request, caller)
                status = 201 if request.method == "POST" else 200
                body = read.body
            except Refused as exc:
                status, body = exc.status, fhir.outcome(exc.code, str(exc))
            except NotFound as exc:
                status, body = 404, fhir.outcome("not-found", f"{exc} not found")
            except (Invalid, ValueError) as exc:
                status, body = 400, fhir.outcome("invalid", str(exc))
            try:
                self._audit(request, caller, status, read)
            except AuditUnavailable:
                status, body = 503, fhir.outcome("transient", "the audit trail is unavailable")
            return _response(status, body)
        return guarded

    def _audit(self, request: web.Request, caller: Caller | None, status: int,
               read: Read | None) -> None:
        outcome = "ok" if status < 300 else {401: "unauthenticated", 403: "denied",
                                             404: "not_found", 429: "rate_limited"}.get(
            status, "invalid")
        request_id = request.headers.get("X-Request-Id") or str(uuid.uuid4())
        target = request.match_info.get("id") or request.query_string or None
        patients: list[str | None] = [*sorted(read.patients)] if read else []
        for alias in patients or [None]:
            self.security.audit.append(AuditRecord(
                ts=dt.datetime.now(dt.UTC), actor=caller.subject if caller else "anonymous",
                role=",".join(caller.roles) if caller else None,
                tenant_id=caller.tenant_id if caller else None,
                method=f"fhir:{request.method} {request.path}", object=target,
                outcome=outcome, source=request.remote, request_id=request_id,
                detail={"status": status}, patient=alias))

    # -- handlers ------------------------------------------------------------------------

    async def metadata(self, request: web.Request) -> web.Response:
        types = [{"type": kind, "interaction": [{"code": "read"}, {"code": "search-type"}],
                  "searchParam": [{"name": n, "type": "token"} for n in sorted(params)
                                  if not n.startswith("_")]}
                 for kind, params in SEARCH_PARAMS.items()] + [
            {"type": "Patient", "interaction": [{"code": "read"}]}]
        return _response(200, {
            "resourceType": "CapabilityStatement", "status": "active",
            "date": dt.date.today().isoformat(), "kind": "instance", "fhirVersion": "4.0.1",
            "format": ["json"], "software": {"name": "rmiot"},
            "implementation": {"description": "rmiot regional medical IoT platform"},
            "rest": [{"mode": "server", "resource": types}]})

    async def read_device(self, request: web.Request, caller: Caller) -> Read:
        async with self._conn() as conn:
            return Read(await self.reader.device(conn, caller.subject, _id(request)))

    async def search_devices(self, request: web.Request, caller: Caller) -> Read:
        q = request.query
        count = self._count(q)
        after = int(q.get("_page", "0") or 0)
        async with self._conn() as conn:
            found = await self.reader.devices(
                conn, caller.subject, organization=_number(q.get("organization", "0")),
                patient=_ref(q.get("patient", ""), "Patient"), after=after, count=count)
        return self._bundle(request, found, str(found[-1]["id"]) if len(found) == count
                            else None)

    async def search_metrics(self, request: web.Request, caller: Caller) -> Read:
        device = _ref(request.query.get("source", ""), "Device")
        if not device:
            raise Invalid("source=Device/<id> is required")
        async with self._conn() as conn:
            found = await self.reader.device_metrics(conn, caller.subject, device)
        return self._bundle(request, found, None)

    async def read_patient(self, request: web.Request, caller: Caller) -> Read:
        async with self._conn() as conn:
            return await self.reader.patient(conn, caller.subject, _id(request))

    async def read_observation(self, request: web.Request, caller: Caller) -> Read:
        async with self._conn() as conn:
            return await self.reader.observation(conn, caller.subject,
                                                 request.match_info["id"])

    async def search_observations(self, request: web.Request, caller: Caller) -> Read:
        query = self._observation_query(request)
        async with self._conn() as conn:
            read, after = await self.reader.observations(conn, caller.subject, query)
        page = f"{fhir.to_us(after[0])}.{after[1]}.{after[2]}.{after[3]}" if after else None
        bundle = self._bundle(request, read.body["entries"], page)
        bundle.patients = read.patients
        return bundle

    async def read_result(self, request: web.Request, caller: Caller) -> Read:
        async with self._conn() as conn:
            return await self.reader.result(conn, caller.subject, _id(request))

    async def search_results(self, request: web.Request, caller: Caller) -> Read:
        q = request.query
        patient = _ref(q.get("patient") or q.get("subject", ""), "Patient")
        if not patient:
            raise Invalid("patient=<id> is required")
        async with self._conn() as conn:
            read = await self.reader.results(conn, caller.subject, patient, self._count(q))
        bundle = self._bundle(request, read.body["entries"], None)
        bundle.patients = read.patients
        return bundle

    async def publish(self, request: web.Request, caller: Caller) -> Read:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise Invalid("the body is not JSON") from None
        if not isinstance(body, dict):
            raise Invalid("the body must be a DocumentReference")
        if caller.tenant_id is None:
            raise Refused(403, "forbidden", "the caller has no home tenant to publish from")
        async with self._conn() as conn:
            return await self.reader.publish(conn, caller.subject, caller.tenant_id, body)

    # -- helpers ------------------------------------------------------------------------

    def _conn(self) -> Any:
        assert self.pool is not None, "start() first"
        return self.pool.connection()

    def _count(self, q: Any) -> int:
        count = _number(q.get("_count", "100"))
        if not 1 <= count <= self.cfg.fhir.page_max:
            raise Invalid(f"_count: 1 to {self.cfg.fhir.page_max}")
        return count

    def _observation_query(self, request: web.Request) -> ObservationQuery:
        q = request.query
        patient = _ref(q.get("patient") or q.get("subject", ""), "Patient")
        device = _ref(q.get("device", ""), "Device")
        if not patient and not device:
            raise Invalid("search Observation by patient, subject or device")
        metrics: set[int] = set()
        for token in ",".join(q.getall("code", [])).split(","):
            if token:
                metrics.add(_metric(token))
        if q.get("category", "vital-signs") != "vital-signs":
            raise Invalid("category: vital-signs only")
        if "category" in q:
            vital = {m.id for m in BY_CODE.values() if m.vital_sign}
            metrics = metrics & vital if metrics else vital
        lo, hi = _dates(q.getall("date", []))
        after = None
        if q.get("_page"):
            try:
                ts, device_s, seq, index = q["_page"].split(".")
                after = (fhir.EPOCH + dt.timedelta(microseconds=int(ts)), int(device_s),
                         int(seq), int(index))
                if after[3] < 0:
                    raise ValueError(index)
            except (ValueError, OverflowError):
                raise Invalid("_page: use the next link as given") from None
        return ObservationQuery(patient, device, tuple(sorted(metrics)), lo, hi,
                                self._count(q), after)

    def _bundle(self, request: web.Request, entries: list[dict[str, Any]],
                page: str | None) -> Read:
        base = f"{request.scheme}://{request.host}{request.path}"
        params = [(k, v) for k, v in request.query.items() if k != "_page"]
        own = "&".join(f"{k}={v}" for k, v in params)
        after = f"{own}&_page={page}".lstrip("&") if page else None
        return Read(fhir.bundle(base, request.query_string, entries, after))


def _id(request: web.Request) -> int:
    text = request.match_info["id"]
    if not text.isdigit() or len(text) > 19:
        raise NotFound(f"{request.path.split('/')[2]}/{text}")
    return int(text)


def _number(text: str) -> int:
    if not text.isdigit() or len(text) > 19:
        raise Invalid(f"{text!r} is not a number")
    return int(text)


def _ref(text: str, kind: str) -> int:
    """An id given as ``<id>`` or ``<kind>/<id>`` (0 when empty)."""
    if not text:
        return 0
    return _number(text.removeprefix(f"{kind}/"))


def _metric(token: str) -> int:
    system, _, code = token.rpartition("|")
    if system and system not in _SYSTEMS:
        raise Invalid(f"code system {system!r}: {', '.join(sorted(_SYSTEMS))}")
    if system == RMIOT_METRIC:
        return _number(code)
    m = BY_CODE.get(code)
    if m is None:
        raise Invalid(f"code {code!r} is not in the platform's catalogue")
    return m.id


def _instant(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _dates(values: list[str]) -> tuple[dt.datetime, dt.datetime]:
    lo, hi = dt.datetime(1, 1, 1, tzinfo=dt.UTC), dt.datetime(9999, 12, 31, tzinfo=dt.UTC)
    for value in values:
        prefix, text = (value[:2], value[2:]) if value[:2].isalpha() else ("eq", value)
        try:
            when = _instant(text)
        except ValueError:
            raise Invalid(f"date {value!r}: an ISO date or date-time") from None
        span = dt.timedelta(days=1) if len(text) == 10 else dt.timedelta(seconds=1)
        if prefix == "ge":
            lo = max(lo, when)
        elif prefix == "gt":
            lo = max(lo, when + dt.timedelta(microseconds=1))
        elif prefix == "lt":
            hi = min(hi, when)
        elif prefix == "le":
            hi = min(hi, when + span)
        elif prefix == "eq":
            lo, hi = max(lo, when), min(hi, when + span)
        else:
            raise Invalid(f"date prefix {prefix!r}: ge, gt, le, lt or eq")
    return lo, hi

