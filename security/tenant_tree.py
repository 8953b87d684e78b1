"""TenantTree: an immutable in-memory snapshot of the tenant tree.

Built from ``(id, parent_id)`` pairs of table ``tenants``; ``parent_id`` is
the truth (``path`` is derived from it and a move may update it later).
Lookups are dictionary accesses with no I/O, safe from any thread: a change
produces a new tree (:meth:`changed`) rather than mutating this one.

A node is *in* the tree only when its parent chain reaches a root: a node
under a missing parent, or on a cycle, is left out, so everything that asks
about it is refused (authorisation fails closed on broken data).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import psycopg

_SELECT = "SELECT id, parent_id FROM tenants"


class TenantTree:
    __slots__ = ("_children", "_lineage", "_parents", "_subtrees")

    def __init__(self, parents: Mapping[int, int | None]) -> None:
        self._parents: dict[int, int | None] = dict(parents)
        self._lineage = _lineages(self._parents)
        children: dict[int, list[int]] = {}
        for node, lineage in self._lineage.items():
            if len(lineage) > 1:
                children.setdefault(lineage[1], []).append(node)
        self._children = {node: tuple(kids) for node, kids in children.items()}
        # Filled on first use; dies with the snapshot, so it is never stale.
        self._subtrees: dict[int, frozenset[int]] = {}

    @classmethod
    async def load(cls, conn: psycopg.AsyncConnection[Any]) -> TenantTree:
        """The whole tree as the database has it now."""
        cur = await conn.execute(_SELECT)
        return cls(dict(await cur.fetchall()))

    async def reloaded(self, conn: psycopg.AsyncConnection[Any],
                       ids: Iterable[int]) -> TenantTree:
        """A new tree with these nodes re-read (added, moved or deleted)."""
        wanted = list(ids)
        cur = await conn.execute(_SELECT + " WHERE id = ANY(%s)", (wanted,))
        found: dict[int, int | None] = dict(await cur.fetchall())
        return self.changed(found, [i for i in wanted if i not in found])

    def changed(self, upserts: Mapping[int, int | None], removed: Iterable[int] = ()) -> TenantTree:
        """A new tree with ``upserts`` (id -> parent) applied and ``removed`` dropped."""
        parents = dict(self._parents)
        for node in removed:
            parents.pop(node, None)
        parents.update(upserts)
        return TenantTree(parents)

    def __contains__(self, node: object) -> bool:
        return node in self._lineage

    def __len__(self) -> int:
        return len(self._lineage)

    def __iter__(self) -> Iterator[int]:
        return iter(self._lineage)

    def parent(self, node: int) -> int | None:
        """The parent id (None for a root or a node not in the tree)."""
        lineage = self._lineage.get(node, ())
        return lineage[1] if len(lineage) > 1 else None

    def ancestors(self, node: int) -> tuple[int, ...]:
        """The node itself, then its parent, up to the root; () if not in the tree."""
        return self._lineage.get(node, ())

    def path(self, node: int) -> list[int]:
        """Ids from the root down to the node (what ``tenants.path`` holds)."""
        return list(reversed(self._lineage.get(node, ())))

    def subtree(self, node: int) -> frozenset[int]:
        """The node and all its descendants; empty if not in the tree."""
        found = self._subtrees.get(node)
        if found is not None:
            return found
        if node not in self._lineage:
            return frozenset()
        members = [node]
        stack = [node]
        while stack:
            kids = self._children.get(stack.pop(), ())
            members.extend(kids)
            stack.extend(kids)
        found = self._subtrees[node] = frozenset(members)
        return found

    def reaches(self, ancestor: int, node: int) -> bool:
        """True when ``ancestor`` is ``node`` or above it (a grant on it covers node)."""
        return ancestor in self._lineage.get(node, ())


def _lineages(parents: Mapping[int, int | None]) -> dict[int, tuple[int, ...]]:
    """id -> (id, parent, ..., root) for every node whose chain reaches a root."""
    lineage: dict[int, tuple[int, ...]] = {}
    broken: set[int] = set()
    for start in parents:
        if start in lineage or start in broken:
            continue
        chain: list[int] = []
        on_chain: set[int] = set()
        node: int | None = start
        tail: tuple[int, ...] | None = ()
        # Walk up until a root, a node already resolved, or trouble.
        while node is not None:
            if node in lineage:
                tail = lineage[node]
                break
            if node in broken or node in on_chain or node not in parents:
                tail = None
                break
            chain.append(node)
            on_chain.add(node)
            node = parents[node]
        if tail is None:
            broken.update(chain)
            continue
        for member in reversed(chain):
            tail = (member, *tail)
            lineage[member] = tail
    return lineage
