"""Pure-Python twin of the compiled RMF v1 codec (``_frame.pyx``).

Same names, same contract and the same results, byte for byte, as the compiled
module; ``rmiot.core_ext`` chooses which one serves.  The contract is written
down in the package docstring (``core_ext/__init__.py``), the wire layout at the
top of ``_frame.pyx``.  This module is the readable reference and the fallback
when the extension is not built; it is also what the tests compare the compiled
twin against, so it favours plain code over speed.
"""

from __future__ import annotations

import hmac
import json
import operator
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Final, NoReturn

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
]

MAGIC: Final = b"RM"
HEADER_LEN: Final = 32
CRC_LEN: Final = 4
TAG_LEN: Final = 16
MAX_FRAME_LEN: Final = HEADER_LEN + 0xFFFF + TAG_LEN + CRC_LEN

KIND_TELEMETRY: Final = 1
KIND_EVENT: Final = 2
KIND_LOCATION: Final = 3
KIND_STATUS: Final = 4
KIND_COMMAND_RESULT: Final = 5
KIND_ACK: Final = 0x81
KIND_COMMAND: Final = 0x82

FLAG_ACK_REQ: Final = 1
FLAG_RETRANS: Final = 2
AUTH_NONE: Final = 0
AUTH_HMAC_SHA256: Final = 1
AUTH_HMAC_SM3: Final = 2

ACK_OK: Final = 0
ACK_DUPLICATE: Final = 1
ACK_BAD_CRC: Final = 2
ACK_AUTH_FAILED: Final = 3
ACK_UNKNOWN_DEVICE: Final = 4
ACK_RATE_LIMITED: Final = 5
ACK_MALFORMED: Final = 6
ACK_TENANT_MISMATCH: Final = 7
ACK_STALE: Final = 8
ACK_AUTH_REQUIRED: Final = 9

# Error code -> ack status, for the codes a device can be told about.  FUTURE
# has no status of its own: a timestamp outside the window either way is STALE.
ACK_STATUS: Final[dict[str, int]] = {
    "OK": ACK_OK,
    "DUPLICATE": ACK_DUPLICATE,
    "BAD_CRC": ACK_BAD_CRC,
    "AUTH_FAILED": ACK_AUTH_FAILED,
    "UNKNOWN_DEVICE": ACK_UNKNOWN_DEVICE,
    "RATE_LIMITED": ACK_RATE_LIMITED,
    "MALFORMED": ACK_MALFORMED,
    "TENANT_MISMATCH": ACK_TENANT_MISMATCH,
    "STALE": ACK_STALE,
    "FUTURE": ACK_STALE,
    "AUTH_REQUIRED": ACK_AUTH_REQUIRED,
}

# The decoder's error codes, in the order the checks run.
ERROR_CODES: Final = (
    "TRUNCATED",
    "BAD_MAGIC",
    "BAD_VERSION",
    "BAD_FLAGS",
    "BAD_CRC",
    "AUTH_FAILED",
    "MALFORMED",
)

KeyLookup = Callable[[int], bytes | tuple[bytes, ...] | None]
Keys = KeyLookup | Mapping[int, bytes] | Mapping[int, tuple[bytes, ...]] | None
Field = tuple[int, int, object]

_HEADER = struct.Struct(">2sBBBBHIQIq")
_FIELD_HEAD = struct.Struct(">HB")
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
# int16 column count, then ts, device_id, tenant_id, seq, kind as (length, value).
_ROW_HEAD = struct.Struct(">hiqi8si4siqih")
_ARRAY_HEAD = struct.Struct(">iiiiii")
_EMPTY_ARRAY = struct.Struct(">iiii")

_I32_MIN: Final = -(1 << 31)
_I32_MAX: Final = (1 << 31) - 1
_I64_MIN: Final = -(1 << 63)
_I64_MAX: Final = (1 << 63) - 1
_PG_EPOCH_US: Final = 946_684_800_000_000  # 2000-01-01 - 1970-01-01 in microseconds
_INT4_OID: Final = 23
_FLOAT8_OID: Final = 701
_HMAC_ALG: Final = {AUTH_HMAC_SHA256: "sha256", AUTH_HMAC_SM3: "sm3"}
_NUMERIC_VTYPES: Final = frozenset((1, 2, 3, 4, 5))

# Results of _probe that are not error codes.
_NEED: Final = "NEED"
_FRAME: Final = "FRAME"


class Frame:
    """One decoded, CRC- (and HMAC-) verified frame.  Made by the decoder only."""

    __slots__ = (
        "auth",
        "copy_row",
        "count",
        "device",
        "flags",
        "kind",
        "raw",
        "seq",
        "tenant",
        "ts_us",
    )
    flags: int
    auth: int
    kind: int
    tenant: int
    device: int
    seq: int
    ts_us: int
    count: int
    raw: bytes
    copy_row: bytes

    def __init__(self) -> None:
        raise TypeError("Frame objects are made by the decoder")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Frame.{name} is read-only")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Frame.{name} is read-only")

    def __reduce__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} objects cannot be pickled")

    @property
    def ack_req(self) -> bool:
        return bool(self.flags & FLAG_ACK_REQ)

    def fields(self) -> list[Field]:
        """[(metric, vtype, value)] in frame order, parsed from ``raw`` on each call."""
        fields = _parse_body(self.raw, self.count)
        assert fields is not None  # the decoder only makes frames whose body parsed
        return fields

    def numeric(self) -> dict[int, float]:
        """metric -> value as float for the numeric vtypes 1-5; a repeated metric: last wins."""
        return {m: _as_float(v) for m, vtype, v in self.fields() if vtype in _NUMERIC_VTYPES}

    def beyond(self, bounds: dict[int, tuple[float, float]]) -> bool:
        """True when a numeric field (vtypes 1-5) of a metric in ``bounds``
        (metric -> (lo, hi)) is not strictly between lo and hi (NaN is not):
        the rule engine's test that a frame leaves every threshold as it was,
        without a dict per frame. Every occurrence of a repeated metric counts."""
        for m, vtype, v in self.fields():
            if vtype in _NUMERIC_VTYPES:
                limits = bounds.get(m)
                if limits is not None and not limits[0] < _as_float(v) < limits[1]:
                    return True
        return False

    def __repr__(self) -> str:
        return (
            f"Frame(kind={self.kind}, tenant={self.tenant}, device={self.device}, "
            f"seq={self.seq}, ts_us={self.ts_us}, count={self.count}, "
            f"flags={self.flags}, auth={self.auth})"
        )


class DecodeError:
    """One error event: what was wrong and which stream bytes it cost."""

    __slots__ = ("ack_req", "code", "device", "length", "offset", "seq", "tenant")
    code: str
    offset: int
    length: int
    tenant: int
    device: int
    seq: int
    ack_req: bool

    def __init__(self) -> None:
        raise TypeError("DecodeError objects are made by the decoder")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"DecodeError.{name} is read-only")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"DecodeError.{name} is read-only")

    def __reduce__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} objects cannot be pickled")

    def __repr__(self) -> str:
        return (
            f"DecodeError(code={self.code!r}, offset={self.offset}, length={self.length}, "
            f"tenant={self.tenant}, device={self.device}, seq={self.seq}, "
            f"ack_req={self.ack_req})"
        )


_Header = tuple[int, int, int, bool]  # tenant, device, seq, ack_req
_NO_HEADER: Final[_Header] = (0, 0, 0, False)


def _header_of(buf: bytes | bytearray, pos: int) -> _Header:
    _, _, flags, _, _, _, tenant, device, seq, _ = _HEADER.unpack_from(buf, pos)
    return tenant, device, seq, bool(flags & FLAG_ACK_REQ)


def _error(code: str, offset: int, length: int, header: _Header) -> DecodeError:
    err = object.__new__(DecodeError)
    put = object.__setattr__
    put(err, "code", code)
    put(err, "offset", offset)
    put(err, "length", length)
    put(err, "tenant", header[0])
    put(err, "device", header[1])
    put(err, "seq", header[2])
    put(err, "ack_req", header[3])
    return err


def _probe(buf: bytes | bytearray, pos: int, end: int) -> tuple[str, int]:
    """Judge the bytes at ``pos``: (_FRAME, total) for a whole frame with a good CRC,
    (_NEED, 0) when more bytes are needed, else (error code, 0).  The checks run in the
    spec's order and each one as soon as its bytes are there, so garbage is
    rejected without waiting for a full header."""
    avail = end - pos
    if avail < 1:
        return _NEED, 0
    if buf[pos] != 0x52:
        return "BAD_MAGIC", 0
    if avail < 2:
        return _NEED, 0
    if buf[pos + 1] != 0x4D:
        return "BAD_MAGIC", 0
    if avail < 3:
        return _NEED, 0
    if buf[pos + 2] != 1:
        return "BAD_VERSION", 0
    if avail < 4:
        return _NEED, 0
    flags = buf[pos + 3]
    if flags & 0xCC or flags & 0x30 == 0x30:
        return "BAD_FLAGS", 0
    if avail < 8:
        return _NEED, 0
    total = HEADER_LEN + _U16.unpack_from(buf, pos + 6)[0] + CRC_LEN
    if flags & 0x30:
        total += TAG_LEN
    if avail < total:
        return _NEED, 0
    crc_at = pos + total - CRC_LEN
    if zlib.crc32(buf[pos:crc_at]) != _U32.unpack_from(buf, crc_at)[0]:
        return "BAD_CRC", 0
    return _FRAME, total


def _parse_body(raw: bytes, count: int) -> list[Field] | None:
    """The body's fields, or None when it is MALFORMED."""
    pos = HEADER_LEN
    end = HEADER_LEN + _U16.unpack_from(raw, 6)[0]
    fields: list[Field] = []
    for _ in range(count):
        if end - pos < 3:
            return None
        metric, vtype = _FIELD_HEAD.unpack_from(raw, pos)
        pos += 3
        value: object
        if vtype == 1:
            if end - pos < 4:
                return None
            value = _F32.unpack_from(raw, pos)[0]
            pos += 4
        elif vtype == 2:
            if end - pos < 8:
                return None
            value = _F64.unpack_from(raw, pos)[0]
            pos += 8
        elif vtype == 3:
            if end - pos < 4:
                return None
            value = _I32.unpack_from(raw, pos)[0]
            pos += 4
        elif vtype == 4:
            if end - pos < 8:
                return None
            value = _I64.unpack_from(raw, pos)[0]
            pos += 8
        elif vtype == 5:
            if end - pos < 1 or raw[pos] > 1:
                return None
            value = raw[pos] == 1
            pos += 1
        elif vtype == 6:
            if end - pos < 1:
                return None
            n = raw[pos]
            pos += 1
            if end - pos < n:
                return None
            try:
                value = raw[pos : pos + n].decode("utf-8")
            except UnicodeDecodeError:
                return None
            pos += n
        elif vtype == 7:
            if end - pos < 2:
                return None
            n = _U16.unpack_from(raw, pos)[0]
            pos += 2
            if end - pos < n:
                return None
            value = raw[pos : pos + n]
            pos += n
        else:
            return None
        fields.append((metric, vtype, value))
    if pos != end:
        return None
    return fields


def _as_float(value: object) -> float:
    assert isinstance(value, (int, float))  # bool is an int: False/True -> 0.0/1.0
    return float(value)


def _attrs(fields: list[Field]) -> bytes | None:
    """The attrs column (jsonb binary: version byte 1 + JSON text), None without text fields."""
    attrs: dict[str, object] = {}
    for metric, vtype, value in fields:
        if vtype == 6:
            assert isinstance(value, str)
            # jsonb cannot hold U+0000, so such a string is kept as its UTF-8 bytes.
            if "\x00" in value:
                attrs[str(metric)] = {"hex": value.encode("utf-8").hex()}
            else:
                attrs[str(metric)] = value
        elif vtype == 7:
            assert isinstance(value, bytes)
            attrs[str(metric)] = {"hex": value.hex()}
    if not attrs:
        return None
    return b"\x01" + json.dumps(attrs, ensure_ascii=False).encode("utf-8")


def _pg_array(oid: int, fmt: str, size: int, values: list[int] | list[float]) -> bytes:
    """One array column (with its int32 length) in PostgreSQL's binary array format."""
    if not values:
        return _EMPTY_ARRAY.pack(12, 0, 0, oid)
    n = len(values)
    elems = struct.pack(">" + ("i" + fmt) * n, *[x for v in values for x in (size, v)])
    return _ARRAY_HEAD.pack(20 + len(elems), 1, 0, oid, n, 1) + elems


def _copy_row(raw: bytes, fields: list[Field]) -> bytes:
    _, _, _, kind, _, _, _, _, seq, ts_us = _HEADER.unpack_from(raw)
    metrics: list[int] = []
    values: list[float] = []
    for metric, vtype, value in fields:
        if vtype in _NUMERIC_VTYPES:
            metrics.append(metric)
            values.append(_as_float(value))
    # Wraps like int64 arithmetic in C: such a timestamp is refused by the
    # platform's window check before anything is stored.
    pg_ts = (ts_us - _PG_EPOCH_US + (1 << 63)) % (1 << 64) - (1 << 63)
    # device_id and tenant_id keep their bytes: bigint/integer read them as signed.
    head = _ROW_HEAD.pack(8, 8, pg_ts, 8, raw[12:20], 4, raw[8:12], 8, seq, 2, kind)
    attrs = _attrs(fields)
    tail = b"\xff\xff\xff\xff" if attrs is None else _I32.pack(len(attrs)) + attrs
    return (
        head + _pg_array(_INT4_OID, "i", 4, metrics) + _pg_array(_FLOAT8_OID, "d", 8, values) + tail
    )


def _build(raw: bytes, offset: int, err_len: int, lookup: KeyLookup | None) -> Frame | DecodeError:
    """The event for a frame whose CRC is good: AUTH, then body checks, in the spec's order."""
    _, _, flags, kind, count, body_len, tenant, device, seq, ts_us = _HEADER.unpack_from(raw)
    auth = flags >> 4 & 3
    if auth:
        key = lookup(device) if lookup is not None else None
        if not key:
            return _error("AUTH_FAILED", offset, err_len, _header_of(raw, 0))
        signed = HEADER_LEN + body_len
        # Several keys during a rotation's overlap: any of them may sign.
        candidates: tuple[bytes, ...] = key if isinstance(key, tuple) else (key,)
        tag = raw[signed : signed + TAG_LEN]
        if not any(one and hmac.compare_digest(
                hmac.digest(one, raw[:signed], _HMAC_ALG[auth])[:TAG_LEN], tag)
                for one in candidates):
            return _error("AUTH_FAILED", offset, err_len, _header_of(raw, 0))
    fields = _parse_body(raw, count)
    if fields is None:
        return _error("MALFORMED", offset, err_len, _header_of(raw, 0))
    frame = object.__new__(Frame)
    put = object.__setattr__
    put(frame, "flags", flags & 0x0F)
    put(frame, "auth", auth)
    put(frame, "kind", kind)
    put(frame, "tenant", tenant)
    put(frame, "device", device)
    put(frame, "seq", seq)
    put(frame, "ts_us", ts_us)
    put(frame, "count", count)
    put(frame, "raw", raw)
    put(frame, "copy_row", _copy_row(raw, fields))
    return frame


def _contiguous(data: bytes | bytearray | memoryview) -> memoryview:
    """``data`` as a flat view; like the compiled twin, a strided view is refused."""
    view = memoryview(data)
    if not view.c_contiguous:
        raise BufferError("memoryview: underlying buffer is not C-contiguous")
    return view


def _key_lookup(keys: Keys) -> KeyLookup | None:
    if keys is None:
        return None
    if isinstance(keys, Mapping):
        return keys.get
    if callable(keys):
        return keys
    raise TypeError("keys must be a mapping device -> key, a callable or None")


class FrameDecoder:
    """Stream decoder: fed bytes as they arrive, returns events in stream order.  No I/O.

    Events do not depend on how the stream was cut into chunks.  Bytes that are
    skipped to resynchronise form one error event per run; a run ends where a
    plausible header (magic, version and flags valid) begins, so a frame that then
    fails its CRC is reported with its own header.  The events of a run and of
    an incomplete frame are returned once their end is known.
    """

    __slots__ = ("_base", "_busy", "_bytes_in", "_errors", "_frames_ok", "_lookup", "_run", "_tail")

    def __init__(self, keys: Keys = None) -> None:
        self._lookup = _key_lookup(keys)
        self._tail = bytearray()  # bytes not consumed yet: an incomplete frame
        self._base = 0  # stream offset of _tail[0]
        # The open skipped run: (code, start offset, header), or None.
        self._run: tuple[str, int, _Header] | None = None
        self._busy = False
        self._bytes_in = 0
        self._frames_ok = 0
        self._errors = 0

    @property
    def bytes_in(self) -> int:
        return self._bytes_in

    @property
    def frames_ok(self) -> int:
        return self._frames_ok

    @property
    def errors(self) -> int:
        return self._errors

    def pending(self) -> int:
        """Bytes held back because the frame they start is not complete yet."""
        return len(self._tail)

    def __reduce__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} objects cannot be pickled")

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame | DecodeError]:
        """Append ``data``; return every event now complete, in stream order.

        If the key lookup raises, the exception propagates and the decoder is left
        as if ``data`` had been buffered but not decoded: the next call decodes it
        again, so no event is lost or doubled.
        """
        if self._busy:
            raise RuntimeError("FrameDecoder.feed() re-entered (from the keys callback?)")
        self._busy = True
        try:
            before = len(self._tail)
            self._tail += _contiguous(data)
            self._bytes_in += len(self._tail) - before
            saved = (self._run, self._frames_ok, self._errors)
            out: list[Frame | DecodeError] = []
            try:
                consumed = self._scan(out)
            except BaseException:
                self._run, self._frames_ok, self._errors = saved
                raise
            del self._tail[:consumed]
            self._base += consumed
            return out
        finally:
            self._busy = False

    def _scan(self, out: list[Frame | DecodeError]) -> int:
        buf = self._tail
        end = len(buf)
        pos = 0
        while pos < end:
            verdict, total = _probe(buf, pos, end)
            if verdict == _FRAME:
                if self._run is not None:
                    out.append(self._close_run(self._base + pos))
                event = _build(bytes(buf[pos : pos + total]), self._base + pos, total, self._lookup)
                self._count(event)
                out.append(event)
                pos += total
                continue
            if verdict == _NEED:
                if end - pos >= 4 and self._run is not None:
                    out.append(self._close_run(self._base + pos))
                break
            if verdict == "BAD_CRC":
                if self._run is not None:
                    out.append(self._close_run(self._base + pos))
                self._run = ("BAD_CRC", self._base + pos, _header_of(buf, pos))
            elif self._run is None:
                self._run = (verdict, self._base + pos, _NO_HEADER)
            # Resynchronise: skip one byte, then up to the next possible "RM".
            nxt = buf.find(b"R", pos + 1)
            pos = end if nxt < 0 else nxt
        return pos

    def _count(self, event: Frame | DecodeError) -> None:
        if isinstance(event, Frame):
            self._frames_ok += 1
        else:
            self._errors += 1

    def _close_run(self, end_offset: int) -> DecodeError:
        assert self._run is not None
        code, start, header = self._run
        self._run = None
        self._errors += 1
        return _error(code, start, end_offset - start, header)

    def eof(self) -> list[DecodeError]:
        """End of input: the open skipped run, then any incomplete frame as TRUNCATED.

        The decoder is then empty and can take a new stream; offsets keep counting.
        """
        if self._busy:
            raise RuntimeError("FrameDecoder.eof() called from inside feed()")
        out: list[DecodeError] = []
        if self._run is not None:
            out.append(self._close_run(self._base))
        n = len(self._tail)
        if n:
            header = _header_of(self._tail, 0) if n >= HEADER_LEN else _NO_HEADER
            out.append(_error("TRUNCATED", self._base, n, header))
            self._errors += 1
            self._tail.clear()
            self._base += n
        return out

    def drop_pending(self) -> DecodeError | None:
        """Give up on the incomplete frame (the caller's timeout): None if there is none.

        The frame is dropped as TRUNCATED from its start up to the next possible
        "RM" after its first byte; decoding resumes there with the next feed()
        (``feed(b"")`` decodes what is already buffered).  If the held bytes follow
        a skipped run that is still open - they are then at most the first three
        bytes of a header - the run is closed over them and returned instead.
        """
        if self._busy:
            raise RuntimeError("FrameDecoder.drop_pending() called from inside feed()")
        n = len(self._tail)
        if not n:
            return None
        if self._run is not None:
            cut = n
            error = self._close_run(self._base + n)
        else:
            nxt = self._tail.find(b"R", 1)
            cut = n if nxt < 0 else nxt
            header = _header_of(self._tail, 0) if n >= HEADER_LEN else _NO_HEADER
            error = _error("TRUNCATED", self._base, cut, header)
            self._errors += 1
        del self._tail[:cut]
        self._base += cut
        return error


def decode_frame(buf: bytes | bytearray | memoryview, keys: Keys = None) -> Frame | DecodeError:
    """Decode ``buf`` as exactly one frame, with the vectors' semantics.

    Errors cover the whole buffer (offset 0, length ``len(buf)``); a short buffer
    is TRUNCATED, and bytes after a good frame make it MALFORMED.
    """
    lookup = _key_lookup(keys)
    data = bytes(_contiguous(buf))
    n = len(data)
    verdict, total = _probe(data, 0, n)
    if verdict == _NEED:
        return _error("TRUNCATED", 0, n, _header_of(data, 0) if n >= HEADER_LEN else _NO_HEADER)
    if verdict == "BAD_CRC":
        return _error(verdict, 0, n, _header_of(data, 0))
    if verdict != _FRAME:
        return _error(verdict, 0, n, _NO_HEADER)
    event = _build(data[:total], 0, n, lookup)
    if total != n and isinstance(event, Frame):
        return _error("MALFORMED", 0, n, _header_of(data, 0))
    return event


def _int_in(name: str, value: object, lo: int, hi: int) -> int:
    number = operator.index(value)  # type: ignore[arg-type]
    if not lo <= number <= hi:
        raise ValueError(f"{name} {number} is outside {lo}..{hi}")
    return number


def _encode_field(metric: object, vtype: object, value: object) -> bytes:
    m = _int_in("metric", metric, 0, 0xFFFF)
    vt = _int_in("vtype", vtype, 1, 7)
    head = _FIELD_HEAD.pack(m, vt)
    if vt in (1, 2):
        if not isinstance(value, (int, float)):
            raise TypeError(f"metric {m}: vtype {vt} needs a number, not {type(value).__name__}")
        return head + (_F32 if vt == 1 else _F64).pack(float(value))
    if vt == 3:
        return head + _I32.pack(_int_in(f"metric {m} int32 value", value, _I32_MIN, _I32_MAX))
    if vt == 4:
        return head + _I64.pack(_int_in(f"metric {m} int64 value", value, _I64_MIN, _I64_MAX))
    if vt == 5:
        return head + bytes((_int_in(f"metric {m} bool value", value, 0, 1),))
    if vt == 6:
        if not isinstance(value, str):
            raise TypeError(f"metric {m}: vtype 6 needs a str, not {type(value).__name__}")
        text = value.encode("utf-8")
        if len(text) > 0xFF:
            raise ValueError(f"metric {m}: string of {len(text)} UTF-8 bytes, at most 255 fit")
        return head + bytes((len(text),)) + text
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"metric {m}: vtype 7 needs bytes, not {type(value).__name__}")
    blob = bytes(value)
    if len(blob) > 0xFFFF:
        raise ValueError(f"metric {m}: {len(blob)} bytes, at most 65535 fit")
    return head + _U16.pack(len(blob)) + blob


def encode_frame(
    kind: int,
    tenant: int,
    device: int,
    seq: int,
    ts_us: int,
    fields: Iterable[tuple[int, int, object]],
    *,
    flags: int = 0,
    auth: int = 0,
    key: bytes | None = None,
) -> bytes:
    """Build one frame.  ``flags`` holds ACK_REQ/RETRANS; ``auth`` != 0 signs with ``key``.

    Raises ValueError (or TypeError) for anything a decoder would not accept back.
    """
    kind = _int_in("kind", kind, 0, 0xFF)
    tenant = _int_in("tenant", tenant, 0, 0xFFFFFFFF)
    device = _int_in("device", device, 0, 0xFFFFFFFFFFFFFFFF)
    seq = _int_in("seq", seq, 0, 0xFFFFFFFF)
    ts_us = _int_in("ts_us", ts_us, _I64_MIN, _I64_MAX)
    flags = _int_in("flags", flags, 0, FLAG_ACK_REQ | FLAG_RETRANS)
    auth = _int_in("auth", auth, 0, AUTH_HMAC_SM3)
    if auth and not key:
        raise ValueError("auth needs a key")
    if not auth and key is not None:
        raise ValueError("a key was given but auth is AUTH_NONE")
    parts = []
    for field in fields:
        metric, vtype, value = field
        parts.append(_encode_field(metric, vtype, value))
    if len(parts) > 0xFF:
        raise ValueError(f"{len(parts)} fields, at most 255 fit")
    body = b"".join(parts)
    if len(body) > 0xFFFF:
        raise ValueError(f"body of {len(body)} bytes, at most 65535 fit")
    signed = (
        _HEADER.pack(
            MAGIC, 1, flags | auth << 4, kind, len(parts), len(body), tenant, device, seq, ts_us
        )
        + body
    )
    if auth:
        assert key is not None
        signed += hmac.digest(key, signed, _HMAC_ALG[auth])[:TAG_LEN]
    return signed + _U32.pack(zlib.crc32(signed))


def encode_ack(tenant: int, device: int, seq: int, ts_us: int, status: int) -> bytes:
    """The ACK frame for (tenant, device, seq): kind 0x81, one int32 field, metric 0 = status."""
    return encode_frame(KIND_ACK, tenant, device, seq, ts_us, [(0, 3, status)])


def late_spans(frames: Iterable[Frame], before_us: int) -> tuple[list[int], list[int],
                                                                 list[int]]:
    """Per device, the first and last ``ts_us`` among the frames measured before
    ``before_us``: ``(devices, firsts, lasts)``, devices in order of first
    appearance. On-time frames cost one comparison each."""
    spans: dict[int, list[int]] = {}
    for f in frames:
        ts = f.ts_us
        if ts >= before_us:
            continue
        span = spans.get(f.device)
        if span is None:
            spans[f.device] = [ts, ts]
        elif ts < span[0]:
            span[0] = ts
        elif ts > span[1]:
            span[1] = ts
    devices = list(spans)
    return devices, [spans[d][0] for d in devices], [spans[d][1] for d in devices]


def copy_header() -> bytes:
    """PostgreSQL binary COPY signature, flags (0) and header extension length (0)."""
    return b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"


def copy_trailer() -> bytes:
    """PostgreSQL binary COPY trailer: a tuple field count of -1."""
    return b"\xff\xff"


def crc32(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """CRC-32 (IEEE 802.3, as ``zlib.crc32``), continuing from ``start``."""
    return zlib.crc32(data, start & 0xFFFFFFFF)
