"""The stream decoder: chunking, resynchronisation, eof and timeouts, acks, COPY rows."""

from __future__ import annotations

import pickle
import struct
import time
import zlib
from types import ModuleType
from typing import Any

import pytest

from .support import (
    KEYS,
    VECTORS,
    chunks,
    decode_stream,
    event_key,
    expected_copy_row,
    frame_bytes,
)

TS = 1_763_000_000_000_000
VITALS = [(m, 1, 60.0 + m / 4) for m in range(1, 9)]


def telemetry(impl: ModuleType, seq: int, *, device: int = 1001, **kw: Any) -> bytes:
    return bytes(impl.encode_frame(1, 7, device, seq, TS + seq, VITALS, **kw))


def frames_of(impl: ModuleType, events: list[Any]) -> list[bytes]:
    return [e.raw for e in events if isinstance(e, impl.Frame)]


def errors_of(impl: ModuleType, events: list[Any]) -> list[tuple[str, int, int]]:
    return [(e.code, e.offset, e.length) for e in events if isinstance(e, impl.DecodeError)]


def assert_accounts_for(impl: ModuleType, events: list[Any], total: int) -> None:
    """Events tile the stream: each starts where the previous ended, none overlap."""
    at = 0
    for event in events:
        if isinstance(event, impl.Frame):
            at += len(event.raw)
        else:
            assert event.offset == at, (event, at)
            at += event.length
    assert at == total


def mixed_stream(impl: ModuleType) -> bytes:
    """Good frames around every kind of trouble, ending in a partial frame."""
    good = [telemetry(impl, seq, flags=1) for seq in range(1, 8)]
    bad_crc = bytearray(telemetry(impl, 50, flags=1))
    bad_crc[40] ^= 0x01
    signed = telemetry(impl, 60, auth=1, key=b"wrong key")
    malformed = frame_bytes(1, 7, 1001, 70, TS, b"\x00\x01\x09", 1)
    return b"".join(
        [
            good[0],
            b"garbage with R, RM and RM\x01\x40 inside",
            good[1],
            bytes(bad_crc),
            good[2],
            signed,
            good[3],
            malformed,
            good[4],
            b"\x00" * 3,
            good[5],
            b"R",
            good[6],
            good[0][:50],
        ]
    )


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13, 36, 64, 100, 4096, 65536])
def test_events_do_not_depend_on_chunk_size(impl: ModuleType, size: int) -> None:
    data = mixed_stream(impl)
    whole = decode_stream(impl, data, keys=KEYS)
    cut = decode_stream(impl, data, list(range(size, len(data), size)), keys=KEYS)
    assert list(map(event_key, cut)) == list(map(event_key, whole))
    assert_accounts_for(impl, whole, len(data))


def test_mixed_stream_events(impl: ModuleType) -> None:
    data = mixed_stream(impl)
    events = decode_stream(impl, data, keys=KEYS)
    assert [e.seq for e in events if isinstance(e, impl.Frame)] == list(range(1, 8))
    codes = [e.code for e in events if isinstance(e, impl.DecodeError)]
    assert codes == [
        "BAD_MAGIC",  # the garbage: one event, although it holds "R", "RM", "RM\x01\x40"
        "BAD_CRC",
        "AUTH_FAILED",
        "MALFORMED",
        "BAD_MAGIC",  # the three zero bytes
        "BAD_MAGIC",  # the lone "R"
        "TRUNCATED",  # the partial frame at eof
    ]
    bad_crc = next(e for e in events if getattr(e, "code", "") == "BAD_CRC")
    assert (bad_crc.tenant, bad_crc.device, bad_crc.seq, bad_crc.ack_req) == (7, 1001, 50, True)
    truncated = events[-1]
    assert (truncated.length, truncated.seq, truncated.ack_req) == (50, 1, True)


@pytest.mark.parametrize("vector", VECTORS["streams"], ids=lambda v: v["name"])
def test_stream_vectors_one_byte_at_a_time(impl: ModuleType, vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    decoder = impl.FrameDecoder(KEYS)
    events = []
    for byte in chunks(data, 1):
        events += decoder.feed(byte)
    events += decoder.eof()
    assert [e.seq for e in events if isinstance(e, impl.Frame)] == [
        f["seq"] for f in vector["expect_frames"]
    ]
    assert_accounts_for(impl, events, len(data))


def test_garbage_run_is_one_event(impl: ModuleType) -> None:
    garbage = bytes(range(0x53, 0x100)) * 20  # no "R" (0x52) in it
    good = telemetry(impl, 1)
    decoder = impl.FrameDecoder()
    events = []
    for piece in chunks(garbage + good, 100):
        events += decoder.feed(piece)
    assert errors_of(impl, events) == [("BAD_MAGIC", 0, len(garbage))]
    assert frames_of(impl, events) == [good]
    assert (decoder.errors, decoder.frames_ok, decoder.bytes_in) == (1, 1, len(garbage + good))


def test_run_before_a_plausible_header_is_emitted_once_it_is_seen(impl: ModuleType) -> None:
    decoder = impl.FrameDecoder()
    assert decoder.feed(b"xyz") == []  # the run may go on
    assert decoder.feed(b"RM\x01") == []  # a header may be starting
    events = decoder.feed(b"\x00")  # magic, version and flags are valid: the run ends
    assert errors_of(impl, events) == [("BAD_MAGIC", 0, 3)]
    assert decoder.pending() == 4


@pytest.mark.parametrize(
    ("prefix", "code"),
    [(b"RX", "BAD_MAGIC"), (b"RM\x02", "BAD_VERSION"), (b"RM\x01\x04", "BAD_FLAGS")],
)
def test_header_errors_need_no_full_header(impl: ModuleType, prefix: bytes, code: str) -> None:
    decoder = impl.FrameDecoder()
    good = telemetry(impl, 1)
    events = decoder.feed(prefix + good)
    assert errors_of(impl, events) == [(code, 0, len(prefix))]
    assert frames_of(impl, events) == [good]


def test_bad_crc_resyncs_from_the_next_byte(impl: ModuleType) -> None:
    """A frame hidden inside a bad one's announced length is still found."""
    inner = telemetry(impl, 2)
    outer = frame_bytes(1, 7, 1001, 1, TS, b"\x00" * 8 + inner + b"\x00" * 8, 0)
    broken = bytearray(outer)
    broken[-1] ^= 0xFF
    events = decode_stream(impl, bytes(broken))
    assert frames_of(impl, events) == [inner]
    assert errors_of(impl, events)[0] == ("BAD_CRC", 0, 32 + 8)


def test_corrupted_length_waits_then_recovers(impl: ModuleType) -> None:
    """A longer length hides the frames behind it until its bytes are all there."""
    good = [telemetry(impl, seq) for seq in range(1, 5)]
    bad = bytearray(good[0])
    bad[6:8] = struct.pack(">H", 300)  # announces 336 bytes, has 92
    decoder = impl.FrameDecoder()
    assert decoder.feed(bytes(bad) + good[1] + good[2]) == []  # 276 of 336 bytes
    assert decoder.pending() == len(bad) + 2 * len(good[1])
    events = decoder.feed(good[3])  # now there are enough bytes: CRC fails, resync
    assert errors_of(impl, events) == [("BAD_CRC", 0, len(bad))]
    assert frames_of(impl, events) == [good[1], good[2], good[3]]
    assert decoder.pending() == 0


def test_shorter_length_fails_crc_and_recovers(impl: ModuleType) -> None:
    good = [telemetry(impl, seq) for seq in range(1, 4)]
    bad = bytearray(good[1])
    bad[6:8] = struct.pack(">H", 20)
    events = decode_stream(impl, good[0] + bytes(bad) + good[2])
    assert frames_of(impl, events) == [good[0], good[2]]
    assert errors_of(impl, events) == [("BAD_CRC", len(good[0]), len(bad))]


def test_drop_pending_is_the_timeout_escape(impl: ModuleType) -> None:
    good = [telemetry(impl, seq, flags=1) for seq in range(1, 3)]
    bad = bytearray(good[0])
    bad[6:8] = b"\xff\xff"  # announces 65,571 bytes
    decoder = impl.FrameDecoder()
    assert decoder.feed(bytes(bad) + good[1]) == []
    assert decoder.pending() == len(bad) + len(good[1])
    dropped = decoder.drop_pending()
    assert isinstance(dropped, impl.DecodeError)
    assert (dropped.code, dropped.offset, dropped.length) == ("TRUNCATED", 0, len(bad))
    assert (dropped.device, dropped.seq, dropped.ack_req) == (1001, 1, True)
    assert frames_of(impl, decoder.feed(b"")) == [good[1]]
    assert decoder.pending() == 0
    assert decoder.drop_pending() is None
    assert decoder.errors == 1


def test_drop_pending_skips_to_the_next_r_only(impl: ModuleType) -> None:
    decoder = impl.FrameDecoder()
    assert decoder.feed(b"RM\x01\x00\x01\x00\xff\xffxxRyy") == []
    dropped = decoder.drop_pending()
    assert (dropped.code, dropped.offset, dropped.length) == ("TRUNCATED", 0, 10)
    assert decoder.pending() == 3  # "Ryy" is decoded by the next feed()
    events = decoder.feed(b"")
    assert errors_of(impl, events) == []  # "Ryy" opened a skipped run that may go on
    assert errors_of(impl, decoder.eof()) == [("BAD_MAGIC", 10, 3)]


def test_drop_pending_after_an_open_run_closes_the_run(impl: ModuleType) -> None:
    decoder = impl.FrameDecoder()
    assert decoder.feed(b"xxRM") == []
    assert decoder.pending() == 2
    dropped = decoder.drop_pending()
    assert (dropped.code, dropped.offset, dropped.length) == ("BAD_MAGIC", 0, 4)
    assert decoder.pending() == 0
    assert decoder.eof() == []


def test_eof_reports_the_run_then_the_partial_frame(impl: ModuleType) -> None:
    decoder = impl.FrameDecoder()
    good = telemetry(impl, 1)
    events = decoder.feed(b"\x00\x00" + good[:10])
    events += decoder.eof()
    assert errors_of(impl, events) == [("BAD_MAGIC", 0, 2), ("TRUNCATED", 2, 10)]
    assert events[-1].device == 0  # no whole header: no header values
    # The decoder starts afresh; offsets keep counting from its creation.
    events = decoder.feed(b"\x00" + good) + decoder.eof()
    assert errors_of(impl, events) == [("BAD_MAGIC", 12, 1)]
    assert frames_of(impl, events) == [good]
    assert decoder.eof() == []


def test_truncated_with_a_whole_header_carries_it(impl: ModuleType) -> None:
    good = telemetry(impl, 9, flags=1)
    decoder = impl.FrameDecoder()
    assert decoder.feed(good[:-1]) == []
    (error,) = decoder.eof()
    assert (error.code, error.length, error.tenant, error.device, error.seq, error.ack_req) == (
        "TRUNCATED",
        len(good) - 1,
        7,
        1001,
        9,
        True,
    )


def test_auth_failed_and_malformed_skip_the_whole_frame(impl: ModuleType) -> None:
    # The bad frames' bodies hold a whole good frame: it must not be decoded.
    inner = telemetry(impl, 3)
    blob = [(9, 7, inner)]
    unsigned_keyless = impl.encode_frame(1, 7, 4242, 1, TS, blob, auth=1, key=b"k")
    malformed = frame_bytes(1, 7, 1001, 2, TS, b"\x00\x09\x07" + struct.pack(">H", 92) + inner, 2)
    after = telemetry(impl, 4)
    events = decode_stream(impl, unsigned_keyless + malformed + after, keys=KEYS)
    assert errors_of(impl, events) == [
        ("AUTH_FAILED", 0, len(unsigned_keyless)),
        ("MALFORMED", len(unsigned_keyless), len(malformed)),
    ]
    assert frames_of(impl, events) == [after]


def test_keys_mapping_callable_or_none(impl: ModuleType) -> None:
    key = b"0123456789abcdef"
    signed = impl.encode_frame(1, 7, 5, 1, TS, VITALS, auth=2, key=key)
    asked: list[int] = []

    def lookup(device: int) -> bytes | None:
        asked.append(device)
        return key if device == 5 else None

    assert isinstance(impl.decode_frame(signed, {5: key}), impl.Frame)
    assert isinstance(impl.decode_frame(signed, lookup), impl.Frame)
    assert asked == [5]
    assert impl.decode_frame(signed).code == "AUTH_FAILED"
    assert impl.decode_frame(signed, {5: b""}).code == "AUTH_FAILED"  # empty: no key
    assert impl.decode_frame(signed, {5: b"other"}).code == "AUTH_FAILED"
    unsigned = telemetry(impl, 1)
    assert isinstance(impl.decode_frame(unsigned, lambda d: pytest.fail("asked")), impl.Frame)
    with pytest.raises(TypeError):
        impl.FrameDecoder(42)


def test_a_raising_key_lookup_loses_and_doubles_nothing(impl: ModuleType) -> None:
    key = b"k" * 16
    first, third = telemetry(impl, 1), telemetry(impl, 3)
    signed = impl.encode_frame(1, 7, 5, 2, TS, VITALS, auth=1, key=key)
    registry_up = False

    def lookup(device: int) -> bytes:
        if not registry_up:
            raise LookupError("registry down")
        return key

    decoder = impl.FrameDecoder(lookup)
    with pytest.raises(LookupError):
        decoder.feed(b"\x00" + first + signed + third)
    assert (decoder.frames_ok, decoder.errors) == (0, 0)
    registry_up = True
    events = decoder.feed(b"")
    assert errors_of(impl, events) == [("BAD_MAGIC", 0, 1)]
    assert [e.seq for e in events if isinstance(e, impl.Frame)] == [1, 2, 3]
    assert (decoder.frames_ok, decoder.errors, decoder.bytes_in) == (3, 1, 1 + 3 * len(first) + 16)


def test_a_raising_key_lookup_restores_an_open_run(impl: ModuleType) -> None:
    """A run open before the failing call is restored with its own header."""
    key = b"k" * 16
    broken_a = bytearray(telemetry(impl, 10, device=21, flags=1))
    broken_a[-1] ^= 1
    broken_b = bytearray(telemetry(impl, 20, device=22))
    broken_b[-1] ^= 1
    signed = impl.encode_frame(1, 7, 5, 2, TS, VITALS, auth=1, key=key)
    fail = True

    def lookup(device: int) -> bytes:
        if fail:
            raise LookupError("registry down")
        return key

    decoder = impl.FrameDecoder(lookup)
    assert decoder.feed(bytes(broken_a) + b"xx") == []  # run A is open
    with pytest.raises(LookupError):
        decoder.feed(telemetry(impl, 1) + bytes(broken_b) + telemetry(impl, 2) + signed)
    fail = False
    events = decoder.feed(b"")
    errors = [
        (e.code, e.device, e.seq, e.ack_req) for e in events if isinstance(e, impl.DecodeError)
    ]
    assert errors == [("BAD_CRC", 21, 10, True), ("BAD_CRC", 22, 20, False)]
    assert [e.seq for e in events if isinstance(e, impl.Frame)] == [1, 2, 2]


def test_feeding_from_the_key_lookup_is_refused(impl: ModuleType) -> None:
    decoder = impl.FrameDecoder(lambda device: decoder.feed(b"x"))
    signed = impl.encode_frame(1, 7, 5, 2, TS, VITALS, auth=1, key=b"k")
    with pytest.raises(RuntimeError, match="re-entered"):
        decoder.feed(signed)


def test_feed_takes_any_bytes_like(impl: ModuleType) -> None:
    good = telemetry(impl, 1)
    for data in (good, bytearray(good), memoryview(good), memoryview(b"xx" + good)[2:]):
        events = impl.FrameDecoder().feed(data)
        assert frames_of(impl, events) == [good]
    with pytest.raises(TypeError):
        impl.FrameDecoder().feed("RM")
    strided = memoryview(good)[::2]
    with pytest.raises(BufferError):
        impl.FrameDecoder().feed(strided)
    with pytest.raises(BufferError):
        impl.decode_frame(strided)
    with pytest.raises(BufferError):
        impl.crc32(strided)


def test_a_max_size_frame_one_byte_at_a_time(impl: ModuleType) -> None:
    """Byte-by-byte feeding of a 64 KiB frame stays linear."""
    big = impl.encode_frame(4, 1, 2, 3, TS, [(1, 7, b"\xab" * 65530)], auth=1, key=b"k")
    assert len(big) == impl.MAX_FRAME_LEN
    decoder = impl.FrameDecoder({2: b"k"})
    started = time.perf_counter()
    events = []
    for byte in chunks(big, 1):
        events += decoder.feed(byte)
    assert time.perf_counter() - started < 20
    assert frames_of(impl, events) == [big]


# -- acks


def independent_ack(tenant: int, device: int, seq: int, ts_us: int, status: int) -> bytes:
    head = struct.pack(">2sBBBBHIQIq", b"RM", 1, 0, 0x81, 1, 7, tenant, device, seq, ts_us)
    signed = head + struct.pack(">HBi", 0, 3, status)
    return signed + struct.pack(">I", zlib.crc32(signed))


@pytest.mark.parametrize("status", range(10))
def test_ack_round_trip(impl: ModuleType, status: int) -> None:
    ack = impl.encode_ack(7, 2**63 + 5, 0xFFFFFFFF, -5, status)
    assert ack == independent_ack(7, 2**63 + 5, 0xFFFFFFFF, -5, status)
    frame = impl.decode_frame(ack)
    assert isinstance(frame, impl.Frame)
    assert (frame.kind, frame.tenant, frame.device, frame.seq, frame.ts_us) == (
        impl.KIND_ACK,
        7,
        2**63 + 5,
        0xFFFFFFFF,
        -5,
    )
    assert frame.fields() == [(0, 3, status)]
    assert ack == impl.encode_frame(impl.KIND_ACK, 7, 2**63 + 5, 0xFFFFFFFF, -5, [(0, 3, status)])


def test_ack_refuses_out_of_range(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.encode_ack(2**32, 1, 1, 1, 0)
    with pytest.raises(ValueError):
        impl.encode_ack(1, 1, 1, 1, 2**31)
    with pytest.raises(TypeError):
        impl.encode_ack(1, 1, 1.0, 1, 0)


# -- encoding errors: both twins refuse the same things the same way

BAD_ENCODE = [
    ({"kind": 256}, ValueError),
    ({"kind": -1}, ValueError),
    ({"tenant": 2**32}, ValueError),
    ({"device": -1}, ValueError),
    ({"device": 2**64}, ValueError),
    ({"seq": 2**32}, ValueError),
    ({"ts_us": 2**63}, ValueError),
    ({"ts_us": 1.5}, TypeError),
    ({"flags": 4}, ValueError),
    ({"auth": 3}, ValueError),
    ({"auth": 1}, ValueError),  # no key
    ({"key": b"k"}, ValueError),  # key without auth
    ({"fields": [(1, 0, 1)]}, ValueError),
    ({"fields": [(1, 8, 1)]}, ValueError),
    ({"fields": [(70000, 1, 1.0)]}, ValueError),
    ({"fields": [(1, 1, "1.0")]}, TypeError),
    ({"fields": [(1, 1, 1e39)]}, OverflowError),
    ({"fields": [(1, 2, 10**400)]}, OverflowError),
    ({"fields": [(1, 3, 2**31)]}, ValueError),
    ({"fields": [(1, 4, 2**63)]}, ValueError),
    ({"fields": [(1, 3, 1.0)]}, TypeError),
    ({"fields": [(1, 5, 2)]}, ValueError),
    ({"fields": [(1, 6, b"x")]}, TypeError),
    ({"fields": [(1, 6, "x" * 256)]}, ValueError),
    ({"fields": [(1, 6, "\udc80")]}, UnicodeEncodeError),
    ({"fields": [(1, 7, "x")]}, TypeError),
    ({"fields": [(1, 7, 5)]}, TypeError),
    ({"fields": [(1, 7, b"x" * 65536)]}, ValueError),
    ({"fields": [(1, 1)]}, ValueError),
    ({"fields": [(1, 1, 1.0)] * 256}, ValueError),
    ({"fields": [(1, 7, b"x" * 40000)] * 2}, ValueError),
    ({"fields": [(1, 1, 1e39), (1, 1, "x")]}, OverflowError),  # the first problem wins
]


@pytest.mark.parametrize(("change", "error"), BAD_ENCODE)
def test_encode_refuses(impl: ModuleType, change: dict[str, Any], error: type) -> None:
    args: dict[str, Any] = {"kind": 1, "tenant": 1, "device": 1, "seq": 1, "ts_us": 1}
    args["fields"] = [(1, 1, 1.0)]
    args.update(change)
    with pytest.raises(error):
        impl.encode_frame(
            args.pop("kind"),
            args.pop("tenant"),
            args.pop("device"),
            args.pop("seq"),
            args.pop("ts_us"),
            args.pop("fields"),
            **args,
        )


def test_encode_accepts_edges(impl: ModuleType) -> None:
    fields = [
        (0, 1, 3.4028234663852886e38),
        (65535, 1, float("inf")),
        (2, 2, float("-inf")),
        (3, 3, -(2**31)),
        (4, 4, 2**63 - 1),
        (5, 5, True),
        (6, 5, 0),
        (7, 6, "x" * 255),
        (8, 7, bytearray(b"\x00\xff")),
        (9, 7, memoryview(b"")),
        (10, 1, 7),  # an int where a float goes
    ]
    raw = impl.encode_frame(255, 2**32 - 1, 2**64 - 1, 2**32 - 1, -(2**63), fields, flags=3)
    frame = impl.decode_frame(raw)
    assert isinstance(frame, impl.Frame)
    assert frame.fields()[-4:-1] == [(7, 6, "x" * 255), (8, 7, b"\x00\xff"), (9, 7, b"")]
    assert frame.fields()[-1] == (10, 1, 7.0)
    assert frame.fields()[5] == (5, 5, True) and frame.fields()[6] == (6, 5, False)
    assert (frame.flags, frame.auth, frame.ack_req) == (3, 0, True)


# -- the COPY row, checked against an independent struct-based encoding


COPY_CASES = [
    ("vitals", 1, VITALS),
    ("no fields", 4, []),
    ("only text", 4, [(305, 6, "fw-1.2.3 监护仪"), (1000, 7, b"\x00\xff")]),
    ("repeated text metric", 2, [(9, 6, "first"), (9, 6, "second"), (10, 6, 'a"b\\c\n')]),
    ("nul in a string", 2, [(9, 6, "a\x00b")]),
    ("every vtype", 2, [(1, 1, -0.0), (2, 2, 1e300), (3, 3, -7), (4, 4, 2**62), (5, 5, True)]),
    ("specials", 1, [(1, 1, float("nan")), (2, 2, float("inf")), (3, 4, -(2**63))]),
    ("mixed", 3, [(400, 4, 40012), (9, 6, "zone"), (401, 2, 1.5), (9, 7, b"\x01")]),
]


@pytest.mark.parametrize(
    ("kind", "fields"), [c[1:] for c in COPY_CASES], ids=[c[0] for c in COPY_CASES]
)
@pytest.mark.parametrize(
    ("tenant", "device", "seq", "ts_us"),
    [(7, 1001, 1, TS), (2**32 - 1, 2**64 - 1, 2**32 - 1, -(2**63)), (0, 0, 0, 2**63 - 1)],
)
def test_copy_row(
    impl: ModuleType,
    kind: int,
    fields: list[tuple[int, int, Any]],
    tenant: int,
    device: int,
    seq: int,
    ts_us: int,
) -> None:
    raw = impl.encode_frame(kind, tenant, device, seq, ts_us, fields)
    frame = impl.decode_frame(raw)
    assert isinstance(frame, impl.Frame)
    decoded = frame.fields()  # float32 values as stored
    assert frame.copy_row == expected_copy_row(kind, tenant, device, seq, ts_us, decoded)


def test_copy_row_layout_by_hand(impl: ModuleType) -> None:
    """One row spelled out byte by byte, so the oracle itself is checked too."""
    raw = impl.encode_frame(1, 7, 1001, 5, 946_684_800_000_001, [(2, 3, 98), (3, 6, "x")])
    row = impl.decode_frame(raw).copy_row
    expected = (
        bytes.fromhex(
            "0008"
            "00000008"
            "0000000000000001"  # ts: 1 us after 2000-01-01
            "00000008"
            "00000000000003e9"  # device_id
            "00000004"
            "00000007"  # tenant_id
            "00000008"
            "0000000000000005"  # seq
            "00000002"
            "0001"  # kind
            "0000001c"
            "00000001"
            "00000000"
            "00000017"
            "00000001"
            "00000001"
            "00000004"
            "00000002"  # metrics int4[] {2}
            "00000020"
            "00000001"
            "00000000"
            "000002bd"
            "00000001"
            "00000001"
            "00000008"
            "4058800000000000"  # vals float8[] {98.0}
        )
        + struct.pack(">i", 11)
        + b'\x01{"3": "x"}'
    )
    assert row == expected


def test_copy_header_and_trailer(impl: ModuleType) -> None:
    assert impl.copy_header() == b"PGCOPY\n\xff\r\n\x00" + bytes(8)
    assert len(impl.copy_header()) == 19
    assert impl.copy_trailer() == b"\xff\xff"


# -- small things


@pytest.mark.parametrize("start", [0, 1, 0xFFFFFFFF, -1, 2**40 + 3])
def test_crc32_is_zlibs(impl: ModuleType, start: int) -> None:
    for data in (b"", b"a", bytes(range(256)) * 3, b"123456789"):
        assert impl.crc32(data, start) == zlib.crc32(data, start & 0xFFFFFFFF)
        assert impl.crc32(memoryview(data)) == zlib.crc32(data)
    assert impl.crc32(b"123456789") == 0xCBF43926  # the CRC-32 check value


def test_frame_and_error_are_immutable(impl: ModuleType) -> None:
    frame = impl.decode_frame(telemetry(impl, 1))
    error = impl.decode_frame(b"x")
    for event, name in ((frame, "seq"), (frame, "raw"), (error, "code"), (error, "offset")):
        with pytest.raises(AttributeError):
            setattr(event, name, 1)
    with pytest.raises(TypeError):
        impl.Frame()
    with pytest.raises(TypeError):
        impl.DecodeError()
    assert "seq=1" in repr(frame)
    assert "BAD_MAGIC" in repr(error)


def test_fields_and_numeric(impl: ModuleType) -> None:
    fields = [(1, 1, 36.7), (2, 5, True), (3, 6, "on"), (1, 3, 80), (4, 7, b"z"), (5, 4, -1)]
    frame = impl.decode_frame(impl.encode_frame(1, 7, 1, 1, TS, fields))
    assert frame.fields() == [
        (1, 1, struct.unpack(">f", struct.pack(">f", 36.7))[0]),
        (2, 5, True),
        (3, 6, "on"),
        (1, 3, 80),
        (4, 7, b"z"),
        (5, 4, -1),
    ]
    assert frame.numeric() == {1: 80.0, 2: 1.0, 5: -1.0}
    assert all(type(v) is float for v in frame.numeric().values())
    assert frame.fields() is not frame.fields()  # a new list each time: callers may edit it


def test_decode_frame_refuses_trailing_bytes(impl: ModuleType) -> None:
    good = telemetry(impl, 1, flags=1)
    error = impl.decode_frame(good + b"\x00")
    assert (error.code, error.length, error.seq, error.ack_req) == (
        "MALFORMED",
        len(good) + 1,
        1,
        True,
    )
    assert impl.decode_frame(b"").code == "TRUNCATED"


UTF8_EDGES = [
    b"",
    b"plain",
    b"\xc2\x80",  # U+0080, the first two-byte character
    b"\xdf\xbf",
    b"\xe0\xa0\x80",  # U+0800
    b"\xed\x9f\xbf",  # U+D7FF, just below the surrogates
    b"\xee\x80\x80",  # U+E000, just above them
    b"\xef\xbf\xbf",
    b"\xf0\x90\x80\x80",  # U+10000
    b"\xf4\x8f\xbf\xbf",  # U+10FFFF, the last one
    b"\xed\xa0\x80",  # U+D800, a surrogate
    b"\xed\xbf\xbf",  # U+DFFF, a surrogate
    b"\xc0\x80",  # overlong NUL
    b"\xc1\xbf",
    b"\xe0\x9f\xbf",  # overlong
    b"\xf0\x8f\xbf\xbf",  # overlong
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xf5\x80\x80\x80",
    b"\xff",
    b"\x80",  # a lone continuation byte
    b"\xc2",  # cut short
    b"\xe2\x82",
    b"\xf0\x9f\x98",
    b"a\xe2\x82\xac",
    b"\xe2\x82\xacb\xe2\x82",
    b"\xe2\x28\xa1",
    b"\xf0\x9f\x98\x80\x00",
]


@pytest.mark.parametrize("last", [True, False], ids=["last", "followed"])
@pytest.mark.parametrize("text", UTF8_EDGES, ids=lambda b: b.hex() or "empty")
def test_utf8_edges(impl: ModuleType, text: bytes, last: bool) -> None:
    """A string field is MALFORMED exactly when Python's strict UTF-8 decoder refuses it."""
    body = struct.pack(">HBB", 9, 6, len(text)) + text
    fields: list[tuple[int, int, object]] = []
    if not last:
        # The next field starts with 0x80, a continuation byte: a check that
        # reads past the string's end would take it for part of the string.
        body += struct.pack(">HBB", 0x8080, 5, 0)
        fields = [(0x8080, 5, False)]
    raw = frame_bytes(4, 1, 2, 3, 4, body, 1 + len(fields))
    try:
        expected: object = text.decode("utf-8")
    except UnicodeDecodeError:
        expected = None
    event = impl.decode_frame(raw)
    if expected is None:
        assert event.code == "MALFORMED"
    else:
        assert event.fields() == [(9, 6, expected), *fields]


def test_nothing_pickles(impl: ModuleType) -> None:
    """Neither twin pickles its objects (a frame travels as its ``raw`` bytes)."""
    frame = impl.decode_frame(telemetry(impl, 1))
    for thing in (frame, impl.decode_frame(b"x"), impl.FrameDecoder()):
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(thing)


def test_any_of_several_keys_may_sign_during_a_rotation(impl: ModuleType) -> None:
    """A lookup may answer a tuple of keys (old and new overlap): any verifies."""
    old, new, other = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
    frames = [impl.encode_frame(1, 7, 9, seq, 1_763_000_000_000_000 + seq, [(1, 1, 72.0)],
                                auth=auth, key=key)
              for seq, (auth, key) in enumerate(((1, old), (1, new), (2, new), (1, other)))]
    decoder = impl.FrameDecoder(lambda device: (new, old))
    events = decoder.feed(b"".join(frames))
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Frame", "Frame", "Frame", "DecodeError"]
    assert events[3].code == "AUTH_FAILED"
    assert impl.decode_frame(frames[0], {9: (new, old)}).seq == 0  # a mapping works too
    assert impl.decode_frame(frames[0], {9: ()}).code == "AUTH_FAILED"  # no key: fails closed


def test_late_spans_name_each_devices_late_frames_only(impl: ModuleType) -> None:
    base = 1_700_000_000_000_000
    stream = b"".join(impl.encode_frame(1, 5, device, seq, base + ts, [(1, 1, 1.0)])
                      for device, seq, ts in ((7, 1, 50), (9, 1, 10), (7, 2, 20), (7, 3, 900),
                                              (9, 2, 30), (8, 1, 950), (7, 4, 5)))
    frames = [ev for ev in impl.FrameDecoder().feed(stream) if type(ev) is impl.Frame]
    assert impl.late_spans(frames, base + 100) == ([7, 9], [base + 5, base + 10],
                                                   [base + 50, base + 30])
    assert impl.late_spans(frames, base) == ([], [], [])
    assert impl.late_spans([], base) == ([], [], [])
