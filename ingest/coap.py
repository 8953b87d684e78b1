"""RMF and the JSON form over CoAP (aiocoap), on a UDP port of its own
(``coap.port``).

Resources, all needing the device's login as query options
``?u=<username>&p=<password>`` (its transport credentials):

=======================  ==========================================================
``POST /rmf/<id>``       RMF frames back to back (content format
                         application/octet-stream, 42, or none). Answer 2.04
                         with the ACK frames as the payload — after commit — then
                         any COMMAND frames waiting for the device.
``POST /json/<id>``      the spec's JSON form (application/json, 50, or none).
                         Answer 2.04 ``{"results": [{"seq", "status"}...],
                         "commands": [...]}``.
``GET /cmd/<id>``        with Observe: each notification carries the COMMAND
                         frames sent to the device since the last one
                         (``Accept: application/json`` for the JSON shape).
=======================  ==========================================================

A confirmable request is answered when its frames are committed: aiocoap
acknowledges the CON at once (empty ACK) and sends the answer as a separate
response, so the device does not retransmit meanwhile. An empty POST is a
poll for commands.

Refusals, with ``{"error": {"code", "detail"}}`` (application/json): 4.01
AUTH_FAILED (no or a wrong login), 4.03 UNKNOWN_DEVICE (another device's login),
4.00 MALFORMED (with ``reason`` and ``path``: a JSON body not in the form),
4.13 TOO_LARGE (over ``coap.max_body_bytes``), 4.15 for another content format,
4.04 for another path, 5.03 SHUTTING_DOWN while the process stops. Refusals
per frame (CRC, HMAC, tenant, state, window, rate) are in the answer, as over
TCP; nothing else in the request is lost.

Why the login is a query, not OSCORE or DTLS: constrained devices that cannot
build an RMF frame cannot run OSCORE either, and aiocoap's DTLS server is
experimental. The query is plain text on the wire, like HTTP Basic without TLS:
plain CoAP is for loopback and trusted networks (development, a hospital's
device VLAN); elsewhere devices should sign their frames (HMAC) or use HTTPS.

Observe carries commands because a device that observes ``/cmd/<id>`` can be
told at once instead of on its next upload; the observation keeps the device's
session (and so its place with the command dispatcher) alive. Notifications
are best effort (CoAP Observe is lossy): a command counts as sent when it
goes out; until the device answers it with a COMMAND_RESULT it is sent again
after the session ends.
"""

from __future__ import annotations

import json
from typing import Any

import aiocoap
import aiocoap.interfaces
import aiocoap.resource
from aiocoap.numbers.codes import Code

from rmiot.config import Config
from rmiot.core_ext.jsonform import JsonFormError
from rmiot.ingest.answers import commands_json
from rmiot.ingest.intake import (
    AUTH_FAILED,
    SHUTTING_DOWN,
    TOO_LARGE,
    UNKNOWN_DEVICE,
    Refused,
    RequestIntake,
)
from rmiot.ingest.logins import LoginView
from rmiot.ingest.payload import device_id
from rmiot.ingest.pipeline import Pipeline

OCTETS = 42
JSON = 50
_REFUSED = {AUTH_FAILED: Code.UNAUTHORIZED, UNKNOWN_DEVICE: Code.FORBIDDEN,
            TOO_LARGE: Code.REQUEST_ENTITY_TOO_LARGE, SHUTTING_DOWN: Code.SERVICE_UNAVAILABLE}


def _error(code: Code, name: str, detail: str, **extra: object) -> aiocoap.Message:
    body = json.dumps({"error": {"code": name, "detail": detail, **extra}}).encode()
    return aiocoap.Message(code=code, payload=body, content_format=JSON)


def _json(code: Code, value: object) -> aiocoap.Message:
    return aiocoap.Message(code=code, payload=json.dumps(value, ensure_ascii=False).encode(),
                           content_format=JSON)


# aiocoap has no type information: its classes are Any to mypy.
class _DeviceResource(aiocoap.resource.Resource,  # type: ignore[misc]
                      aiocoap.resource.PathCapable):  # type: ignore[misc]
    """Base of the resources under ``/<kind>/<device id>``."""

    def __init__(self, adapter: CoapAdapter) -> None:
        super().__init__()
        self.adapter = adapter

    def device(self, request: Any) -> int:
        """The device the path names, once its login is checked (else Refused)."""
        path = request.opt.uri_path
        device = device_id(path[0]) if len(path) == 1 else None
        if device is None:
            raise LookupError
        query = dict(q.partition("=")[::2] for q in request.opt.uri_query)
        self.adapter.intake.login(query.get("u"), query.get("p"), device)
        return device


class _Upload(_DeviceResource):
    def __init__(self, adapter: CoapAdapter, json_form: bool) -> None:
        super().__init__(adapter)
        self.json_form = json_form

    async def render_post(self, request: Any) -> aiocoap.Message:
        wanted = JSON if self.json_form else OCTETS
        if request.opt.content_format not in (None, wanted):
            return _error(Code.UNSUPPORTED_CONTENT_FORMAT, "UNSUPPORTED_MEDIA",
                          f"content format {wanted} here")
        try:
            device = self.device(request)
            taken = await self.adapter.intake.take(device, request.payload, self.json_form)
        except LookupError:
            return _error(Code.NOT_FOUND, "NOT_FOUND", "use /rmf/<device id> or /json/<device id>")
        except Refused as exc:
            return _error(_REFUSED[exc.code], exc.code, exc.detail)
        except JsonFormError as exc:
            return _error(Code.BAD_REQUEST, exc.code, exc.detail, reason=exc.reason,
                          path=exc.path)
        if self.json_form:
            return _json(Code.CHANGED, {"results": taken.answer.results_json(),
                                        "commands": commands_json(taken.commands)})
        payload = taken.answer.ack_frames() + b"".join(c.raw for c in taken.commands)
        return aiocoap.Message(code=Code.CHANGED, payload=payload, content_format=OCTETS)


class _Commands(_DeviceResource, aiocoap.interfaces.ObservableResource):  # type: ignore[misc]
    """``GET /cmd/<id>``, observable: the commands waiting for the device."""

    async def add_observation(self, request: Any, serverobservation: Any) -> None:
        try:
            device = self.device(request)
        except (LookupError, Refused):
            return  # not accepted: render answers the error and ends it
        intake = self.adapter.intake
        session = intake.sessions.get(device)
        trigger = serverobservation.trigger  # called with no response: render anew
        session.observer = trigger

        def ended() -> None:
            if session.observer is trigger:
                session.observer = None

        serverobservation.accept(ended)
        if intake.pipeline.dispatcher is not None:  # it may have commands waiting
            intake.pipeline.dispatcher.device_seen(device, session)

    async def render_get(self, request: Any) -> aiocoap.Message:
        try:
            device = self.device(request)
        except LookupError:
            return _error(Code.NOT_FOUND, "NOT_FOUND", "use /cmd/<device id>")
        except Refused as exc:
            return _error(_REFUSED[exc.code], exc.code, exc.detail)
        commands = self.adapter.intake.sessions.get(device).take_commands()
        if request.opt.accept == JSON:
            return _json(Code.CONTENT, {"commands": commands_json(commands)})
        return aiocoap.Message(code=Code.CONTENT, payload=b"".join(c.raw for c in commands),
                               content_format=OCTETS)


class CoapAdapter:
    def __init__(self, cfg: Config, pipeline: Pipeline, logins: LoginView) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.intake = RequestIntake(pipeline, logins, cfg.coap.max_body_bytes,
                                    cfg.coap.answer_timeout_s, "coap")
        self.site = aiocoap.resource.Site()
        self.site.add_resource(["rmf"], _Upload(self, json_form=False))
        self.site.add_resource(["json"], _Upload(self, json_form=True))
        self.site.add_resource(["cmd"], _Commands(self))
        self.context: aiocoap.Context | None = None
        self.port = 0

    async def start(self) -> int:
        """Listen; returns the UDP port bound."""
        self.intake.start()
        self.context = await aiocoap.Context.create_server_context(
            self.site, bind=(self.cfg.coap.host, self.cfg.coap.port), transports=["udp6"])
        self.port = self.cfg.coap.port or _bound_port(self.context)
        return self.port

    async def stop_taking(self) -> None:
        """Refuse new requests (5.03); those waiting for a commit still get answered."""
        self.intake.close()

    async def stop(self) -> None:
        if self.context is not None:
            await self.context.shutdown()
            self.context = None
        await self.intake.stop()


def _bound_port(context: aiocoap.Context) -> int:
    # aiocoap does not say which port "0" became; its UDP transport's socket does.
    for interface in context.request_interfaces:
        messages = getattr(getattr(interface, "token_interface", None), "message_interface",
                           None)
        transport = getattr(messages, "transport", None)
        if transport is not None:
            return int(transport.get_extra_info("socket").getsockname()[1])
    raise RuntimeError("the CoAP server has no UDP socket")
