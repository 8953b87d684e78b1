"""Token-bucket rate limits, keyed (per tenant, per device, per caller).

``RateLimiter(rate, burst)`` keeps one bucket per key: ``rate`` tokens a
second, at most ``burst`` saved up; ``take(key)`` spends one token or
refuses, ``take_up_to(key, n)`` as many of n as there are. Limits fail
closed for the key concerned only. Buckets idle long enough to be full again
are forgotten, so memory follows the active keys.
A key refused more than ``abuse_threshold`` times within a minute is reported
once a minute by ``take`` returning ``Refusal.SUSTAINED`` so the caller audits
it (one record, not one per refused request).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass


class Refusal(enum.Enum):
    NONE = 0          # allowed
    REFUSED = 1       # over the limit
    SUSTAINED = 2     # over the limit, and it has been going on: audit this one


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float
    rate: float
    burst: float
    refused: int = 0
    window_start: float = 0.0
    reported: float = 0.0


class RateLimiter:
    def __init__(self, rate: float, burst: float, abuse_threshold: int = 100) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.abuse_threshold = abuse_threshold
        self.buckets: dict[object, _Bucket] = {}
        self._next_sweep = 0.0

    def take(self, key: object, now: float | None = None) -> Refusal:
        """Spend one token for one request of ``key``, or refuse it."""
        return self.take_up_to(key, 1, now)[1]

    def take_up_to(self, key: object, n: int, now: float | None = None,
                   rate: float | None = None) -> tuple[int, Refusal]:
        """Spend up to n whole tokens at once (n requests of one key, e.g. the
        frames of one device in one read): how many are allowed, and whether
        the rest were refused (SUSTAINED once a minute under sustained abuse).
        ``rate`` overrides the limiter's rate for this key (a tenant's own
        quota; burst twice the rate), taking effect when it changes."""
        now = time.monotonic() if now is None else now
        rate = self.rate if rate is None else rate
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = _Bucket(rate * 2 if rate != self.rate else self.burst,
                                                 now, rate, rate * 2 if rate != self.rate
                                                 else self.burst, window_start=now)
        else:
            if bucket.rate != rate:
                bucket.rate, bucket.burst = rate, (rate * 2 if rate != self.rate else self.burst)
            bucket.tokens = min(bucket.burst, bucket.tokens + (now - bucket.stamp) * bucket.rate)
            bucket.stamp = now
        granted = min(n, int(bucket.tokens))
        bucket.tokens -= granted
        if granted == n:
            if now >= self._next_sweep:
                self._sweep(now)
            return granted, Refusal.NONE
        if now - bucket.window_start > 60.0:
            bucket.window_start, bucket.refused = now, 0
        bucket.refused += n - granted
        if bucket.refused > self.abuse_threshold and now - bucket.reported > 60.0:
            bucket.reported = now
            return granted, Refusal.SUSTAINED
        return granted, Refusal.REFUSED

    def _sweep(self, now: float) -> None:
        self.buckets = {k: b for k, b in self.buckets.items()
                        if now - b.stamp < b.burst / b.rate}
        self._next_sweep = now + max(self.burst / self.rate, 10.0)
