"""Row-level access for query results, on top of the interceptor's check.

The interceptor decides whether a caller may ``act`` on ``obj`` in the tenant
a request names; this module decides which rows inside that come back. The
tenants a caller reaches (``Authorizer.reach``) are split by the kind of role
that reaches them:

- ``full``: roles that see every row of their subtree (hospital_admin,
  department_head…);
- ``bound``: clinicians, who see a patient's data only while that patient is
  bound to a device in their reach (``device_bindings``, the binding's tenant
  in the clinician's subtree), and only for the bound period;
- ``deid``: commission roles, who get aggregates with groups smaller than k
  suppressed (``query.aggregates``);
- the ``patient`` role reaches nothing here yet: no table links a user to a
  patient record.

A row whose tenant is reached by none of them is answered like a row that does
not exist (NOT_FOUND), so ids cannot be probed across tenants.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

SubtreeOf = Callable[[int], frozenset[int]]  # a tenant -> it and its descendants
CACHE_MAX = 4096  # scopes cached; emptied (not aged) when full
COMMISSION_ROLES = frozenset({"commission_admin", "commission_analyst"})
BINDING_ROLES = frozenset({"clinician"})
UNLINKED_ROLES = frozenset({"patient"})


class Policy(Protocol):
    """What this module needs of ``rmiot.security.authz.Authorizer``."""

    def reach(self, subject: str, obj: str, act: str) -> frozenset[int]: ...
    def roles_of(self, subject: str) -> list[tuple[str, int]]: ...
    def permissions_of(self, role: str) -> list[tuple[str, str]]: ...

    @property
    def version(self) -> int: ...


@dataclass(frozen=True)
class Scope:
    """The tenants where a caller may see rows of one object type, by how."""

    full: frozenset[int] = frozenset()
    bound: frozenset[int] = frozenset()
    deid: frozenset[int] = frozenset()

    def sees(self, tenant: int) -> bool:
        """Every row of ``tenant`` (no binding or de-identification needed)."""
        return tenant in self.full

    def reaches(self, tenant: int) -> bool:
        return tenant in self.full or tenant in self.bound or tenant in self.deid


class Access:
    """Scopes per (caller, object, action), cached until the policy changes."""

    def __init__(self, policy: Policy, subtree: SubtreeOf) -> None:
        self.policy = policy
        self.subtree = subtree
        self._cache: dict[tuple[str, str, str], Scope] = {}
        self._version = -1

    def scope(self, subject: str, obj: str, act: str) -> Scope:
        if self.policy.version != self._version:
            self._cache.clear()
            self._version = self.policy.version
        key = (subject, obj, act)
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            found = self._cache[key] = self._compute(subject, obj, act)
        return found

    def _compute(self, subject: str, obj: str, act: str) -> Scope:
        reached = self.policy.reach(subject, obj, act)
        if not reached:
            return Scope()
        parts: dict[str, set[int]] = {"full": set(), "bound": set(), "deid": set()}
        rights: Mapping[str, bool] = {}
        for role, tenant in self.policy.roles_of(subject):
            if role not in rights:
                rights = {**rights, role: (obj, act) in self.policy.permissions_of(role)}
            if not rights[role] or role in UNLINKED_ROLES:
                continue
            kind = ("bound" if role in BINDING_ROLES
                    else "deid" if role in COMMISSION_ROLES else "full")
            parts[kind] |= self.subtree(tenant)
        # A tenant reached fully needs no narrower rule; reach() has the last word.
        full = frozenset(parts["full"]) & reached
        return Scope(full, frozenset(parts["bound"] - full) & reached,
                     frozenset(parts["deid"] - full) & reached)
