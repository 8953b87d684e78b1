"""JSON shapes of RMF v1: the vectors' decoded-frame shape and the devices' JSON form.

Pure Python, no I/O.  Two jobs:

* Decoder events to and from the shape of ``frame-v1-vectors.json`` (what
  ``rmiot frame decode`` prints, one object a line): ``frame_to_json``,
  ``error_to_json``, ``event_to_json``; and ``frame_from_json``, which builds
  the exact frame bytes back from that shape.
* The JSON form devices send over MQTT (topic suffix ``/json``), CoAP and HTTP:
  ``{"seq", "ts_us", "kind", "fields": [[metric, value], ...]}`` or a list of
  such objects.  ``parse_json_form`` validates it into ``JsonReading`` records;
  ``JsonReading.encode(tenant, device)`` makes the RMF frame that the rest of
  the pipeline takes, so a JSON reading is decoded, checked and stored exactly
  like a binary one.  The tenant and device come from the transport's
  credentials, never from the payload.

A field is ``[metric, value]`` with the vtype inferred from the JSON value
(true/false: bool, an integer: int32 or else int64, any other number: float64,
a string: UTF-8 string, ``{"hex": "..."}``: bytes) or ``[metric, vtype, value]``
to choose it, e.g. float32.  The payload must be UTF-8 JSON without duplicate
keys, NaN or Infinity; only the four keys above are allowed; ``kind`` is one of
the device-to-platform kinds 1-5.

Every problem raises ``JsonFormError``: ``code`` is "MALFORMED" (so
``ACK_STATUS[code]`` is the status to answer with), ``reason`` names the rule
that failed and ``path`` where, e.g. ``[2].fields[0][1]``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Final, cast

from . import (
    KIND_COMMAND_RESULT,
    KIND_TELEMETRY,
    DecodeError,
    Frame,
    encode_frame,
)

__all__ = [
    "MAX_READINGS",
    "JsonFormError",
    "JsonReading",
    "error_to_json",
    "event_to_json",
    "frame_from_json",
    "frame_to_json",
    "parse_json_form",
    "readings_from_json",
]

MAX_READINGS: Final = 1000  # readings in one JSON payload
_FORM_KEYS: Final = frozenset(("seq", "ts_us", "kind", "fields"))
_FRAME_KEYS: Final = frozenset(
    ("flags", "auth", "kind", "tenant", "device", "seq", "ts_us", "fields")
)
_I32: Final = (-(1 << 31), (1 << 31) - 1)
_I64: Final = (-(1 << 63), (1 << 63) - 1)
_MAX_BODY: Final = 0xFFFF
_MAX_FIELDS: Final = 0xFF
# Encoded size of a field without its value bytes: metric u16 + vtype u8 (+ length).
_VALUE_SIZE: Final = {1: 4, 2: 8, 3: 4, 4: 8, 5: 1}

Field = tuple[int, int, object]


class JsonFormError(ValueError):
    """A JSON payload that cannot become a frame; ``code`` is always "MALFORMED"."""

    def __init__(self, reason: str, path: str, detail: str) -> None:
        super().__init__(f"{path or '<payload>'}: {detail}")
        self.code = "MALFORMED"
        self.reason = reason
        self.path = path
        self.detail = detail


@dataclass(frozen=True, slots=True)
class JsonReading:
    """One validated reading of the JSON form; ``fields`` are (metric, vtype, value)."""

    seq: int
    ts_us: int
    kind: int
    fields: tuple[Field, ...]

    def encode(self, tenant: int, device: int, *, flags: int = 0) -> bytes:
        """The RMF frame for this reading (AUTH none: the transport authenticated it)."""
        fields = self.fields
        return encode_frame(self.kind, tenant, device, self.seq, self.ts_us, fields, flags=flags)


# -- decoder events -> the vectors' shape


def _value_to_json(value: object) -> object:
    return {"hex": value.hex()} if isinstance(value, bytes) else value


def frame_to_json(frame: Frame) -> dict[str, object]:
    """The vectors' shape of a frame: flags, auth, kind, tenant, device, seq, ts_us, fields.

    Float values are Python floats as decoded; a NaN or infinity among them is
    the caller's to render (``json.dumps`` writes ``NaN``, which is not JSON).
    """
    return {
        "flags": frame.flags,
        "auth": frame.auth,
        "kind": frame.kind,
        "tenant": frame.tenant,
        "device": frame.device,
        "seq": frame.seq,
        "ts_us": frame.ts_us,
        "fields": [[m, vtype, _value_to_json(v)] for m, vtype, v in frame.fields()],
    }


def error_to_json(error: DecodeError) -> dict[str, object]:
    """An error event as ``{"error": code, ...}`` with where it was and whose header it had."""
    return {
        "error": error.code,
        "offset": error.offset,
        "length": error.length,
        "tenant": error.tenant,
        "device": error.device,
        "seq": error.seq,
        "ack_req": error.ack_req,
    }


def event_to_json(event: Frame | DecodeError) -> dict[str, object]:
    """``frame_to_json`` or ``error_to_json``, whichever twin made the event."""
    # Duck-typed on purpose: the tests feed events of both twins through here.
    if hasattr(event, "code"):
        return error_to_json(cast(DecodeError, event))
    return frame_to_json(event)


# -- validation helpers


def _fail(reason: str, path: str, detail: str) -> JsonFormError:
    return JsonFormError(reason, path, detail)


def _int(value: object, lo: int, hi: int, path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail("bad_type", path, f"expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise _fail("out_of_range", path, f"{value} is outside {lo}..{hi}")
    return value


def _number(value: object, path: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _fail("bad_type", path, f"expected a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        raise _fail("out_of_range", path, "number too large for a float64") from None
    if not math.isfinite(number):
        raise _fail("out_of_range", path, "number is not finite")
    return number


def _hex_blob(value: object, path: str) -> bytes:
    if not isinstance(value, dict) or set(value) != {"hex"} or not isinstance(value["hex"], str):
        raise _fail("bad_type", path, 'expected {"hex": "<hex digits>"}')
    try:
        blob = bytes.fromhex(value["hex"])
    except ValueError:
        raise _fail("bad_value", path, "not an even number of hex digits") from None
    if len(blob) > _MAX_BODY:
        raise _fail("too_long", path, f"{len(blob)} bytes, at most {_MAX_BODY} fit")
    return blob


def _text(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise _fail("bad_type", path, f"expected a string, got {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise _fail("bad_value", path, "string holds a lone surrogate") from None
    if size > 0xFF:
        raise _fail("too_long", path, f"string of {size} UTF-8 bytes, at most 255 fit")
    return value


def _typed_value(vtype: int, value: object, path: str) -> object:
    """``value`` checked and converted for an explicit vtype."""
    if vtype == 1:
        number = _number(value, path)
        try:
            struct.pack(">f", number)  # the encoder's own range check
        except OverflowError:
            raise _fail("out_of_range", path, f"{number} does not fit a float32") from None
        return number
    if vtype == 2:
        return _number(value, path)
    if vtype == 3:
        return _int(value, *_I32, path)
    if vtype == 4:
        return _int(value, *_I64, path)
    if vtype == 5:
        if not isinstance(value, bool):
            raise _fail("bad_type", path, f"expected true or false, got {type(value).__name__}")
        return value
    if vtype == 6:
        return _text(value, path)
    return _hex_blob(value, path)


def _inferred_field(metric: int, value: object, path: str) -> Field:
    if isinstance(value, bool):
        return metric, 5, value
    if isinstance(value, int):
        if _I32[0] <= value <= _I32[1]:
            return metric, 3, value
        return metric, 4, _int(value, *_I64, path)
    if isinstance(value, float):
        return metric, 2, _number(value, path)
    if isinstance(value, str):
        return metric, 6, _text(value, path)
    if isinstance(value, dict):
        return metric, 7, _hex_blob(value, path)
    raise _fail("bad_type", path, f"cannot carry a {type(value).__name__} value")


def _field_size(field: Field) -> int:
    _, vtype, value = field
    if vtype == 6:
        assert isinstance(value, str)
        return 4 + len(value.encode("utf-8"))
    if vtype == 7:
        assert isinstance(value, bytes)
        return 5 + len(value)
    return 3 + _VALUE_SIZE[vtype]


def _fields(value: object, path: str, *, explicit_only: bool) -> tuple[Field, ...]:
    if not isinstance(value, list):
        raise _fail("bad_type", path, f"expected a list of fields, got {type(value).__name__}")
    if len(value) > _MAX_FIELDS:
        raise _fail("too_many_fields", path, f"{len(value)} fields, at most {_MAX_FIELDS} fit")
    fields: list[Field] = []
    body = 0
    for i, item in enumerate(value):
        at = f"{path}[{i}]"
        if not isinstance(item, list) or len(item) not in ((3,) if explicit_only else (2, 3)):
            shape = "[metric, vtype, value]" if explicit_only else "[metric, value]"
            raise _fail("bad_field", at, f"expected {shape}")
        metric = _int(item[0], 0, 0xFFFF, f"{at}[0]")
        if len(item) == 3:
            vtype = _int(item[1], 1, 7, f"{at}[1]")
            field: Field = (metric, vtype, _typed_value(vtype, item[2], f"{at}[2]"))
        else:
            field = _inferred_field(metric, item[1], f"{at}[1]")
        body += _field_size(field)
        if body > _MAX_BODY:
            raise _fail("body_too_long", path, f"fields need more than {_MAX_BODY} bytes")
        fields.append(field)
    return tuple(fields)


def _object(value: object, keys: frozenset[str], path: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _fail("bad_type", path, f"expected an object, got {type(value).__name__}")
    for name in value:
        if name not in keys:
            raise _fail("unknown_key", f"{path}.{name}", f"unknown key {name!r}")
    for name in sorted(keys):
        if name not in value:
            raise _fail("missing_key", f"{path}.{name}", f"missing key {name!r}")
    return cast(dict[str, object], value)


# -- the devices' JSON form


def _reading(value: object, path: str) -> JsonReading:
    obj = _object(value, _FORM_KEYS, path)
    return JsonReading(
        seq=_int(obj["seq"], 0, 0xFFFFFFFF, f"{path}.seq"),
        ts_us=_int(obj["ts_us"], *_I64, f"{path}.ts_us"),
        kind=_int(obj["kind"], KIND_TELEMETRY, KIND_COMMAND_RESULT, f"{path}.kind"),
        fields=_fields(obj["fields"], f"{path}.fields", explicit_only=False),
    )


def readings_from_json(value: object, *, max_readings: int = MAX_READINGS) -> list[JsonReading]:
    """Validate an already parsed JSON form: one reading object or a list of them."""
    if isinstance(value, list):
        if not value:
            raise _fail("empty", "", "an empty list of readings")
        if len(value) > max_readings:
            raise _fail("too_many_readings", "", f"{len(value)} readings, at most {max_readings}")
        return [_reading(item, f"[{i}]") for i, item in enumerate(value)]
    return [_reading(value, "")]


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        # Which value counts would be up to the parser: refuse instead.
        raise ValueError("duplicate key in a JSON object")
    return obj


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _loads(payload: str | bytes | bytearray | memoryview) -> object:
    if not isinstance(payload, str):
        try:
            payload = bytes(payload).decode("utf-8")
        except UnicodeDecodeError:
            raise _fail("not_utf8", "", "payload is not UTF-8") from None
    try:
        return json.loads(
            payload, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants
        )
    except (ValueError, RecursionError) as exc:
        raise _fail("not_json", "", f"not JSON: {exc}") from None


def parse_json_form(
    payload: str | bytes | bytearray | memoryview, *, max_readings: int = MAX_READINGS
) -> list[JsonReading]:
    """Parse and validate a JSON-form payload into its readings, in payload order."""
    return readings_from_json(_loads(payload), max_readings=max_readings)


# -- the vectors' shape -> frame bytes


def frame_from_json(value: object, key: bytes | None = None) -> bytes:
    """The frame bytes for a decoded frame in the vectors' shape; ``key`` signs it if AUTH != 0.

    ``frame_from_json(frame_to_json(f), key) == f.raw`` for every frame ``f``.
    """
    obj = _object(value, _FRAME_KEYS, "")
    kind = _int(obj["kind"], 0, 0xFF, ".kind")
    tenant = _int(obj["tenant"], 0, 0xFFFFFFFF, ".tenant")
    device = _int(obj["device"], 0, (1 << 64) - 1, ".device")
    seq = _int(obj["seq"], 0, 0xFFFFFFFF, ".seq")
    ts_us = _int(obj["ts_us"], *_I64, ".ts_us")
    flags = _int(obj["flags"], 0, 3, ".flags")
    auth = _int(obj["auth"], 0, 2, ".auth")
    fields = _fields(obj["fields"], ".fields", explicit_only=True)
    if auth and not key:
        raise _fail("missing_key", ".auth", f"auth {auth} needs the device's key to sign")
    signing_key = key if auth else None
    return encode_frame(
        kind, tenant, device, seq, ts_us, fields, flags=flags, auth=auth, key=signing_key
    )
