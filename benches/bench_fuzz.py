"""Fuzz the RMF v1 decoders: the hypothesis properties with the ``long`` profile, then
a plain random-mutation loop against both twins for a fixed time.

The loop builds streams of valid frames, damages one, cuts the stream into random
chunks and checks what the properties check: no exception, events tile the
stream, every undamaged frame comes back, and the twins give the same events.

Prints progress, then as its last line one JSON object:
``fuzz_properties`` ("passed" / "failed" / "skipped"), ``fuzz_streams``,
``fuzz_bytes``, ``fuzz_failures``.  Exits non-zero on any failure.
Run: ``python benches/bench_fuzz.py [--seconds S] [--seed N] [--no-properties]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rmiot.core_ext import _frame_py  # noqa: E402

KEYS = {1001: bytes(range(16)), 1002: b"\xa5" * 32}


def twins() -> list[ModuleType]:
    try:
        from rmiot.core_ext import _frame
    except ModuleNotFoundError:
        print("compiled twin not built: fuzzing the pure twin alone")
        return [_frame_py]
    return [_frame_py, _frame]


def random_frame(rng: random.Random) -> bytes:
    fields: list[tuple[int, int, object]] = []
    for _ in range(rng.randrange(10)):
        vtype = rng.randrange(1, 8)
        value: object
        if vtype in (1, 2):
            value = rng.choice([rng.uniform(-1e6, 1e6), 0.0, -0.0, float("nan"), float("inf")])
        elif vtype == 3:
            value = rng.randrange(-(2**31), 2**31)
        elif vtype == 4:
            value = rng.randrange(-(2**63), 2**63)
        elif vtype == 5:
            value = rng.random() < 0.5
        elif vtype == 6:
            value = "".join(rng.choice("abc xyz é监") for _ in range(rng.randrange(30)))
        else:
            value = rng.randbytes(rng.randrange(60))
        fields.append((rng.randrange(12), vtype, value))
    auth = rng.choice([0, 0, 0, 1, 2])
    device = rng.choice([1001, 1002]) if auth else rng.randrange(2**64)
    return _frame_py.encode_frame(
        rng.choice([1, 2, 3, 4, 5]),
        rng.randrange(2**32),
        device,
        rng.randrange(2**32),
        rng.randrange(-(2**63), 2**63),
        fields,
        flags=rng.randrange(4),
        auth=auth,
        key=KEYS[device] if auth else None,
    )


def damage(rng: random.Random, frame: bytes) -> bytes:
    n = len(frame)
    how = rng.randrange(5)
    if how == 0:
        out = bytearray(frame)
        for _ in range(rng.randrange(1, 5)):
            out[rng.randrange(n)] ^= rng.randrange(1, 256)
        return bytes(out)
    if how == 1:
        start = rng.randrange(n)
        return frame[:start] + frame[rng.randrange(start + 1, n + 1) :]
    if how == 2:
        at = rng.randrange(1, n)
        return frame[:at] + rng.randbytes(rng.randrange(1, 20)) + frame[at:]
    if how == 3:
        return frame[: rng.randrange(n)]
    length = (int.from_bytes(frame[6:8], "big") + rng.randrange(1, 0x10000)) % 0x10000
    return frame[:6] + length.to_bytes(2, "big") + frame[8:]


def event_key(event: Any) -> tuple[Any, ...]:
    if hasattr(event, "code"):
        return (event.code, event.offset, event.length, event.device, event.seq)
    return (event.raw, event.copy_row, repr(event.fields()))


def decode(codec: ModuleType, data: bytes, rng: random.Random) -> list[Any]:
    decoder = codec.FrameDecoder(KEYS)
    events: list[Any] = []
    at = 0
    while at < len(data):
        step = rng.choice([1, 2, 7, 64, 1000, 65536])
        events += decoder.feed(data[at : at + step])
        at += step
    while decoder.pending():
        events.append(decoder.drop_pending())
        events += decoder.feed(b"")
    return events + decoder.eof()


def check_stream(codecs: list[ModuleType], rng: random.Random) -> int:
    good = [random_frame(rng) for _ in range(rng.randrange(2, 7))]
    k = rng.randrange(len(good))
    after = b"".join(good[k + 1 :])
    damaged = damage(rng, good[k])
    # Damage that leaves the whole frame in the stream damaged nothing: say "R"
    # inserted after its "R", or its last byte deleted and the next frame
    # starting with that very byte.
    while good[k] in damaged + after[: len(good[k]) - 1]:
        damaged = damage(rng, good[k])
    data = b"".join([*good[:k], damaged, after])
    if rng.random() < 0.2:
        data = rng.randbytes(rng.randrange(200)) + data
    expected = good[:k] + good[k + 1 :]
    reference = None
    for codec in codecs:
        # One seed per stream, so both twins see the same chunking.
        events = decode(codec, data, random.Random(len(data)))
        at = 0
        for event in events:
            if isinstance(event, codec.Frame):
                at += len(event.raw)
            else:
                assert event.offset == at and event.length > 0, (event, at)
                at += event.length
        assert at == len(data), "events do not cover the stream"
        frames = [e.raw for e in events if isinstance(e, codec.Frame)]
        assert frames == expected, "a good frame was lost or a bad one accepted"
        keys = list(map(event_key, events))
        assert reference is None or keys == reference, "the twins disagree"
        reference = keys
    return len(data)


def run_properties() -> str:
    env = {**os.environ, "RMIOT_HYPOTHESIS_PROFILE": "long", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "pytest", "-q", "tests/core_ext/test_properties.py"]
    print("$ RMIOT_HYPOTHESIS_PROFILE=long " + " ".join(command[2:]), flush=True)
    done = subprocess.run(command, cwd=REPO, env=env, check=False)
    return "passed" if done.returncode == 0 else "failed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="random-mutation loop time")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-properties", action="store_true", help="skip the hypothesis run")
    parser.add_argument("--replay", type=int, default=None, help="check one stream seed, verbosely")
    args = parser.parse_args()
    if args.replay is not None:
        check_stream(twins(), random.Random(args.replay))
        print("stream seed", args.replay, "passes")
        return

    properties = "skipped" if args.no_properties else run_properties()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"random-mutation loop: {args.seconds:g} s, seed {seed}", flush=True)
    rng = random.Random(seed)
    codecs = twins()
    streams = total = failures = 0
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        stream_seed = rng.randrange(2**63)
        try:
            total += check_stream(codecs, random.Random(stream_seed))
        except Exception:
            failures += 1
            print(f"FAILED on stream seed {stream_seed} (replay: --replay {stream_seed})")
            traceback.print_exc()
            if failures >= 5:
                break
        streams += 1
    print(f"{streams:,} streams, {total / 2**20:.1f} MiB, {failures} failures")
    print(
        json.dumps(
            {
                "fuzz_properties": properties,
                "fuzz_streams": streams,
                "fuzz_bytes": total,
                "fuzz_failures": failures,
            }
        )
    )
    if failures or properties == "failed":
        raise SystemExit(1)


if __name__ == "__main__":
    main()
