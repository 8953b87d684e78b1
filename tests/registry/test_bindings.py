"""Device ↔ patient / bed / episode bindings over time."""

from __future__ import annotations

import psycopg
import pytest

from rmiot.registry import bindings
from rmiot.registry.bindings import Target
from rmiot.registry.devices import Scope
from rmiot.registry.store import NOT_FOUND, PRECONDITION, RegistryError
from tests.registry.conftest import World


def test_bind_transfer_unbind_keeps_the_whole_history(world: World) -> None:
    with world.conn() as conn:
        device = world.device(conn, "pump-1", state="active",
                              department=str(world.department)).id
        scope = Scope(world.department)
        first = bindings.bind(conn, device, Target(world.patient, "ICU-4", "ADM-1"),
                              "user:nurse-a", "admitted", scope)
        assert (first.patient_id, first.bed, first.episode, first.bound_by) == (
            world.patient, "ICU-4", "ADM-1", "user:nurse-a")
        assert first.tenant_id == world.department and first.unbound_at_us is None
        second = bindings.transfer(conn, device, Target(None, "ICU-5"), "user:nurse-b",
                                   "moved to bed 5", scope)
        closed = bindings.unbind(conn, device, "user:nurse-c", "discharged", scope)
        assert closed.id == second.id and closed.end_kind == "unbind"
        assert bindings.current(conn, device) is None
        history = bindings.history(conn, scope, device_id=device)
        by_patient = bindings.history(conn, scope, patient_id=world.patient)
    assert [b.id for b in history] == [second.id, first.id]  # newest first
    old = history[1]
    assert (old.end_kind, old.unbound_by, old.end_reason) == ("transfer", "user:nurse-b",
                                                              "moved to bed 5")
    assert old.unbound_at_us is not None and old.unbound_at_us <= history[0].bound_at_us
    assert (history[0].bed, history[0].patient_id, history[0].unbound_by) == (
        "ICU-5", None, "user:nurse-c")
    assert [b.id for b in by_patient] == [first.id]


def test_one_open_binding_per_device(world: World) -> None:
    with world.conn() as conn:
        device = world.device(conn, "mon-1", state="active").id
        bindings.bind(conn, device, Target(world.patient), "user:nurse")
        with pytest.raises(RegistryError, match="already bound") as info:
            bindings.bind(conn, device, Target(None, "7"), "user:nurse")
        assert info.value.code == PRECONDITION
        with pytest.raises(RegistryError, match="already bound there"):
            bindings.transfer(conn, device, Target(world.patient), "user:nurse")
        # The database holds it against concurrent callers too.
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO device_bindings (device_id, tenant_id, bed, bound_by) "
                         "VALUES (%s, %s, 'x', 'raw')", (device, world.hospital))
        bindings.unbind(conn, device, "user:nurse")
        with pytest.raises(RegistryError, match="is not bound"):
            bindings.unbind(conn, device, "user:nurse")
        with pytest.raises(RegistryError, match="not bound: bind it"):
            bindings.transfer(conn, device, Target(None, "8"), "user:nurse")


def test_what_can_be_bound(world: World) -> None:
    with world.conn() as conn:
        idle = world.device(conn, "idle").id
        with pytest.raises(RegistryError, match="is registered: only an active device") as info:
            bindings.bind(conn, idle, Target(world.patient), "user:nurse")
        assert info.value.code == PRECONDITION
        device = world.device(conn, "mon-2", state="active").id
        with pytest.raises(RegistryError, match="names a patient, a bed, or both"):
            bindings.bind(conn, device, Target(), "user:nurse")
        with pytest.raises(RegistryError, match="not a patient of the device's hospital"):
            bindings.bind(conn, device, Target(world.foreign_patient), "user:nurse")
        with pytest.raises(RegistryError) as info:  # out of the scope's reach: not found
            bindings.bind(conn, device, Target(world.foreign_patient), "user:nurse",
                          scope=Scope(world.hospital))
        assert info.value.code == NOT_FOUND
        with pytest.raises(RegistryError) as info:
            bindings.bind(conn, device, Target(world.patient), "user:nurse",
                          scope=Scope(world.other_hospital))
        assert info.value.code == NOT_FOUND
        with pytest.raises(RegistryError, match="vendors do not see bindings"):
            bindings.history(conn, Scope(world.hospital, vendor_id=1), device_id=device)
        with pytest.raises(RegistryError) as info:
            bindings.history(conn, Scope(world.other_hospital), patient_id=world.patient)
        assert info.value.code == NOT_FOUND
