"""Single-flight: one detached task per key, its outcome shared by every waiter.

The work runs in a task of its own, so a waiter that goes away (client disconnect, cancel)
never cancels it: the next waiter, or the cache, still gets the result. Errors are shared too:
every waiter sees the same exception, not just the first one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
S = TypeVar("S")
V = TypeVar("V")


class Flights(Generic[K, S, V]):
    """In-flight work by key. `S` is a state object the work shares with its observers
    (a blob fill's progress), `V` the work's result."""

    def __init__(self) -> None:
        self._inflight: dict[K, tuple[S, asyncio.Task[V]]] = {}

    def join(
        self, key: K, state: Callable[[], S], work: Callable[[S], Awaitable[V]]
    ) -> tuple[S, asyncio.Task[V], bool]:
        """The running flight for `key`, or a new one; the bool says whether this call started it."""
        entry = self._inflight.get(key)
        if entry is not None:
            return entry[0], entry[1], False
        st = state()
        task: asyncio.Task[V] = asyncio.ensure_future(work(st))
        self._inflight[key] = (st, task)
        task.add_done_callback(lambda t: self._done(key, t))
        return st, task, True

    def _done(self, key: K, task: asyncio.Task[V]) -> None:
        if self._inflight.get(key, (None, None))[1] is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so a flight nobody awaited does not warn

    async def run(self, key: K, work: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """Await the shared outcome of `work` for `key`; the bool is True for a follower."""
        _, task, started = self.join(key, lambda: None, lambda _: work())  # type: ignore[arg-type,return-value]
        return await asyncio.shield(task), not started

    def state(self, key: K) -> S | None:
        """The state of the flight for `key`, if one runs (none is started)."""
        entry = self._inflight.get(key)
        return None if entry is None else entry[0]

    def __contains__(self, key: object) -> bool:
        return key in self._inflight

    def __len__(self) -> int:
        return len(self._inflight)

    def keys(self) -> list[K]:
        return list(self._inflight)

    def tasks(self) -> list[asyncio.Task[V]]:
        return [t for _, t in self._inflight.values()]
