"""The asset ledger, depreciation and KPIs, each checked against a figure
computed here independently from the same small fixture."""

from __future__ import annotations

import datetime as dt
import math
from decimal import Decimal

import pytest

from rmiot.registry import kpis, ledger, work_orders
from rmiot.registry.assets import AssetData, book_value
from rmiot.registry.devices import Scope
from rmiot.registry.store import RegistryError
from tests.ops.conftest import District, write_frames

UTC = dt.UTC


@pytest.mark.parametrize("days", [0, 100, 365, 1000, 1826, 2000])
def test_depreciation_matches_an_independent_formula(days: int) -> None:
    bought = dt.date(2020, 1, 1)
    on = bought + dt.timedelta(days=days)
    years = days / 365.25
    for method, expected in (
            ("straight_line", 120_000 * max(0.0, 1 - years / 5)),
            ("declining_balance", 0.0 if years >= 5 else 120_000 * (1 - 2 / 5) ** years)):
        asset = AssetData(purchase_date=bought, purchase_cost=Decimal("120000.00"),
                          depreciation_method=method, useful_life_years=5)
        got = book_value(asset, on)
        assert got is not None and abs(float(got) - expected) <= 0.01, (method, days, got)
        lost = ledger.depreciation(asset, bought, on)
        assert abs(float(lost) - (120_000 - expected)) <= 0.01


def test_ledger_records_a_life_from_procurement_to_scrapping(district: District) -> None:
    d = district
    dev = d.device(d.ventilator_model, d.icu_a, d.hospital_a, purchase_date=dt.date(2021, 3, 1),
                   purchase_cost=Decimal("80000"), depreciation_method="straight_line",
                   useful_life_years=8, calibration_due=dt.date(2025, 1, 1))
    scope = Scope(d.hospital_a)
    t0 = dt.datetime(2021, 2, 1, tzinfo=UTC)
    with d.conn() as conn:
        for n, (kind, cost, doc) in enumerate((("procurement", "80000", "PO-1"),
                                               ("acceptance", None, "ACC-7"),
                                               ("deployment", None, ""),
                                               ("maintenance", "1200.50", "INV-9"))):
            ledger.record(conn, scope, dev, kind, t0 + dt.timedelta(days=30 * n), "user:eng",
                          cost=Decimal(cost) if cost else None, document_ref=doc)
        ledger.record(conn, scope, dev, "calibration", t0 + dt.timedelta(days=400), "user:eng",
                      cost=Decimal("300"), document_ref="CAL-2022-1",
                      next_due=dt.date(2026, 6, 1))
        book = ledger.ledger(conn, scope, dev, dt.date(2025, 3, 1))
        assert [e.kind for e in book.events] == ["procurement", "acceptance", "deployment",
                                                  "maintenance", "calibration"]
        assert book.events[1].document_ref == "ACC-7"
        assert book.maintenance_cost == Decimal("1500.50")
        assert book.device.asset.calibration_due == dt.date(2026, 6, 1)
        years = (dt.date(2025, 3, 1) - dt.date(2021, 3, 1)).days / 365.25
        assert abs(float(book.book_value or 0) - 80000 * (1 - years / 8)) <= 0.01
        with pytest.raises(RegistryError) as other:  # another hospital's caller
            ledger.ledger(conn, Scope(d.hospital_b), dev)
        assert other.value.code == "not_found"
        ledger.record(conn, scope, dev, "scrapping", t0 + dt.timedelta(days=2000), "user:eng",
                      document_ref="SCRAP-1", detail="beyond repair")
        state = conn.execute("SELECT state FROM devices WHERE id = %s", (dev,)).fetchone()
        assert state is not None and state[0] == "scrapped"


def _expected(series: list[tuple[dt.datetime, int]], lo: dt.datetime, hi: dt.datetime,
              gap: dt.timedelta) -> tuple[float, float, float, int]:
    """observed, up, in use (s) and uses, by walking the reports."""
    observed = up = in_use = 0.0
    uses = 0
    inside = [(t, s) for t, s in series if lo <= t < hi]
    for i, (t, s) in enumerate(inside):
        nxt = inside[i + 1][0] if i + 1 < len(inside) else hi
        held = (min(nxt, hi, t + gap) - t).total_seconds()
        observed += held
        up += held if s in (0, 1) else 0
        in_use += held if s == 1 else 0
        uses += s == 1 and (i == 0 or inside[i - 1][1] != 1)
    return observed, up, in_use, uses


def test_kpis_from_telemetry_match_an_independent_count(district: District) -> None:
    d = district
    lo = dt.datetime(2025, 3, 1, tzinfo=UTC)
    hi = dt.datetime(2025, 3, 2, tzinfo=UTC)
    asset = {"purchase_date": dt.date(2024, 3, 1), "purchase_cost": Decimal("36525"),
             "depreciation_method": "straight_line", "useful_life_years": 10}
    v1 = d.device(d.ventilator_model, d.icu_a, d.hospital_a, **asset)
    v2 = d.device(d.ventilator_model, d.icu_a, d.hospital_a)
    p1 = d.device(d.pump_model, d.building_a, d.hospital_a)
    # A day of reports every 10 minutes (a two-hour silence in v2's), cycling states.
    pattern = [0, 1, 1, 1, 0, 2, 2, 0, 1, 3, 1, 0]
    series: dict[int, list[tuple[dt.datetime, int]]] = {}
    for n, dev in enumerate((v1, v2, p1)):
        rows = []
        for i in range(-3, 144):
            t = lo + dt.timedelta(minutes=10 * i + n)
            if dev == v2 and 60 <= i < 72:
                continue
            rows.append((t, pattern[(i + n) % len(pattern)]))
        series[dev] = rows
        write_frames(d.dsn, dev, d.hospital_a,
                     [(t, [(304, s), (302, 100 + i / 6), (300, 90)])
                      for i, (t, s) in enumerate(rows)])
    with d.conn() as conn:
        order = work_orders.report(conn, Scope(d.hospital_a), "user:nurse", "alarm on power",
                                   device_id=v1, at=lo + dt.timedelta(hours=3))
        work_orders.step(conn, Scope(d.hospital_a), order.id, "close", "user:eng",
                         note="replaced fuse", cost=Decimal("450"),
                         at=lo + dt.timedelta(hours=7, minutes=30))
        ledger.record(conn, Scope(d.hospital_a), v1, "calibration", lo + dt.timedelta(hours=9),
                      "user:eng", cost=Decimal("50"))
        got = kpis.kpis(conn, d.hospital_a, lo, hi, "device")
        by_kind = {k.key: k for k in kpis.kpis(conn, d.hospital_a, lo, hi, "kind")}
        by_hospital = kpis.kpis(conn, d.region, lo, hi, "hospital")
    per = {k.key: k for k in got}
    totals = {"observed": 0.0, "up": 0.0}
    for dev in (v1, v2, p1):
        observed, up, in_use, uses = _expected(series[dev], lo, hi, kpis.MAX_GAP)
        k = per[dev]
        assert math.isclose(k.observed_s, observed) and math.isclose(k.up_s, up)
        assert math.isclose(k.in_use_s, in_use) and k.uses == uses
        assert k.uptime is not None and math.isclose(k.uptime, up / observed)
        assert k.utilisation is not None and math.isclose(k.utilisation, in_use / observed)
        inside = [i for i, (t, _) in enumerate(series[dev]) if lo <= t < hi]
        assert math.isclose(k.usage_hours, (inside[-1] - inside[0]) / 6)
        totals["observed"] += observed if dev != p1 else 0
        totals["up"] += up if dev != p1 else 0
    k1 = per[v1]
    assert k1.failures == 1 and k1.repairs == 1 and math.isclose(k1.mttr_h or 0, 4.5)
    assert math.isclose(k1.mtbf_h or 0, k1.up_s / 3600)
    assert k1.maintenance_cost == Decimal("500")
    assert k1.depreciation == Decimal("10.00")  # 36,525 over 10 years of 365.25 days: 10 a day
    assert k1.cost_per_use == (Decimal("510") / k1.uses).quantize(Decimal("0.01"))
    vents = by_kind["ventilator"]
    assert vents.devices == 2 and vents.uptime is not None
    assert math.isclose(vents.uptime, totals["up"] / totals["observed"])
    assert [k.key for k in by_hospital] == [d.hospital_a]
    assert by_hospital[0].devices == 3
