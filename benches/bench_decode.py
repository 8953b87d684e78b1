"""Decode throughput of the RMF v1 codec, compiled twin against the pure one.

The workload is the ingest hot path: a long stream of 8-field float32
telemetry frames (CRC, no HMAC) cut into 64 KiB chunks as a socket would
deliver them, fed to one FrameDecoder on one core; a frame counts once it is
returned with its COPY row built.  A second run signs every frame with
HMAC-SHA256.  Each figure is the best of several runs (the machine is shared).

Prints the figures, then as its last line one JSON object:
``decode_c_fps``, ``decode_py_fps``, ``decode_hmac_c_fps``, ``c_over_py``.
Run: ``python benches/bench_decode.py [--frames N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rmiot.core_ext import _frame_py

CHUNK = 64 * 1024
TS = 1_763_000_000_000_000
KEY = bytes(range(16))


def stream(codec: ModuleType, frames: int, *, auth: int = 0) -> tuple[list[bytes], int]:
    """``frames`` distinct telemetry frames back to back, cut into 64 KiB chunks."""
    parts = []
    for seq in range(frames):
        fields = [(metric, 1, 60.0 + metric + seq % 50 / 8) for metric in range(1, 9)]
        parts.append(
            codec.encode_frame(
                1,
                7,
                1000 + seq % 64,
                seq,
                TS + seq * 1000,
                fields,
                auth=auth,
                key=KEY if auth else None,
            )
        )
    data = b"".join(parts)
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)], len(parts[0])


def decode_rate(
    codec: ModuleType, chunks: list[bytes], frames: int, runs: int, **kw: object
) -> float:
    """Frames per second, best of ``runs``; checks every frame came out."""
    best = float("inf")
    for _ in range(runs):
        decoder = codec.FrameDecoder(**kw)
        feed = decoder.feed
        decoded = 0
        started = time.perf_counter()
        for chunk in chunks:
            decoded += len(feed(chunk))
        elapsed = time.perf_counter() - started
        if decoded != frames or decoder.frames_ok != frames:
            raise SystemExit(f"{codec.__name__}: decoded {decoded} of {frames} frames")
        best = min(best, elapsed)
    return frames / best


def compiled() -> ModuleType:
    try:
        from rmiot.core_ext import _frame
    except ModuleNotFoundError:
        raise SystemExit(
            "the compiled twin is not built: python setup.py build_ext --inplace"
        ) from None
    return _frame


def report(what: str, fps: float) -> None:
    print(f"{what:<42} {fps:>14,.0f} frames/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--frames", type=int, default=1_000_000, help="frames for the compiled twin"
    )
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    c = compiled()
    chunks, size = stream(c, args.frames)
    print(
        f"stream: {args.frames:,} frames of {size} bytes (8 x float32, CRC), "
        f"{sum(map(len, chunks)) / 2**20:.1f} MiB in {len(chunks):,} chunks of 64 KiB; "
        f"pid {os.getpid()}, best of {args.runs}"
    )
    c_fps = decode_rate(c, chunks, args.frames, args.runs)
    report("compiled, CRC, COPY row", c_fps)

    py_frames = max(args.frames // 50, 1000)
    py_chunks, _ = stream(c, py_frames)
    py_fps = decode_rate(_frame_py, py_chunks, py_frames, max(args.runs // 2, 1))
    report(f"pure Python ({py_frames:,} frames)", py_fps)

    hmac_frames = max(args.frames // 5, 1000)
    hmac_chunks, hmac_size = stream(c, hmac_frames, auth=1)
    keys = {1000 + i: KEY for i in range(64)}
    hmac_fps = decode_rate(c, hmac_chunks, hmac_frames, args.runs, keys=keys)
    report(f"compiled, CRC + HMAC-SHA256 ({hmac_size} B)", hmac_fps)
    print(f"compiled / pure: {c_fps / py_fps:.1f}x")

    print(
        json.dumps(
            {
                "decode_c_fps": round(c_fps),
                "decode_py_fps": round(py_fps),
                "decode_hmac_c_fps": round(hmac_fps),
                "c_over_py": round(c_fps / py_fps, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
