"""A device's fields as text — the CSV import's columns, and the same names in
the gRPC API — parsed and checked one by one, with a reason for each refusal.

| column | holds |
|---|---|
| tenant | the hospital or department, by id or code (the API: the request's tenant) |
| department | a department under the tenant, by id or code (empty: the tenant itself) |
| model | the device model: its id, or ``<vendor code>/<model name>`` |
| serial | serial number, unique per model in a hospital |
| udi | Unique Device Identifier (GS1 / GB UDI, human-readable form), unique in a hospital |
| rfid, barcode, qr | codes, each unique in a hospital for its kind |
| location | building / floor / room, free text up to 200 characters |
| gateway | id of the gateway device that speaks for this one |
| state | ``registered`` (default) or ``active`` |
| auth_required | true / false; empty: the tenant's policy decides |
| asset_class | medical device risk class: I, II or III |
| asset_grade | the hospital's importance grade: A, B or C |
| purchase_date | YYYY-MM-DD, not in the future |
| purchase_cost | amount in yuan, at most 2 decimals |
| depreciation_method | straight_line or declining_balance (needs useful_life_years) |
| useful_life_years | 1..100 |
| calibration_due, inspection_due | YYYY-MM-DD |

A device needs a model and a serial number or a UDI. Empty means absent (in
an update: clear it). Values naming other rows (tenant, department, model,
gateway) and uniqueness are checked against the database by
``registry.checks``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from rmiot.registry.assets import ASSET_CLASSES, ASSET_GRADES, DEPRECIATION_METHODS, AssetData
from rmiot.registry.store import INVALID

CODE_KINDS = ("rfid", "barcode", "qr")
INITIAL_STATES = ("registered", "active")
COLUMNS = ("tenant", "department", "model", "serial", "udi", "rfid", "barcode", "qr",
           "location", "gateway", "state", "auth_required", "asset_class", "asset_grade",
           "purchase_date", "purchase_cost", "depreciation_method", "useful_life_years",
           "calibration_due", "inspection_due")
# What an update may change (identity — tenant, model, serial, UDI — stays).
UPDATABLE = ("department", "location", "gateway", "auth_required", *CODE_KINDS,
             "asset_class", "asset_grade", "purchase_date", "purchase_cost",
             "depreciation_method", "useful_life_years", "calibration_due", "inspection_due")

_GRAPHIC = re.compile(r"^[!-~]+$")          # printable ASCII, no space
_CODE = re.compile(r"^\S{1,128}$")
_TRUE, _FALSE = ("true", "yes", "1", "y", "t"), ("false", "no", "0", "n", "f")
MAX_COST = Decimal("999999999999.99")


@dataclass(frozen=True)
class FieldError:
    column: str
    reason: str
    code: str = INVALID


@dataclass
class DeviceSpec:
    """One device to register, parsed; references are still names or ids."""

    tenant: str = ""                 # id or code, as given
    department: str = ""
    model: str = ""
    serial_no: str | None = None
    udi: str | None = None
    codes: dict[str, str] = field(default_factory=dict)
    location: str | None = None
    gateway_id: int | None = None
    state: str = "registered"
    auth_required: bool | None = None
    asset: dict[str, Any] = field(default_factory=dict)   # AssetData field -> value

    def asset_data(self) -> AssetData:
        return AssetData(**self.asset)


class Bad(ValueError):
    """A value that does not parse; the message is the reason."""


def _text(limit: int, pattern: re.Pattern[str] | None = None,
          what: str = "") -> Callable[[str], str]:
    def parse(value: str) -> str:
        if len(value) > limit:
            raise Bad(f"at most {limit} characters")
        if pattern is not None and not pattern.match(value):
            raise Bad(what)
        return value
    return parse


def _date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise Bad(f"{value!r} is not a date (YYYY-MM-DD)") from None


def _purchase_date(value: str) -> dt.date:
    day = _date(value)
    if day > dt.date.today():
        raise Bad("a purchase date cannot be in the future")
    return day


def _cost(value: str) -> Decimal:
    try:
        amount = Decimal(value.replace(",", ""))
    except InvalidOperation:
        raise Bad(f"{value!r} is not an amount") from None
    if not amount.is_finite() or amount < 0 or amount > MAX_COST:
        raise Bad(f"an amount from 0 to {MAX_COST}")
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -2:
        raise Bad("at most 2 decimals")
    return amount


def _choice(options: tuple[str, ...], upper: bool = False) -> Callable[[str], str]:
    def parse(value: str) -> str:
        value = value.upper() if upper else value.lower()
        if value not in options:
            raise Bad(f"one of {', '.join(options)}")
        return value
    return parse


def _int(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise Bad(f"{value!r} is not a whole number") from None
        if not low <= number <= high:
            raise Bad(f"a number from {low} to {high}")
        return number
    return parse


def _bool(value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise Bad("true or false")


PARSERS: dict[str, Callable[[str], Any]] = {
    "tenant": _text(128), "department": _text(128), "model": _text(200),
    "serial": _text(64, _GRAPHIC, "printable characters without spaces"),
    "udi": _text(255, _GRAPHIC, "printable characters without spaces (the UDI's HRI form)"),
    **{kind: _text(128, _CODE, "no spaces") for kind in CODE_KINDS},
    "location": _text(200), "gateway": _int(1, 2**63 - 1),
    "state": _choice(INITIAL_STATES), "auth_required": _bool,
    "asset_class": _choice(ASSET_CLASSES, upper=True),
    "asset_grade": _choice(ASSET_GRADES, upper=True),
    "purchase_date": _purchase_date, "purchase_cost": _cost,
    "depreciation_method": _choice(DEPRECIATION_METHODS),
    "useful_life_years": _int(1, 100),
    "calibration_due": _date, "inspection_due": _date,
}
_ASSET = frozenset(AssetData.__dataclass_fields__)


def parse_value(column: str, raw: str) -> tuple[Any, FieldError | None]:
    """(value, None) or (None, the error); an empty value is None."""
    value = raw.strip()
    if not value:
        return None, None
    try:
        return PARSERS[column](value), None
    except Bad as exc:
        return None, FieldError(column, str(exc))


def parse_device(row: Mapping[str, str], default_tenant: str = "") -> tuple[DeviceSpec,
                                                                             list[FieldError]]:
    """A device to register from its columns; every field error is returned."""
    errors: list[FieldError] = []
    spec = DeviceSpec()
    for column, raw in row.items():
        if column not in PARSERS:
            errors.append(FieldError(column, "unknown column"))
            continue
        value, error = parse_value(column, raw or "")
        if error:
            errors.append(error)
        elif value is not None:
            _assign(spec, column, value)
    spec.tenant = spec.tenant or default_tenant
    if not spec.tenant:
        errors.append(FieldError("tenant", "required (or give a default tenant)"))
    if not spec.model and not any(e.column == "model" for e in errors):
        errors.append(FieldError("model", "required"))
    if spec.serial_no is None and spec.udi is None \
            and not any(e.column in ("serial", "udi") for e in errors):
        errors.append(FieldError("serial", "a device needs a serial number or a UDI"))
    errors += check_asset(spec.asset)
    return spec, errors


def parse_update(changes: Mapping[str, str]) -> tuple[dict[str, Any], list[FieldError]]:
    """An update: column -> new value (None: clear it)."""
    out: dict[str, Any] = {}
    errors: list[FieldError] = []
    for column, raw in changes.items():
        if column not in UPDATABLE:
            reason = ("cannot be changed" if column in PARSERS else "unknown field")
            errors.append(FieldError(column, reason))
            continue
        value, error = parse_value(column, raw)
        if error:
            errors.append(error)
        else:
            out[column] = value
    return out, errors


def check_asset(asset: Mapping[str, Any]) -> list[FieldError]:
    """Checks across asset fields (after an update, over the merged values)."""
    if asset.get("depreciation_method") and not asset.get("useful_life_years"):
        return [FieldError("useful_life_years", "needed with a depreciation method")]
    return []


def _assign(spec: DeviceSpec, column: str, value: Any) -> None:
    if column in CODE_KINDS:
        spec.codes[column] = value
    elif column in _ASSET:
        spec.asset[column] = value
    elif column == "serial":
        spec.serial_no = value
    elif column == "gateway":
        spec.gateway_id = value
    else:
        setattr(spec, column, value)
