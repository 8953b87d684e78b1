"""Structured logs: one JSON object a line off a terminal."""

from __future__ import annotations

import json
import logging

import pytest

from rmiot import logs


def test_json_lines_carry_context(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup("info", "json")
        logging.getLogger("rmiot.test").info("batch written", extra={"rows": 4000})
        logging.getLogger("rmiot.test").debug("not shown")
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["msg"] == "batch written" and record["rows"] == 4000
    assert record["level"] == "info" and record["logger"] == "rmiot.test"
    assert record["ts"].endswith("Z")
