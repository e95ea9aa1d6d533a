"""Docker Hub's pull-limit headers: `ratelimit-limit: 100;w=21600` and
`ratelimit-remaining: 76;w=21600` (pulls per window of w seconds). Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RateLimit:
    limit: int
    remaining: int
    window: int | None


def _count(value: str) -> tuple[int, int | None]:
    count, _, rest = value.partition(";")
    window = None
    for param in rest.split(";"):
        key, _, v = param.strip().partition("=")
        if key == "w" and v.isdigit():
            window = int(v)
    return int(count.strip()), window


def parse_ratelimit(headers: Mapping[str, str]) -> RateLimit | None:
    """The limit an answer announces, or None when it has no (readable) rate-limit headers."""
    limit_h, remaining_h = headers.get("ratelimit-limit"), headers.get("ratelimit-remaining")
    if limit_h is None or remaining_h is None:
        return None
    try:
        limit, window = _count(limit_h)
        remaining, window2 = _count(remaining_h)
    except ValueError:
        return None
    return RateLimit(limit, remaining, window or window2)
