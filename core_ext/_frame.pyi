"""Types of the RMF v1 codec: the compiled ``_frame`` and its pure twin ``_frame_py``.

``rmiot.core_ext`` re-exports these names whichever twin is loaded.
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Final, final

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

_KeyLookup = Callable[[int], bytes | tuple[bytes, ...] | None]
_Keys = _KeyLookup | Mapping[int, bytes] | Mapping[int, tuple[bytes, ...]] | None
_Buffer = bytes | bytearray | memoryview

MAGIC: Final = b"RM"
HEADER_LEN: Final = 32
CRC_LEN: Final = 4
TAG_LEN: Final = 16
MAX_FRAME_LEN: Final = 65587

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

ACK_STATUS: Final[dict[str, int]]
ERROR_CODES: Final[tuple[str, ...]]

@final
class Frame:
    """One decoded, CRC- (and HMAC-) verified frame.  Made by the decoder only."""

    @property
    def flags(self) -> int: ...
    @property
    def auth(self) -> int: ...
    @property
    def kind(self) -> int: ...
    @property
    def tenant(self) -> int: ...
    @property
    def device(self) -> int: ...
    @property
    def seq(self) -> int: ...
    @property
    def ts_us(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def raw(self) -> bytes: ...
    @property
    def copy_row(self) -> bytes: ...
    @property
    def ack_req(self) -> bool: ...
    def fields(self) -> list[tuple[int, int, object]]: ...
    def numeric(self) -> dict[int, float]: ...
    def beyond(self, bounds: dict[int, tuple[float, float]]) -> bool: ...

@final
class DecodeError:
    """One error event: what was wrong and which stream bytes it cost."""

    @property
    def code(self) -> str: ...
    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def tenant(self) -> int: ...
    @property
    def device(self) -> int: ...
    @property
    def seq(self) -> int: ...
    @property
    def ack_req(self) -> bool: ...

@final
class FrameDecoder:
    """Stream decoder: fed bytes as they arrive, returns events in stream order.  No I/O."""

    def __init__(self, keys: _Keys = None) -> None: ...
    @property
    def bytes_in(self) -> int: ...
    @property
    def frames_ok(self) -> int: ...
    @property
    def errors(self) -> int: ...
    def feed(self, data: _Buffer) -> list[Frame | DecodeError]: ...
    def eof(self) -> list[DecodeError]: ...
    def pending(self) -> int: ...
    def drop_pending(self) -> DecodeError | None: ...

def decode_frame(buf: _Buffer, keys: _Keys = None) -> Frame | DecodeError: ...
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
) -> bytes: ...
def encode_ack(tenant: int, device: int, seq: int, ts_us: int, status: int) -> bytes: ...
def copy_header() -> bytes: ...
def copy_trailer() -> bytes: ...
def late_spans(frames: Iterable[Frame], before_us: int) -> tuple[list[int], list[int],
                                                                 list[int]]: ...
def crc32(data: _Buffer, start: int = 0) -> int: ...
