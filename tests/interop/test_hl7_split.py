"""The HL7 v2 splitter (ingest/hl7/messages.py) on byte-exact vectors: the
encoding characters a message declares, repetitions, components and
subcomponents, escape sequences, and what makes a message unreadable (AR)."""

from __future__ import annotations

import pytest

from rmiot.ingest.hl7.messages import MessageError, parse

STANDARD = (b"MSH|^~\\&|GW|HOSP^x|RMIOT|R|20240101120000||ORU^R01^ORU_R01|C-1|P|2.6\r"
            b"PID|||A1^^^H&1.2&ISO^MR~440301198001011234^^^CHN^NNCHN||Zhang^San\r"
            b"OBX|1|NM|8867-4^Heart\\S\\rate^LN||72|/min|||||F|||20240101120000||||17\r"
            b"NTE|1||a\\F\\b\\T\\c\\R\\d\\E\\e \\X4F4B\\ \\H\\bold\\N\\ x\\.br\\y\r")


@pytest.mark.parametrize(("segment", "number", "component", "repeat", "expect"), [
    ("MSH", 1, 1, 1, "|"),
    ("MSH", 2, 1, 1, "^~\\&"),
    ("MSH", 4, 1, 1, "HOSP"),
    ("MSH", 4, 2, 1, "x"),
    ("MSH", 9, 2, 1, "R01"),
    ("MSH", 10, 1, 1, "C-1"),
    ("PID", 3, 1, 1, "A1"),
    ("PID", 3, 4, 1, "H"),           # the first subcomponent of an HD
    ("PID", 3, 1, 2, "440301198001011234"),
    ("PID", 3, 5, 2, "NNCHN"),
    ("PID", 3, 1, 3, ""),            # no third repetition
    ("PID", 5, 2, 1, "San"),
    ("PID", 40, 1, 1, ""),           # beyond the last field
    ("OBX", 3, 2, 1, "Heart^rate"),  # \S\ is the component separator as text
    ("OBX", 18, 1, 1, "17"),
    ("NTE", 3, 1, 1, "a|b&c~d\\e OK bold x y"),
])
def test_fields(segment: str, number: int, component: int, repeat: int, expect: str) -> None:
    message = parse(STANDARD)
    found = message.segment(segment)
    assert found is not None
    assert found.field(number, component, repeat) == expect


def test_the_encoding_characters_are_the_messages_own() -> None:
    message = parse(b"MSH#$%!@#GW#H1#R#R#2024##ORU$R01#C-2#T#2.5\n"
                    b"PID###I1$$$CHN$NNCHN%I2##N!S!1$G\n")
    assert message.header.message_type == "ORU^R01" and message.header.processing_id == "T"
    pid = message.segment("PID")
    assert pid is not None
    assert (pid.field(3, 5), pid.field(3, 1, 2), pid.field(5, 1), pid.field(5, 2)) == (
        "NNCHN", "I2", "N$1", "G")
    assert message.segment("PV1") is None


@pytest.mark.parametrize("raw", [
    b"this is not HL7",
    b"MSH",
    b"MSHA^~\\&|x",                   # an alphanumeric field separator
    b"MSH|^~\\&#*|GW|H",               # more than four encoding characters
    b"MSH|^~\\1|GW|H",                 # an alphanumeric encoding character
    b"MSH|^^\\&|GW|H",                # encoding characters not distinct
])
def test_no_usable_msh_is_unreadable(raw: bytes) -> None:
    with pytest.raises(MessageError) as caught:
        parse(raw)
    assert caught.value.ack_code == "AR" and caught.value.header is None


def test_a_line_that_is_no_segment_is_unreadable_but_the_header_is_kept() -> None:
    with pytest.raises(MessageError) as caught:
        parse(b"MSH|^~\\&|GW|H1|R|R|2024||ORU^R01|C-3|P|2.5\rPID|||1\rnot a segment|x\r")
    assert caught.value.ack_code == "AR" and "line 3" in str(caught.value)
    assert caught.value.header is not None and caught.value.header.control_id == "C-3"
