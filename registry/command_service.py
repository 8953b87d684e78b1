"""CommandService: people send commands to devices and follow them
(proto/commands.proto; the state machine is ``rmiot.registry.commands``).

Authorised as ``command:write`` (Send) or ``command:read`` (Get, List) on the
request's ``tenant_id`` (0: the caller's home tenant); the rows are limited to
that tenant's subtree, and a device or command outside it is answered
NOT_FOUND, the same as one that does not exist. Queuing a command is all Send
does: the ingest process holding the device's connection is told by NOTIFY
and sends it (``CommandDispatcher``).
"""

from __future__ import annotations

import grpc
import orjson
from psycopg_pool import AsyncConnectionPool

from rmiot.grpc_server import Context, Service
from rmiot.proto import commands_pb2, commands_pb2_grpc
from rmiot.registry import commands
from rmiot.registry.commands import Command, CommandError, CommandNotFound, Param, to_us
from rmiot.security.interceptor import MethodRule, current_caller

SERVICE = commands_pb2.DESCRIPTOR.services_by_name["CommandService"].full_name
RULES = {
    f"/{SERVICE}/Send": MethodRule("command", "write", "tenant_id", "device_id"),
    f"/{SERVICE}/Get": MethodRule("command", "read", "tenant_id", "command_id"),
    f"/{SERVICE}/List": MethodRule("command", "read", "tenant_id", "device_id"),
}
MAX_PAGE = 1000

# The oneof case of a Param <-> the RMF vtype.
_VTYPE = {"f32": 1, "f64": 2, "i32": 3, "i64": 4, "flag": 5, "text": 6, "blob": 7}
_CASE = {v: k for k, v in _VTYPE.items()}
_STATE = {s: commands_pb2.CommandState.Value(f"COMMAND_{s.upper()}") for s in commands.STATES}
_STATE_NAME = {v: k for k, v in _STATE.items()}


def params_from_proto(params: list[commands_pb2.Param]) -> list[Param]:
    out: list[Param] = []
    for p in params:
        case = p.WhichOneof("value")
        if case is None:
            raise CommandError(f"parameter metric {p.metric} has no value")
        out.append((p.metric, _VTYPE[case], getattr(p, case)))
    return out


def params_to_proto(params: list[Param]) -> list[commands_pb2.Param]:
    out = []
    for metric, vtype, value in params:
        p = commands_pb2.Param(metric=metric)
        setattr(p, _CASE[vtype], value)
        out.append(p)
    return out


def command_to_proto(c: Command) -> commands_pb2.Command:
    return commands_pb2.Command(
        id=c.id, device_id=c.device_id, tenant_id=c.tenant_id, name=c.name,
        params=params_to_proto(c.params), state=_STATE[c.state], created_by=c.created_by,
        created_us=to_us(c.created_at), expires_us=to_us(c.expires_at),
        sent_us=to_us(c.sent_at), delivered_us=to_us(c.delivered_at),
        finished_us=to_us(c.finished_at), result_code=c.result_code)


def service(pool: AsyncConnectionPool) -> Service:
    """The servicer to mount (its RULES go to the interceptor)."""
    return Service(SERVICE, commands_pb2_grpc.add_CommandServiceServicer_to_server,
                   CommandServicer(pool))


def _scope(tenant_id: int) -> int:
    return tenant_id or current_caller().tenant_id or 0


class CommandServicer(commands_pb2_grpc.CommandServiceServicer):
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def Send(self, request: commands_pb2.SendCommandRequest,
                   context: Context) -> commands_pb2.SendCommandReply:
        try:
            params = params_from_proto(list(request.params))
            async with self.pool.connection() as conn:
                command = await commands.queue(conn, _scope(request.tenant_id),
                                               request.device_id, request.name, params,
                                               request.ttl_s, current_caller().subject)
        except CommandError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except CommandNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        return commands_pb2.SendCommandReply(command_id=command.id,
                                             expires_us=to_us(command.expires_at))

    async def Get(self, request: commands_pb2.GetCommandRequest,
                  context: Context) -> commands_pb2.Command:
        async with self.pool.connection() as conn:
            command = await commands.get(conn, _scope(request.tenant_id), request.command_id)
            events = await commands.history(conn, request.command_id) if command else []
        if command is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"command {request.command_id} not found")
        reply = command_to_proto(command)
        reply.history.extend(commands_pb2.CommandEvent(
            at_us=to_us(e.at), state=_STATE[e.state],
            detail_json=orjson.dumps(e.detail).decode() if e.detail is not None else "")
            for e in events)
        return reply

    async def List(self, request: commands_pb2.ListCommandsRequest,
                   context: Context) -> commands_pb2.ListCommandsReply:
        size = min(request.page_size or 100, MAX_PAGE)
        if size < 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_size: 1..1000 (0: 100)")
        if request.state and request.state not in _STATE_NAME:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "state: unknown value")
        async with self.pool.connection() as conn:
            found = await commands.find(
                conn, _scope(request.tenant_id), device_id=request.device_id,
                state=_STATE_NAME.get(request.state, ""), before_id=request.before_id,
                limit=size)
        return commands_pb2.ListCommandsReply(
            commands=[command_to_proto(c) for c in found],
            next_before_id=found[-1].id if len(found) == size else 0)

