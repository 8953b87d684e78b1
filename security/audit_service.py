"""AuditService: auditors read the audit trail (proto/audit.proto).

Authorised as ``audit:read`` on the tenant asked for (only ``auditor`` and
``audit_admin`` hold it — never the system administrator), and the rows are
limited to that tenant's subtree, so a hospital's auditor sees that hospital's
records; at the region's root, everything, including records of no tenant.
"Who looked at this patient's records" is a query by the patient's pseudonym.
Reading the trail is itself audited (by the interceptor).
"""

from __future__ import annotations

import datetime as dt

import orjson
from psycopg_pool import AsyncConnectionPool

from rmiot.grpc_server import Context
from rmiot.proto import audit_pb2, audit_pb2_grpc
from rmiot.security.authz import Authorizer
from rmiot.security.interceptor import MethodRule, current_caller

SERVICE = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name
RULES = {f"/{SERVICE}/Query": MethodRule(obj="audit", act="read", tenant_field="tenant_id")}
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, pool: AsyncConnectionPool, authorizer: Authorizer) -> None:
        self.pool = pool
        self.authorizer = authorizer

    async def Query(self, request: audit_pb2.AuditQuery, context: Context) -> audit_pb2.AuditPage:
        tenant = request.tenant_id or current_caller().tenant_id or 0
        size = min(request.page_size or 100, 1000)
        where = ["true"]
        params: list[object] = []
        if self.authorizer.tree.parent(tenant) is not None:
            # Below the root: that subtree's records only. (The root's auditor also
            # sees records with no tenant: logins, platform-wide actions.)
            where.append("tenant_id = ANY(%s)")
            params.append(sorted(self.authorizer.tree.subtree(tenant)))
        for column, value in (("actor", request.actor), ("patient", request.patient)):
            if value:
                where.append(f"{column} = %s")
                params.append(value)
        if request.from_us:
            where.append("ts >= %s")
            params.append(EPOCH + dt.timedelta(microseconds=request.from_us))
        if request.to_us:
            where.append("ts < %s")
            params.append(EPOCH + dt.timedelta(microseconds=request.to_us))
        if request.before_id:
            where.append("id < %s")
            params.append(request.before_id)
        sql = ("SELECT id, ts, actor, role, tenant_id, method, object, outcome, source, "
               "request_id, patient, detail, hash FROM audit_log WHERE "
               + " AND ".join(where) + " ORDER BY id DESC LIMIT %s")
        params.append(size)
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql.encode(), params)
            rows = await cur.fetchall()
        entries = [audit_pb2.AuditEntry(
            id=r[0], ts_us=(r[1] - EPOCH) // dt.timedelta(microseconds=1), actor=r[2],
            role=r[3] or "", tenant_id=r[4] or 0, method=r[5], object=r[6] or "",
            outcome=r[7], source=r[8] or "", request_id=r[9] or "", patient=r[10] or "",
            detail_json=orjson.dumps(r[11]).decode() if r[11] is not None else "",
            hash=bytes(r[12])) for r in rows]
        return audit_pb2.AuditPage(entries=entries,
                                   next_before_id=rows[-1][0] if len(rows) == size else 0)
