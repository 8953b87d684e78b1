"""Gateway: the platform's own gRPC API, called as the dashboard's user.

Every call carries the user's session token (``authorization: Bearer``) and
the HTTP request's id (``x-request-id``), so the security interceptor
authenticates, authorises and audits it exactly as for any other client. A
refusal comes back as ``ApiError`` with the HTTP status the page shows:
401 (log in again), 404 (not found, or not the caller's: the same answer),
400, 429, else 503.
"""

from __future__ import annotations

from typing import Any

import grpc

from rmiot.config import Config
from rmiot.grpc_server import channel
from rmiot.proto import (
    alarm_pb2_grpc,
    auth_pb2_grpc,
    query_pb2_grpc,
    registry_pb2_grpc,
)

HTTP_STATUS = {
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 404,  # like NOT_FOUND: ids are not probed
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
}
TIMEOUT_S = 10.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail or message  # the API's own words (for the user's own login)


class Gateway:
    def __init__(self, cfg: Config, port: int) -> None:
        self.channel = channel(cfg, host=cfg.grpc.host, port=port)
        self.auth = auth_pb2_grpc.AuthServiceStub(self.channel)
        self.query = query_pb2_grpc.QueryServiceStub(self.channel)
        self.alarms = alarm_pb2_grpc.AlarmServiceStub(self.channel)
        self.registry = registry_pb2_grpc.RegistryServiceStub(self.channel)

    async def call(self, method: Any, request: Any, token: str, request_id: str) -> Any:
        """``method`` (a stub's) with the user's token; ApiError when refused."""
        metadata = [("x-request-id", request_id)]
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        try:
            return await method(request, metadata=metadata, timeout=TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            status = HTTP_STATUS.get(code, 503)
            message = "not found" if status == 404 else (exc.details() or code.name)
            raise ApiError(status, message, exc.details() or code.name) from None

    async def close(self) -> None:
        await self.channel.close(None)
