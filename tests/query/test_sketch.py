"""The percentile sketch: the SQL bin function and its Python twin agree, every
value is within 1 % of its bin's value, and percentiles read off a sketch are
within 1 % of percentile_disc's."""

from __future__ import annotations

import math
import random

import psycopg

from rmiot.query import sketch

VALUES = [0.0, 1.0, -1.0, 1e-300, -1e-300, 5e-324, 1e300, -1e300, 0.5, 36.6, 72.0, 98.5,
          -2.0, 123456.789, 0.0101, 99.99999]


def test_the_sql_and_python_bins_agree(database: str) -> None:
    values = VALUES + [random.Random(3).uniform(-1e4, 1e4) for _ in range(500)]
    with psycopg.connect(database) as conn:
        rows = conn.execute("SELECT v, rmiot_sketch_bin(v), "
                            "rmiot_sketch_value(rmiot_sketch_bin(v)) "
                            "FROM unnest(%s::float8[]) v", (values,)).fetchall()
    for v, bin_, rep in rows:
        assert bin_ == sketch.bin_of(v), v
        assert math.isclose(rep, sketch.value_of(bin_), rel_tol=1e-12), v
        assert abs(rep - v) <= sketch.ALPHA * abs(v) * (1 + 1e-9), v


def test_percentiles_are_within_the_relative_error() -> None:
    rng = random.Random(11)
    values = [rng.lognormvariate(3, 1) for _ in range(5000)] + [-rng.random() for _ in range(50)]
    counts: dict[int, int] = {}
    for v in values:
        counts[sketch.bin_of(v)] = counts.get(sketch.bin_of(v), 0) + 1
    fractions = [0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 1.0]
    bins = sorted(counts)
    got = sketch.percentiles(bins, [counts[b] for b in bins], fractions)
    ordered = sorted(values)
    for q, approx in zip(fractions, got, strict=True):
        exact = ordered[max(1, math.ceil(q * len(ordered))) - 1]  # percentile_disc
        assert abs(approx - exact) <= sketch.ALPHA * abs(exact) + 1e-12, q
    assert all(math.isnan(p) for p in sketch.percentiles([], [], [0.5]))
