"""The standard's query tiers (T/GDIOT 009—2024 §7.1) and how they are held.

| tier | the standard | here |
|---|---|---|
| simple | ≤ 1 s: clear conditions, few records | one device or patient, by index |
| complex | ≤ 2 s: fuzzy conditions, many records | aggregates, fleet status, energy |
| batch | ≤ 3 s: many conditions or complex queries at once | a Batch call |

Every call gets a server-side deadline: the tier's budget, or the client's
gRPC deadline when that is sooner. Two mechanisms hold it, so no call hangs:
the database connections of each tier carry ``statement_timeout`` = the tier's
budget (a statement can never outlive it, whatever happens in the process),
and the handler's work runs under an ``asyncio`` timeout of the remaining time
(psycopg cancels the running statement when its task is cancelled). Running out
is ``DEADLINE_EXCEEDED`` with a message naming the tier and its budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from rmiot.config import QueryConfig


class Tier(enum.Enum):
    SIMPLE = "simple"
    COMPLEX = "complex"
    BATCH = "batch"


@dataclass(frozen=True)
class QueryOptions:
    """Tunables of the query service (the [query] configuration section)."""

    simple_s: float = 1.0
    complex_s: float = 2.0
    batch_s: float = 3.0
    min_group_size: int = 11          # k: smaller groups are suppressed for commission roles
    pool_max: int = 8                 # database connections per tier
    batch_max_items: int = 100
    batch_parallel: int = 8           # items of one batch running at once
    raw_window_max_s: int = 86_400    # the unary Raw call's widest window
    page_max: int = 10_000            # rows per page
    online_within_s: int = 300        # fleet status: seen this recently is online
    replica_max_staleness_s: float = 0.0  # > 0: complex tier on a standby this fresh

    @classmethod
    def of(cls, cfg: QueryConfig) -> QueryOptions:
        return cls(simple_s=cfg.simple_s, complex_s=cfg.complex_s, batch_s=cfg.batch_s,
                   min_group_size=cfg.min_group_size, pool_max=cfg.pool_max,
                   batch_max_items=cfg.batch_max_items, batch_parallel=cfg.batch_parallel,
                   online_within_s=cfg.online_within_s,
                   replica_max_staleness_s=cfg.replica_max_staleness_s)

    def budget(self, tier: Tier) -> float:
        return {Tier.SIMPLE: self.simple_s, Tier.COMPLEX: self.complex_s,
                Tier.BATCH: self.batch_s}[tier]


class QueryError(Exception):
    """A refusal with its gRPC status (NOT_FOUND, INVALID_ARGUMENT…)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class DeadlineExceeded(QueryError):
    def __init__(self, tier: Tier, budget: float) -> None:
        super().__init__(grpc.StatusCode.DEADLINE_EXCEEDED,
                         f"the {tier.value} tier's deadline ({budget:g} s) passed "
                         "before the query finished")


class Deadline:
    """When a call must be done: ``time.monotonic()`` at the end."""

    def __init__(self, tier: Tier, budget: float, client_remaining: float | None = None) -> None:
        self.tier = tier
        self.budget = budget if client_remaining is None else min(budget, client_remaining)
        self.end = time.monotonic() + self.budget

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def narrowed(self, tier: Tier, budget: float) -> Deadline:
        """A part of this call (a batch item) with a budget of its own."""
        return Deadline(tier, budget, self.remaining())

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Run the body within the deadline; DeadlineExceeded when it runs out
        (the body's database statement is cancelled with it)."""
        try:
            async with asyncio.timeout(self.remaining()):
                yield
        except TimeoutError:
            raise DeadlineExceeded(self.tier, self.budget) from None
