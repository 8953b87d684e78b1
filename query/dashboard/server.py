"""The dashboard's HTTP server (aiohttp): pages, a JSON API, live updates.

- ``POST /api/login`` logs in through ``AuthService.Login`` (password, and the
  TOTP code for administrator roles) and keeps the session token in an
  HttpOnly, SameSite=Strict cookie; ``POST /api/logout`` ends the session.
  Every other ``/api`` call needs that session (401 otherwise) and is made as
  its user through the gRPC API (``gateway``): reach, NOT_FOUND across
  tenants and de-identification are the API's.
- POSTs must carry ``X-Rmiot: 1`` (a page of another site cannot send it
  without a CORS preflight we never answer): no cross-site request forgery.
- Every request but static files is audited (actor, tenant, route, status,
  address, request id) and traced; its time goes to ``rmiot.http.duration``.
- ``GET /api/events?tenant=ID`` (or ``hospital=ID``) is a server-sent event
  stream: the page's figures every ``dashboard.refresh_s``.
- Pages (``/``, ``/hospital/ID``, ``/device/ID``) are one static HTML page
  whose script reads the API; no build step.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web
from opentelemetry import trace

from rmiot import observability
from rmiot.config import Config
from rmiot.proto import auth_pb2
from rmiot.query.dashboard.gateway import ApiError, Gateway
from rmiot.query.dashboard.views import Viewer, Views
from rmiot.security.audit import AuditRecord
from rmiot.security.authz import Authorizer
from rmiot.security.interceptor import AuditSink
from rmiot.security.sessions import SessionInfo, SessionStore

log = logging.getLogger("rmiot.dashboard")
COOKIE = "rmiot_session"
STATIC = resources.files("rmiot.query.dashboard") / "static"
PAGES = ("/", "/login", "/hospital/{id:[0-9]+}", "/device/{id:[0-9]+}")
HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-store"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Call:
    """What the middleware learnt of a request: its id and its session."""

    request_id: str
    session: SessionInfo | None


CALL = web.RequestKey("rmiot_call", Call)


class Dashboard:
    def __init__(self, cfg: Config, grpc_port: int, sessions: SessionStore,
                 authorizer: Authorizer, audit: AuditSink,
                 ingest: Callable[[], Mapping[str, float]] | None = None) -> None:
        self.cfg = cfg
        self.sessions = sessions
        self.audit = audit
        self.gateway = Gateway(cfg, grpc_port)
        self.views = Views(self.gateway, authorizer, ingest)
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.app = web.Application(middlewares=[self._audited])
        add = self.app.router
        for page in PAGES:
            add.add_get(page, self.page)
        add.add_get("/static/{name}", self.static)
        add.add_post("/api/login", self.login)
        add.add_post("/api/logout", self.logout)
        add.add_get("/api/me", self.me)
        add.add_get("/api/overview", self.overview)
        add.add_get("/api/hospital/{id:[0-9]+}", self.hospital)
        add.add_get("/api/device/{id:[0-9]+}", self.device)
        add.add_post("/api/alarms/{id:[0-9]+}/{action:ack|clear}", self.alarm_action)
        add.add_get("/api/events", self.events)

    @property
    def url(self) -> str:
        scheme = "https" if self.cfg.dashboard.tls else "http"
        return f"{scheme}://{self.cfg.dashboard.host}:{self.port}/"

    async def start(self) -> str:
        """Listen; returns the address."""
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        context = None
        if self.cfg.dashboard.tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(self.cfg.tls_path("cert_file"),
                                    self.cfg.tls_path("key_file"))
        site = web.TCPSite(self.runner, self.cfg.dashboard.host, self.cfg.dashboard.port,
                           ssl_context=context, reuse_address=True)
        await site.start()
        self.port = observability.bound_port(site)
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        await self.gateway.close()

    # -- every request: session, audit, span ---------------------------------------

    @web.middleware
    async def _audited(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/static/"):
            return await handler(request)
        request_id = request.headers.get("X-Request-Id") or str(uuid.uuid4())
        route = request.match_info.route.resource
        name = f"HTTP {request.method} {route.canonical if route else request.path}"
        session = await self._session(request)
        request[CALL] = Call(request_id, session)
        started, status = time.perf_counter(), 500
        span = observability.tracer().start_span(name, kind=trace.SpanKind.SERVER, attributes={
            "http.request.method": request.method, "url.path": request.path})
        try:
            with trace.use_span(span, end_on_exit=False):
                response = await handler(request)
            status = response.status
            for key, value in HEADERS.items():
                response.headers.setdefault(key, value)
            response.headers["X-Request-Id"] = request_id
            return response
        except ApiError as exc:
            status = exc.status
            return self._json({"error": str(exc)}, status, request_id)
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            tenant = _tenant_of(request, session)
            span.set_attributes({"http.response.status_code": status, "rmiot.tenant": tenant or 0,
                                 "enduser.id": _actor(session)})
            span.end()
            observability.instruments.http_duration.record(
                time.perf_counter() - started, {"http.route": name, "status": status})
            if request.path != "/api/login":  # the login writes its own record (AuthService)
                self.audit.append(AuditRecord(
                    ts=dt.datetime.now(dt.UTC), actor=_actor(session), role="",
                    tenant_id=tenant, method=name, object=request.match_info.get("id"),
                    outcome=_outcome(status), source=request.remote or "",
                    request_id=request_id, detail={"status": status, "path": request.path},
                    patient=None))

    async def _session(self, request: web.Request) -> SessionInfo | None:
        token = request.cookies.get(COOKIE, "")
        return await self.sessions.resolve(token) if token else None

    def _viewer(self, request: web.Request) -> Viewer:
        session = request[CALL].session
        if session is None:
            raise ApiError(401, "log in")
        if session.password_change_only:
            raise ApiError(403, "the password must be changed first (rmiot or AuthService)")
        subject = f"user:{session.username}"
        return Viewer(request.cookies[COOKIE], request[CALL].request_id, subject,
                      session.tenant_id or 0, self.views.deid(subject))

    @staticmethod
    def _json(body: Any, status: int = 200, request_id: str = "") -> web.Response:
        response = web.json_response(body, status=status, dumps=json.dumps)
        for key, value in HEADERS.items():
            response.headers[key] = value
        if request_id:
            response.headers["X-Request-Id"] = request_id
        return response

    @staticmethod
    def _check_origin(request: web.Request) -> None:
        if request.headers.get("X-Rmiot") != "1":
            raise ApiError(403, "missing X-Rmiot header")

    # -- pages and files ------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=(STATIC / "index.html").read_bytes(),
                            content_type="text/html", charset="utf-8")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        kinds = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
        suffix = name[name.rfind("."):] if "." in name else ""
        file = STATIC / name
        if "/" in name or suffix not in kinds or not file.is_file():
            raise web.HTTPNotFound()
        return web.Response(body=file.read_bytes(), content_type=kinds[suffix],
                            headers={"Cache-Control": "max-age=300"})

    # -- the API ---------------------------------------------------------------------

    async def login(self, request: web.Request) -> web.Response:
        self._check_origin(request)
        body = await request.json()
        try:
            reply = await self.gateway.call(self.gateway.auth.Login, auth_pb2.LoginRequest(
                username=str(body.get("username", "")), password=str(body.get("password", "")),
                totp=str(body.get("totp", ""))), "", request[CALL].request_id)
        except ApiError as exc:  # a lockout (PERMISSION_DENIED) says so, not "not found"
            raise ApiError(403 if exc.status == 404 else exc.status, exc.detail) from None
        response = self._json({"password_change_required": reply.password_change_required})
        response.set_cookie(COOKIE, reply.token, httponly=True, samesite="Strict", path="/",
                            secure=self.cfg.dashboard.tls, max_age=reply.idle_timeout_s * 96)
        return response

    async def logout(self, request: web.Request) -> web.Response:
        self._check_origin(request)
        token = request.cookies.get(COOKIE, "")
        if token:
            with contextlib.suppress(ApiError):  # already ended: the cookie goes all the same
                await self.gateway.call(self.gateway.auth.Logout, auth_pb2.LogoutRequest(),
                                        token, request[CALL].request_id)
        response = self._json({})
        response.del_cookie(COOKIE, path="/")
        return response

    async def me(self, request: web.Request) -> web.Response:
        v = self._viewer(request)
        who = await self.gateway.call(self.gateway.auth.WhoAmI, auth_pb2.WhoAmIRequest(),
                                      v.token, v.request_id)
        return self._json({"subject": who.subject, "tenant": who.tenant_id, "deid": v.deid,
                           "roles": sorted({g.role for g in who.roles}),
                           "refresh_s": self.cfg.dashboard.refresh_s})

    async def overview(self, request: web.Request) -> web.Response:
        v = self._viewer(request)
        return self._json(await self.views.overview(v, _int(request.query.get("tenant"))))

    async def hospital(self, request: web.Request) -> web.Response:
        v = self._viewer(request)
        return self._json(await self.views.hospital(v, int(request.match_info["id"])))

    async def device(self, request: web.Request) -> web.Response:
        v = self._viewer(request)
        return self._json(await self.views.device(v, int(request.match_info["id"])))

    async def alarm_action(self, request: web.Request) -> web.Response:
        self._check_origin(request)
        v = self._viewer(request)
        body = await request.json()
        done = await self.views.act_on_alarm(
            v, int(request.match_info["id"]), _int(body.get("tenant")),
            request.match_info["action"], str(body.get("comment", ""))[:500])
        return self._json(done)

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The page's figures now and every ``refresh_s``, as server-sent events."""
        v = self._viewer(request)
        hospital = _int(request.query.get("hospital"))
        tenant = _int(request.query.get("tenant"))
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store",
            "X-Accel-Buffering": "no"})
        await response.prepare(request)
        try:
            while True:
                try:
                    data = await (self.views.hospital(v, hospital) if hospital
                                  else self.views.overview(v, tenant))
                    event = "figures"
                except ApiError as exc:
                    data, event = {"error": str(exc), "status": exc.status}, "refused"
                await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
                if event == "refused":
                    break
                await asyncio.sleep(self.cfg.dashboard.refresh_s)
        except ConnectionResetError:
            pass  # the page went away
        return response


def _int(value: Any) -> int:
    try:
        return max(int(value or 0), 0)
    except (TypeError, ValueError):
        raise ApiError(400, f"not a number: {value!r}") from None


def _actor(session: SessionInfo | None) -> str:
    return f"user:{session.username}" if session else "anonymous"


def _tenant_of(request: web.Request, session: SessionInfo | None) -> int | None:
    for key in ("tenant", "hospital"):
        if request.query.get(key, "").isdigit():
            return int(request.query[key])
    if request.path.startswith("/api/hospital/"):
        return int(request.match_info["id"])
    return session.tenant_id if session else None


def _outcome(status: int) -> str:
    return {401: "unauthenticated", 403: "denied", 404: "not_found",
            400: "invalid", 429: "rate_limited"}.get(status, "ok" if status < 400 else "error")
