"""Every Prometheus object of the mirror, in one registry, with named helpers.

Labels take values from small fixed sets only (route, method, status class, outcome): never a
repository, tag or digest.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ROUTES = ("base", "manifest", "blob", "tags", "referrers", "other")
TIERS = ("hot", "warm", "cold")
#: Where a blob request was answered from, in lookup order.
SOURCES = ("hot", "warm", "cold", "upstream", "pass-through")
#: Why a blob left a tier: over budget, a retention rule, cold's max idle, disk full, a copy that
#: failed its digest, or an operator's `mirror cache evict`.
EVICTION_REASONS = ("budget", "retention", "idle", "disk_full", "corrupt", "manual")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
    """One instance per app, so tests can run several mirrors in one process."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mirror_http_requests", "Requests answered, by route, method, status and cache outcome.",
            ["route", "method", "status", "outcome"], registry=self.registry)
        self.bytes_served = Counter(
            "mirror_blob_bytes_served", "Blob bytes sent to clients, by source.",
            ["source"], registry=self.registry)
        self.fills = Gauge("mirror_fills_in_flight", "Blob fills running now.", registry=self.registry)
        self.lookups = Counter(
            "mirror_blob_lookups", "Blob requests by the tier that answered (hot → warm → cold → upstream).",
            ["source"], registry=self.registry)
        self.tier_bytes = Gauge("mirror_tier_bytes", "Bytes held per tier.", ["tier"], registry=self.registry)
        self.tier_objects = Gauge("mirror_tier_objects", "Objects held per tier.", ["tier"], registry=self.registry)
        self.evictions = Counter(
            "mirror_evictions", "Blobs that left a tier, by tier and reason (demotions included).",
            ["tier", "reason"], registry=self.registry)
        self.evicted_bytes = Counter(
            "mirror_evicted_bytes", "Bytes that left a tier, by tier and reason.",
            ["tier", "reason"], registry=self.registry)
        for source in SOURCES:
            self.lookups.labels(source)
        for tier in TIERS:
            self.tier_bytes.labels(tier)
            self.tier_objects.labels(tier)
            for reason in EVICTION_REASONS:
                self.evictions.labels(tier, reason)
                self.evicted_bytes.labels(tier, reason)
        self._request_children: dict[tuple[str, str, int, str], Counter] = {}

    def request(self, route: str, method: str, status: int, outcome: str) -> None:
        """Count one answered request (label children memoised: this is on every request)."""
        key = (route, method, status, outcome)
        child = self._request_children.get(key)
        if child is None:
            method = method if method in _METHODS else "other"
            child = self._request_children[key] = self.requests.labels(route, method, str(status), outcome)
        child.inc()

    def served(self, source: str, nbytes: int) -> None:
        self.bytes_served.labels(source).inc(nbytes)

    def lookup(self, source: str) -> None:
        self.lookups.labels(source).inc()

    def tier_usage(self, tier: str, nbytes: int, objects: int) -> None:
        self.tier_bytes.labels(tier).set(nbytes)
        self.tier_objects.labels(tier).set(objects)

    def evicted(self, tier: str, reason: str, count: int, nbytes: int) -> None:
        self.evictions.labels(tier, reason).inc(count)
        self.evicted_bytes.labels(tier, reason).inc(nbytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
