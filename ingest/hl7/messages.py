"""HL7 v2 messages in and acknowledgements out (original acknowledgement mode).

Parsing is python-hl7's (``hl7`` on PyPI): a small, maintained, pure-Python
parser that builds a message tree lazily from the delimiters the message's own
MSH declares, at about 0.2 ms for an ORU with a few OBX — what 2,000 messages
a second on one core needs. hl7apy was the other candidate: it validates
against the standard's message structures, which costs several times more per
message and rejects the slightly-off structures real monitor gateways send; the
checks that matter here (codes, units, values, times, the devices named) are
the platform's own and come with precise error locations.

``parse`` turns the bytes between the MLLP frame marks into a ``Message``
(the tree and its header), or raises ``MessageError`` with the header fields
it could still read, so even a broken message is answered with its own control
id. ``ack`` builds the ACK: MSA-1 AA (accepted), AE (application error: the
content is wrong, nothing of it is stored) or AR (rejected: unparseable, not
supported, not authorised), MSA-2 the message's control id, and one ERR segment
per problem — ERR-2 where (segment^sequence^field), ERR-3 the HL7 table 0357
code, ERR-4 severity (E error, W warning), ERR-8 what is wrong in words.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hl7

# HL7 table 0357, the codes used here.
SEGMENT_SEQUENCE = 100
REQUIRED_MISSING = 101
DATA_TYPE = 102
TABLE_VALUE = 103
UNSUPPORTED_MESSAGE = 200
UNSUPPORTED_EVENT = 201
UNSUPPORTED_PROCESSING = 202
UNSUPPORTED_VERSION = 203
UNKNOWN_KEY = 204
DUPLICATE_KEY = 205
RECORD_LOCKED = 206
INTERNAL = 207
CODE_TEXT = {SEGMENT_SEQUENCE: "Segment sequence error", REQUIRED_MISSING:
             "Required field missing", DATA_TYPE: "Data type error", TABLE_VALUE:
             "Table value not found", UNSUPPORTED_MESSAGE: "Unsupported message type",
             UNSUPPORTED_EVENT: "Unsupported event code", UNSUPPORTED_PROCESSING:
             "Unsupported processing id", UNSUPPORTED_VERSION: "Unsupported version id",
             UNKNOWN_KEY: "Unknown key identifier", DUPLICATE_KEY: "Duplicate key identifier",
             RECORD_LOCKED: "Application record locked", INTERNAL: "Application internal error"}

_control_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Problem:
    """One ERR segment: ``code`` from table 0357, where (segment id, its
    1-based repetition in the message, field number), ``text`` in words."""

    code: int
    text: str
    segment: str = ""
    sequence: int = 0
    field: int = 0
    severity: str = "E"

    def where(self) -> str:
        return f"{self.segment}-{self.sequence}-{self.field}" if self.segment else ""


class MessageError(Exception):
    """A message answered AR or AE as a whole; ``problems`` say why."""

    def __init__(self, ack_code: str, problems: Sequence[Problem],
                 header: Header | None = None) -> None:
        super().__init__("; ".join(p.text for p in problems))
        self.ack_code = ack_code
        self.problems = list(problems)
        self.header = header


class ContentError(MessageError):
    """The message's content is wrong (AE); nothing of it is taken."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__("AE", problems)


@dataclass(frozen=True, slots=True)
class Header:
    """What the ACK echoes from MSH, and what routing needs."""

    field_sep: str = "|"
    encoding: str = "^~\\&"
    sending_app: str = ""
    sending_facility: str = ""
    receiving_app: str = ""
    receiving_facility: str = ""
    message_code: str = ""       # MSH-9.1: ORU, ADT...
    trigger: str = ""            # MSH-9.2: R01, A02...
    control_id: str = ""         # MSH-10
    processing_id: str = "P"     # MSH-11
    version: str = ""            # MSH-12

    @property
    def message_type(self) -> str:
        return f"{self.message_code}^{self.trigger}"


@dataclass(frozen=True, slots=True)
class Message:
    tree: Any          # hl7.Message
    header: Header


def decode_text(raw: bytes) -> str:
    """The message as text: UTF-8, else GB18030 (what many Chinese HIS send),
    with the segment terminator normalised to CR."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        text = raw.decode("gb18030", errors="replace")
    return text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")


def _raw_header(text: str) -> Header | None:
    """MSH read by splitting the first segment: for messages python-hl7 refuses."""
    if not text.startswith("MSH") or len(text) < 8:
        return None
    sep = text[3]
    first = text.split("\r", 1)[0].split(sep)
    comp = first[1][:1] if len(first) > 1 and first[1] else "^"

    def at(n: int) -> str:  # MSH-n: the separator itself is MSH-1
        return first[n - 1] if len(first) >= n else ""

    msg_type = at(9).split(comp)
    return Header(sep, at(2) or "^~\\&", at(3), at(4), at(5), at(6), msg_type[0],
                  msg_type[1] if len(msg_type) > 1 else "", at(10), at(11) or "P", at(12))


def field(segment: Any, number: int, component: int = 1, repeat: int = 1) -> str:
    """SEG-number.component as text ('' when absent), unescaped."""
    try:
        value = segment.extract_field(1, number, repeat, component)
    except (IndexError, KeyError):
        return ""
    return str(value).strip()


def parse(raw: bytes) -> Message:
    """The message, or MessageError (AR) naming what is unreadable."""
    text = decode_text(raw)
    header = _raw_header(text)
    if header is None:
        raise MessageError("AR", [Problem(SEGMENT_SEQUENCE, "the message does not start "
                                          "with an MSH segment", "MSH", 1, 0)])
    try:
        tree = hl7.parse(text)
        msh = tree.segment("MSH")
    except Exception as exc:  # python-hl7 raises several kinds on malformed input
        raise MessageError("AR", [Problem(SEGMENT_SEQUENCE, f"unreadable message: {exc}")],
                           header) from None
    header = Header(header.field_sep, header.encoding, field(msh, 3), field(msh, 4),
                    field(msh, 5), field(msh, 6), field(msh, 9, 1), field(msh, 9, 2),
                    field(msh, 10), field(msh, 11) or "P", field(msh, 12))
    if not header.control_id:
        raise MessageError("AR", [Problem(REQUIRED_MISSING, "MSH-10 (message control id) "
                                          "is empty", "MSH", 1, 10)], header)
    if not header.version.startswith("2."):
        raise MessageError("AR", [Problem(UNSUPPORTED_VERSION, f"version {header.version!r}: "
                                          "HL7 v2.x only", "MSH", 1, 12)], header)
    if header.processing_id[:1] not in ("P", "T"):
        raise MessageError("AR", [Problem(UNSUPPORTED_PROCESSING,
                                          f"processing id {header.processing_id!r}: P or T",
                                          "MSH", 1, 11)], header)
    return Message(tree, header)


def escape(text: str, header: Header) -> str:
    """Text made safe inside a field (HL7 escape sequences)."""
    chars = (header.encoding + "^~\\&"[len(header.encoding):])[:4]
    comp, rep, esc, sub = chars[0], chars[1], chars[2], chars[3]
    out = text.replace(esc, f"{esc}E{esc}")
    for char, code in ((header.field_sep, "F"), (comp, "S"), (rep, "R"), (sub, "T")):
        out = out.replace(char, f"{esc}{code}{esc}")
    return out.replace("\r", " ").replace("\n", " ")


def ack(header: Header | None, code: str, problems: Sequence[Problem] = (),
        app: str = "RMIOT", facility: str = "RMIOT") -> bytes:
    """The ACK message for ``header``'s message (see the module docstring)."""
    h = header or Header()
    sep = h.field_sep
    comp = (h.encoding or "^")[0]
    now = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S+0000")
    msh = sep.join(("MSH", h.encoding, app, facility, escape(h.sending_app, h),
                    escape(h.sending_facility, h), now, "",
                    comp.join(("ACK", escape(h.trigger, h), "ACK")),
                    f"RMIOT{next(_control_ids)}", h.processing_id or "P", h.version or "2.6"))
    segments = [msh, sep.join(("MSA", code, escape(h.control_id, h)))]
    for p in problems:
        where = comp.join((p.segment, str(p.sequence), str(p.field))) if p.segment else ""
        segments.append(sep.join(("ERR", "", where,
                                  comp.join((str(p.code), CODE_TEXT.get(p.code, ""), "HL70357")),
                                  p.severity, "", "", "", escape(p.text, h))))
    return ("\r".join(segments) + "\r").encode()


def hl7_time(text: str, tz: dt.tzinfo) -> int:
    """Microseconds since the epoch of an HL7 DTM (YYYY[MM[DD[HH[MM[SS[.S...]]]]]][+/-ZZZZ]);
    ``tz`` when it has no offset. ValueError when it is not one."""
    value = text.strip()
    offset: dt.tzinfo = tz
    for sign in ("+", "-"):
        at = value.find(sign, 4)
        if at > 0:
            zone = value[at + 1:]
            if len(zone) != 4 or not zone.isdigit():
                raise ValueError(f"bad time zone offset in {text!r}")
            minutes = int(zone[:2]) * 60 + int(zone[2:])
            offset = dt.timezone(dt.timedelta(minutes=minutes if sign == "+" else -minutes))
            value = value[:at]
            break
    whole, _, frac = value.partition(".")
    if not whole.isdigit() or len(whole) not in (4, 6, 8, 10, 12, 14) or \
            (frac and not frac.isdigit()):
        raise ValueError(f"{text!r} is not an HL7 date/time")
    parts = [int(whole[i:i + 2 if i else 4]) for i in (0, 4, 6, 8, 10, 12) if i < len(whole)]
    year, month, day, hour, minute, second = parts + [0, 1, 1, 0, 0, 0][len(parts):]
    stamp = dt.datetime(year, month, day, hour, minute, second, tzinfo=offset)
    micros = int((frac + "000000")[:6]) if frac else 0
    return int(stamp.timestamp()) * 1_000_000 + micros
