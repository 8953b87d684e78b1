"""The lifecycle state machine: every allowed move is made and recorded (who,
when, why), every other one is refused — through the registry and directly
in the database."""

from __future__ import annotations

import itertools

import psycopg
import pytest

from rmiot.registry import bindings, lifecycle, store
from rmiot.registry.devices import EVERYTHING
from rmiot.registry.lifecycle import STATES, TRANSITIONS
from rmiot.registry.store import PRECONDITION, RegistryError
from tests.registry.conftest import World

# How to reach each state from `registered`.
PATHS = {"registered": [], "active": ["active"], "suspended": ["active", "suspended"],
         "maintenance": ["active", "maintenance"], "retired": ["retired"],
         "scrapped": ["retired", "scrapped"]}
ALLOWED = [(a, b) for a, targets in TRANSITIONS.items() for b in targets]
REFUSED = [(a, b) for a in STATES for b in STATES if b not in TRANSITIONS[a]]


def walk(conn: psycopg.Connection[object], device: int, state: str) -> None:
    for step in PATHS[state]:
        lifecycle.transition(conn, device, step, "user:setup", f"towards {state}")


def test_the_state_machine_is_the_databases() -> None:
    assert set(PATHS) == set(STATES)
    assert len(ALLOWED) == 12 and len(REFUSED) == 24


def test_the_code_and_the_database_hold_the_same_transitions(world: World) -> None:
    with world.conn() as conn:
        rows = conn.execute("SELECT from_state, to_state FROM device_transitions").fetchall()
    assert set(rows) == set(ALLOWED)


@pytest.mark.parametrize(("start", "target"), ALLOWED)
def test_every_allowed_transition_is_made_and_recorded(world: World, start: str,
                                                       target: str) -> None:
    with world.conn() as conn:
        device = world.device(conn, f"ok-{start}-{target}").id
        walk(conn, device, start)
        assert lifecycle.transition(conn, device, target, "user:alice",
                                    f"{start} to {target}") == start
        state = conn.execute("SELECT state FROM devices WHERE id = %s", (device,)).fetchone()
        history = lifecycle.history(conn, device)
    assert state == (target,)
    expected: list[tuple[str | None, str]] = [(None, "registered")]
    for step in [*PATHS[start], target]:
        expected.append((expected[-1][1], step))
    assert [(h.from_state, h.to_state) for h in history] == expected
    assert (history[-1].actor, history[-1].reason) == ("user:alice", f"{start} to {target}")
    assert history[0].actor == "user:test" and history[0].reason == "registered"
    assert all(a.at_us <= b.at_us for a, b in itertools.pairwise(history))


@pytest.mark.parametrize(("start", "target"), REFUSED)
def test_every_other_transition_is_refused(world: World, start: str, target: str) -> None:
    with world.conn() as conn:
        device = world.device(conn, f"no-{start}-{target}").id
        walk(conn, device, start)
        before = lifecycle.history(conn, device)
        with pytest.raises(RegistryError) as info:
            lifecycle.transition(conn, device, target, "user:alice", "try")
        assert info.value.code == PRECONDITION
        assert f"device {device} is {start}" in str(info.value).replace("already ", "")
        if target != start:
            # The database refuses it whatever path the change takes.
            with pytest.raises(RegistryError) as info:
                store.set_state(conn, device, target)
            assert f"cannot go from {start} to {target}" in str(info.value)
        state = conn.execute("SELECT state FROM devices WHERE id = %s", (device,)).fetchone()
        assert state == (start,)
        assert lifecycle.history(conn, device) == before


def test_the_refusal_names_the_allowed_moves(world: World) -> None:
    with world.conn() as conn:
        device = world.device(conn, "names").id
        with pytest.raises(RegistryError, match="cannot become scrapped: it can go to active, "
                                                "retired"):
            lifecycle.transition(conn, device, "scrapped", "user:alice", "early")
        walk(conn, device, "scrapped")
        with pytest.raises(RegistryError, match="that is final"):
            lifecycle.transition(conn, device, "active", "user:alice", "revive")
        with pytest.raises(RegistryError, match="state must be one of"):
            lifecycle.transition(conn, device, "broken", "user:alice", "x")
        with pytest.raises(RegistryError, match="cannot go from scrapped to broken"):
            store.set_state(conn, device, "broken")


def test_a_transition_needs_a_reason(world: World) -> None:
    with world.conn() as conn:
        device = world.device(conn, "why").id
        with pytest.raises(RegistryError, match="needs a reason"):
            lifecycle.transition(conn, device, "active", "user:alice", "  ")
        with pytest.raises(RegistryError) as info:
            lifecycle.transition(conn, 987654321987, "active", "user:alice", "x")
        assert info.value.code == store.NOT_FOUND


def test_a_change_outside_the_registry_is_recorded_too(world: World) -> None:
    with world.conn() as conn:
        device = world.device(conn, "raw").id
        store.set_state(conn, device, "active")
        last = lifecycle.history(conn, device)[-1]
    assert (last.from_state, last.to_state, last.actor) == ("registered", "active",
                                                            "db:rmiot_app")


def test_a_new_device_starts_registered_or_active(world: World) -> None:
    with world.conn() as conn:
        for state in ("registered", "active"):
            store.register_device(conn, world.hospital, state=state)
        for state in ("suspended", "retired", "scrapped"):
            with pytest.raises(psycopg.errors.CheckViolation, match="starts registered"):
                store.register_device(conn, world.hospital, state=state)


def test_leaving_active_ends_the_open_binding(world: World) -> None:
    with world.conn() as conn:
        device = world.device(conn, "bound", state="active").id
        bindings.bind(conn, device, bindings.Target(world.patient, "12-3"), "user:nurse")
        lifecycle.transition(conn, device, "maintenance", "user:tech", "screen cracked")
        assert bindings.current(conn, device) is None
        [closed] = bindings.history(conn, EVERYTHING, device_id=device)
    assert closed.end_kind == "device_maintenance"
    assert (closed.unbound_by, closed.end_reason) == ("user:tech", "screen cracked")
