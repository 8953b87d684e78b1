"""What each page shows, as JSON, read through the API as the user (``Gateway``).

- ``overview``: the tenant tree (hospitals and their departments) with device
  counts online/offline/fault, equipment availability per kind and hospital,
  energy with month-on-month and year-on-year, the open alarms, and the
  platform's ingest figures;
- ``hospital``: the same for one hospital (a tenant outside the caller's reach
  is 404, like one that does not exist), with its devices;
- ``device``: the latest values and the recent frames of one device.

Commission roles (de-identified regional views, ``query.access``) get the
counts and aggregates only: alarms as counts per hospital and severity, no
device lists, no drill-down.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rmiot.catalogue import METRICS
from rmiot.proto import alarm_pb2, query_pb2, registry_pb2
from rmiot.query.access import Access
from rmiot.query.dashboard.gateway import ApiError, Gateway
from rmiot.security.authz import Authorizer

# Device kinds an emergency needs first, shown first in the availability table.
EMERGENCY_KINDS = ("monitor", "ventilator", "defibrillator", "infusion_pump")
MAX_HOSPITALS = 60  # availability per kind: one Batch item per hospital
RECENT_S = 900      # the device page's chart: the last 15 minutes


@dataclass(frozen=True)
class Viewer:
    """Who is looking: the session token for the API, and what they may see."""

    token: str
    request_id: str
    subject: str
    tenant: int
    deid: bool  # commission roles: de-identified aggregates only


class Views:
    def __init__(self, gateway: Gateway, authorizer: Authorizer,
                 ingest: Callable[[], Mapping[str, float]] | None = None) -> None:
        self.api = gateway
        self.authorizer = authorizer
        self.access = Access(authorizer, lambda tenant: authorizer.tree.subtree(tenant))
        self.ingest = ingest
        self._rate = 0.0
        self._last: tuple[float, float] | None = None  # (monotonic s, rows stored then)

    def deid(self, subject: str) -> bool:
        scope = self.access.scope(subject, "aggregate", "read")
        return bool(scope.deid) and not scope.full

    async def _call(self, v: Viewer, method: Any, request: Any) -> Any:
        return await self.api.call(method, request, v.token, v.request_id)

    async def _batch(self, v: Viewer, items: list[query_pb2.BatchItem]) -> dict[str, Any]:
        """Each item's reply (None when refused: out of reach, or failed)."""
        reply = await self._call(v, self.api.query.Batch, query_pb2.BatchRequest(items=items))
        field = {item.id: str(item.WhichOneof("query")) for item in items}  # reply field: same name
        return {r.id: getattr(r, field[r.id]) if r.code == 0 else None for r in reply.results}

    # -- pages ---------------------------------------------------------------------

    async def overview(self, v: Viewer, tenant: int = 0) -> dict[str, Any]:
        fleet = query_pb2.FleetRequest
        got = await self._batch(v, [
            query_pb2.BatchItem(id="hospitals", fleet=fleet(
                tenant_id=tenant, group_by=query_pb2.GROUP_HOSPITAL)),
            query_pb2.BatchItem(id="departments", fleet=fleet(
                tenant_id=tenant, group_by=query_pb2.GROUP_DEPARTMENT)),
            query_pb2.BatchItem(id="energy", energy=query_pb2.EnergyRequest(
                tenant_id=tenant, by_hospital=True)),
        ])
        if got["hospitals"] is None:
            raise ApiError(404, "not found")
        hospitals = [_counts(r) for r in got["hospitals"].rows]
        tree = self._tree(hospitals, got["departments"].rows if got["departments"] else [])
        return {"tree": tree,
                "availability": await self._availability(v, [h["id"] for h in hospitals]),
                "energy": _energy(got["energy"]), "alarms": await self._alarms(v, tenant),
                "ingest": self._ingest_figures(), "as_of_us": got["hospitals"].as_of_us}

    async def hospital(self, v: Viewer, hospital: int) -> dict[str, Any]:
        page = await self.overview(v, hospital)
        devices: list[dict[str, Any]] = []
        if not v.deid:
            reply = await self._call(v, self.api.registry.ListDevices,
                                     registry_pb2.ListDevicesRequest(tenant_id=hospital,
                                                                     page_size=1000))
            devices = [{"id": d.id, "serial_no": d.serial_no, "state": d.state,
                        "department_id": d.department_id, "location": d.location,
                        "model_id": d.model_id} for d in reply.devices]
        return {**page, "hospital": hospital, "devices": devices}

    async def device(self, v: Viewer, device: int) -> dict[str, Any]:
        if v.deid:
            raise ApiError(404, "not found")
        now_us = time.time_ns() // 1000
        latest = await self._call(v, self.api.query.Latest,
                                  query_pb2.LatestRequest(device_id=device))
        raw = await self._call(v, self.api.query.Raw, query_pb2.RawRequest(
            device_id=device, from_us=now_us - RECENT_S * 10**6, to_us=now_us + 10**6,
            page_size=5000))
        series: dict[int, list[tuple[int, float]]] = {}
        for frame in raw.frames:
            for metric, value in zip(frame.metrics, frame.values, strict=True):
                series.setdefault(metric, []).append((frame.ts_us, value))
        return {"device": device,
                "latest": [{"metric": x.metric, **_metric(x.metric), "value": x.value,
                            "ts_us": x.ts_us} for x in latest.values],
                "series": [{"metric": m, **_metric(m), "points": sorted(points)}
                           for m, points in sorted(series.items())]}

    async def act_on_alarm(self, v: Viewer, alarm: int, tenant: int, action: str,
                           comment: str) -> dict[str, Any]:
        method = self.api.alarms.Acknowledge if action == "ack" else self.api.alarms.Clear
        done = await self._call(v, method, alarm_pb2.AlarmActionRequest(
            tenant_id=tenant, alarm_id=alarm, comment=comment))
        return _alarm(done)

    # -- parts ---------------------------------------------------------------------

    def _tree(self, hospitals: list[dict[str, Any]],
              departments: Any) -> list[dict[str, Any]]:
        by_id = {h["id"]: {**h, "departments": []} for h in hospitals}
        tree = self.authorizer.tree
        for row in departments:
            if row.group_id in by_id:
                continue  # devices of the hospital itself, in no department
            home = by_id.get(tree.parent(int(row.group_id)) or 0)
            if home is not None:
                home["departments"].append(_counts(row))
        return sorted(by_id.values(), key=lambda h: str(h["name"]))

    async def _availability(self, v: Viewer, hospitals: list[int]) -> list[dict[str, Any]]:
        if not hospitals:
            return []
        got = await self._batch(v, [
            query_pb2.BatchItem(id=str(h), fleet=query_pb2.FleetRequest(
                tenant_id=h, group_by=query_pb2.GROUP_KIND))
            for h in hospitals[:MAX_HOSPITALS]])
        out = []
        for hospital, reply in got.items():
            if reply is None:
                continue
            kinds = sorted(({"kind": r.group, "total": r.total, "available": r.online,
                             "fault": r.in_fault} for r in reply.rows),
                           key=lambda k: (k["kind"] not in EMERGENCY_KINDS, k["kind"]))
            out.append({"hospital": int(hospital), "kinds": kinds})
        return out

    async def _alarms(self, v: Viewer, tenant: int) -> dict[str, Any]:
        try:
            reply = await self._call(v, self.api.alarms.List, alarm_pb2.ListAlarmsRequest(
                tenant_id=tenant, state="open", page_size=200))
        except ApiError as exc:
            if exc.status != 404:
                raise
            return {"visible": False, "open": [], "counts": []}
        if v.deid:  # counts only: which hospital, how severe
            counts: dict[tuple[int, str], int] = {}
            for a in reply.alarms:
                key = (int(a.tenant_id), a.severity)
                counts[key] = counts.get(key, 0) + 1
            return {"visible": True, "open": [], "counts": [
                {"tenant": t, "severity": s, "count": n} for (t, s), n in sorted(counts.items())]}
        return {"visible": True, "open": [_alarm(a) for a in reply.alarms], "counts": []}

    def _ingest_figures(self) -> dict[str, float]:
        """The platform process's figures, with its rows/s since the last look."""
        if self.ingest is None:
            return {}
        figures = dict(self.ingest())
        now, stored = time.monotonic(), figures.get("stored", 0.0)
        if self._last is None:
            self._last = (now, stored)
        elif now - self._last[0] >= 1.0:
            self._rate = (stored - self._last[1]) / (now - self._last[0])
            self._last = (now, stored)
        return {**figures, "rate": round(self._rate, 1)}


def _counts(row: Any) -> dict[str, Any]:
    return {"id": int(row.group_id), "name": row.group, "total": row.total,
            "online": row.online, "offline": row.offline + row.never_seen,
            "fault": row.in_fault, "inactive": row.inactive}


def _energy(reply: Any) -> list[dict[str, Any]]:
    if reply is None:
        return []
    return [{"zone": r.zone, "energy": r.energy,
             "previous_month": r.previous_month if r.HasField("previous_month") else None,
             "last_year": r.last_year if r.HasField("last_year") else None,
             "mom_pct": r.mom_pct if r.HasField("mom_pct") else None,
             "yoy_pct": r.yoy_pct if r.HasField("yoy_pct") else None} for r in reply.rows]


def _alarm(a: Any) -> dict[str, Any]:
    return {"id": a.id, "tenant": a.tenant_id, "device": a.device_id, "severity": a.severity,
            "state": a.state, "message": a.message, "rule": a.rule_code, "value": a.value,
            "raised_us": a.raised_us, "acked_by": a.acked_by}


def _metric(metric: int) -> dict[str, str]:
    code = METRICS.get(metric)
    return {"name": code.name if code else f"metric {metric}", "unit": code.unit if code else ""}
