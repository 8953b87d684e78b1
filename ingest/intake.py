"""RequestIntake: the path CoAP and HTTP share from a device's request to its
answer, so each of those adapters only speaks its protocol.

1. ``login(username, password, device)``: the login (``ingest.logins``) must be
   live and belong to the device the request names, else ``Refused``
   AUTH_FAILED (no such login, revoked, wrong password) or UNKNOWN_DEVICE (a
   login of another device). Fails closed.
2. ``take(device, payload, json_form)``: the payload's size is checked
   (``Refused`` TOO_LARGE), the adapter waits while the pipeline is paused
   (``ReadGate``: the request is held, nothing dropped), the payload becomes
   events (``ingest.payload``; a JSON body not in the spec's form raises
   ``JsonFormError``, code MALFORMED, and nothing of it is taken), the
   pipeline gets them on the device's ``RequestSession``, and the answer comes
   back once every frame that asked for an ack has it (after commit) or at
   ``timeout_s``, with the commands waiting for the device.
3. ``close()`` when the process stops: new requests, and those the gate
   holds, are refused SHUTTING_DOWN (nothing of them taken; the device sends
   them again); those in the pipeline are still answered.

The adapter renders the answer (``ingest.answers``) in its own way.
"""

from __future__ import annotations

from dataclasses import dataclass

from rmiot.core_ext import Frame
from rmiot.core_ext.jsonform import JsonFormError
from rmiot.ingest.answers import Answer, RequestSession
from rmiot.ingest.logins import LoginView
from rmiot.ingest.payload import json_events, rmf_events
from rmiot.ingest.pipeline import Pipeline
from rmiot.ingest.sessions import ReadGate, Sessions

AUTH_FAILED = "AUTH_FAILED"
UNKNOWN_DEVICE = "UNKNOWN_DEVICE"
TOO_LARGE = "TOO_LARGE"
SHUTTING_DOWN = "SHUTTING_DOWN"


class Refused(Exception):
    """A request refused as a whole; ``code`` says why, the message explains."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Taken:
    answer: Answer
    commands: list[Frame]


class RequestIntake:
    def __init__(self, pipeline: Pipeline, logins: LoginView, max_body_bytes: int,
                 timeout_s: float, kind: str = "request") -> None:
        self.kind = kind  # the transport (coap, http) in metrics and traces
        self.pipeline = pipeline
        self.logins = logins
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s
        self.gate = ReadGate()
        self.sessions: Sessions[int, RequestSession] = Sessions(pipeline, RequestSession)
        self.closing = False

    def start(self) -> None:
        self.pipeline.register(self.gate)
        self.sessions.start()

    def close(self) -> None:
        """Refuse new requests (SHUTTING_DOWN), also those held by the gate;
        requests already in the pipeline still get their answers."""
        self.closing = True
        self.gate.open.set()

    async def stop(self) -> None:
        self.close()
        await self.sessions.stop()
        self.pipeline.unregister(self.gate)

    def login(self, username: str | None, password: str | None, device: int) -> None:
        """Check that the login is live and is ``device``'s; else ``Refused``."""
        owner = self.logins.verify(username, password) if username and password else None
        if owner is None:
            self.pipeline.stats["login_refused"] += 1
            raise Refused(AUTH_FAILED, "no valid device login (a user name and password "
                                       "from the device's transport credentials)")
        if owner != device:
            self.pipeline.stats["login_other_device"] += 1
            raise Refused(UNKNOWN_DEVICE, f"this login is device {owner}'s; it cannot "
                                          f"send for device {device}")

    async def take(self, device: int, payload: bytes, json_form: bool) -> Taken:
        if len(payload) > self.max_body_bytes:
            raise Refused(TOO_LARGE, f"{len(payload)} bytes; at most {self.max_body_bytes}")
        await self.gate.wait()
        if self.closing:
            raise Refused(SHUTTING_DOWN, "the ingest process is stopping; send again")
        view = self.pipeline.view
        try:
            events = json_events(payload, device, view) if json_form else \
                rmf_events(payload, device, view)
        except JsonFormError as exc:
            self.pipeline.stats[exc.code] += 1
            raise
        session = self.sessions.get(device)
        session.kind = self.kind
        answer = Answer(events)
        session.expect(answer)
        if events:
            self.pipeline.accept(list(events), session)
        elif self.pipeline.dispatcher is not None:  # a poll: the device is here
            self.pipeline.dispatcher.device_seen(device, session)
        await answer.wait(self.timeout_s)
        return Taken(answer, session.take_commands())
