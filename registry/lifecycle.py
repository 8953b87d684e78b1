"""A device's lifecycle: registered → active → suspended / maintenance →
retired → scrapped, every step recorded with who, when and why.

``TRANSITIONS`` is the state machine; migration 0007 holds the same table
(``device_transitions``) and its triggers refuse any other move and write
``device_state_history``, whatever path the change takes. ``transition``
checks first so the refusal names the moves that are allowed, and passes the
actor and reason to those triggers through the transaction's settings
(``rmiot.actor``, ``rmiot.reason``). Leaving ``active`` ends the device's open
patient binding (the trigger records it, with the same actor and reason).

Which states may send data is the ingest view's business (registered, active
and maintenance; see ``registry.view``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from rmiot.registry.store import NOT_FOUND, PRECONDITION, RegistryError

STATES = ("registered", "active", "suspended", "maintenance", "retired", "scrapped")
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "registered": ("active", "retired"),
    "active": ("suspended", "maintenance", "retired"),
    "suspended": ("active", "maintenance", "retired"),
    "maintenance": ("active", "suspended", "retired"),
    "retired": ("scrapped",),
    "scrapped": (),
}
MAX_REASON = 500


@dataclass(frozen=True)
class StateChange:
    device_id: int
    from_state: str | None       # None: the device was registered
    to_state: str
    actor: str
    reason: str
    at_us: int


def set_actor(conn: psycopg.Connection[Any], actor: str, reason: str = "") -> None:
    """Name who changes the registry, and why, for the rest of this transaction
    (read by migration 0007's triggers). Call inside ``conn.transaction()``."""
    conn.execute("SELECT set_config('rmiot.actor', %s, true), set_config('rmiot.reason', %s, "
                 "true)", (actor, reason))


def check_transition(device_id: int, current: str, to_state: str) -> None:
    if to_state not in STATES:
        raise RegistryError(f"state must be one of {', '.join(STATES)}")
    if to_state == current:
        raise RegistryError(f"device {device_id} is already {current}", PRECONDITION)
    allowed = TRANSITIONS[current]
    if to_state not in allowed:
        then = f"it can go to {', '.join(allowed)}" if allowed else "that is final"
        raise RegistryError(f"device {device_id} is {current} and cannot become {to_state}: "
                            f"{then}", PRECONDITION)


def transition(conn: psycopg.Connection[Any], device_id: int, to_state: str, actor: str,
               reason: str) -> str:
    """Move the device to ``to_state``; returns the state it left. The device
    must exist (callers check the caller's reach first)."""
    reason = reason.strip()
    if not reason:
        raise RegistryError("a state change needs a reason")
    if len(reason) > MAX_REASON:
        raise RegistryError(f"a reason has at most {MAX_REASON} characters")
    if not actor:
        raise RegistryError("a state change needs an actor")
    with conn.transaction():
        row = conn.execute("SELECT state FROM devices WHERE id = %s FOR UPDATE",
                           (device_id,)).fetchone()
        if row is None:
            raise RegistryError(f"device {device_id} does not exist", NOT_FOUND)
        current = str(row[0])
        check_transition(device_id, current, to_state)
        set_actor(conn, actor, reason)
        conn.execute("UPDATE devices SET state = %s, updated_at = now() WHERE id = %s",
                     (to_state, device_id))
    return current


def history(conn: psycopg.Connection[Any], device_id: int) -> list[StateChange]:
    """Every state the device entered, oldest first."""
    rows = conn.execute(
        "SELECT device_id, from_state, to_state, actor, coalesce(reason, ''), "
        "(extract(epoch FROM at) * 1000000)::bigint FROM device_state_history "
        "WHERE device_id = %s ORDER BY id", (device_id,)).fetchall()
    return [StateChange(int(r[0]), r[1], r[2], r[3], r[4], int(r[5])) for r in rows]
