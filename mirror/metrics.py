"""Every Prometheus object of the mirror, in one registry, with named helpers.

Labels take values from small fixed sets only (route, method, status class, outcome): never a
repository, tag or digest.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ROUTES = ("base", "manifest", "blob", "tags", "referrers", "other")
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
