"""PolicyService: the security administrator manages roles and rights
(proto/policy.proto). Every method needs ``policy:manage`` on the tenant named
in the request — which only ``security_admin`` holds (migration 0005 enforces
it) — so a hospital's security administrator manages that hospital's subtree
and nothing outside it. The Authorizer's own guards (separation of duties, the
last security administrator) come back as FAILED_PRECONDITION.
"""

from __future__ import annotations

import grpc

from rmiot.grpc_server import Context
from rmiot.proto import policy_pb2, policy_pb2_grpc
from rmiot.security.authz import Authorizer, AuthzError
from rmiot.security.interceptor import MethodRule

SERVICE = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name
RULES = {
    f"/{SERVICE}/Grant": MethodRule("policy", "manage", "tenant_id", "subject"),
    f"/{SERVICE}/Revoke": MethodRule("policy", "manage", "tenant_id", "subject"),
    f"/{SERVICE}/ListGrants": MethodRule("policy", "read", "tenant_id"),
    f"/{SERVICE}/SetPermission": MethodRule("policy", "manage", "tenant_id", "role"),
}


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    async def Grant(self, request: policy_pb2.GrantRequest,
                    context: Context) -> policy_pb2.GrantReply:
        try:
            await self.authorizer.grant(request.subject, request.role, request.tenant_id)
        except AuthzError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return policy_pb2.GrantReply()

    async def Revoke(self, request: policy_pb2.RevokeRequest,
                     context: Context) -> policy_pb2.RevokeReply:
        try:
            revoked = await self.authorizer.revoke(request.subject, request.role,
                                                   request.tenant_id)
        except AuthzError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return policy_pb2.RevokeReply(revoked=revoked)

    async def ListGrants(self, request: policy_pb2.ListGrantsRequest,
                         context: Context) -> policy_pb2.ListGrantsReply:
        subtree = self.authorizer.tree.subtree(request.tenant_id)
        return policy_pb2.ListGrantsReply(grants=[
            policy_pb2.Grant(subject=s, role=r, tenant_id=t)
            for s, r, t in self.authorizer.grants_in(subtree)])

    async def SetPermission(self, request: policy_pb2.SetPermissionRequest,
                            context: Context) -> policy_pb2.SetPermissionReply:
        if self.authorizer.tree.parent(request.tenant_id) is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "a role's rights apply everywhere: only a security "
                                "administrator of the region may change them")
        try:
            await self.authorizer.set_permission(request.role, request.object, request.action,
                                                 request.allow)
        except AuthzError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return policy_pb2.SetPermissionReply()
