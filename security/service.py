"""Everything security a platform process runs, assembled in one place: the
keyring, the session store, the Authorizer, the audit log, the interceptor that
every gRPC method goes through, and AuthService. Other services add their
method rules with ``add_rules`` before the server starts; a method without a
rule is refused (see ``interceptor``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from psycopg_pool import AsyncConnectionPool

from rmiot import db
from rmiot.config import Config
from rmiot.grpc_server import Service
from rmiot.proto import audit_pb2_grpc, auth_pb2_grpc, policy_pb2_grpc
from rmiot.security import audit_service, auth_service, policy_service
from rmiot.security.audit import AuditLog, AuditRecord
from rmiot.security.authz import Authorizer
from rmiot.security.interceptor import MethodRule, SecurityInterceptor
from rmiot.security.sessions import SessionStore
from rmiot.security.sm4 import Keyring


class SecurityServices:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.dsn = db.app_dsn(cfg)
        self.keyring = Keyring.load(cfg.keyring_dir)
        self.sessions = SessionStore(self.dsn, cfg.security.session_idle_minutes,
                                     cfg.security.password_max_age_days)
        self.authorizer = Authorizer(self.dsn)
        self.audit = AuditLog(self.dsn, checkpoints=cfg.audit_checkpoints,
                              checkpoint_interval_s=cfg.security.audit_checkpoint_interval_s)
        self.rules: dict[str, MethodRule] = {**auth_service.RULES, **policy_service.RULES,
                                             **audit_service.RULES}
        self.interceptor = SecurityInterceptor(
            self.rules, self.sessions, self.authorizer, self.audit,
            caller_rate=cfg.security.caller_rate_per_s,
            tenant_rate=cfg.security.tenant_rate_per_s)
        self.pool: AsyncConnectionPool | None = None
        self.auth: auth_service.AuthServicer | None = None
        self.audit_reader: audit_service.AuditServicer | None = None

    def ingest_abuse(self, kind: str, key: int) -> None:
        """The ingest path's report of a device or tenant flooding it."""
        self.audit.append(AuditRecord(
            ts=dt.datetime.now(dt.UTC), actor=f"{kind}:{key}", role=None,
            tenant_id=key if kind == "tenant" else None, method="ingest", object=None,
            outcome="sustained_abuse", source="ingest", request_id="",
            detail={"limit": f"ingest.{kind}_rate_per_s"}, patient=None))

    def add_rules(self, rules: Mapping[str, MethodRule]) -> None:
        self.rules.update(rules)

    async def start(self) -> None:
        self.pool = await db.open_pool(self.dsn, 1, self.cfg.database.pool_max)
        await self.audit.start()
        await self.authorizer.start()
        await self.sessions.start()
        self.auth = auth_service.AuthServicer(self.pool, self.cfg.security, self.keyring,
                                              self.sessions, self.authorizer, self.audit)
        self.audit_reader = audit_service.AuditServicer(self.pool, self.authorizer)

    def services(self) -> list[Service]:
        assert self.auth is not None and self.audit_reader is not None, "start() first"
        return [
            Service(auth_service.SERVICE, auth_pb2_grpc.add_AuthServiceServicer_to_server,
                    self.auth),
            Service(policy_service.SERVICE, policy_pb2_grpc.add_PolicyServiceServicer_to_server,
                    policy_service.PolicyServicer(self.authorizer)),
            Service(audit_service.SERVICE, audit_pb2_grpc.add_AuditServiceServicer_to_server,
                    self.audit_reader),
        ]

    async def stop(self) -> None:
        await self.sessions.stop()
        await self.authorizer.stop()
        await self.audit.stop()
        if self.pool is not None:
            await self.pool.close()
