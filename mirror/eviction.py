"""What to evict (policies: pure functions over index entries) and the background evictor that
applies the decisions (mechanism: `Tiers` demotes or deletes). Never calls HTTP.

A policy orders a tier's entries, first to go first (`Policy.key` in Python, `Policy.sql` in the
index, the same order):
    lru   least recently used
    lfu   fewest hits, then least recently used
    gdsf  greedy-dual-size-frequency without aging: lowest hits/size first, so one big blob
          used once goes before many small ones used often (configs, small layers)
`plan` walks that order, skipping protected digests (pins, in-flight fills, blobs being sent),
until the tier is down to its target or the pass's bound is reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from mirror.config import RetentionRule
from mirror.store.index import Entry
from mirror.store.manifests import TagKey

log = logging.getLogger("mirror.eviction")


@dataclass(frozen=True)
class Policy:
    """An eviction order, as data: `key` sorts entries in Python (pure, for tests and small
    sets), `sql` is the same order for the index, which streams candidates in it so that a
    pass reads only as many rows as it evicts."""

    name: str
    key: Callable[[Entry], tuple[float, ...]]
    sql: str

    def order(self, entries: Iterable[Entry]) -> list[Entry]:
        return sorted(entries, key=self.key)


LRU = Policy("lru", lambda e: (e.last_access,), "last_access")
LFU = Policy("lfu", lambda e: (e.hits, e.last_access), "hits, last_access")
GDSF = Policy(
    "gdsf",
    lambda e: ((e.hits + 1) / max(e.size, 1), e.last_access),
    "(hits + 1.0) / max(size, 1), last_access",
)
POLICIES: dict[str, Policy] = {p.name: p for p in (LRU, LFU, GDSF)}


def plan(
    ordered: Iterable[Entry], used: int, target: int, protected: Collection[str], max_victims: int
) -> list[Entry]:
    """The entries to evict, taken from `ordered` (first to go first), so that `used` falls to
    `target` bytes; stops reading as soon as it is there or has `max_victims`."""
    victims: list[Entry] = []
    if used <= target:
        return victims
    for entry in ordered:
        if entry.digest in protected:
            continue
        victims.append(entry)
        used -= entry.size
        if used <= target or len(victims) >= max_victims:
            break
    return victims


def target_bytes(
    used: int, budget: int, free: int, min_free: int, high: float, low: float
) -> int | None:
    """Where a tier should shrink to, or None when it needs no eviction: above `high` × budget
    it goes down to `low` × budget; when the filesystem has less than `min_free` free it gives
    back the shortfall plus the watermarks' gap, so it does not evict again at the next write."""
    target: int | None = None
    if budget and used > high * budget:
        target = int(low * budget)
    shortfall = min_free - free
    if shortfall > 0:
        by_free = max(used - shortfall - int((high - low) * used), 0)
        target = by_free if target is None else min(target, by_free)
    return target


def expired_tags(
    last_pulled: Mapping[TagKey, float], rules: Sequence[RetentionRule], now: float
) -> set[TagKey]:
    """Tags that retention rules let go: past `keep_tags` most recent of their repository, or
    not pulled for `max_idle` seconds. The first rule matching `<upstream>/<repo>` applies."""
    by_repo: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for (upstream, repo, tag), when in last_pulled.items():
        by_repo.setdefault((upstream, repo), []).append((when, tag))
    expired: set[TagKey] = set()
    for (upstream, repo), tags in by_repo.items():
        rule = next((r for r in rules if fnmatchcase(f"{upstream}/{repo}", r.pattern)), None)
        if rule is None:
            continue
        for rank, (when, tag) in enumerate(sorted(tags, reverse=True)):
            if (rule.keep_tags and rank >= rule.keep_tags) or (
                rule.max_idle and now - when > rule.max_idle
            ):
                expired.add((upstream, repo, tag))
    return expired


@dataclass
class PassReport:
    """What one eviction pass did: blobs demoted to cold, deleted, and bytes freed."""

    demoted: int = 0
    deleted: int = 0
    freed: int = 0
    #: A tier stopped at max_per_pass, not at its target: run again at once.
    bounded: bool = False
    #: Tags that retention rules let go.
    expired_tags: int = 0


class Evictor:
    """Runs `one_pass` every `interval` seconds, or at once when woken (a fill that crossed the
    high watermark). One pass at a time; a failing pass is logged and the next one tries again."""

    def __init__(self, one_pass: Callable[[], Awaitable[PassReport]], interval: float) -> None:
        self._one_pass = one_pass
        self._interval = interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self.passes = 0

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="evictor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            if not self._again:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            self._again = False
            started = time.monotonic()
            try:
                report = await self._one_pass()
            except Exception:
                log.exception("eviction pass failed; the next one retries")
                continue
            self.passes += 1
            self._again = report.bounded
            if report.deleted or report.demoted:
                log.info(
                    "eviction pass: %d demoted, %d deleted, %d bytes freed in %.3fs",
                    report.demoted,
                    report.deleted,
                    report.freed,
                    time.monotonic() - started,
                )
