"""One message from one authenticated device, as pipeline events: what the
message transports (MQTT, CoAP, HTTP) share before the pipeline.

A message carries RMF frames back to back (``rmf_events``) or the spec's JSON
form (``json_events``). The transport has already proven which device sent it —
the broker's login and ACL for MQTT, the device's credentials for CoAP and
HTTP — so the device id comes from there, never from the payload:

- RMF: decoded as a TCP stream that ends with the message (an incomplete frame
  at its end is TRUNCATED). A frame naming another device becomes a
  ``Refusal`` with code UNKNOWN_DEVICE, which the pipeline NACKs like any error
  event: a login speaks for its own device only — and, for a gateway, for the
  devices registered behind it (``devices.gateway_id``) — so no device can put
  data under another's id, HMAC or not. (A frame with the right device but
  another tenant is the pipeline's TENANT_MISMATCH.) Acks for a gateway's
  children go down the gateway's topic or answer, and so do their commands.
- JSON form: validated by ``core_ext.jsonform`` (a payload that is not the form
  raises ``JsonFormError``, code MALFORMED, and none of it is taken); each
  reading becomes the RMF frame it stands for, for the device and its tenant
  in the registry view, with ACK_REQ set: a JSON device always gets its
  readings confirmed. A device the view does not know gets tenant 0, which
  the pipeline refuses as UNKNOWN_DEVICE.

Everything after this — device state, tenant, HMAC policy, time window, rate
limits, duplicates, acks after commit — is the pipeline's, the same for every
transport.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rmiot.core_ext import FLAG_ACK_REQ, Frame, FrameDecoder
from rmiot.core_ext.jsonform import parse_json_form
from rmiot.registry.view import DeviceView

Event = Any  # Frame | DecodeError | Refusal: what Pipeline.accept takes

UNKNOWN_DEVICE = "UNKNOWN_DEVICE"
MAX_DEVICE_ID = (1 << 63) - 1  # the registry's range: 1 .. 2^63-1


def device_id(text: str) -> int | None:
    """The device id a topic level or path segment names, or None when it is
    not a decimal number in the registry's range."""
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        return None
    value = int(text)
    return value if 1 <= value <= MAX_DEVICE_ID else None


@dataclass(frozen=True, slots=True)
class Refusal:
    """An error event an adapter decides; the same fields the pipeline reads
    from a ``DecodeError`` (it counts ``code`` and NACKs it if ``ack_req``)."""

    code: str
    tenant: int
    device: int
    seq: int
    ack_req: bool
    offset: int = 0
    length: int = 0


def rmf_events(payload: bytes, device: int, view: DeviceView) -> list[Event]:
    """The frames of one RMF message from ``device``, checked to be its own
    or, for a gateway, its children's."""
    decoder = FrameDecoder(view.key)
    events: list[Event] = decoder.feed(payload)
    events += decoder.eof()
    for i, ev in enumerate(events):
        if type(ev) is Frame and ev.device != device and not _behind(view, ev.device, device):
            events[i] = Refusal(UNKNOWN_DEVICE, ev.tenant, ev.device, ev.seq, ev.ack_req)
    return events


def _behind(view: DeviceView, child: int, gateway: int) -> bool:
    entry = view.get(child)
    return entry is not None and entry.gateway_id == gateway


def json_events(payload: bytes, device: int, view: DeviceView) -> list[Event]:
    """The readings of one JSON-form message from ``device``, as frames that
    ask for acks. Raises ``JsonFormError`` when the payload is not the form."""
    readings = parse_json_form(payload)
    entry = view.get(device)
    tenant = entry.tenant_id if entry is not None else 0
    raw = b"".join(r.encode(tenant, device, flags=FLAG_ACK_REQ) for r in readings)
    events: list[Event] = FrameDecoder().feed(raw)
    return events
