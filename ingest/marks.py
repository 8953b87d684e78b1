"""Marks of what the batch writer stored, for the rollups to recompute.

The query service keeps its own rollups (migration 0010, ``rmiot.query.rollups``).
A frame landing in a bucket already rolled up — a device's buffer after an
outage, a retransmission days late — must make that bucket stale. The writer
therefore records, in the transaction of each COPY, one ``rollup_marks`` row:
per device of the batch, the first and last ts it stored. The mark commits if
and only if the rows do, so no stored row can go unseen by the rollup job,
however late it is. One small INSERT per batch, not per frame.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import psycopg

MARK_SQL = b"INSERT INTO rollup_marks (device_ids, first_ts, last_ts) VALUES (%s, %s, %s)"
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class StoredFrame(Protocol):
    """What marking needs of a stored frame (``rmiot.core_ext.Frame`` has it)."""

    @property
    def device(self) -> int: ...
    @property
    def ts_us(self) -> int: ...


def spans_of(frames: Iterable[StoredFrame]) -> tuple[list[int], list[dt.datetime],
                                                       list[dt.datetime]]:
    """Per device, the first and last ts among ``frames``: the columns of one
    ``rollup_marks`` row."""
    spans: dict[int, list[int]] = {}
    for frame in frames:
        ts = frame.ts_us
        span = spans.get(frame.device)
        if span is None:
            spans[frame.device] = [ts, ts]
        elif ts < span[0]:
            span[0] = ts
        elif ts > span[1]:
            span[1] = ts
    ids = list(spans)
    return (ids, [EPOCH + dt.timedelta(microseconds=spans[i][0]) for i in ids],
            [EPOCH + dt.timedelta(microseconds=spans[i][1]) for i in ids])


async def mark_stored(conn: psycopg.AsyncConnection[Any],
                      frames: Sequence[StoredFrame]) -> None:
    """Record that ``frames`` were stored; call it in the transaction that
    stores them."""
    if frames:
        await conn.execute(MARK_SQL, spans_of(frames))
