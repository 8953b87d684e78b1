"""The one gRPC interceptor every rmiot service goes through.

For each call, in order:
1. **authenticate**: a session token (metadata ``authorization: Bearer …``)
   makes the caller ``user:<name>``; a verified client certificate from the
   platform's CA (mTLS) makes it ``cert:<common name>``, speaking for the
   tenant in its ``urn:rmiot:tenant:<id>`` name. Neither: UNAUTHENTICATED —
   unless the method is public (Login);
2. **limit**: a token bucket per caller and one per tenant; over either:
   RESOURCE_EXHAUSTED (sustained abuse is audited once a minute);
3. **authorise**: the method's rule names the object and action and where the
   target tenant is in the request (default: the caller's home tenant); the
   Authorizer (Casbin over the tenant tree) decides. No rule for a method:
   PERMISSION_DENIED — a new RPC is closed until someone writes its rule. A
   session that must change its password may call only the methods that allow
   it (ChangePassword, Logout, WhoAmI);
4. **audit**: every call, allowed or not, is appended to the audit chain with
   time, caller, roles, tenant, method, object, outcome, source address and
   request id (``x-request-id`` metadata, or a new one, echoed back).

Handlers read the caller with ``current_caller()``. The standard health and
reflection services are not intercepted (probes every few seconds would drown
the audit log; they reveal no data).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID
from opentelemetry import trace

from rmiot.grpc_server import Context, ServerInterceptor
from rmiot.security.audit import AuditRecord
from rmiot.security.limits import RateLimiter, Refusal
from rmiot.security.sessions import SessionInfo, SessionStore

TENANT_URI = "urn:rmiot:tenant:"
UNINTERCEPTED = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class MethodRule:
    """How one RPC is authorised. ``obj``/``act`` go to the Authorizer;
    ``tenant_field`` names the request field holding the target tenant id;
    ``object_field`` the request field recorded as the audited object."""

    obj: str = ""
    act: str = ""
    tenant_field: str | None = None
    object_field: str | None = None
    public: bool = False               # no caller needed (Login)
    audited_by_handler: bool = False   # the servicer writes a richer record itself (Login)
    any_caller: bool = False           # any authenticated caller (WhoAmI, Logout)
    during_password_change: bool = False


@dataclass(frozen=True)
class Caller:
    subject: str                       # "user:alice", "cert:hospital-12", "anonymous"
    tenant_id: int | None
    kind: str                          # user, platform, vendor, operator, anonymous
    session: SessionInfo | None = None
    roles: tuple[str, ...] = field(default=())


ANONYMOUS = Caller("anonymous", None, "anonymous")
_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("rmiot_caller",
                                                                 default=ANONYMOUS)


def current_caller() -> Caller:
    """The authenticated caller of the RPC being handled."""
    return _CALLER.get()


class Authorizer(Protocol):
    def allowed(self, subject: str, tenant_id: int, obj: str, act: str) -> bool: ...
    def roles_of(self, subject: str) -> list[tuple[str, int]]: ...


class AuditSink(Protocol):
    def append(self, record: AuditRecord) -> None: ...


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, outcome: str) -> None:
        super().__init__(message)
        self.code = code
        self.outcome = outcome


@dataclass
class CallState:
    """What is known about a call so far; whatever it holds is audited."""

    caller: Caller = ANONYMOUS
    tenant: int | None = None
    outcome: str = "ok"
    detail: dict[str, Any] = field(default_factory=dict)
    patient: str | None = None         # the pseudonym of a patient whose data it read


_CALL: contextvars.ContextVar[CallState | None] = contextvars.ContextVar("rmiot_call",
                                                                       default=None)


def note_patient(pseudonym: str) -> None:
    """Say that the RPC being handled reads (or changes) this patient's data:
    its audit record carries the pseudonym, so ``rmiot audit patient`` finds
    it. A second patient goes into the record's detail. Outside an RPC (an
    operator's command reading the database directly) it does nothing."""
    call = _CALL.get()
    if call is None or not pseudonym or pseudonym == call.patient:
        return
    if call.patient is None:
        call.patient = pseudonym
        return
    others: list[str] = call.detail.setdefault("patients", [])
    if pseudonym not in others:
        others.append(pseudonym)


class SecurityInterceptor(ServerInterceptor):
    def __init__(self, rules: Mapping[str, MethodRule], sessions: SessionStore,
                 authorizer: Authorizer, audit: AuditSink, *,
                 caller_rate: float = 200.0, tenant_rate: float = 2000.0) -> None:
        self.rules = rules
        self.sessions = sessions
        self.authorizer = authorizer
        self.audit = audit
        self.per_caller = RateLimiter(caller_rate, caller_rate * 2)
        self.per_tenant = RateLimiter(tenant_rate, tenant_rate * 2)
        self._certs: dict[bytes, Caller] = {}

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
            details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(UNINTERCEPTED):
            return handler
        rule = self.rules.get(method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method, rule),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, method, rule),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        # Client-streaming calls carry their tenant per message: the servicer
        # checks each one through check(); the interceptor authenticates and audits.
        wrap = (grpc.stream_unary_rpc_method_handler if handler.stream_unary
                else grpc.stream_stream_rpc_method_handler)
        behavior = handler.stream_unary or handler.stream_stream
        return wrap(self._unary(behavior, method, rule, streaming_in=True),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)

    # -- the checks -------------------------------------------------------------

    async def admit(self, request: Any, context: Context, method: str, rule: MethodRule | None,
                    call: CallState, streaming_in: bool = False) -> None:
        """Authenticate, limit and authorise one call, noting in ``call`` who and
        which tenant as soon as known (a refusal is audited with them); raises Refused."""
        call.caller = caller = await self.authenticate(context)
        if rule is None:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          f"{method} has no authorisation rule", "denied")
        if caller is ANONYMOUS and not rule.public:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED,
                          "log in (AuthService.Login) or present a client certificate",
                          "unauthenticated")
        tenant = caller.tenant_id
        if rule.tenant_field and not streaming_in:
            tenant = int(getattr(request, rule.tenant_field)) or tenant
        call.tenant = tenant
        self._limit(caller, context)
        if caller.session and caller.session.password_change_only \
                and not rule.during_password_change:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          "the password must be changed first (AuthService.ChangePassword)",
                          "denied")
        if rule.public or rule.any_caller:
            return
        if tenant is None or not self.authorizer.allowed(caller.subject, tenant, rule.obj,
                                                         rule.act):
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          f"{caller.subject} may not {rule.act} {rule.obj} in tenant {tenant}",
                          "denied")

    def check(self, caller: Caller, tenant_id: int, obj: str, act: str) -> bool:
        """For servicers: may the caller act on this tenant (per message, per row)?"""
        return self.authorizer.allowed(caller.subject, tenant_id, obj, act)

    async def authenticate(self, context: Context) -> Caller:
        metadata = dict(context.invocation_metadata() or ())
        bearer = str(metadata.get("authorization", ""))
        if bearer.lower().startswith("bearer "):
            info = await self.sessions.resolve(bearer[7:].strip())
            if info is None:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED,
                              "the session has ended or expired: log in again",
                              "unauthenticated")
            subject = f"user:{info.username}"
            roles = tuple(sorted({r for r, _ in self.authorizer.roles_of(subject)}))
            return Caller(subject, info.tenant_id, "user", info, roles)
        auth = context.auth_context()
        pems = list(auth.get("x509_pem_cert") or ()) if auth else []
        if pems:
            caller = self._cert_caller(pems[0])
            roles = tuple(sorted({r for r, _ in self.authorizer.roles_of(caller.subject)}))
            return replace(caller, roles=roles)
        return ANONYMOUS

    def _cert_caller(self, pem: bytes) -> Caller:
        cached = self._certs.get(pem)
        if cached is None:
            cached = self._certs[pem] = certificate_caller(x509.load_pem_x509_certificate(pem))
        return cached

    def _limit(self, caller: Caller, context: Context) -> None:
        # Anonymous callers (logging in) are limited per source address, not as one.
        who = caller.subject if caller is not ANONYMOUS else _host(context.peer())
        for limiter, key in ((self.per_caller, who), (self.per_tenant, caller.tenant_id)):
            verdict = limiter.take(key)
            if verdict is Refusal.NONE:
                continue
            if verdict is Refusal.SUSTAINED:
                self._record(CallState(caller, caller.tenant_id, "sustained_abuse",
                                       {"key": str(key)}), "rate_limit", None, context, "")
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          "too many requests: slow down", "rate_limited")

    # -- wrapping ---------------------------------------------------------------

    def _unary(self, behavior: Callable[..., Awaitable[Any]], method: str,
               rule: MethodRule | None, streaming_in: bool = False) -> Callable[..., Any]:
        @functools.wraps(behavior)
        async def guarded(request: Any, context: Context) -> Any:
            call, request_id = CallState(), self._request_id(context)
            try:
                await self.admit(request, context, method, rule, call, streaming_in)
                token, current = _CALLER.set(call.caller), _CALL.set(call)
                try:
                    return await behavior(request, context)
                finally:
                    _CALL.reset(current)
                    _CALLER.reset(token)
            except Refused as refused:
                call.outcome, call.detail = refused.outcome, {"error": str(refused)}
                await context.abort(refused.code, str(refused))
            except BaseException:
                call.outcome = _outcome(context.code())
                raise
            finally:
                if not (rule and rule.audited_by_handler):
                    self._record(call, method, _object(request, rule, streaming_in), context,
                                 request_id)
        return guarded

    def _streaming(self, behavior: Callable[..., AsyncIterator[Any]], method: str,
                   rule: MethodRule | None) -> Callable[..., AsyncIterator[Any]]:
        @functools.wraps(behavior)
        async def guarded(request: Any, context: Context) -> AsyncIterator[Any]:
            call, request_id = CallState(), self._request_id(context)
            try:
                await self.admit(request, context, method, rule, call)
                token, current = _CALLER.set(call.caller), _CALL.set(call)
                try:
                    async for item in behavior(request, context):
                        yield item
                finally:
                    _CALL.reset(current)
                    _CALLER.reset(token)
            except Refused as refused:
                call.outcome, call.detail = refused.outcome, {"error": str(refused)}
                await context.abort(refused.code, str(refused))
            except BaseException:
                call.outcome = _outcome(context.code())
                raise
            finally:
                self._record(call, method, _object(request, rule, False), context, request_id)
        return guarded

    def _request_id(self, context: Context) -> str:
        metadata = dict(context.invocation_metadata() or ())
        request_id = str(metadata.get("x-request-id") or uuid.uuid4())
        context.set_trailing_metadata((("x-request-id", request_id),))
        return request_id

    def _record(self, call: CallState, method: str, obj: str | None, context: Context,
                request_id: str) -> None:
        span = trace.get_current_span()  # the call's span, when tracing (rmiot.rpc_tracing)
        if span.is_recording():
            span.set_attributes({"rmiot.tenant": call.tenant or 0,
                                 "enduser.id": call.caller.subject,
                                 "rmiot.outcome": call.outcome, "rmiot.request_id": request_id})
        self.audit.append(AuditRecord(
            ts=dt.datetime.now(dt.UTC), actor=call.caller.subject,
            role=",".join(call.caller.roles), tenant_id=call.tenant, method=method, object=obj,
            outcome=call.outcome, source=context.peer(), request_id=request_id,
            detail=call.detail, patient=call.patient))


def certificate_caller(cert: x509.Certificate) -> Caller:
    """The caller a verified client certificate of the platform's CA names:
    ``cert:<common name>``, its kind (OU), and the tenant of its
    ``urn:rmiot:tenant:<id>`` name. Also for the non-gRPC listeners (MLLP)."""
    value = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    name = value.decode() if isinstance(value, bytes) else value
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    kind = str(units[0].value) if units else "platform"
    tenant = None
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        for uri in sans.value.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith(TENANT_URI):
                tenant = int(uri[len(TENANT_URI):])
    except x509.ExtensionNotFound:
        pass
    return Caller(f"cert:{name}", tenant, kind)


def _host(peer: str) -> str:
    """'ipv4:1.2.3.4:5678' -> 'ipv4:1.2.3.4' (the port changes per connection)."""
    return peer.rpartition(":")[0] or peer


def _object(request: Any, rule: MethodRule | None, streaming_in: bool) -> str | None:
    if rule is None or not rule.object_field or streaming_in:
        return None
    return str(getattr(request, rule.object_field, "")) or None


_OUTCOMES = {grpc.StatusCode.PERMISSION_DENIED: "denied",
             grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
             grpc.StatusCode.NOT_FOUND: "not_found",
             grpc.StatusCode.INVALID_ARGUMENT: "invalid",
             grpc.StatusCode.RESOURCE_EXHAUSTED: "rate_limited"}


def _outcome(code: grpc.StatusCode | None) -> str:
    """The audit outcome of a call that ended in an exception."""
    return _OUTCOMES.get(code, "error") if code is not None else "error"
