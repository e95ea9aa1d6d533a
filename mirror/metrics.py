"""Every Prometheus object of the mirror, in one registry, with named helpers.

Labels take values from small fixed sets only (route, method, status class, outcome): never a
repository, tag or digest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mirror.outcome import Outcome

ROUTES = ("base", "manifest", "blob", "tags", "referrers", "other")
TIERS = ("hot", "warm", "cold")
#: Where a blob request was answered from, in lookup order; `range`: a Range the fill had not
#: reached, asked of upstream on its own (those bytes are passed through, not kept).
SOURCES = ("hot", "warm", "cold", "upstream", "range", "pass-through")
#: Why a blob left a tier: over budget, a retention rule, cold's max idle, disk full, a copy that
#: failed its digest, or an operator's `mirror cache evict`.
EVICTION_REASONS = ("budget", "retention", "idle", "disk_full", "corrupt", "manual")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Kinds of upstream request.
UPSTREAM_KINDS = ("manifest", "manifest_head", "blob", "blob_head", "list", "token")
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)
#: Why events left a webhook's queue undelivered: the queue was full (the oldest go), the
#: receiver refused a batch with a 4xx that another try would not mend, or the queue could not
#: be written.
EVENT_DROP_REASONS = ("queue_full", "rejected", "unwritable")
#: Seconds from an event to its delivery: milliseconds while the receiver is up, the length of
#: an outage while it is not.
_DELIVERY_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
_FILL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


class Metrics:
    """One instance per app, so tests can run several mirrors in one process."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mirror_http_requests",
            "Requests answered, by route, method, status and cache outcome.",
            ["route", "method", "status", "outcome"],
            registry=self.registry,
        )
        self.bytes_served = Counter(
            "mirror_blob_bytes_served",
            "Blob bytes sent to clients, by source.",
            ["source"],
            registry=self.registry,
        )
        self.fills = Gauge(
            "mirror_fills_in_flight", "Blob fills running now.", registry=self.registry
        )
        self.lookups = Counter(
            "mirror_blob_lookups",
            "Blob requests by the tier that answered (hot → warm → cold → upstream).",
            ["source"],
            registry=self.registry,
        )
        self.tier_bytes = Gauge(
            "mirror_tier_bytes", "Bytes held per tier.", ["tier"], registry=self.registry
        )
        self.tier_objects = Gauge(
            "mirror_tier_objects", "Objects held per tier.", ["tier"], registry=self.registry
        )
        self.evictions = Counter(
            "mirror_evictions",
            "Blobs that left a tier, by tier and reason (demotions included).",
            ["tier", "reason"],
            registry=self.registry,
        )
        self.evicted_bytes = Counter(
            "mirror_evicted_bytes",
            "Bytes that left a tier, by tier and reason.",
            ["tier", "reason"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mirror_request_duration_seconds",
            "Time to answer a request (to the end of the body).",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.upstream_requests = Counter(
            "mirror_upstream_requests",
            "Requests sent to upstreams, by upstream, kind and status.",
            ["upstream", "kind", "status"],
            registry=self.registry,
        )
        self.upstream_retries = Counter(
            "mirror_upstream_retries",
            "Upstream requests tried again, by upstream, kind and why "
            "(connection, status, resume: a blob body picked up again with Range).",
            ["upstream", "kind", "reason"],
            registry=self.registry,
        )
        self.client_refusals = Counter(
            "mirror_client_refusals",
            "Client requests refused before any work, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.client_aborts = Counter(
            "mirror_client_aborts",
            "Blob answers cut off mid-body, by why: the client went away (gone), "
            "read nothing for timeouts.read (stalled), or the fill it followed failed (fill_failed).",
            ["reason"],
            registry=self.registry,
        )
        self.password_checks = Counter(
            "mirror_client_password_checks",
            "bcrypt checks of client passwords run: for known and unknown user names alike "
            "(an unknown one is checked against a dummy hash); a remembered pair runs none.",
            registry=self.registry,
        )
        self.password_checks_now = Gauge(
            "mirror_client_password_checks_in_progress",
            "Client password checks running now (at most the password threads) and waiting "
            "for one of them.",
            ["state"],
            registry=self.registry,
        )
        self.upstream_bytes = Counter(
            "mirror_upstream_bytes",
            "Blob bytes received from upstreams.",
            ["upstream"],
            registry=self.registry,
        )
        self.fill_seconds = Histogram(
            "mirror_fill_duration_seconds",
            "Blob fills from start to commit, by source and result.",
            ["source", "result"],
            buckets=_FILL_BUCKETS,
            registry=self.registry,
        )
        self.fill_followers = Histogram(
            "mirror_fill_followers",
            "Requests that streamed from one fill as it ran (the first included).",
            buckets=(0, 1, 2, 5, 10, 20, 50, 100),
            registry=self.registry,
        )
        self.digest_mismatches = Counter(
            "mirror_digest_mismatches",
            "Upstream or cold bytes that did not match their digest.",
            ["source"],
            registry=self.registry,
        )
        self.token_fetches = Counter(
            "mirror_token_fetches",
            "Bearer tokens fetched from token realms, by upstream and result.",
            ["upstream", "result"],
            registry=self.registry,
        )
        self.ratelimit_remaining = Gauge(
            "mirror_upstream_ratelimit_remaining",
            "Pulls left in the upstream's rate-limit window (Docker Hub's ratelimit-remaining), per credential.",
            ["upstream", "credential"],
            registry=self.registry,
        )
        self.ratelimit_limit = Gauge(
            "mirror_upstream_ratelimit_limit",
            "The upstream's pull limit per window, per credential.",
            ["upstream", "credential"],
            registry=self.registry,
        )
        self.up = Gauge(
            "mirror_upstream_up",
            "1 when the upstream's last answer was not a failure.",
            ["upstream"],
            registry=self.registry,
        )
        self.events_emitted = Counter(
            "mirror_events_emitted",
            "Events emitted (committed to every queue and audit log that wants them), by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.events_delivered = Counter(
            "mirror_events_delivered",
            "Events a webhook acknowledged with 2xx.",
            ["endpoint"],
            registry=self.registry,
        )
        self.events_failed = Counter(
            "mirror_events_failed",
            "Deliveries to a webhook that failed and will be tried again (no answer, 408, "
            "429, 3xx, 5xx).",
            ["endpoint"],
            registry=self.registry,
        )
        self.events_dropped = Counter(
            "mirror_events_dropped",
            "Events that left a webhook's queue undelivered, by reason.",
            ["endpoint", "reason"],
            registry=self.registry,
        )
        self.events_queued = Gauge(
            "mirror_events_queue_depth",
            "Events waiting on disk for a webhook.",
            ["endpoint"],
            registry=self.registry,
        )
        self.events_latency = Histogram(
            "mirror_events_delivery_seconds",
            "Seconds from an event to the 2xx that acknowledged it.",
            ["endpoint"],
            buckets=_DELIVERY_BUCKETS,
            registry=self.registry,
        )
        self.open_fds = Gauge(
            "mirror_open_fds", "File descriptors the process holds.", registry=self.registry
        )
        self.tasks = Gauge("mirror_asyncio_tasks", "asyncio tasks alive.", registry=self.registry)
        self._latency_children: dict[str, Any] = {}
        self._request_children: dict[tuple[str, str, int, str], Counter] = {}
        self._emitted_children: dict[str, Any] = {}
        self._prefill()

    def _prefill(self) -> None:
        """Every label set known in advance, exported at 0 from the start: a panel over a
        fresh mirror shows 0, not "no data"."""
        self.client_refusals.labels("connections_per_client")
        for state in ("running", "waiting"):
            self.password_checks_now.labels(state)
        for reason in ("gone", "stalled", "fill_failed"):
            self.client_aborts.labels(reason)
        for source in ("upstream", "cold"):
            self.digest_mismatches.labels(source)
            for result in ("ok", "failed"):
                self.fill_seconds.labels(source, result)
        for source in SOURCES:
            self.lookups.labels(source)
            self.bytes_served.labels(source)
        for route in ROUTES:
            self.latency.labels(route)
        for route in ("manifest", "blob"):
            for outcome in Outcome:
                self.requests.labels(route, "GET", "200", outcome.value)
        for tier in TIERS:
            self.tier_bytes.labels(tier)
            self.tier_objects.labels(tier)
            for reason in EVICTION_REASONS:
                self.evictions.labels(tier, reason)
                self.evicted_bytes.labels(tier, reason)

    def request(self, route: str, method: str, status: int, outcome: str) -> None:
        """Count one answered request (label children memoised: this is on every request)."""
        key = (route, method, status, outcome)
        child = self._request_children.get(key)
        if child is None:
            method = method if method in _METHODS else "other"
            child = self._request_children[key] = self.requests.labels(
                route, method, str(status), outcome
            )
        child.inc()

    def served(self, source: str, nbytes: int) -> None:
        self.bytes_served.labels(source).inc(nbytes)

    def prefill(self, upstreams: Iterable[tuple[str, str]]) -> None:
        """Label values known from the config: (upstream name, credential). Gauges start as
        NaN ("not known yet"), not 0, which would read as "no pulls left"."""
        for name, credential in upstreams:
            for result in ("ok", "failed"):
                self.token_fetches.labels(name, result)
            self.ratelimit_remaining.labels(name, credential).set(math.nan)
            self.ratelimit_limit.labels(name, credential).set(math.nan)
            self.up.labels(name).set(math.nan)
            self.upstream_bytes.labels(name)
            self.upstream_retries.labels(name, "blob", "resume")
            for kind in UPSTREAM_KINDS:
                self.upstream_requests.labels(name, kind, "200")
                for reason in ("status", "connection"):
                    self.upstream_retries.labels(name, kind, reason)

    def prefill_events(self, kinds: Iterable[str], endpoints: Iterable[str]) -> None:
        """The event kinds and the configured webhooks' names, exported at 0 from the start."""
        for kind in kinds:
            self._emitted_children[kind] = self.events_emitted.labels(kind)
        for name in endpoints:
            self.events_delivered.labels(name)
            self.events_failed.labels(name)
            self.events_queued.labels(name)
            self.events_latency.labels(name)
            for reason in EVENT_DROP_REASONS:
                self.events_dropped.labels(name, reason)

    # -- named helpers: every update goes through one of these ---------------------------------

    def event_emitted(self, kind: str, count: int = 1) -> None:
        """Events committed to their queues and audit log (from the events thread)."""
        child = self._emitted_children.get(kind)
        if child is None:
            child = self._emitted_children[kind] = self.events_emitted.labels(kind)
        child.inc(count)

    def events_acknowledged(self, endpoint: str, ages: Iterable[float]) -> None:
        """Events a webhook answered 2xx for, each `age` seconds after it was emitted."""
        latency, count = self.events_latency.labels(endpoint), 0
        for age in ages:
            latency.observe(age)
            count += 1
        self.events_delivered.labels(endpoint).inc(count)

    def event_delivery_failed(self, endpoint: str) -> None:
        self.events_failed.labels(endpoint).inc()

    def events_lost(self, endpoint: str, reason: str, count: int) -> None:
        """Events that left `endpoint`'s queue undelivered: `queue_full`, `rejected`,
        `unwritable`."""
        self.events_dropped.labels(endpoint, reason).inc(count)

    def events_waiting(self, endpoint: str, depth: int) -> None:
        self.events_queued.labels(endpoint).set(depth)

    def retried(self, upstream: str, kind: str, reason: str) -> None:
        """An upstream request tried again: after a `connection` failure or a retryable
        `status`, or a blob body picked up again with Range (`resume`)."""
        self.upstream_retries.labels(upstream, kind, reason).inc()

    def receiving(self, upstream: str) -> Callable[[float], None]:
        """What counts blob bytes received from `upstream`, piece by piece (one label lookup
        per body, not per piece)."""
        return self.upstream_bytes.labels(upstream).inc

    def rate_limit(self, upstream: str, credential: str, limit: int, remaining: int) -> None:
        self.ratelimit_remaining.labels(upstream, credential).set(remaining)
        self.ratelimit_limit.labels(upstream, credential).set(limit)

    def token_fetched(self, upstream: str, ok: bool) -> None:
        self.token_fetches.labels(upstream, "ok" if ok else "failed").inc()

    def refused(self, reason: str) -> None:
        """A client request refused before any work (`connections_per_client`)."""
        self.client_refusals.labels(reason).inc()

    @contextmanager
    def password_check_waiting(self) -> Iterator[None]:
        """Around a client password check waiting for a password thread."""
        gauge = self.password_checks_now.labels("waiting")
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    @contextmanager
    def password_check_running(self) -> Iterator[None]:
        """Around one bcrypt check of a client password (counted as it starts)."""
        self.password_checks.inc()
        gauge = self.password_checks_now.labels("running")
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def aborted(self, reason: str) -> None:
        """A blob answer cut off mid-body: `gone`, `stalled` or `fill_failed`."""
        self.client_aborts.labels(reason).inc()

    def mismatch(self, source: str) -> None:
        """Bytes from `upstream` or `cold` that did not match their digest."""
        self.digest_mismatches.labels(source).inc()

    def process(self, fills: int, fds: int, tasks: int) -> None:
        """The process's own state, sampled when metrics are scraped."""
        self.fills.set(fills)
        self.open_fds.set(fds)
        self.tasks.set(tasks)

    def took(self, route: str, seconds: float) -> None:
        child = self._latency_children.get(route)
        if child is None:
            child = self._latency_children[route] = self.latency.labels(route)
        child.observe(seconds)

    def upstream(self, upstream: str, kind: str, status: int | str) -> None:
        self.upstream_requests.labels(upstream, kind, str(status)).inc()
        self.up.labels(upstream).set(
            0 if status == "error" or (isinstance(status, int) and status >= 500) else 1
        )

    def fill_done(self, source: str, ok: bool, seconds: float, followers: int) -> None:
        self.fill_seconds.labels(source, "ok" if ok else "failed").observe(seconds)
        self.fill_followers.observe(followers)

    def lookup(self, source: str) -> None:
        self.lookups.labels(source).inc()

    def tier_usage(self, tier: str, nbytes: int, objects: int) -> None:
        self.tier_bytes.labels(tier).set(nbytes)
        self.tier_objects.labels(tier).set(objects)

    def evicted(self, tier: str, reason: str, count: int, nbytes: int) -> None:
        self.evictions.labels(tier, reason).inc(count)
        self.evicted_bytes.labels(tier, reason).inc(nbytes)

    # -- read back, for the status page ------------------------------------------------------

    def answered(self, outcome: str) -> float:
        """Requests answered with this cache outcome."""
        return _sum(self.requests, outcome=outcome)

    def served_from(self, source: str) -> float:
        return _sum(self.bytes_served, source=source)

    def received_total(self) -> float:
        """Blob bytes received from every upstream."""
        return _sum(self.upstream_bytes)

    def contacted(self, upstream: str) -> bool:
        return _sum(self.upstream_requests, upstream=upstream) > 0

    def is_up(self, upstream: str) -> bool:
        return _sum(self.up, upstream=upstream) == 1

    def pulls_left(self, upstream: str) -> float:
        """What the upstream last said is left of its pull limit (NaN: it has not said)."""
        return _sum(self.ratelimit_remaining, upstream=upstream)

    def total(self, name: str, **match: str) -> float:
        """The sum of the samples of exposition name `name` whose labels include `match`, as a
        scraper would read them (tests and tools)."""
        found = 0.0
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in match.items()):
                    found += sample.value
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _sum(metric: Counter | Gauge, **match: str) -> float:
    """The sum of a metric's samples whose labels include `match` (counters: the `_total`
    samples, not `_created`)."""
    found = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            if all(sample.labels.get(k) == v for k, v in match.items()):
                found += sample.value
    return found
