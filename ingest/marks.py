"""Marks of late frames the batch writer stored, for the rollups to recompute.

The query service keeps its own rollups (migration 0010, ``rmiot.query.rollups``).
Its job finds recently stored rows by itself, scanning each device's rows from
its previous run minus ``query.rollup_scan_overlap_s`` (at least 90 s): a row
less late than that when committed is found. A frame landing later — a
device's buffer after an outage, a retransmission days late — must make its
bucket stale some other way: in the transaction of each COPY, the writer adds
one ``rollup_marks`` row naming, per device of the batch, the first and last ts
of its frames measured more than ``LATE_AFTER_S`` ago. The mark commits if and
only if the rows do, so no late row goes unseen, however late. One small INSERT
per batch that has late frames; on-time frames cost one comparison each
(``core_ext.late_spans``).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from typing import Any

import psycopg

from rmiot.core_ext import Frame, late_spans

MARK_SQL = b"INSERT INTO rollup_marks (device_ids, first_ts, last_ts) VALUES (%s, %s, %s)"
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# Frames measured longer ago than this are marked; the rollup job's scan
# (query.rollup_scan_overlap_s >= 90 s) finds the rest, with room for clocks
# and commit delays.
LATE_AFTER_S = 60


def _ts(us: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=us)


async def mark_stored(conn: psycopg.AsyncConnection[Any], frames: Sequence[Frame],
                      now_us: int | None = None) -> None:
    """Mark the late ones among ``frames``; call it in the transaction that
    stores them."""
    now = time.time_ns() // 1000 if now_us is None else now_us
    devices, firsts, lasts = late_spans(frames, now - LATE_AFTER_S * 1_000_000)
    if devices:
        await conn.execute(MARK_SQL, (devices, [_ts(t) for t in firsts],
                                      [_ts(t) for t in lasts]))
