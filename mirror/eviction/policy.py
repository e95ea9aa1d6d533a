"""What to evict, as pure functions: the victim plan, the watermark arithmetic and
retention's choice of tags. No I/O; `passes.py` applies them. The eviction orders themselves
are data in `mirror/policies.py` (the config checks its policy names against them).

`plan` walks a policy's order, skipping protected digests (pins, in-flight fills, blobs being
sent), until the tier is down to its target or the pass's bound is reached.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Protocol, TypeVar

from mirror.policies import Candidate


class Rule(Protocol):
    """A retention rule (config.RetentionRule)."""

    @property
    def pattern(self) -> str: ...

    @property
    def max_idle(self) -> float: ...

    @property
    def keep_tags(self) -> int: ...


E = TypeVar("E", bound=Candidate)
#: (upstream, repository, tag)
Tag = tuple[str, str, str]
T = TypeVar("T", bound=Tag)


def plan(
    ordered: Iterable[E], used: int, target: int, protected: Collection[Hashable], max_victims: int
) -> list[E]:
    """The entries to evict, taken from `ordered` (first to go first), so that `used` falls to
    `target` bytes; stops reading as soon as it is there or has `max_victims`."""
    victims: list[E] = []
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


def expired_tags(last_pulled: Mapping[T, float], rules: Sequence[Rule], now: float) -> set[T]:
    """Tags that retention rules let go: past `keep_tags` most recent of their repository, or
    not pulled for `max_idle` seconds. The first rule matching `<upstream>/<repo>` applies."""
    by_repo: dict[tuple[str, str], list[tuple[float, T]]] = {}
    for key, when in last_pulled.items():
        by_repo.setdefault((key[0], key[1]), []).append((when, key))
    expired: set[T] = set()
    for (upstream, repo), tags in by_repo.items():
        rule = next((r for r in rules if fnmatchcase(f"{upstream}/{repo}", r.pattern)), None)
        if rule is None:
            continue
        for rank, (when, key) in enumerate(sorted(tags, reverse=True)):
            too_many = rule.keep_tags and rank >= rule.keep_tags
            if too_many or (rule.max_idle and now - when > rule.max_idle):
                expired.add(key)
    return expired
