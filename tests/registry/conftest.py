"""Fixtures for the registry: a small world per test (a region, two
hospitals, a department, two vendors with models, an approval, patients) on
the real test database."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from rmiot.registry import approvals, models
from rmiot.registry.devices import Device, register
from rmiot.registry.fields import parse_device
from rmiot.security import patient_keys, patients
from rmiot.security.patient_keys import PatientKeys
from rmiot.security.patients import PatientIdentity
from rmiot.security.sm4 import Keyring
from rmiot.tenants import store as tenants

_worlds = itertools.count(1)
MONITOR_METRICS: list[dict[str, Any]] = [{"id": 1}, {"id": 2, "min": 50, "max": 100},
                   {"id": 1001, "name": "st_segment", "unit": "mV", "min": -5, "max": 5}]


@dataclass
class World:
    dsn: str
    stamp: str
    region: int
    hospital: int
    department: int
    other_hospital: int
    vendor: str                # vendor codes
    other_vendor: str
    monitor: int               # the vendor's models
    gateway_model: int
    pump: int                  # the other vendor's
    patient: int
    foreign_patient: int       # of the other hospital

    def conn(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True)

    def device(self, conn: psycopg.Connection[Any], serial: str, **columns: str) -> Device:
        """Register a device of the vendor's monitor model in the hospital."""
        spec, errors = parse_device({"tenant": str(self.hospital), "model": str(self.monitor),
                                     "serial": serial, **columns})
        assert not errors, errors
        return register(conn, spec, "user:test")


@pytest.fixture(scope="session")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> Keyring:
    return Keyring.load(tmp_path_factory.mktemp("keys") / "ring")


@pytest.fixture
def world(database: str, keyring: Keyring, tmp_path: Path) -> Iterator[World]:
    stamp = f"{next(_worlds)}x{time.time_ns() % 10**10}"
    with psycopg.connect(database, autocommit=True) as conn:
        region = tenants.create_tenant(conn, f"rr-{stamp}", "Region", "region")
        hospital = tenants.create_tenant(conn, f"rh-{stamp}", "Hospital", "hospital", region)
        department = tenants.create_tenant(conn, f"rd-{stamp}", "ICU", "department", hospital)
        other = tenants.create_tenant(conn, f"ro-{stamp}", "Other", "hospital", region)
        vendor = models.create_vendor(conn, f"v-{stamp}", "Vendor")
        other_vendor = models.create_vendor(conn, f"w-{stamp}", "Other vendor")
        monitor = models.create_model(conn, vendor.id, "M1", "monitor", MONITOR_METRICS)
        gateway = models.create_model(conn, vendor.id, "G1", "gateway", [])
        pump = models.create_model(conn, other_vendor.id, "P1", "infusion_pump",
                                   [{"id": 10}, {"id": 11}])
        for h in (hospital, other):
            approvals.approve(conn, h, vendor.id, "user:test")
        key = patients.pseudonym_key(tmp_path / "pseudonym")
        patient, _ = patient_keys.register_patient(conn, PatientKeys(keyring), key, hospital,
                                               PatientIdentity("张三", f"P{stamp}"))
        foreign, _ = patient_keys.register_patient(conn, PatientKeys(keyring), key, other,
                                               PatientIdentity("李四", f"Q{stamp}"))
    yield World(database, stamp, region, hospital, department, other, vendor.code,
                other_vendor.code, monitor.id, gateway.id, pump.id, patient, foreign)
