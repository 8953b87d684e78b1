"""Properties over generated input: no crash, no hang, no lost good frame, twins agree.

The default settings keep this module to a few seconds; ``RMIOT_HYPOTHESIS_PROFILE=long``
selects the ``long`` profile (``benches/bench_fuzz.py`` runs it).
"""

from __future__ import annotations

import os
import struct
import zlib
from types import ModuleType
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rmiot.core_ext import _frame_py

from .support import KEYS, TWINS, event_key, expected_copy_row, frame_bytes

settings.register_profile(
    "long",
    max_examples=5_000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
SHORT = settings(max_examples=40, deadline=None, database=None)
PROFILE = (
    settings.get_profile("long") if os.environ.get("RMIOT_HYPOTHESIS_PROFILE") == "long" else SHORT
)

# Devices whose frames are signed: two with keys, one the decoder has no key for.
SIGNED_DEVICES = (1001, 1002, 4242)
NO_KEY = b"not in the key table"

metrics = st.integers(0, 12) | st.integers(0, 0xFFFF)
field = st.one_of(
    st.tuples(metrics, st.just(1), st.floats(width=32)),
    st.tuples(metrics, st.just(2), st.floats()),
    st.tuples(metrics, st.just(3), st.integers(-(2**31), 2**31 - 1)),
    st.tuples(metrics, st.just(4), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(metrics, st.just(5), st.booleans()),
    st.tuples(
        metrics,
        st.just(6),
        st.text(st.characters(exclude_categories=["Cs"]), max_size=40).filter(
            lambda s: len(s.encode("utf-8")) <= 255
        ),
    ),
    st.tuples(metrics, st.just(7), st.binary(max_size=80)),
)
field_lists = st.lists(field, max_size=12)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """A well-formed frame (encoded by the pure twin, checked against the vectors)."""
    auth = draw(st.sampled_from([0, 0, 0, 1, 2]))
    if auth:
        device = draw(st.sampled_from(SIGNED_DEVICES))
        key: bytes | None = KEYS.get(device, NO_KEY)
    else:
        device = draw(st.integers(0, 2**64 - 1))
        key = None
    return _frame_py.encode_frame(
        draw(st.integers(0, 255)),
        draw(st.integers(0, 2**32 - 1)),
        device,
        draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(-(2**63), 2**63 - 1)),
        draw(field_lists),
        flags=draw(st.integers(0, 3)),
        auth=auth,
        key=key,
    )


# Pieces of a hostile stream: frames, their prefixes, garbage, near-headers.
pieces = st.one_of(
    frames(),
    frames().flatmap(lambda f: st.integers(1, len(f) - 1).map(lambda n: f[:n])),
    st.binary(max_size=64),
    st.sampled_from([b"R", b"RM", b"RM\x01", b"RM\x01\x00", b"RM\x02", b"RM\x01\x30"]),
    st.binary(min_size=4, max_size=40).map(lambda b: b"RM\x01\x00" + b),
)


def cut_points(draw: st.DrawFn, length: int) -> list[int]:
    return sorted(set(draw(st.lists(st.integers(0, length), max_size=12))))


def decode(module: ModuleType, data: bytes, cuts: list[int], *, drain: bool) -> list[Any]:
    """Feed ``data`` cut at ``cuts``; with ``drain``, time out held frames as a server would."""
    decoder = module.FrameDecoder(KEYS)
    events: list[Any] = []
    start = 0
    for cut in [*cuts, len(data)]:
        events += decoder.feed(data[start:cut])
        start = cut
    while drain and decoder.pending():
        before = decoder.pending()
        dropped = decoder.drop_pending()
        assert dropped is not None
        events.append(dropped)
        events += decoder.feed(b"")
        assert decoder.pending() < before  # each timeout makes progress
    events += decoder.eof()
    assert decoder.pending() == 0
    assert decoder.bytes_in == len(data)
    assert decoder.frames_ok + decoder.errors == len(events)
    return events


def assert_tiles(module: ModuleType, events: list[Any], total: int) -> None:
    """Each event starts where the previous ended; together they cover the stream."""
    at = 0
    for event in events:
        if isinstance(event, module.Frame):
            at += len(event.raw)
        else:
            assert event.code in module.ERROR_CODES
            assert event.offset == at and event.length > 0, event
            at += event.length
    assert at == total


@PROFILE
@given(st.data())
def test_any_stream_any_chunking(data: st.DataObject) -> None:
    stream = b"".join(data.draw(st.lists(pieces, max_size=8), label="pieces"))
    cuts = cut_points(data.draw, len(stream))
    drain = data.draw(st.booleans(), label="drain")
    reference = None
    for module in TWINS:
        events = decode(module, stream, cuts, drain=drain)
        assert_tiles(module, events, len(stream))
        whole = decode(module, stream, [], drain=drain)
        keys = list(map(event_key, events))
        assert keys == list(map(event_key, whole)), "events depend on chunking"
        if reference is not None:
            assert keys == reference, "the twins disagree"
        reference = keys


def mutate(draw: st.DrawFn, frame: bytes) -> bytes:
    """The frame damaged so that it is not that frame any more."""
    n = len(frame)
    how = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "length", "garble"]))
    if how == "flip":
        out = bytearray(frame)
        for at in draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=4, unique=True)):
            out[at] ^= draw(st.integers(1, 255))
        return bytes(out)
    if how == "delete":
        start = draw(st.integers(0, n - 1))
        end = draw(st.integers(start + 1, n))
        return frame[:start] + frame[end:]
    if how == "insert":
        at = draw(st.integers(1, n - 1))
        return frame[:at] + draw(st.binary(min_size=1, max_size=20)) + frame[at:]
    if how == "truncate":
        return frame[: draw(st.integers(0, n - 1))]
    if how == "length":
        body_len = struct.unpack_from(">H", frame, 6)[0]
        new = draw(st.integers(0, 0xFFFF).filter(lambda v: v != body_len))
        return frame[:6] + struct.pack(">H", new) + frame[8:]
    return draw(st.binary(min_size=1, max_size=n))


@PROFILE
@given(st.data())
def test_good_frames_around_a_bad_one_are_recovered(data: st.DataObject) -> None:
    good = data.draw(st.lists(frames(), min_size=2, max_size=6), label="frames")
    assume(all(isinstance(_frame_py.decode_frame(f, KEYS), _frame_py.Frame) for f in good))
    k = data.draw(st.integers(0, len(good) - 1), label="damaged")
    damaged = mutate(data.draw, good[k])
    after = b"".join(good[k + 1 :])
    # Damage that leaves the whole frame in the stream damaged nothing: say "R"
    # inserted after its "R", or its last byte deleted and the next frame
    # starting with that very byte.
    assume(good[k] not in damaged + after[: len(good[k]) - 1])
    stream = b"".join([*good[:k], damaged, after])
    cuts = cut_points(data.draw, len(stream))
    expected = good[:k] + good[k + 1 :]
    for module in TWINS:
        # Draining stands in for the server's timeout: a damaged length may
        # otherwise hide the frames after it until the stream ends.
        events = decode(module, stream, cuts, drain=True)
        assert [e.raw for e in events if isinstance(e, module.Frame)] == expected
        assert_tiles(module, events, len(stream))


@PROFILE
@given(st.data())
def test_body_damage_with_a_good_crc_skips_exactly_that_frame(data: st.DataObject) -> None:
    """Damage the CRC cannot see (it was recomputed): AUTH_FAILED or MALFORMED skip
    just that frame, or it decodes as a different, valid frame."""
    good = data.draw(st.lists(frames(), min_size=3, max_size=5), label="frames")
    assume(all(isinstance(_frame_py.decode_frame(f, KEYS), _frame_py.Frame) for f in good))
    k = data.draw(st.integers(0, len(good) - 1), label="damaged")
    frame = bytearray(good[k])
    end = len(frame) - 4
    assume(end > 32)
    for at in data.draw(st.lists(st.integers(32, end - 1), min_size=1, max_size=3)):
        frame[at] = data.draw(st.integers(0, 255))
    frame[end:] = struct.pack(">I", zlib.crc32(frame[:end]))
    alone = _frame_py.decode_frame(bytes(frame), KEYS)
    kept = [bytes(frame)] if isinstance(alone, _frame_py.Frame) else []
    stream = b"".join([*good[:k], frame, *good[k + 1 :]])
    for module in TWINS:
        events = decode(module, stream, cut_points(data.draw, len(stream)), drain=False)
        assert [e.raw for e in events if isinstance(e, module.Frame)] == [
            *good[:k],
            *kept,
            *good[k + 1 :],
        ]
        if not kept:
            errors = [e for e in events if not isinstance(e, module.Frame)]
            assert [(e.code, e.length) for e in errors] == [(alone.code, len(frame))]


@PROFILE
@given(st.binary(max_size=200) | frames() | pieces)
def test_decode_frame_on_anything(buf: bytes) -> None:
    results = [event_key(module.decode_frame(buf, KEYS)) for module in TWINS]
    assert all(r == results[0] for r in results)


@PROFILE
@given(
    st.integers(0, 255),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(-(2**63), 2**63 - 1),
    field_lists,
)
def test_encode_decode_round_trip(
    kind: int, tenant: int, device: int, seq: int, ts_us: int, fields: list[Any]
) -> None:
    encoded = [m.encode_frame(kind, tenant, device, seq, ts_us, fields) for m in TWINS]
    assert all(e == encoded[0] for e in encoded)
    # What a receiver gets back: float32 values rounded, the rest exactly.
    stored = [
        (m, vt, struct.unpack(">f", struct.pack(">f", v))[0] if vt == 1 else v)
        for m, vt, v in fields
    ]
    for module in TWINS:
        frame = module.decode_frame(encoded[0])
        assert isinstance(frame, module.Frame)
        assert (frame.kind, frame.tenant, frame.device, frame.seq, frame.ts_us) == (
            kind,
            tenant,
            device,
            seq,
            ts_us,
        )
        assert repr(frame.fields()) == repr(stored)
        assert frame.copy_row == expected_copy_row(kind, tenant, device, seq, ts_us, stored)


@PROFILE
@given(
    st.binary(max_size=60) | st.text(max_size=20).map(lambda s: s.encode("utf-8", "surrogatepass"))
)
def test_utf8_check_is_pythons(text: bytes) -> None:
    """A string field is MALFORMED exactly when Python's strict decoder refuses it."""
    body = struct.pack(">HBB", 9, 6, len(text)) + text
    raw = frame_bytes(4, 1, 2, 3, 4, body, 1)
    try:
        text.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    for module in TWINS:
        event = module.decode_frame(raw)
        assert isinstance(event, module.Frame) is valid, (module, text)
        if not valid:
            assert event.code == "MALFORMED"


bounds_maps = st.dictionaries(
    metrics,
    st.tuples(st.floats(allow_nan=False), st.floats(allow_nan=False)),
    max_size=6,
)


@PROFILE
@given(field_lists, bounds_maps)
def test_beyond_is_any_numeric_field_outside_its_bounds(
    fields: list[tuple[int, int, Any]], bounds: dict[int, tuple[float, float]]
) -> None:
    """The rule engine's quick test agrees with the fields, on both twins."""
    raw = _frame_py.encode_frame(1, 7, 1, 1, 1_763_000_000_000_000, fields)
    for module in TWINS:
        frame = module.decode_frame(raw)
        expected = any(
            m in bounds and not bounds[m][0] < float(v) < bounds[m][1]
            for m, vtype, v in frame.fields()
            if vtype <= 5
        )
        assert frame.beyond(bounds) is expected, module
