"""RMF and the JSON form over HTTP(S) (aiohttp), for devices that speak only HTTP.

``POST /v1/devices/<device id>/frames`` with HTTP Basic (the device's
transport credentials) and a body of

- ``application/octet-stream``: RMF frames back to back, or
- ``application/json``: the spec's JSON form (one reading or a list).

The answer comes once the frames are committed (or at
``http.answer_timeout_s``):

- by default JSON: ``{"device", "results": [{"seq", "status"}, ...],
  "commands": [{"id", "seq", "params"}, ...]}``, one result per frame or
  reading in body order, status OK, DUPLICATE (stored before: treat as OK),
  a refusal code (UNKNOWN_DEVICE, TENANT_MISMATCH, STALE/FUTURE, RATE_LIMITED,
  AUTH_REQUIRED, BAD_CRC, AUTH_FAILED, MALFORMED, TRUNCATED...), ACCEPTED (an
  RMF frame without ACK_REQ: taken, not confirmed) or PENDING (not committed
  by the timeout: send it again later, it is never stored twice);
- with ``Accept: application/octet-stream``: the ACK frames, as TCP would have
  sent them, then any COMMAND frames for the device.

Status 200 when every frame has its answer, 202 when some are PENDING. An
empty body is a poll for commands.

Whole-request refusals, each ``{"error": {"code", "detail"}}``: 401
AUTH_FAILED (no or a wrong login; with ``WWW-Authenticate``), 403
UNKNOWN_DEVICE (another device's login), 400 MALFORMED (a JSON body not in the
form, with ``reason`` and ``path``; nothing of it is stored), 413 TOO_LARGE
(over ``http.max_body_bytes``), 415 UNSUPPORTED_MEDIA, 404 NOT_FOUND, 503
SHUTTING_DOWN while the process stops. The
login is checked before the body is read.

Several ingest processes share the port (SO_REUSEPORT), as over TCP.
``http.tls``: HTTPS with the platform's certificate (``tls.cert_file``, by
default the dev CA's server certificate).
"""

from __future__ import annotations

import base64
import binascii
import ssl

from aiohttp import web

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
    Taken,
)
from rmiot.ingest.logins import LoginView
from rmiot.ingest.payload import device_id
from rmiot.ingest.pipeline import Pipeline

OCTETS = "application/octet-stream"
JSON = "application/json"
_REFUSED = {AUTH_FAILED: 401, UNKNOWN_DEVICE: 403, TOO_LARGE: 413, SHUTTING_DOWN: 503}


def _error(status: int, code: str, detail: str, **extra: object) -> web.Response:
    headers = {"WWW-Authenticate": 'Basic realm="rmiot devices"'} if status == 401 else None
    return web.json_response({"error": {"code": code, "detail": detail, **extra}},
                             status=status, headers=headers)


def basic_login(header: str | None) -> tuple[str | None, str | None]:
    """(username, password) of an ``Authorization: Basic`` header, or Nones."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        user, sep, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    return (user, password) if sep else (None, None)


class HttpAdapter:
    def __init__(self, cfg: Config, pipeline: Pipeline, logins: LoginView) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.intake = RequestIntake(pipeline, logins, cfg.http.max_body_bytes,
                                    cfg.http.answer_timeout_s, "http")
        self.app = web.Application(client_max_size=cfg.http.max_body_bytes)
        self.app.router.add_post("/v1/devices/{device}/frames", self.post_frames)
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> int:
        """Listen; returns the port bound."""
        self.intake.start()
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                    shutdown_timeout=5.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.cfg.http.host, self.cfg.http.port,
                           reuse_port=True, backlog=4096, ssl_context=self._tls())
        await site.start()
        self.port = int(self.runner.addresses[0][1])
        return self.port

    def _tls(self) -> ssl.SSLContext | None:
        if not self.cfg.http.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cfg.tls_path("cert_file"), self.cfg.tls_path("key_file"))
        return context

    async def stop_taking(self) -> None:
        """Refuse new requests (503); those waiting for a commit still get answered."""
        self.intake.close()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        await self.intake.stop()

    async def post_frames(self, request: web.Request) -> web.Response:
        device = device_id(request.match_info["device"])
        if device is None:
            return _error(404, "NOT_FOUND", "use /v1/devices/<device id>/frames")
        if request.content_type not in (OCTETS, JSON):
            return _error(415, "UNSUPPORTED_MEDIA", f"send {OCTETS} (RMF) or {JSON} "
                                                    "(the JSON form)")
        try:
            self.intake.login(*basic_login(request.headers.get("Authorization")), device)
            if (request.content_length or 0) > self.intake.max_body_bytes:
                raise Refused(TOO_LARGE, f"{request.content_length} bytes; at most "
                                         f"{self.intake.max_body_bytes}")
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise Refused(TOO_LARGE, f"at most {self.intake.max_body_bytes} bytes") from None
            taken = await self.intake.take(device, body, request.content_type == JSON)
        except Refused as exc:
            return _error(_REFUSED[exc.code], exc.code, exc.detail)
        except JsonFormError as exc:
            return _error(400, exc.code, exc.detail, reason=exc.reason, path=exc.path)
        return self._answer(request, device, taken)

    def _answer(self, request: web.Request, device: int, taken: Taken) -> web.Response:
        status = 200 if taken.answer.complete else 202
        if OCTETS in request.headers.get("Accept", ""):
            body = taken.answer.ack_frames() + b"".join(c.raw for c in taken.commands)
            return web.Response(body=body, status=status, content_type=OCTETS)
        return web.json_response({"device": device, "results": taken.answer.results_json(),
                                  "commands": commands_json(taken.commands)}, status=status)
