"""Answers to requests (CoAP, HTTP): a request's payload is answered once the
pipeline has answered each of its frames, i.e. after their commit.

``Answer`` holds one request's events and what became of each, in payload
order. Decoder errors and refusals are known at once (their code), and so is a
frame that did not ask for an ack (``ACCEPTED``: taken, not confirmed — as
over TCP, a device that wants to know sets ACK_REQ; the JSON form always
does). A frame that asked waits for its ack from the pipeline: OK or DUPLICATE
after the commit, or a refusal code at once. ``wait(timeout)`` returns when no
frame waits any more, or at the timeout, leaving the rest ``PENDING`` (not
known to be stored: the device sends them again; a resend is never stored
twice). Their acks, when they come, are still matched to them, not to a later
request's frames.

``RequestSession`` is the device's session (``ingest.sessions``) on a
request/response transport: acks the pipeline sends it go to the answers
waiting for them, matched by (device, seq) in the order the frames came (the
only thing an ack names); COMMAND frames wait in a mailbox for the device's
next response, or go out at once to its CoAP observation if it has one (which
also keeps the session from ending while it lasts). A command handed out in a
response counts as sent: the device confirms it with a COMMAND_RESULT, and if
it does not before the session ends, the dispatcher queues it again.

Renderings: ``ack_frames`` (the binary acks, as TCP would have sent them),
``results_json`` / ``commands_json`` (the JSON forms). A device on the JSON form
answers a command with a reading of kind 5 whose fields are
``[[0, 4, <command id>], [1, <result code>]]`` (the id as an int64, vtype 4).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence

from rmiot.core_ext import ACK_STATUS, Frame, encode_ack
from rmiot.ingest.payload import Event
from rmiot.ingest.sessions import DeviceSession, read_downlink

ACCEPTED = "ACCEPTED"
PENDING = "PENDING"
STATUS_NAMES = {status: name for name, status in ACK_STATUS.items() if name != "FUTURE"}


class Answer:
    """What one request's events came to; see the module's docstring."""

    def __init__(self, events: Sequence[Event]) -> None:
        self.events = events
        self.statuses: list[str | None] = [None] * len(events)
        self.waiting = 0
        self._done = asyncio.Event()

    def resolve(self, index: int, status: int) -> None:
        if self.statuses[index] is None:
            self.statuses[index] = STATUS_NAMES.get(status, str(status))
            self.waiting -= 1
            if not self.waiting:
                self._done.set()

    async def wait(self, timeout: float) -> None:
        if self.waiting:
            try:
                async with asyncio.timeout(timeout):
                    await self._done.wait()
            except TimeoutError:
                pass
        self.statuses = [PENDING if s is None else s for s in self.statuses]

    @property
    def complete(self) -> bool:
        return not self.waiting

    def ack_frames(self) -> bytes:
        """The ACK frames of the frames that asked for one and were answered."""
        now_us = time.time_ns() // 1000
        out = bytearray()
        for ev, name in zip(self.events, self.statuses, strict=True):
            status = ACK_STATUS.get(name or "")
            if ev.ack_req and status is not None:
                out += encode_ack(ev.tenant, ev.device, ev.seq, now_us, status)
        return bytes(out)

    def results_json(self) -> list[dict[str, object]]:
        """One object per event: seq and status (and where, for a decoder error)."""
        out: list[dict[str, object]] = []
        for ev, name in zip(self.events, self.statuses, strict=True):
            item: dict[str, object] = {"seq": ev.seq, "status": name}
            if type(ev) is not Frame:
                item["offset"] = ev.offset
            out.append(item)
        return out


def commands_json(commands: Sequence[Frame]) -> list[dict[str, object]]:
    """COMMAND frames as ``{"id", "seq", "params": [[metric, vtype, value], ...]}``
    (bytes values as ``{"hex": ...}``, as in the JSON form)."""
    out: list[dict[str, object]] = []
    for frame in commands:
        fields = frame.fields()
        command_id = next((v for m, _, v in fields if m == 0), None)
        params = [[m, vt, {"hex": v.hex()} if isinstance(v, bytes) else v]
                  for m, vt, v in fields if m != 0]
        out.append({"id": command_id, "seq": frame.seq, "params": params})
    return out


class RequestSession(DeviceSession):
    kind = "request"  # the transport's name in metrics and traces (set by its intake)
    """A device's session on CoAP or HTTP; see the module's docstring."""

    def __init__(self, device: int) -> None:
        super().__init__(device)
        self.waiting: dict[tuple[int, int], deque[tuple[Answer, int]]] = {}
        self.mailbox: list[Frame] = []
        # Called when commands arrive, while the device observes them (CoAP).
        self.observer: Callable[[], None] | None = None

    @property
    def held(self) -> bool:
        return self.observer is not None

    def expect(self, answer: Answer) -> None:
        """Settle what is known of ``answer`` now and wait for the acks of the
        rest. Call it before handing the events to the pipeline."""
        statuses = answer.statuses
        for i, ev in enumerate(answer.events):
            if type(ev) is Frame:
                if not ev.ack_req:
                    statuses[i] = ACCEPTED
                    continue
                answer.waiting += 1
            else:
                statuses[i] = ev.code
                if not (ev.ack_req and ev.code in ACK_STATUS):
                    continue
                # Its NACK comes too: queue it so it is not taken for a frame's.
            self.waiting.setdefault((ev.device, ev.seq), deque()).append((answer, i))

    def send(self, data: bytes) -> None:
        acks, commands = read_downlink(data)
        waiting = self.waiting
        for device, seq, status in acks:
            queue = waiting.get((device, seq))
            if queue:
                answer, index = queue.popleft()
                if not queue:
                    del waiting[(device, seq)]
                answer.resolve(index, status)
        if commands:
            self.mailbox.extend(commands)
            if self.observer is not None:
                self.observer()

    def take_commands(self) -> list[Frame]:
        """The commands waiting for the device's next response (now handed out)."""
        commands, self.mailbox = self.mailbox, []
        return commands
