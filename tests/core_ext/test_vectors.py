"""Every vector of frame-v1-vectors.json, on both twins, byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest

import rmiot.core_ext
from rmiot.core_ext import _frame_py
from rmiot.core_ext.jsonform import frame_from_json, frame_to_json

from .support import (
    BAD_VECTORS,
    COMPILED,
    GOOD_VECTORS,
    HERE,
    KEYS,
    PURE_ONLY,
    REPO,
    VECTORS,
    VECTORS_NAME,
    decode_stream,
    event_key,
    expected_copy_row,
    fields_from_json,
    spec_dir,
)


def by_name(vectors: list[dict[str, Any]]) -> list[Any]:
    return [pytest.param(v, id=v["name"]) for v in vectors]


def test_compiled_loaded() -> None:
    """The compiled twin is built and is what the package serves (unless RMIOT_PURE=1)."""
    if PURE_ONLY:
        assert rmiot.core_ext.IMPL == "python"
        return
    assert COMPILED is not None, (
        "rmiot.core_ext._frame is not built: run `python setup.py build_ext --inplace` "
        "(or set RMIOT_PURE=1 to test the pure twin alone)"
    )
    assert rmiot.core_ext.IMPL == "c"
    assert rmiot.core_ext.Frame is COMPILED.Frame
    assert COMPILED.__file__ is not None and not COMPILED.__file__.endswith(".py")


def test_vectors_copy_matches_spec() -> None:
    """The repo's copy of the vectors has not drifted from the shared spec."""
    shared = spec_dir() / VECTORS_NAME
    if not shared.exists():
        pytest.skip(f"no shared spec at {shared} (set RMIOT_SPEC_DIR)")
    assert (HERE / VECTORS_NAME).read_bytes() == shared.read_bytes()


def test_vectors_cover_every_error_code() -> None:
    codes = {v["expect"]["error"] for v in BAD_VECTORS}
    assert codes == set(_frame_py.ERROR_CODES)


@pytest.mark.parametrize("vector", by_name(GOOD_VECTORS))
def test_good_frame(impl: ModuleType, vector: dict[str, Any]) -> None:
    raw = bytes.fromhex(vector["hex"])
    frame = impl.decode_frame(raw, KEYS)
    assert isinstance(frame, impl.Frame), frame
    expect = vector["expect"]["frame"]
    assert frame_to_json(frame) == expect
    assert frame.raw == raw
    assert frame.count == len(expect["fields"])
    assert frame.ack_req == bool(expect["flags"] & 1)
    fields = fields_from_json(expect["fields"])
    assert frame.copy_row == expected_copy_row(
        expect["kind"], expect["tenant"], expect["device"], expect["seq"], expect["ts_us"], fields
    )
    assert frame.numeric() == {m: float(v) for m, vtype, v in fields if vtype <= 5}  # type: ignore[arg-type]


@pytest.mark.parametrize("vector", by_name(BAD_VECTORS))
def test_bad_frame(impl: ModuleType, vector: dict[str, Any]) -> None:
    raw = bytes.fromhex(vector["hex"])
    error = impl.decode_frame(raw, KEYS)
    assert isinstance(error, impl.DecodeError), error
    assert error.code == vector["expect"]["error"]
    assert (error.offset, error.length) == (0, len(raw))
    if error.code in ("BAD_CRC", "AUTH_FAILED", "MALFORMED") or (
        error.code == "TRUNCATED" and len(raw) >= 32
    ):
        # A whole v1 header was there: the error carries it (for the NACK).
        assert (error.tenant, error.device) == (7, int.from_bytes(raw[12:20], "big"))
        assert error.seq == int.from_bytes(raw[20:24], "big")
    else:
        assert (error.tenant, error.device, error.seq, error.ack_req) == (0, 0, 0, False)


@pytest.mark.parametrize("vector", by_name(VECTORS["frames"]))
def test_frame_vector_through_stream_decoder(impl: ModuleType, vector: dict[str, Any]) -> None:
    """The stream decoder agrees with decode_frame on each single-frame vector."""
    events = decode_stream(impl, bytes.fromhex(vector["hex"]), keys=KEYS)
    if "frame" in vector["expect"]:
        assert [frame_to_json(e) for e in events] == [vector["expect"]["frame"]]
    else:
        assert not [e for e in events if isinstance(e, impl.Frame)]
        assert events[0].code == vector["expect"]["error"]
        # Errors account for every byte, once.
        assert events[0].offset == 0
        assert sum(e.length for e in events) == len(vector["hex"]) // 2


@pytest.mark.parametrize("vector", by_name(VECTORS["streams"]))
def test_stream_vector(impl: ModuleType, vector: dict[str, Any]) -> None:
    events = decode_stream(impl, bytes.fromhex(vector["hex"]), keys=KEYS)
    frames = [frame_to_json(e) for e in events if isinstance(e, impl.Frame)]
    assert frames == vector["expect_frames"]


@pytest.mark.parametrize("vector", by_name(GOOD_VECTORS))
def test_encode_reproduces_vector(impl: ModuleType, vector: dict[str, Any]) -> None:
    frame = vector["expect"]["frame"]
    encoded = impl.encode_frame(
        frame["kind"],
        frame["tenant"],
        frame["device"],
        frame["seq"],
        frame["ts_us"],
        fields_from_json(frame["fields"]),
        flags=frame["flags"],
        auth=frame["auth"],
        key=KEYS.get(frame["device"]) if frame["auth"] else None,
    )
    assert encoded.hex() == vector["hex"]


@pytest.mark.parametrize("vector", by_name(GOOD_VECTORS))
def test_jsonform_round_trip(vector: dict[str, Any]) -> None:
    frame = vector["expect"]["frame"]
    key = KEYS.get(frame["device"]) if frame["auth"] else None
    assert frame_from_json(json.loads(json.dumps(frame)), key).hex() == vector["hex"]


@pytest.mark.skipif(COMPILED is None or PURE_ONLY, reason="compiled twin not under test")
def test_twins_agree_on_every_vector() -> None:
    assert COMPILED is not None
    for vector in VECTORS["frames"]:
        raw = bytes.fromhex(vector["hex"])
        pure, compiled = _frame_py.decode_frame(raw, KEYS), COMPILED.decode_frame(raw, KEYS)
        assert event_key(pure) == event_key(compiled), vector["name"]
    for vector in VECTORS["streams"]:
        raw = bytes.fromhex(vector["hex"])
        pure_events = decode_stream(_frame_py, raw, keys=KEYS)
        compiled_events = decode_stream(COMPILED, raw, keys=KEYS)
        assert list(map(event_key, pure_events)) == list(map(event_key, compiled_events))


@pytest.mark.skipif(COMPILED is None or PURE_ONLY, reason="compiled twin not under test")
def test_twins_have_the_same_names_and_constants() -> None:
    assert COMPILED is not None
    assert sorted(COMPILED.__all__) == sorted(_frame_py.__all__)
    for name in _frame_py.__all__:
        value = getattr(_frame_py, name)
        if not callable(value):
            assert getattr(COMPILED, name) == value, name


def test_package_exports_the_contract() -> None:
    for name in rmiot.core_ext.__all__:
        assert hasattr(rmiot.core_ext, name), name
    assert rmiot.core_ext.IMPL in ("c", "python")
    assert rmiot.core_ext.ACK_STATUS["BAD_CRC"] == rmiot.core_ext.ACK_BAD_CRC == 2
    assert rmiot.core_ext.ACK_STATUS["MALFORMED"] == 6
    assert "BAD_MAGIC" not in rmiot.core_ext.ACK_STATUS


def _import_with(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = "import rmiot.core_ext as c; print(c.IMPL, c.Frame.__module__)"
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_rmiot_pure_1_forces_the_pure_twin() -> None:
    done = _import_with({"RMIOT_PURE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["python", "rmiot.core_ext._frame_py"]


def test_rmiot_pure_0_requires_the_compiled_twin() -> None:
    done = _import_with({"RMIOT_PURE": "0"})
    if COMPILED is None:
        assert done.returncode != 0
        assert "not built" in done.stderr
    else:
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["c", "rmiot.core_ext._frame"]


def test_rmiot_pure_other_values_are_refused() -> None:
    done = _import_with({"RMIOT_PURE": "yes"})
    assert done.returncode != 0
    assert "RMIOT_PURE" in done.stderr


def test_unset_falls_back_only_when_not_built() -> None:
    """Unset RMIOT_PURE: the compiled twin if built, else the pure one, silently."""
    env = {k: v for k, v in os.environ.items() if k != "RMIOT_PURE"}
    code = (
        "import sys; sys.modules['rmiot.core_ext._frame'] = None  # as if not built\n"
        "import rmiot.core_ext as c; print(c.IMPL, c.Frame.__module__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["python", "rmiot.core_ext._frame_py"]
