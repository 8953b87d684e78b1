"""What the message transports share, without a network: device ids from
topics and paths, a message's frames checked to be its device's, the
downlink split into acks and commands."""

from __future__ import annotations

from pathlib import Path

import pytest

from rmiot.core_ext import ACK_OK, ACK_STALE, KIND_COMMAND, Frame, encode_ack, encode_frame
from rmiot.ingest.payload import UNKNOWN_DEVICE, Refusal, device_id, rmf_events
from rmiot.ingest.sessions import read_downlink
from rmiot.registry.view import DeviceView
from rmiot.security.sm4 import Keyring
from tests.ingest.conftest import vitals


@pytest.mark.parametrize(("text", "expected"), [
    ("1", 1), ("9223372036854775807", 2**63 - 1), ("0", None), ("9223372036854775808", None),
    ("", None), ("-1", None), ("12a", None), ("²", None), ("١٢", None), (" 1", None),
    ("0" * 30 + "1", None),
])
def test_device_ids_are_the_registrys_range(text: str, expected: int | None) -> None:
    assert device_id(text) == expected


def test_frames_of_another_device_become_refusals(tmp_path: Path) -> None:
    view = DeviceView("", Keyring.load(tmp_path / "ring"))  # not started: no keys needed
    payload = vitals(3, 7, 1, 1000) + vitals(3, 8, 2, 1000, ack=False) + vitals(3, 7, 3, 1001)
    events = rmf_events(payload + b"RM\x01", 7, view)
    assert [type(e).__name__ for e in events] == ["Frame", "Refusal", "Frame", "DecodeError"]
    assert events[1] == Refusal(UNKNOWN_DEVICE, 3, 8, 2, False)
    assert events[3].code == "TRUNCATED"  # the message ends mid-frame


def test_downlink_splits_acks_and_commands() -> None:
    command = encode_frame(KIND_COMMAND, 3, 7, 5, 1000, [(0, 4, 5), (10, 1, 2.5)])
    data = encode_ack(3, 7, 1, 0, ACK_OK) + command + encode_ack(3, 7, 2, 0, ACK_STALE)
    acks, commands = read_downlink(data)
    assert acks == [(7, 1, ACK_OK), (7, 2, ACK_STALE)]
    assert len(commands) == 1 and type(commands[0]) is Frame
    assert commands[0].fields() == [(0, 4, 5), (10, 1, 2.5)]
    acks, commands = read_downlink(data[:-10])  # a cut-off end is left out
    assert acks == [(7, 1, ACK_OK)] and [c.raw for c in commands] == [command]
