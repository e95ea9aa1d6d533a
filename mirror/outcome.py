"""How a request was answered: one word, in the X-Mirror-Cache header, the access log and the
metrics' `outcome` label."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    HIT = "hit"
    MISS = "miss"
    COALESCED = "coalesced"
    REVALIDATED = "revalidated"
    STALE = "stale"
    PASS_THROUGH = "pass-through"
