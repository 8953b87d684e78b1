"""Helpers shared by the codec tests: the twins, the vectors, event comparison."""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import Any

from rmiot.core_ext import _frame_py

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
VECTORS_NAME = "frame-v1-vectors.json"


def _compiled_twin() -> ModuleType | None:
    try:
        return import_module("rmiot.core_ext._frame")
    except ModuleNotFoundError:
        return None


COMPILED = _compiled_twin()
PURE_ONLY = os.environ.get("RMIOT_PURE") == "1"
TWINS: list[ModuleType] = [_frame_py]
if COMPILED is not None and not PURE_ONLY:
    TWINS.append(COMPILED)


def twin_name(module: ModuleType) -> str:
    return "python" if module is _frame_py else "c"


def spec_dir() -> Path:
    return Path(os.environ.get("RMIOT_SPEC_DIR", REPO.parent / "shared" / "spec"))


def vectors_path() -> Path:
    """The repo's copy of the vectors, else the shared spec's (``RMIOT_SPEC_DIR``)."""
    local = HERE / VECTORS_NAME
    if local.exists():
        return local
    return spec_dir() / VECTORS_NAME


def load_vectors() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(vectors_path().read_text(encoding="utf-8"))
    return data


VECTORS = load_vectors()
KEYS = {int(device): bytes.fromhex(key) for device, key in VECTORS["keys"].items()}
GOOD_VECTORS = [v for v in VECTORS["frames"] if "frame" in v["expect"]]
BAD_VECTORS = [v for v in VECTORS["frames"] if "error" in v["expect"]]


def event_key(event: Any) -> tuple[Any, ...]:
    """Everything observable about an event, to compare twins and chunkings."""
    if hasattr(event, "code"):
        return (
            "error",
            event.code,
            event.offset,
            event.length,
            event.tenant,
            event.device,
            event.seq,
            event.ack_req,
        )
    return (
        "frame",
        event.flags,
        event.auth,
        event.kind,
        event.tenant,
        event.device,
        event.seq,
        event.ts_us,
        event.count,
        event.ack_req,
        event.raw,
        event.copy_row,
        # repr: NaN != NaN and 0.0 == -0.0, but the twins must agree on both.
        repr(event.fields()),
        repr(event.numeric()),
    )


def decode_stream(
    module: ModuleType, data: bytes, cuts: list[int] | None = None, keys: Any = None
) -> list[Any]:
    """Feed ``data`` cut at ``cuts`` (offsets), then eof; all events in order."""
    decoder = module.FrameDecoder(keys)
    events: list[Any] = []
    start = 0
    for cut in [*(cuts or []), len(data)]:
        events += decoder.feed(data[start:cut])
        start = cut
    events += decoder.eof()
    return events


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def fields_from_json(fields: list[list[Any]]) -> list[tuple[int, int, object]]:
    """The vectors' fields as encode_frame takes them ({"hex": ...} -> bytes)."""
    return [
        (metric, vtype, bytes.fromhex(value["hex"]) if vtype == 7 else value)
        for metric, vtype, value in fields
    ]


# -- an independent oracle for the COPY row: plain struct, written from the brief


def _column(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


def _array(oid: int, fmt: str, size: int, values: list[Any]) -> bytes:
    if not values:
        return _column(struct.pack(">iii", 0, 0, oid))
    elements = b"".join(struct.pack(">i" + fmt, size, v) for v in values)
    return _column(struct.pack(">iiiii", 1, 0, oid, len(values), 1) + elements)


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def expected_copy_row(
    kind: int, tenant: int, device: int, seq: int, ts_us: int, fields: list[tuple[int, int, Any]]
) -> bytes:
    """telemetry(ts, device_id, tenant_id, seq, kind, metrics, vals, attrs) as one tuple."""
    metrics = [m for m, vtype, _ in fields if 1 <= vtype <= 5]
    vals = [float(v) for _, vtype, v in fields if 1 <= vtype <= 5]
    attrs: dict[str, Any] = {}
    for metric, vtype, value in fields:
        if vtype == 6:
            ok = "\x00" not in value
            attrs[str(metric)] = value if ok else {"hex": value.encode("utf-8").hex()}
        elif vtype == 7:
            attrs[str(metric)] = {"hex": bytes(value).hex()}
    pg_epoch_us = 946_684_800_000_000
    attrs_column = (
        _column(b"\x01" + json.dumps(attrs, ensure_ascii=False).encode("utf-8"))
        if attrs
        else struct.pack(">i", -1)
    )
    return (
        struct.pack(">h", 8)
        + _column(struct.pack(">q", _signed(ts_us - pg_epoch_us, 64)))
        + _column(struct.pack(">q", _signed(device, 64)))
        + _column(struct.pack(">i", _signed(tenant, 32)))
        + _column(struct.pack(">q", seq))
        + _column(struct.pack(">h", kind))
        + _array(23, "i", 4, metrics)
        + _array(701, "d", 8, vals)
        + attrs_column
    )


def frame_bytes(
    kind: int,
    tenant: int,
    device: int,
    seq: int,
    ts_us: int,
    body: bytes,
    count: int,
    *,
    flags: int = 0,
    tag: bytes = b"",
) -> bytes:
    """A frame built by hand (any body, any flags) with a correct CRC."""
    head = struct.pack(
        ">2sBBBBHIQIq", b"RM", 1, flags, kind, count, len(body), tenant, device, seq, ts_us
    )
    signed = head + body + tag
    return signed + struct.pack(">I", zlib.crc32(signed))
