"""`rmiot frame decode|encode`, as a vendor runs it: a real process, stdin/stdout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

VECTORS = Path(__file__).resolve().parent / "core_ext" / "frame-v1-vectors.json"
RMIOT = [sys.executable, "-m", "rmiot.cli", "frame"]


def run(args: list[str], data: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*RMIOT, *args], input=data, capture_output=True, timeout=60)


def test_decode_prints_the_vectors_shape() -> None:
    vectors = json.loads(VECTORS.read_text())
    hex_lines = "\n".join(v["hex"] for v in vectors["frames"]).encode()
    out = run(["decode", "--hex", "--keys", str(VECTORS)], hex_lines)
    assert out.returncode == 1  # some vectors are errors
    printed = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(printed) == len(vectors["frames"])
    for vector, got in zip(vectors["frames"], printed, strict=True):
        expect = vector["expect"]
        if "frame" in expect:
            assert got == expect["frame"], vector["name"]
        else:
            assert got["error"] == expect["error"], vector["name"]


def test_decode_stream_recovers_the_good_frames() -> None:
    vectors = json.loads(VECTORS.read_text())
    for stream in vectors["streams"]:
        out = run(["decode", "--stream", "--keys", str(VECTORS)], bytes.fromhex(stream["hex"]))
        frames = [e for e in map(json.loads, out.stdout.splitlines()) if "error" not in e]
        assert frames == stream["expect_frames"], stream["name"]


def test_encode_round_trips_and_signs() -> None:
    vectors = json.loads(VECTORS.read_text())
    good = [v for v in vectors["frames"] if "frame" in v["expect"]]
    lines = "\n".join(json.dumps(v["expect"]["frame"]) for v in good).encode()
    out = run(["encode", "--hex", "--keys", str(VECTORS)], lines)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().split() == [v["hex"] for v in good]
    binary = run(["encode", "--keys", str(VECTORS)], lines)
    assert binary.stdout == b"".join(bytes.fromhex(v["hex"]) for v in good)


def test_bad_input_is_one_clear_line() -> None:
    out = run(["decode", "--hex"], b"52 4d zz\n")
    assert out.returncode == 1 and b"not hex" in out.stderr and b"Traceback" not in out.stderr
    out = run(["encode"], b'{"kind": 1}\n')
    assert out.returncode == 1 and out.stderr.startswith(b"rmiot: line 1:")
