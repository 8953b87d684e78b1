"""Percentile sketches: the mergeable histograms kept in the rollups.

A value v ≠ 0 falls in bin ``±(OFFSET + ceil(ln|v| / ln γ))`` with
γ = (1 + α) / (1 − α) and α = 1 %; 0 has bin 0. Every value in a bin lies
within α (relative) of the value the bin stands for, so a percentile read from
merged sketches is within 1 % of the exact one (the same rank's value). Bins
order like the values they hold, negative ones below zero.

A sketch is a PostgreSQL ``int8[]`` of ``bin << 32 | count`` elements (SQL:
``rmiot_sketch_bin``/``rmiot_sketch_value``, migration 0010). Merging is a sum
of counts per bin, in SQL; reading percentiles off a merged sketch is here.

Percentiles follow ``percentile_disc``: the smallest value whose cumulative
share reaches q (rank ``ceil(q·n)``, at least 1).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence

ALPHA = 0.01
# ln((1 + α) / (1 - α)), to the digits migration 0010's SQL functions use.
LN_GAMMA = 0.020000666706669
GAMMA = math.exp(LN_GAMMA)
OFFSET = 50_000
COUNT_BITS = 32
_LN_MIDPOINT = math.log(2 / (1 + GAMMA))  # a bin's value: 2γ^i / (1 + γ), in log space


def bin_of(value: float) -> int:
    """The bin of a finite value (the twin of SQL ``rmiot_sketch_bin``)."""
    if value > 0:
        return OFFSET + math.ceil(math.log(value) / LN_GAMMA)
    if value < 0:
        return -(OFFSET + math.ceil(math.log(-value) / LN_GAMMA))
    return 0


def value_of(bin_: int) -> float:
    """The value a bin stands for (the twin of SQL ``rmiot_sketch_value``)."""
    if bin_ == 0:
        return 0.0
    magnitude = math.exp((abs(bin_) - OFFSET) * LN_GAMMA + _LN_MIDPOINT)
    return magnitude if bin_ > 0 else -magnitude


def percentiles(bins: Sequence[int], counts: Sequence[int],
                fractions: Sequence[float]) -> list[float]:
    """Percentiles of a merged sketch given as parallel ``bins`` (in ascending
    order, as the queries return them) and ``counts``; NaN for each fraction
    when the sketch is empty."""
    running = list(itertools.accumulate(counts))
    total = running[-1] if running else 0
    if total == 0:
        return [math.nan] * len(fractions)
    return [value_of(bins[bisect.bisect_left(running, max(1, math.ceil(q * total)))])
            for q in fractions]
