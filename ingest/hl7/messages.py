"""HL7 v2 messages in and acknowledgements out (original acknowledgement mode).

Parsing is a small strict splitter of our own (``Segment``): a message is
segments cut at CR, each cut into fields at the field separator MSH-1 declares;
a field is cut into repetitions and components (MSH-2's encoding characters)
only when it is read, and its HL7 escape sequences (``\\F\\ \\S\\ \\T\\ \\R\\
\\E\\``, ``\\Xhh..\\``; formatting ones dropped) are undone then. That costs a few
microseconds for an ORU with a few OBX, where building python-hl7's object
tree cost about a millisecond — half of the listener's CPU per message. (hl7apy
validates against the standard's message structures at several times that,
and rejects the slightly-off structures real monitor gateways send.) The checks
that matter here (codes, units, values, times, the devices named) are the
platform's own and come with precise error locations. A segment id that is not
three upper-case letters or digits, or encoding characters that are not four
distinct punctuation marks other than the field separator, make the message
unreadable (AR).

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
import re
from collections.abc import Sequence
from dataclasses import dataclass

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
class Delimiters:
    """The encoding characters a message declares in MSH-1 and MSH-2."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"


DEFAULT_DELIMITERS = Delimiters()
_SEGMENT_ID = re.compile(r"[A-Z0-9]{3}\Z")
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})+\Z")


class Segment:
    """One segment, cut into fields: ``fields[n]`` is SEG-n (for MSH too: its
    ``fields[1]`` is the field separator, ``fields[2]`` the encoding characters)."""

    __slots__ = ("delimiters", "fields", "name")

    def __init__(self, fields: list[str], delimiters: Delimiters) -> None:
        self.name = fields[0]
        self.fields = fields
        self.delimiters = delimiters

    def field(self, number: int, component: int = 1, repeat: int = 1) -> str:
        """SEG-number.component (its first subcomponent) of the repeat-th repetition,
        unescaped and stripped ('' when absent)."""
        fields = self.fields
        if number >= len(fields):
            return ""
        value = fields[number]
        if self.name == "MSH" and number <= 2:
            return value if component == repeat == 1 else ""
        d = self.delimiters
        if d.repetition in value:
            repeats = value.split(d.repetition)
            if repeat > len(repeats):
                return ""
            value = repeats[repeat - 1]
        elif repeat != 1:
            return ""
        if d.component in value:
            parts = value.split(d.component)
            if component > len(parts):
                return ""
            value = parts[component - 1]
        elif component != 1:
            return ""
        if d.subcomponent in value:  # the first subcomponent (as of an HD's namespace id)
            value = value.split(d.subcomponent, 1)[0]
        if d.escape in value:
            value = unescape(value, d)
        return value.strip()


def unescape(text: str, d: Delimiters) -> str:
    """``text`` with its HL7 escape sequences undone (formatting ones dropped)."""
    out: list[str] = []
    esc = d.escape
    at = 0
    while True:
        start = text.find(esc, at)
        end = text.find(esc, start + 1) if start >= 0 else -1
        if end < 0:
            out.append(text[at:])
            return "".join(out)
        out.append(text[at:start])
        code = text[start + 1:end]
        at = end + 1
        plain = {"F": d.field, "S": d.component, "T": d.subcomponent, "R": d.repetition,
                 "E": esc}.get(code)
        if plain is not None:
            out.append(plain)
        elif code[:1] == "X" and _HEX.match(code[1:]):
            out.append(bytes.fromhex(code[1:]).decode("utf-8", errors="replace"))
        elif code == ".br":
            out.append(" ")
        # \H\ \N\ (highlighting), .sp .fi .in ..., \C..\ \M..\ (character sets): dropped


@dataclass(frozen=True, slots=True)
class Message:
    segments: list[Segment]
    header: Header

    def segment(self, name: str) -> Segment | None:
        """The first segment called ``name``."""
        for segment in self.segments:
            if segment.name == name:
                return segment
        return None


def decode_text(raw: bytes) -> str:
    """The message as text: UTF-8, else GB18030 (what many Chinese HIS send),
    with the segment terminator normalised to CR."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        text = raw.decode("gb18030", errors="replace")
    if "\n" in text:
        text = text.replace("\r\n", "\r").replace("\n", "\r")
    return text.strip("\r")


def _delimiters(text: str) -> Delimiters | None:
    """MSH-1 and MSH-2 of a message starting with MSH, or None when they are unusable."""
    sep = text[3]
    chars = text[4:].split(sep, 1)[0] if len(text) > 4 else ""
    if not 1 <= len(chars) <= 4 or sep.isalnum() or sep.isspace() or sep in chars \
            or len(set(chars)) != len(chars) or any(c.isalnum() or c.isspace() for c in chars):
        return None
    chars += "^~\\&"[len(chars):]
    return Delimiters(sep, chars[0], chars[1], chars[2], chars[3])


def _raw_header(segment: Segment) -> Header:
    msh = segment.field
    return Header(segment.delimiters.field, segment.fields[2] if len(segment.fields) > 2
                  else "^~\\&", msh(3), msh(4), msh(5), msh(6), msh(9, 1), msh(9, 2),
                  msh(10), msh(11) or "P", msh(12))


def field(segment: Segment | None, number: int, component: int = 1, repeat: int = 1) -> str:
    """SEG-number.component as text ('' when absent or no segment), unescaped."""
    return segment.field(number, component, repeat) if segment is not None else ""


def parse(raw: bytes) -> Message:
    """The message, or MessageError (AR) naming what is unreadable."""
    text = decode_text(raw)
    d = _delimiters(text) if text.startswith("MSH") and len(text) >= 8 else None
    if d is None:
        raise MessageError("AR", [Problem(SEGMENT_SEQUENCE, "the message does not start "
                                          "with an MSH segment declaring its encoding "
                                          "characters", "MSH", 1, 0)])
    sep = d.field
    segments = []
    for line in text.split("\r"):
        if not line.strip():
            continue
        fields = line.split(sep)
        segments.append(Segment(fields, d))
    msh = segments[0]
    msh.fields.insert(1, sep)  # MSH-1 is the separator itself
    header = _raw_header(msh)
    for n, segment in enumerate(segments):
        if not _SEGMENT_ID.match(segment.name) or (n and segment.name == "MSH"):
            raise MessageError("AR", [Problem(SEGMENT_SEQUENCE, f"unreadable message: line "
                                              f"{n + 1} is not a segment "
                                              f"({segment.name[:8]!r})")], header)
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
    return Message(segments, header)


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
