"""Time buckets: one origin and one local time zone for every bucket the query
service and the rollups make, so that a day means a local day everywhere.

The platform's calendar is China Standard Time (UTC+8, no daylight saving since
1991): the standard is Chinese and so are its hospitals. Every fixed-width
bucket is aligned on ``ORIGIN``, local midnight of Monday 2000-01-03, so
day buckets start at local midnight, week buckets on Mondays, and sub-day
buckets on whole minutes and hours as usual (the offset is whole hours).
Month buckets are local calendar months. Changing the zone means rebuilding the
day rollups (``rmiot query rollup --rebuild``).
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

TIMEZONE = "Asia/Shanghai"
ZONE = ZoneInfo(TIMEZONE)
ORIGIN = dt.datetime(2000, 1, 3, tzinfo=ZONE)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
ONE_US = dt.timedelta(microseconds=1)
MINUTE = dt.timedelta(minutes=1)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)


def from_us(us: int) -> dt.datetime:
    """Microseconds since 1970 UTC (the wire format) as an aware datetime."""
    return EPOCH + dt.timedelta(microseconds=us)


def to_us(ts: dt.datetime) -> int:
    return (ts - EPOCH) // ONE_US


def floor(ts: dt.datetime, width: dt.timedelta) -> dt.datetime:
    """The start of the fixed-width bucket holding ``ts``."""
    return ORIGIN + ((ts - ORIGIN) // width) * width


def ceil(ts: dt.datetime, width: dt.timedelta) -> dt.datetime:
    start = floor(ts, width)
    return start if start == ts else start + width


def aligned(ts: dt.datetime, width: dt.timedelta) -> bool:
    return floor(ts, width) == ts


def month_floor(ts: dt.datetime) -> dt.datetime:
    local = ts.astimezone(ZONE)
    return local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def add_months(ts: dt.datetime, months: int) -> dt.datetime:
    """``ts`` moved by whole calendar months, the day clamped to the month's end
    (31 March - 1 month = 28/29 February)."""
    local = ts.astimezone(ZONE)
    index = local.year * 12 + local.month - 1 + months
    year, month = divmod(index, 12)
    first_next = dt.date(year + (month + 1) // 12, (month + 1) % 12 + 1, 1)
    last_day = (first_next - dt.timedelta(days=1)).day
    return local.replace(year=year, month=month + 1, day=min(local.day, last_day))


def month_ceil(ts: dt.datetime) -> dt.datetime:
    start = month_floor(ts)
    return start if start == ts else add_months(start, 1)


def local_date(ts: dt.datetime) -> dt.date:
    return ts.astimezone(ZONE).date()


def start_of(day: dt.date) -> dt.datetime:
    """Local midnight starting ``day``."""
    return dt.datetime(day.year, day.month, day.day, tzinfo=ZONE)
