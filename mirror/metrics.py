"""Every Prometheus object of the mirror, in one registry, with named helpers.

Labels take values from small fixed sets only (route, method, status class, outcome): never a
repository, tag or digest.

Worker processes (multiprocess mode). A host that serves with several processes exports one
set of metrics, whichever process a scrape reaches: each worker calls `use_multiprocess` before
it builds its Metrics, and from then on every value lives in a file of its own in a directory
all of them share (prometheus_client's multiprocess mode); a scrape, the status page and
/readyz read the merge of every file there. Counters and histograms are summed over every
process the host has run since its start (a worker that exited still counts what it counted).
Each gauge says how its processes' values combine (its `multiprocess_mode`):

- `livesum`, things each process holds for itself: fills in flight, password checks running
  and waiting, and the memory tier's bytes and objects (exported as `tier="hot"` of
  `mirror_tier_bytes`/`_objects`). A worker's share goes when `forget_process` is told it
  exited.
- `mostrecent`, facts about the host any worker may learn: warm and cold usage, the upstreams'
  pull limits and health, webhook queue depths. The value set last, by whichever process,
  wins, and stays after that process exits. What a gauge shows before anyone has learned its
  value (0, or NaN for "no upstream has said yet") is set as of the epoch (`_preset`), so a
  worker that starts later does not hide what the host already knew.
- `liveall`, one series per process (a `pid` label): open descriptors and asyncio tasks, for
  leak hunting.
- `min`: the host's start time, the first worker's.
- `livemin`: whether the host works with its cluster (`mirror_cluster_up`): each worker has
  its own Redis connection, and the host is joined only while every live worker is.

Without `use_multiprocess` (one process, and every test that runs several mirrors in one
process) each Metrics keeps its values in memory in its own registry, as prometheus_client
does by default, and the modes play no part.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

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
#: receiver refused a batch with a 4xx that another try would not mend, or the journal could
#: not be written (or a line of it was found cut short).
EVENT_DROP_REASONS = ("queue_full", "rejected", "unwritable")
#: Seconds from an event to its delivery: milliseconds while the receiver is up, the length of
#: an outage while it is not.
_DELIVERY_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
_FILL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


#: The environment variable prometheus_client reads, at every value it creates, for the
#: directory of a process's files.
_DIRECTORY_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
#: The exposition names of the memory tier's per-process gauges, and the name each is shown as
#: (with `tier="hot"`): one metric has one multiprocess mode, and warm and cold are the host's.
_MEMORY_AS_TIER = {
    "mirror_tier_memory_bytes": "mirror_tier_bytes",
    "mirror_tier_memory_objects": "mirror_tier_objects",
}
#: The time a `_preset` value is stamped with: before any value a process sets itself.
_PRESET_AT = 1.0

#: The directory every process of the host keeps its values in, once `use_multiprocess` ran.
_shared: Path | None = None
#: This process's id, read once per process rather than by a system call on every update.
_pid = os.getpid()


def _renew_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_renew_pid)


def _process_id() -> int:
    """Which process's file an update goes to. prometheus_client asks on every update (to
    notice a fork); the id kept up to date at fork saves that system call on the hot path."""
    return _pid


def prepare_multiprocess(directory: Path) -> None:
    """For the parent at the host's start, before it starts a worker: the directory made,
    and emptied of what processes of an earlier start left (the host's counters start at 0,
    as one process's do when it starts)."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()


def use_multiprocess(directory: Path) -> None:
    """For a worker, right after the fork and before it builds any Metrics: every metric made
    from now on in this process keeps its values in `directory` (prometheus_client's
    multiprocess mode, chosen here rather than by the environment at import, which has long
    happened), and `Metrics.render` and `Metrics.read` show every process's values merged.

    The environment variable is set too: prometheus_client reads it for each value's file.
    Programs this process starts inherit it; a Python one that used prometheus_client would
    add its values to the host's."""
    global _shared
    if not directory.is_dir():
        raise FileNotFoundError(f"metrics directory {directory} does not exist")
    os.environ[_DIRECTORY_VARIABLE] = str(directory)
    # prometheus_client's multiprocess functions carry no annotations (here and below)
    values.ValueClass = values.MultiProcessValue(_process_id)  # type: ignore[no-untyped-call]
    _shared = directory


def forget_process(pid: int, directory: Path) -> None:
    """For the parent, once a worker has exited: its share of the `live*` gauges (fills,
    password checks, memory tier, descriptors, tasks) goes. What it counted stays counted."""
    mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


class _Host(Collector):
    """Every process's values in the shared directory, merged as each metric says: counters
    and histograms summed, gauges by their mode. The memory tier's per-process sums are shown
    as `tier="hot"` of the tier gauges."""

    def __init__(self, directory: Path) -> None:
        self._merged = MultiProcessCollector(None, str(directory))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        merged = self._merged.collect()  # type: ignore[no-untyped-call]
        families: dict[str, Metric] = {f.name: f for f in merged}
        for memory, tier in _MEMORY_AS_TIER.items():
            held = families.pop(memory, None)
            if held is not None and tier in families:
                families[tier].samples.extend(s._replace(name=tier) for s in held.samples)
        return families.values()


def _preset(gauge: Gauge, value: float) -> None:
    """A gauge's value until a process learns the real one (0, or NaN: not known yet),
    stamped as of the epoch: in multiprocess mode a `mostrecent` gauge shows the value set
    last, and this one must lose to any value the host has learned, also one learned by a
    worker that started earlier. `Gauge.set` would stamp it now, so the value object is
    set directly (a value kept in memory takes the stamp and ignores it)."""
    gauge._value.set(value, timestamp=_PRESET_AT)


class Metrics:
    """One instance per app, so tests can run several mirrors in one process; in a worker
    of several (`use_multiprocess`), one per process, all of them exporting the host's."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        #: True when this process is one of the host's workers (see the module's docstring).
        self.multiprocess = _shared is not None
        #: Where a scrape and a read-back find the samples: this registry, or every worker's.
        self._source: Collector = self.registry if _shared is None else _Host(_shared)
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
            "mirror_fills_in_flight",
            "Blob fills running now.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.lookups = Counter(
            "mirror_blob_lookups",
            "Blob requests by the tier that answered (hot → warm → cold → upstream).",
            ["source"],
            registry=self.registry,
        )
        self.tier_bytes = Gauge(
            "mirror_tier_bytes",
            "Bytes held per tier.",
            ["tier"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.tier_objects = Gauge(
            "mirror_tier_objects",
            "Objects held per tier.",
            ["tier"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        #: Where the memory tier's usage goes: each worker has a memory tier of its own, and
        #: the host holds their sum (shown as `tier="hot"` of the two above).
        self._memory = (self.tier_bytes, self.tier_objects)
        if self.multiprocess:
            bytes_name, objects_name = _MEMORY_AS_TIER
            self._memory = (
                Gauge(bytes_name, "", ["tier"], registry=None, multiprocess_mode="livesum"),
                Gauge(objects_name, "", ["tier"], registry=None, multiprocess_mode="livesum"),
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
            multiprocess_mode="livesum",
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
        self.cold_uploads = Counter(
            "mirror_cold_uploads",
            "Blobs fetched from upstream copied to a cluster's shared cold tier, by result.",
            ["result"],
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
            multiprocess_mode="mostrecent",
        )
        self.ratelimit_limit = Gauge(
            "mirror_upstream_ratelimit_limit",
            "The upstream's pull limit per window, per credential.",
            ["upstream", "credential"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.up = Gauge(
            "mirror_upstream_up",
            "1 when the upstream's last answer was not a failure.",
            ["upstream"],
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.cluster_up = Gauge(
            "mirror_cluster_up",
            "1 while this replica shares its records through the cluster's Redis; 0 while it "
            "serves standalone (Redis unreachable, or no [cluster]).",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.events_emitted = Counter(
            "mirror_events_emitted",
            "Events emitted (appended to the journal for every webhook and audit log that wants "
            "them), by kind.",
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
            multiprocess_mode="mostrecent",
        )
        self.events_latency = Histogram(
            "mirror_events_delivery_seconds",
            "Seconds from an event to the 2xx that acknowledged it.",
            ["endpoint"],
            buckets=_DELIVERY_BUCKETS,
            registry=self.registry,
        )
        self.open_fds = Gauge(
            "mirror_open_fds",
            "File descriptors the process holds.",
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        self.tasks = Gauge(
            "mirror_asyncio_tasks",
            "asyncio tasks alive.",
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        self.started = Gauge(
            "mirror_start_time_seconds",
            "When the mirror started (Unix time; with worker processes, the first one's).",
            registry=self.registry,
            multiprocess_mode="min",
        )
        self.started.set(time.time())
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
        for result in ("ok", "failed", "skipped"):
            self.cold_uploads.labels(result)
        for source in SOURCES:
            self.lookups.labels(source)
            self.bytes_served.labels(source)
        for route in ROUTES:
            self.latency.labels(route)
        for route in ("manifest", "blob"):
            for outcome in Outcome:
                self.requests.labels(route, "GET", "200", outcome.value)
        for tier in TIERS:
            for gauge in self._tier_gauges(tier):
                _preset(gauge.labels(tier), 0)
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
            _preset(self.ratelimit_remaining.labels(name, credential), math.nan)
            _preset(self.ratelimit_limit.labels(name, credential), math.nan)
            _preset(self.up.labels(name), math.nan)
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
            _preset(self.events_queued.labels(name), 0)
            self.events_latency.labels(name)
            for reason in EVENT_DROP_REASONS:
                self.events_dropped.labels(name, reason)

    # -- named helpers: every update goes through one of these ---------------------------------

    def event_emitted(self, kind: str, count: int = 1) -> None:
        """Events appended to their journal (added up by the emitter: events/__init__.py)."""
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

    def cluster(self, joined: bool) -> None:
        self.cluster_up.set(1 if joined else 0)

    def fill_done(self, source: str, ok: bool, seconds: float, followers: int) -> None:
        self.fill_seconds.labels(source, "ok" if ok else "failed").observe(seconds)
        self.fill_followers.observe(followers)

    def cold_upload(self, result: str) -> None:
        """An upload to the shared cold tier: `ok`, `failed`, or `skipped` (too many waiting)."""
        self.cold_uploads.labels(result).inc()

    def lookup(self, source: str) -> None:
        self.lookups.labels(source).inc()

    def _tier_gauges(self, tier: str) -> tuple[Gauge, Gauge]:
        """(bytes, objects) gauges of a tier: the memory tier's are this process's own."""
        return self._memory if tier == "hot" else (self.tier_bytes, self.tier_objects)

    def tier_usage(self, tier: str, nbytes: int, objects: int) -> None:
        held_bytes, held_objects = self._tier_gauges(tier)
        held_bytes.labels(tier).set(nbytes)
        held_objects.labels(tier).set(objects)

    def evicted(self, tier: str, reason: str, count: int, nbytes: int) -> None:
        self.evictions.labels(tier, reason).inc(count)
        self.evicted_bytes.labels(tier, reason).inc(nbytes)

    # -- read back, for the status page -----------------------------------------------------

    def read(self) -> Reading:
        """Every sample now, the host's in multiprocess mode. Blocking then (it reads every
        process's file): the event loop calls it in a thread."""
        return Reading(self._source.collect())

    def total(self, name: str, **match: str) -> float:
        """`read().total(...)`, for tests and tools."""
        return self.read().total(name, **match)

    def render(self) -> bytes:
        """The exposition text, the host's in multiprocess mode (blocking then, as `read`)."""
        return generate_latest(self._source)


class Reading:
    """One collection of every sample, as a scraper reads it: what the status page and
    /readyz show, taken once per request."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._samples = [s for family in families for s in family.samples]

    def _values(self, name: str, **match: str) -> list[float]:
        return [
            s.value
            for s in self._samples
            if s.name == name and all(s.labels.get(k) == v for k, v in match.items())
        ]

    def total(self, name: str, **match: str) -> float:
        """The sum of the samples of exposition name `name` whose labels include `match`."""
        return sum(self._values(name, **match))

    def answered(self, outcome: str) -> float:
        """Requests answered with this cache outcome."""
        return self.total("mirror_http_requests_total", outcome=outcome)

    def served_from(self, source: str) -> float:
        return self.total("mirror_blob_bytes_served_total", source=source)

    def received_total(self) -> float:
        """Blob bytes received from every upstream."""
        return self.total("mirror_upstream_bytes_total")

    def contacted(self, upstream: str) -> bool:
        return self.total("mirror_upstream_requests_total", upstream=upstream) > 0

    def is_up(self, upstream: str) -> bool:
        return self.total("mirror_upstream_up", upstream=upstream) == 1

    def pulls_left(self, upstream: str) -> float:
        """What the upstream last said is left of its pull limit (NaN: it has not said)."""
        left = self._values("mirror_upstream_ratelimit_remaining", upstream=upstream)
        return sum(left) if left else math.nan

    def held(self, tier: str) -> tuple[int, int]:
        """(bytes, objects) a tier holds (the memory tier: of every worker together)."""
        return (
            int(self.total("mirror_tier_bytes", tier=tier)),
            int(self.total("mirror_tier_objects", tier=tier)),
        )

    def started(self) -> float:
        """When the mirror started (Unix time)."""
        return self.total("mirror_start_time_seconds")
