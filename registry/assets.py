"""A device's asset data (the standard's 8.3): class and grade, purchase,
depreciation, and the calibration and inspection due dates — and what the
device is worth on a given day.

Depreciation, over ``useful_life_years`` from ``purchase_date``, to nothing at
the end of the useful life:

- ``straight_line``: the cost falls by the same amount every day;
- ``declining_balance``: double-declining, the value falls by ``2 / life`` of
  itself a year (continuously compounded by day), so most of it goes early.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, fields
from decimal import ROUND_HALF_UP, Decimal

DEPRECIATION_METHODS = ("straight_line", "declining_balance")
ASSET_CLASSES = ("I", "II", "III")
ASSET_GRADES = ("A", "B", "C")
CENT = Decimal("0.01")


@dataclass(frozen=True)
class AssetData:
    asset_class: str | None = None
    asset_grade: str | None = None
    purchase_date: dt.date | None = None
    purchase_cost: Decimal | None = None
    depreciation_method: str | None = None
    useful_life_years: int | None = None
    calibration_due: dt.date | None = None
    inspection_due: dt.date | None = None


ASSET_COLUMNS = tuple(f.name for f in fields(AssetData))


def book_value(asset: AssetData, on: dt.date) -> Decimal | None:
    """The device's value on ``on`` (None when cost, date, method or life is missing)."""
    cost, bought = asset.purchase_cost, asset.purchase_date
    life, method = asset.useful_life_years, asset.depreciation_method
    if cost is None or bought is None or life is None or method is None:
        return None
    years = Decimal(max((on - bought).days, 0)) / Decimal("365.25")
    if years >= life:
        return Decimal("0.00")
    if method == "straight_line":
        value = cost * (1 - years / life)
    else:
        rate = min(Decimal(2) / life, Decimal(1))
        value = cost * (1 - rate) ** years if rate < 1 else Decimal(0)
    return value.quantize(CENT, rounding=ROUND_HALF_UP)
