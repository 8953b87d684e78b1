"""AuthService: log in, log out, change password, who am I (proto/auth.proto).

Login is public; it writes its own audit record (the interceptor does not), so
the record names the user name tried and why a login failed. Every failure,
lockout and success is in the audit chain.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import grpc
from psycopg_pool import AsyncConnectionPool

from rmiot.config import SecurityConfig
from rmiot.grpc_server import Context
from rmiot.proto import auth_pb2, auth_pb2_grpc
from rmiot.security import identity
from rmiot.security.audit import AuditRecord
from rmiot.security.interceptor import AuditSink, Authorizer, MethodRule, current_caller
from rmiot.security.passwords import PasswordPolicyError
from rmiot.security.sessions import SessionStore
from rmiot.security.sm4 import Keyring

SERVICE = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
RULES = {
    f"/{SERVICE}/Login": MethodRule(public=True, audited_by_handler=True),
    f"/{SERVICE}/Logout": MethodRule(any_caller=True, during_password_change=True),
    f"/{SERVICE}/ChangePassword": MethodRule(any_caller=True, during_password_change=True),
    f"/{SERVICE}/WhoAmI": MethodRule(any_caller=True, during_password_change=True),
}


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, pool: AsyncConnectionPool, cfg: SecurityConfig, keyring: Keyring,
                 sessions: SessionStore, authorizer: Authorizer, audit: AuditSink) -> None:
        self.pool = pool
        self.cfg = cfg
        self.keyring = keyring
        self.sessions = sessions
        self.authorizer = authorizer
        self.audit = audit

    def requires_totp(self, username: str) -> bool:
        roles = {role for role, _ in self.authorizer.roles_of(f"user:{username}")}
        return bool(roles & identity.ADMIN_ROLES)

    async def Login(self, request: auth_pb2.LoginRequest,
                    context: Context) -> auth_pb2.LoginReply:
        source = context.peer()
        try:
            async with self.pool.connection() as conn:
                result = await identity.login(conn, self.cfg, self.keyring, request.username,
                                              request.password, request.totp, source,
                                              self.requires_totp)
        except identity.LoginError as exc:
            self._audit(request.username, "failed_login", source, context,
                        {"code": exc.code}, None)
            code = (grpc.StatusCode.PERMISSION_DENIED if exc.code == "LOCKED"
                    else grpc.StatusCode.UNAUTHENTICATED)
            await context.abort(code, str(exc))
        self.sessions.remember(result.session)
        self._audit(request.username, "ok", source, context,
                    {"password_change_required": result.session.password_change_only},
                    result.session.tenant_id)
        return auth_pb2.LoginReply(
            token=result.token,
            password_change_required=result.session.password_change_only,
            idle_timeout_s=self.cfg.session_idle_minutes * 60)

    async def Logout(self, request: auth_pb2.LogoutRequest,
                     context: Context) -> auth_pb2.LogoutReply:
        caller = current_caller()
        if caller.session is not None:
            await self.sessions.end(caller.session, "logout")
        return auth_pb2.LogoutReply()

    async def ChangePassword(self, request: auth_pb2.ChangePasswordRequest,
                             context: Context) -> auth_pb2.ChangePasswordReply:
        caller = current_caller()
        if caller.session is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "certificate holders have no password")
        session = caller.session
        try:
            async with self.pool.connection() as conn:
                await identity.change_password(conn, session.user_id, session.username,
                                               request.old_password, request.new_password)
        except PasswordPolicyError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except identity.LoginError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        self.sessions.clear_password_change(session)
        return auth_pb2.ChangePasswordReply()

    async def WhoAmI(self, request: auth_pb2.WhoAmIRequest,
                     context: Context) -> auth_pb2.WhoAmIReply:
        caller = current_caller()
        return auth_pb2.WhoAmIReply(
            subject=caller.subject, tenant_id=caller.tenant_id or 0,
            roles=[auth_pb2.RoleGrant(role=r, tenant_id=t)
                   for r, t in self.authorizer.roles_of(caller.subject)])

    def _audit(self, username: str, outcome: str, source: str,
               context: Context, detail: dict[str, Any], tenant_id: int | None) -> None:
        metadata = dict(context.invocation_metadata() or ())
        self.audit.append(AuditRecord(
            ts=dt.datetime.now(dt.UTC), actor=f"user:{username}", role="", tenant_id=tenant_id,
            method=f"/{SERVICE}/Login", object=None, outcome=outcome, source=source,
            request_id=str(metadata.get("x-request-id", "")), detail=detail, patient=None))


def add_to_server(servicer: AuthServicer, server: grpc.aio.Server) -> None:
    auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server)
