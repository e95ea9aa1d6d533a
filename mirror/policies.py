"""Eviction orders, as data: the names `[warm] policy` and `[cold] policy` take, the order the
index streams a tier's blobs in, and the same order in Python.

A policy orders a tier's entries, first to go first (`Policy.key` in Python, `Policy.sql` in the
index, the same order):
    lru   least recently used
    lfu   fewest hits, then least recently used
    gdsf  greedy-dual-size-frequency without aging: lowest hits/size first, so one big blob
          used once goes before many small ones used often (configs, small layers)

A leaf module (it imports nothing of the mirror's), so that the config can check its policy
names here and the eviction passes use the same table.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar


class Candidate(Protocol):
    """What a policy knows of a blob in a tier (store/index.py's Entry)."""

    @property
    def digest(self) -> Hashable: ...

    @property
    def size(self) -> int: ...

    @property
    def last_access(self) -> float: ...

    @property
    def hits(self) -> int: ...


E = TypeVar("E", bound=Candidate)


@dataclass(frozen=True)
class Policy:
    """An eviction order, as data: `key` sorts entries in Python (pure, for tests and small
    sets), `sql` is the same order for the index, which streams candidates in it so that a
    pass reads only as many rows as it evicts."""

    name: str
    key: Callable[[Candidate], tuple[float, ...]]
    sql: str

    def order(self, entries: Iterable[E]) -> list[E]:
        return sorted(entries, key=self.key)


LRU = Policy("lru", lambda e: (e.last_access,), "last_access")
LFU = Policy("lfu", lambda e: (e.hits, e.last_access), "hits, last_access")
GDSF = Policy(
    "gdsf",
    lambda e: ((e.hits + 1) / max(e.size, 1), e.last_access),
    "(hits + 1.0) / max(size, 1), last_access",
)
#: Every policy by the name `[warm] policy` and `[cold] policy` take.
POLICIES: dict[str, Policy] = {p.name: p for p in (LRU, LFU, GDSF)}
