"""Memo tables fed by what clients send (Accept headers, route names, verified passwords):
bounded in entries, and forgotten all at once when full.

Clearing at once rather than keeping an LRU order costs nothing on the hit path (a plain dict
lookup) and still bounds what a client can make the mirror keep; a table that refills was
only a cache.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Bounded(Generic[K, V]):
    """At most `limit` entries; the one that would pass it clears the table first."""

    __slots__ = ("_data", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._data: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        return self._data.get(key)

    def remember(self, key: K, value: V) -> V:
        if len(self._data) >= self.limit and key not in self._data:
            self._data.clear()
        self._data[key] = value
        return value

    def forget(self, key: K) -> None:
        self._data.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)
