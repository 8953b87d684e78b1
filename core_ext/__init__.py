"""RMF v1 frame codec: the one place that chooses the compiled or the pure-Python twin.

Twins.  ``_frame`` (Cython, the fast path) and ``_frame_py`` (pure Python, the
reference) have the same names, the same contract and give the same results
byte for byte; the test suite runs against both.  ``RMIOT_PURE`` chooses:

* ``RMIOT_PURE=1``: the pure twin;
* ``RMIOT_PURE=0``: the compiled twin; ImportError if it is not built;
* unset or empty: the compiled twin if built, else the pure one.

``IMPL`` says which one was loaded: ``"c"`` or ``"python"``.

Contract.  The codec does no I/O.  It is fed bytes and hands back events:

* ``Frame`` - one verified frame (CRC, and HMAC when AUTH != 0): header values,
  ``raw`` (the frame as received), ``copy_row`` (the frame as one PostgreSQL
  binary COPY tuple for ``telemetry(ts, device_id, tenant_id, seq, kind,
  metrics int4[], vals float8[], attrs jsonb)``), and ``fields()`` /
  ``numeric()`` parsed on demand.  Immutable; made by the decoder only.
* ``DecodeError`` - an error event: ``code`` (one of ``ERROR_CODES``), the stream
  ``offset`` where the bad bytes start, the ``length`` of bytes they cost, and
  tenant/device/seq/ack_req from the header when a whole RMF v1 header was there
  (BAD_CRC, AUTH_FAILED, MALFORMED, TRUNCATED with 32+ bytes), else zeros.

``FrameDecoder.feed()`` returns the events completed by the new bytes in stream
order and keeps an incomplete frame for the next call; the events never depend
on how the stream was cut into chunks.  Checks run in the spec's order: magic,
version, flags, length (TRUNCATED: wait), CRC, AUTH, MALFORMED.  After BAD_MAGIC,
BAD_VERSION, BAD_FLAGS or BAD_CRC the decoder skips one byte and scans to the
next "RM"; each contiguous skipped run is one event (a run ends where a header
with valid magic, version and flags begins).  AUTH_FAILED and MALFORMED skip the
whole frame, whose bounds the CRC has proven.  ``eof()`` reports what is left as
TRUNCATED; ``drop_pending()`` is the caller's timeout for a frame that never
completes (a corrupted length can hide the frames after it until then).

Keys.  ``keys`` maps a device id to its HMAC key (a mapping or a callable
returning ``bytes``, a tuple of ``bytes`` — several keys during a rotation's
overlap window, any of which may sign — or ``None``); it is consulted only for
frames with AUTH != 0.
No key (or an empty one) is AUTH_FAILED: authentication fails closed.  If the
lookup raises, ``feed()`` re-raises and decodes the same bytes again next time.

``decode_frame()`` decodes one whole buffer with the vectors' semantics;
``encode_frame()`` / ``encode_ack()`` build frames; ``copy_header()`` and
``copy_trailer()`` frame a COPY stream of ``copy_row`` tuples.  The JSON shapes
(the vectors' and the devices' JSON form) are in ``rmiot.core_ext.jsonform``.
"""

from __future__ import annotations

import os
from importlib import import_module
from types import ModuleType
from typing import TYPE_CHECKING

__all__ = [
    "ACK_AUTH_FAILED",
    "ACK_AUTH_REQUIRED",
    "ACK_BAD_CRC",
    "ACK_DUPLICATE",
    "ACK_MALFORMED",
    "ACK_OK",
    "ACK_RATE_LIMITED",
    "ACK_STALE",
    "ACK_STATUS",
    "ACK_TENANT_MISMATCH",
    "ACK_UNKNOWN_DEVICE",
    "AUTH_HMAC_SHA256",
    "AUTH_HMAC_SM3",
    "AUTH_NONE",
    "CRC_LEN",
    "ERROR_CODES",
    "FLAG_ACK_REQ",
    "FLAG_RETRANS",
    "HEADER_LEN",
    "IMPL",
    "KIND_ACK",
    "KIND_COMMAND",
    "KIND_COMMAND_RESULT",
    "KIND_EVENT",
    "KIND_LOCATION",
    "KIND_STATUS",
    "KIND_TELEMETRY",
    "MAGIC",
    "MAX_FRAME_LEN",
    "TAG_LEN",
    "DecodeError",
    "Frame",
    "FrameDecoder",
    "copy_header",
    "copy_trailer",
    "crc32",
    "decode_frame",
    "encode_ack",
    "encode_frame",
    "late_spans",
]


def _load() -> tuple[str, ModuleType]:
    choice = os.environ.get("RMIOT_PURE", "")
    if choice not in ("", "0", "1"):
        raise ImportError(f"RMIOT_PURE={choice!r}: use 1 (pure Python), 0 (compiled) or unset")
    if choice == "1":
        return "python", import_module("._frame_py", __name__)
    try:
        return "c", import_module("._frame", __name__)
    except ModuleNotFoundError as exc:
        # Only a missing module falls back: a built but broken one is an error.
        if exc.name != f"{__name__}._frame":
            raise
        if choice == "0":
            raise ImportError(
                "RMIOT_PURE=0 asks for the compiled codec but rmiot.core_ext._frame is not "
                "built; run `python setup.py build_ext --inplace` (or unset RMIOT_PURE)"
            ) from exc
        return "python", import_module("._frame_py", __name__)


if TYPE_CHECKING:
    # The stub of the compiled twin (_frame.pyi) is the typed face of both twins.
    from ._frame import (
        ACK_AUTH_FAILED,
        ACK_AUTH_REQUIRED,
        ACK_BAD_CRC,
        ACK_DUPLICATE,
        ACK_MALFORMED,
        ACK_OK,
        ACK_RATE_LIMITED,
        ACK_STALE,
        ACK_STATUS,
        ACK_TENANT_MISMATCH,
        ACK_UNKNOWN_DEVICE,
        AUTH_HMAC_SHA256,
        AUTH_HMAC_SM3,
        AUTH_NONE,
        CRC_LEN,
        ERROR_CODES,
        FLAG_ACK_REQ,
        FLAG_RETRANS,
        HEADER_LEN,
        KIND_ACK,
        KIND_COMMAND,
        KIND_COMMAND_RESULT,
        KIND_EVENT,
        KIND_LOCATION,
        KIND_STATUS,
        KIND_TELEMETRY,
        MAGIC,
        MAX_FRAME_LEN,
        TAG_LEN,
        DecodeError,
        Frame,
        FrameDecoder,
        copy_header,
        copy_trailer,
        crc32,
        decode_frame,
        encode_ack,
        encode_frame,
        late_spans,
    )

    IMPL: str
else:
    IMPL, _codec = _load()
    globals().update({name: getattr(_codec, name) for name in __all__ if name != "IMPL"})
