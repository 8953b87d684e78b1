"""The JSON shapes: the devices' JSON form and the vectors' decoded-frame shape."""

from __future__ import annotations

import json
from typing import Any

import pytest

from rmiot.core_ext import ACK_STATUS, Frame, decode_frame, encode_frame
from rmiot.core_ext.jsonform import (
    JsonFormError,
    JsonReading,
    error_to_json,
    event_to_json,
    frame_from_json,
    frame_to_json,
    parse_json_form,
    readings_from_json,
)

from .support import GOOD_VECTORS, KEYS, TWINS

TS = 1_700_000_000_000_000


def test_the_spec_example() -> None:
    payload = b'{"seq": 12, "ts_us": 1700000000000000, "kind": 1, "fields": [[1, 72.5], [2, 98]]}'
    assert parse_json_form(payload) == [
        JsonReading(seq=12, ts_us=TS, kind=1, fields=((1, 2, 72.5), (2, 3, 98)))
    ]


def test_inferred_and_explicit_vtypes() -> None:
    fields = [
        [1, 72.5],
        [2, 98],
        [3, -(2**31)],
        [4, 2**31],
        [5, True],
        [6, "on 监护仪"],
        [7, {"hex": "00ff"}],
        [8, 1, 36.7],
        [9, 4, 5],
        [10, 5, False],
        [11, 7, {"hex": ""}],
    ]
    (reading,) = parse_json_form(json.dumps({"seq": 1, "ts_us": TS, "kind": 2, "fields": fields}))
    assert reading.fields == (
        (1, 2, 72.5),
        (2, 3, 98),
        (3, 3, -(2**31)),
        (4, 4, 2**31),
        (5, 5, True),
        (6, 6, "on 监护仪"),
        (7, 7, b"\x00\xff"),
        (8, 1, 36.7),
        (9, 4, 5),
        (10, 5, False),
        (11, 7, b""),
    )


def test_a_list_of_readings_keeps_its_order() -> None:
    items = [{"seq": n, "ts_us": TS + n, "kind": 1, "fields": []} for n in range(5)]
    assert [r.seq for r in parse_json_form(json.dumps(items))] == list(range(5))
    assert [r.seq for r in readings_from_json(items)] == list(range(5))


def test_a_reading_becomes_the_same_frame_as_binary() -> None:
    (reading,) = parse_json_form(
        '{"seq": 7, "ts_us": 1700000000000000, "kind": 1, "fields": [[1, 72.5], [21, true]]}'
    )
    raw = reading.encode(9, 1001, flags=1)
    assert raw == encode_frame(1, 9, 1001, 7, TS, [(1, 2, 72.5), (21, 5, True)], flags=1)
    frame = decode_frame(raw)
    assert isinstance(frame, Frame)
    assert (frame.tenant, frame.device, frame.seq, frame.auth, frame.ack_req) == (
        9,
        1001,
        7,
        0,
        True,
    )
    assert frame.numeric() == {1: 72.5, 21: 1.0}


def reading(**change: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"seq": 1, "ts_us": TS, "kind": 1, "fields": [[1, 1.5]]}
    obj.update(change)
    return obj


def with_field(*field: Any) -> dict[str, Any]:
    return reading(fields=[list(field)])


BAD_PAYLOADS = [
    (b"\xff{}", "not_utf8", ""),
    (b"{", "not_json", ""),
    (b'{"seq": NaN}', "not_json", ""),
    (b'{"seq": 1, "seq": 2, "ts_us": 1, "kind": 1, "fields": []}', "not_json", ""),
    (b"[" * 100_000 + b"]" * 100_000, "not_json", ""),
    (b"5", "bad_type", ""),
    (b"[]", "empty", ""),
    (json.dumps(reading(extra=1)), "unknown_key", ".extra"),
    (json.dumps({"seq": 1, "ts_us": TS, "fields": []}), "missing_key", ".kind"),
    (json.dumps(reading(seq=-1)), "out_of_range", ".seq"),
    (json.dumps(reading(seq=2**32)), "out_of_range", ".seq"),
    (json.dumps(reading(seq=True)), "bad_type", ".seq"),
    (json.dumps(reading(seq=1.0)), "bad_type", ".seq"),
    (json.dumps(reading(ts_us=2**63)), "out_of_range", ".ts_us"),
    (json.dumps(reading(ts_us="1")), "bad_type", ".ts_us"),
    (json.dumps(reading(kind=0x81)), "out_of_range", ".kind"),
    (json.dumps(reading(kind=0)), "out_of_range", ".kind"),
    (json.dumps(reading(fields={})), "bad_type", ".fields"),
    (json.dumps(reading(fields=[[1]])), "bad_field", ".fields[0]"),
    (json.dumps(reading(fields=[[1, 2, 3, 4]])), "bad_field", ".fields[0]"),
    (json.dumps(reading(fields=[1])), "bad_field", ".fields[0]"),
    (json.dumps(with_field(65536, 1.0)), "out_of_range", ".fields[0][0]"),
    (json.dumps(with_field(-1, 1.0)), "out_of_range", ".fields[0][0]"),
    (json.dumps(with_field(1, 2**63)), "out_of_range", ".fields[0][1]"),
    (json.dumps(with_field(1, None)), "bad_type", ".fields[0][1]"),
    (json.dumps(with_field(1, [1])), "bad_type", ".fields[0][1]"),
    (json.dumps(with_field(1, 1e308 * 10)), "not_json", ""),  # Infinity
    (b'{"seq":1,"ts_us":1,"kind":1,"fields":[[1,1e400]]}', "out_of_range", ".fields[0][1]"),
    (json.dumps(with_field(1, "x" * 256)), "too_long", ".fields[0][1]"),
    (json.dumps(with_field(1, "\ud800")), "bad_value", ".fields[0][1]"),
    (json.dumps(with_field(1, {"hex": "abc"})), "bad_value", ".fields[0][1]"),
    (json.dumps(with_field(1, {"hex": "zz"})), "bad_value", ".fields[0][1]"),
    (json.dumps(with_field(1, {"hex": "00", "x": 1})), "bad_type", ".fields[0][1]"),
    (json.dumps(with_field(1, {"hex": 5})), "bad_type", ".fields[0][1]"),
    (json.dumps(with_field(1, 0, 1.0)), "out_of_range", ".fields[0][1]"),
    (json.dumps(with_field(1, 8, 1.0)), "out_of_range", ".fields[0][1]"),
    (json.dumps(with_field(1, 1, 1e39)), "out_of_range", ".fields[0][2]"),
    (json.dumps(with_field(1, 1, "1")), "bad_type", ".fields[0][2]"),
    (json.dumps(with_field(1, 3, 2**31)), "out_of_range", ".fields[0][2]"),
    (json.dumps(with_field(1, 3, True)), "bad_type", ".fields[0][2]"),
    (json.dumps(with_field(1, 3, 1.0)), "bad_type", ".fields[0][2]"),
    (json.dumps(with_field(1, 5, 1)), "bad_type", ".fields[0][2]"),
    (json.dumps(with_field(1, 6, 5)), "bad_type", ".fields[0][2]"),
    (json.dumps(with_field(1, 7, "00")), "bad_type", ".fields[0][2]"),
    (json.dumps(reading(fields=[[1, 1.0]] * 256)), "too_many_fields", ".fields"),
    (
        json.dumps(reading(fields=[[1, {"hex": "00" * 30_000}]] * 3)),
        "body_too_long",
        ".fields",
    ),
    (json.dumps([reading(), reading(seq=-5)]), "out_of_range", "[1].seq"),
    (json.dumps([reading()] * 1001), "too_many_readings", ""),
]


@pytest.mark.parametrize(("payload", "reason", "path"), BAD_PAYLOADS)
def test_bad_payloads(payload: str | bytes, reason: str, path: str) -> None:
    with pytest.raises(JsonFormError) as caught:
        parse_json_form(payload)
    error = caught.value
    assert (error.code, error.reason, error.path) == ("MALFORMED", reason, path)
    assert ACK_STATUS[error.code] == 6
    assert isinstance(error, ValueError)


def test_readings_limit_is_the_callers() -> None:
    items = [reading(seq=n) for n in range(3)]
    with pytest.raises(JsonFormError):
        readings_from_json(items, max_readings=2)
    assert len(readings_from_json(items, max_readings=3)) == 3


def test_limits_are_inclusive() -> None:
    fields = [[1, "x" * 255]] + [[2, 0.5]] * 254  # 255 fields, a 255-byte string
    (one,) = parse_json_form(json.dumps(reading(fields=fields)))
    assert len(one.encode(1, 1)) == 36 + 259 + 254 * 11
    (two,) = parse_json_form(json.dumps(reading(fields=[[1, {"hex": "00" * 65530}]])))
    assert len(two.encode(1, 1)) == 36 + 65535


# -- the vectors' shape


@pytest.mark.parametrize("vector", GOOD_VECTORS, ids=lambda v: v["name"])
def test_frame_to_json_and_back_on_both_twins(vector: dict[str, Any]) -> None:
    raw = bytes.fromhex(vector["hex"])
    for module in TWINS:
        frame = module.decode_frame(raw, KEYS)
        shape = frame_to_json(frame)
        assert shape == vector["expect"]["frame"]
        assert event_to_json(frame) == shape
        # What `rmiot frame decode` prints is JSON and comes back the same.
        text = json.dumps(shape, ensure_ascii=False)
        assert frame_from_json(json.loads(text), KEYS.get(shape["device"])) == raw


def test_error_to_json_on_both_twins() -> None:
    for module in TWINS:
        error = module.decode_frame(b"RM\x02")
        expected = {
            "error": "BAD_VERSION",
            "offset": 0,
            "length": 3,
            "tenant": 0,
            "device": 0,
            "seq": 0,
            "ack_req": False,
        }
        assert error_to_json(error) == expected
        assert event_to_json(error) == expected


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"flags": 4}, "out_of_range"),
        ({"auth": 1}, "missing_key"),  # no key to sign with
        ({"kind": "1"}, "bad_type"),
        ({"fields": [[1, 1.0]]}, "bad_field"),  # the vectors' shape names the vtype
        ({"extra": 0}, "unknown_key"),
    ],
)
def test_frame_from_json_refuses(change: dict[str, Any], reason: str) -> None:
    shape = dict(GOOD_VECTORS[0]["expect"]["frame"], **change)
    with pytest.raises(JsonFormError) as caught:
        frame_from_json(shape)
    assert caught.value.reason == reason
