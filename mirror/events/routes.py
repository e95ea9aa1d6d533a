"""Where each kind of event goes: which webhooks want it (their `events` globs) and whether
the audit log keeps it. Decided once from the configuration, so that a kind nothing wants
costs its emitter one dictionary lookup."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from mirror.config import AUDIT_KINDS, EVENT_KINDS, EventsConfig, webhook_name


@dataclass(frozen=True, slots=True)
class Route:
    """Where events of one kind go."""

    endpoints: tuple[str, ...]
    audit: bool


def routes(config: EventsConfig) -> dict[str, Route]:
    """kind → where it goes, for every kind something wants (no entry: nothing does)."""
    found: dict[str, Route] = {}
    for kind in EVENT_KINDS:
        names = tuple(
            webhook_name(h)
            for h in config.webhooks
            if any(fnmatch.fnmatchcase(kind, p) for p in h.events)
        )
        audit = bool(config.audit_log) and kind in AUDIT_KINDS
        if names or audit:
            found[kind] = Route(names, audit)
    return found
