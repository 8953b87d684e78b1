"""``rmiot frame decode|encode``: a device vendor's tools for RMF v1 frames.

decode reads frames from standard input and prints one JSON object a line,
in the shape of ``frame-v1-vectors.json`` (a frame, or ``{"error": CODE, ...}``):

- binary input: the whole input is one frame, unless ``--stream``;
- ``--hex``: hex text; each non-empty line is one frame, unless ``--stream``,
  where all of it (white space ignored) is one byte stream;
- ``--stream``: a byte stream of frames and garbage, decoded as the TCP server
  does (resynchronising after errors; a partial frame at the end is TRUNCATED).

``--keys FILE``: a JSON object of device id -> hex key (the vectors file's
``keys``; a whole vectors file works too), needed to verify HMAC frames.
Exit code 0 when every frame decoded, 1 when any error was printed.

encode reads JSON objects (one a line, the same shape decode prints) and writes
the frames: binary, or one hex line each with ``--hex``. HMAC frames are signed
with the device's key from ``--keys``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

import orjson

from rmiot.core_ext import DecodeError, FrameDecoder, decode_frame
from rmiot.core_ext.jsonform import JsonFormError, event_to_json, frame_from_json


class FrameToolError(Exception):
    pass


def load_keys(path: str | None) -> dict[int, bytes]:
    if not path:
        return {}
    try:
        data = orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise FrameToolError(f"cannot read keys from {path}: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("keys"), dict):
        data = data["keys"]
    if not isinstance(data, dict):
        raise FrameToolError(f"{path} must hold a JSON object of device id -> hex key")
    try:
        return {int(dev): bytes.fromhex(key) for dev, key in data.items()}
    except (ValueError, TypeError) as exc:
        raise FrameToolError(f"{path}: bad device id or hex key: {exc}") from None


def _chunks(stream: BinaryIO, hex_text: bool) -> Iterator[bytes]:
    pending = b""
    while chunk := stream.read(65536):
        if not hex_text:
            yield chunk
            continue
        digits = pending + b"".join(chunk.split())
        cut = len(digits) - len(digits) % 2
        pending = digits[cut:]
        try:
            yield bytes.fromhex(digits[:cut].decode("ascii"))
        except ValueError as exc:
            raise FrameToolError(f"input is not hex: {exc}") from None
    if pending:
        raise FrameToolError("hex input has an odd number of digits")


def decode(stdin: BinaryIO, stdout: TextIO, keys: dict[int, bytes], stream: bool,
           hex_text: bool) -> int:
    errors = 0

    def emit(event: object) -> None:
        nonlocal errors
        errors += isinstance(event, DecodeError)
        stdout.write(orjson.dumps(event_to_json(event)).decode() + "\n")  # type: ignore[arg-type]

    if stream:
        decoder = FrameDecoder(keys)
        for chunk in _chunks(stdin, hex_text):
            for event in decoder.feed(chunk):
                emit(event)
        for event in decoder.eof():
            emit(event)
    elif hex_text:
        for number, line in enumerate(stdin.read().splitlines(), start=1):
            if line.strip():
                try:
                    frame = bytes.fromhex(line.decode("ascii"))
                except ValueError as exc:
                    raise FrameToolError(f"line {number} is not hex: {exc}") from None
                emit(decode_frame(frame, keys))
    else:
        emit(decode_frame(stdin.read(), keys))
    return 1 if errors else 0


def encode(stdin: BinaryIO, stdout: BinaryIO, keys: dict[int, bytes], hex_text: bool) -> int:
    for number, line in enumerate(stdin.read().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
            key = None
            if isinstance(value, dict) and value.get("auth") and isinstance(value.get("device"),
                                                                            int):
                key = keys.get(value["device"])
            frame = frame_from_json(value, key)
        except orjson.JSONDecodeError as exc:
            raise FrameToolError(f"line {number}: not JSON: {exc}") from None
        except JsonFormError as exc:
            raise FrameToolError(f"line {number}: {exc}") from None
        stdout.write(frame.hex().encode() + b"\n" if hex_text else frame)
    stdout.flush()
    return 0


def main(action: str, keys_path: str | None, stream: bool, hex_text: bool) -> int:
    keys = load_keys(keys_path)
    try:
        if action == "decode":
            return decode(sys.stdin.buffer, sys.stdout, keys, stream, hex_text)
        return encode(sys.stdin.buffer, sys.stdout.buffer, keys, hex_text)
    except BrokenPipeError:  # the reader (head, less) left: not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's flush
        return 0
