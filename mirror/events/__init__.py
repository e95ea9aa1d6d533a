"""Events: what happens in the mirror, told to webhooks and kept in an audit trail.

`Events` is the one emitter, handed to the constructors of what emits (tiers, eviction
passes, the upstream client, manifests and blobs, the HTTP handlers, bundles and the admin
commands). Each kind has a method here that says what its data holds; with no webhook and no
audit log wanting a kind, that method returns at its first line and builds nothing.

What "emitted" means: an event is emitted once it is on disk for every webhook that wants it
and written to the audit log if that keeps its kind. The loop only appends its data to a
list. The events thread encodes (cloudevents.py) and writes everything gathered since its
last write at once (a group commit: a full queue and a dead webhook cost a pull an
append and a share of one write, not a disk write of its own): the audit lines, then, in the
serving mirror, the journal (journal.py), one write(2) each; in an admin command, which has
no journal, the queues' SQLite commit. Either is in the kernel once it returns, so it
survives a kill -9 (a power loss may take what was not yet flushed). The queue thread then
commits the serving mirror's journaled events to their queues (queue.py), off the path of
any pull.

A method returns a future that is done once its event is emitted; the pull handler awaits it
before the answer goes out, so a pull a client saw answered is on disk. Other emitters do
not wait: what a kill -9 can lose is an event of theirs still in the list, the few
milliseconds before its write. A write that takes longer than MAX_WAIT (a stalled disk)
stops holding the pulls waiting on it: they are answered, their events follow when the disk
does.

Delivery (delivery.py) reads the queues in order, in batches, and removes what a webhook
acknowledged: at least once, never out of order per webhook.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fnmatch
import logging
import socket
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror.config import AUDIT_KINDS, EVENT_KINDS, EventsConfig, webhook_name
from mirror.errors import ConfigError
from mirror.events.audit import AuditFile
from mirror.events.cloudevents import Envelope
from mirror.events.journal import Journal, Position
from mirror.events.queue import EventQueue, Queued
from mirror.metrics import Metrics

log = logging.getLogger("mirror.events")

#: Seconds the queue thread lets journaled events gather before it commits them.
ENQUEUE_GATHER = 0.05
#: Longest a pull waits for its event's write before it is answered anyway.
MAX_WAIT = 1.0

#: What `emit` hands back: done once the event is emitted; None when no future is made
#: (no sink wants the kind, or no loop is attached: an admin command).
Emitted = asyncio.Future[None] | None
#: Events for the queues: webhook name → (emitted at, encoded event), in order.
Rows = dict[str, list[tuple[float, str]]]


@dataclass(frozen=True, slots=True)
class _Route:
    """Where events of one kind go."""

    endpoints: tuple[str, ...]
    audit: bool


@dataclass(frozen=True, slots=True)
class _Pending:
    """An event not yet encoded (the events thread encodes it, in emission order)."""

    kind: str
    at: float
    data: dict[str, Any]
    subject: str | None
    route: _Route


@dataclass(frozen=True, slots=True)
class _Encoded:
    kind: str
    at: float
    body: str
    route: _Route


class Events:
    """The emitter (see the module docstring). Emit on the event loop it is attached to, or,
    unattached (the admin commands), from one thread; `close` writes what is left.
    `journal`: the directory of the serving mirror's journal (None for a command)."""

    def __init__(
        self,
        config: EventsConfig,
        metrics: Metrics,
        queue_path: Path,
        journal: Path | None = None,
    ) -> None:
        self._metrics = metrics
        self.endpoints = tuple(webhook_name(h) for h in config.webhooks)
        self._routes: dict[str, _Route] = {}
        for kind in EVENT_KINDS:
            names = tuple(
                webhook_name(h)
                for h in config.webhooks
                if any(fnmatch.fnmatchcase(kind, p) for p in h.events)
            )
            audit = bool(config.audit_log) and kind in AUDIT_KINDS
            if names or audit:
                self._routes[kind] = _Route(names, audit)
        metrics.prefill_events(EVENT_KINDS, self.endpoints)
        self._envelope = Envelope(config.source or f"urn:mirror:{socket.gethostname()}")
        self._lock = threading.Lock()
        self._pending: list[_Pending] = []
        #: Done once the events pending now are emitted: the one future of their batch.
        self._batch: asyncio.Future[None] | None = None
        self._flushing = False
        #: Journaled events the queue thread has yet to commit (and how far they reach).
        self._journaled: list[tuple[Rows, Position]] = []
        self._enqueuing = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        #: Batch futures not yet done, with when each was made, oldest first (loop only).
        self._waiting: collections.deque[tuple[float, asyncio.Future[None]]] = collections.deque()
        self._watchdog = False
        self._arrived: dict[str, asyncio.Event] = {}
        #: Webhooks whose queue is dropping events (logged once until a delivery succeeds).
        self._dropping: set[str] = set()
        self._queue: EventQueue | None = None
        self._journal: Journal | None = None
        self._audit: AuditFile | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._queue_thread: ThreadPoolExecutor | None = None
        if not self._routes:
            return
        if self.endpoints:
            self._queue = EventQueue(queue_path, self.endpoints, config.max_queue)
            try:
                self._queue.open()
                if journal is not None:
                    self._journal = self._replayed(self._queue, journal)
            except (sqlite3.Error, OSError) as e:
                raise ConfigError(f"events: cannot open the event queue {queue_path}: {e}") from e
            for name in self.endpoints:
                metrics.events_waiting(name, self._queue.depth[name])
            self._queue_thread = ThreadPoolExecutor(1, thread_name_prefix="event-queue")
        if config.audit_log:
            try:
                self._audit = AuditFile(config.audit_log, config.audit_max_bytes, config.audit_keep)
            except OSError as e:
                raise ConfigError(f"events.audit_log: cannot open it: {e.strerror}") from e
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="events")

    def _replayed(self, queue: EventQueue, directory: Path) -> Journal:
        """At start: the journal, its events the queues had not taken committed to them."""
        journal = Journal(directory, queue.taken())
        lines = journal.replay()
        rows: Rows = {}
        for kind, at, body in lines:
            route = self._routes.get(kind)
            for name in route.endpoints if route is not None else ():
                rows.setdefault(name, []).append((at, body))
        queue.append(rows, journal.position)
        journal.consumed(journal.position)
        if lines:
            log.info("%d events from the journal queued", len(lines))
        return journal

    # -- the emitter -----------------------------------------------------------------------

    def wants(self, kind: str) -> bool:
        return kind in self._routes

    def emit(self, kind: str, data: dict[str, Any], subject: str | None = None) -> Emitted:
        """Hand the event to the events thread, which encodes and writes it; see the module
        docstring. `data` is the event's own: nothing may change it afterwards."""
        route = self._routes.get(kind)
        if route is None:
            return None
        now = time.time()
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            loop = None
        made = None
        with self._lock:
            self._pending.append(_Pending(kind, now, data, subject, route))
            done = self._batch
            if done is None and loop is not None:
                done = made = self._batch = loop.create_future()
            start, self._flushing = not self._flushing, True
        if start:
            self._submit(self._thread, self._flush)
        if made is not None and loop is not None:
            self._waiting.append((now, made))
            if not self._watchdog:
                self._watchdog = True
                loop.call_later(MAX_WAIT, self._overdue)
        return done

    def attach(self) -> None:
        """Make futures on the running loop from now on (the server, at start)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._arrived = {name: asyncio.Event() for name in self.endpoints}

    def detach(self) -> None:
        """Stop making futures; release those still waiting (the server, at stop)."""
        self._loop = None
        while self._waiting:
            _, done = self._waiting.popleft()
            if not done.done():
                done.set_result(None)

    def reopen(self) -> None:
        """Reopen the audit log on the events thread (SIGHUP, after logrotate)."""
        audit, thread = self._audit, self._thread
        if audit is not None and thread is not None:
            thread.submit(self._reopen, audit)

    @staticmethod
    def _reopen(audit: AuditFile) -> None:
        try:
            audit.reopen()
            log.info("audit log reopened: %s", audit.path)
        except OSError as e:
            log.error(
                "cannot reopen the audit log %s, writing on to the old file: %s", audit.path, e
            )

    def close(self) -> None:
        """Blocking: write what is still pending, commit the journaled events to their
        queues, then close the queue, the journal and the audit log."""
        thread, queue_thread = self._thread, self._queue_thread
        if thread is None:
            return
        self._routes = {}
        thread.submit(self._flush).result()
        thread.shutdown(wait=True)
        if queue_thread is not None:
            queue_thread.submit(self._enqueue).result()
            queue_thread.shutdown(wait=True)
        self._closed = True
        if self._queue is not None:
            self._queue.close()
        if self._journal is not None:
            self._journal.close()
        if self._audit is not None:
            self._audit.close()

    @staticmethod
    def _submit(executor: ThreadPoolExecutor | None, fn: Any) -> None:
        assert executor is not None
        with contextlib.suppress(RuntimeError):  # shutting down: `close` writes what is left
            executor.submit(fn)

    # -- the events thread -----------------------------------------------------------------

    def _flush(self) -> None:
        """Write one batch: everything pending now. Whatever arrives meanwhile is the next
        batch, submitted behind anything else queued for the thread (a reopen)."""
        with self._lock:
            batch, self._pending = self._pending, []
            done, self._batch = self._batch, None
        if batch and not self._closed:
            encode = self._envelope.encode
            touched = self._write(
                [
                    _Encoded(p.kind, p.at, encode(p.kind, p.data, p.subject, p.at), p.route)
                    for p in batch
                ]
            )
            loop = self._loop
            if loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
                    loop.call_soon_threadsafe(self._settle, done, touched)
        with self._lock:
            again = bool(self._pending) and not self._closed
            self._flushing = again
        if again:
            self._submit(self._thread, self._flush)

    def _write(self, batch: list[_Encoded]) -> set[str]:
        """Audit lines, then the journal (or, in a command, the queues), then the counts.
        Never raises: a disk that will not take them costs those events (logged, counted),
        not the pull. Returns the webhooks with new events (for a command's direct commit)."""
        lines = [p.body for p in batch if p.route.audit]
        if lines and self._audit is not None:
            try:
                self._audit.write(lines)
            except OSError as e:
                log.error("the audit log cannot be written (%s): %d lines lost", e, len(lines))
        rows: Rows = {}
        for p in batch:
            for name in p.route.endpoints:
                rows.setdefault(name, []).append((p.at, p.body))
        written, touched = True, set()
        if rows and self._journal is not None:
            journaled = [(p.kind, p.at, p.body) for p in batch if p.route.endpoints]
            try:
                position = self._journal.write(journaled)
            except OSError as e:
                written = False
                self._unwritable(rows, "journal", e)
            else:
                with self._lock:
                    self._journaled.append((rows, position))
                    start, self._enqueuing = not self._enqueuing, True
                if start:
                    self._submit(self._queue_thread, self._enqueue)
        elif rows:
            written = self._commit(rows, None)
            touched = set(rows)
        if written:
            for kind, count in Counter(p.kind for p in batch).items():
                self._metrics.event_emitted(kind, count)
        return touched

    def _unwritable(self, rows: Rows, what: str, e: Exception) -> None:
        lost = sum(len(events) for events in rows.values())
        log.error("the event %s cannot be written (%s): %d events lost", what, e, lost)
        for name, events in rows.items():
            self._metrics.events_lost(name, "unwritable", len(events))

    def _commit(self, rows: Rows, position: Position | None) -> bool:
        """Commit to the queues (the queue thread's, or a command's events thread)."""
        queue = self._queue
        assert queue is not None
        try:
            dropped = queue.append(rows, position)
        except sqlite3.Error as e:
            self._unwritable(rows, "queue", e)
            return False
        for name, count in dropped.items():
            self._metrics.events_lost(name, "queue_full", count)
            if name not in self._dropping:
                self._dropping.add(name)
                log.warning(
                    "webhook %s is not taking events and its queue is full: the oldest are dropped",
                    name,
                )
        for name in rows:
            self._metrics.events_waiting(name, queue.depth.get(name, 0))
        return True

    # -- the queue thread ------------------------------------------------------------------

    def _enqueue(self) -> None:
        """Commit what the journal holds to the queues, all of it in one transaction. It
        lets ENQUEUE_GATHER pass first: a transaction costs the same for one event or
        hundreds, and every one of them takes the interpreter from the loop for a while."""
        if not self._closed:
            time.sleep(ENQUEUE_GATHER)
        with self._lock:
            taken, self._journaled = self._journaled, []
        if taken:
            rows: Rows = {}
            for part, _ in taken:
                for name, events in part.items():
                    rows.setdefault(name, []).extend(events)
            position = taken[-1][1]
            if self._commit(rows, position) and self._journal is not None:
                self._journal.consumed(position)
            loop = self._loop
            if loop is not None:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._settle, None, set(rows))
        with self._lock:
            again = bool(self._journaled)
            self._enqueuing = again
        if again:
            self._submit(self._queue_thread, self._enqueue)

    # -- back on the loop ------------------------------------------------------------------

    def _settle(self, done: asyncio.Future[None] | None, touched: set[str]) -> None:
        if done is not None and not done.done():
            done.set_result(None)
        waiting = self._waiting
        while waiting and waiting[0][1].done():
            waiting.popleft()
        for name in touched:
            arrived = self._arrived.get(name)
            if arrived is not None:
                arrived.set()

    def _overdue(self) -> None:
        """Answer the pulls whose events wait longer than MAX_WAIT for the disk."""
        loop, waiting = self._loop, self._waiting
        before, late = time.time() - MAX_WAIT, 0
        while waiting and (waiting[0][0] <= before or waiting[0][1].done()):
            _, done = waiting.popleft()
            if not done.done():
                done.set_result(None)
                late += 1
        if late:
            log.warning(
                "the event journal takes over %.0fs to write: pulls are answered before their "
                "events are on disk",
                MAX_WAIT,
            )
        if waiting and loop is not None:
            loop.call_later(MAX_WAIT, self._overdue)
        else:
            self._watchdog = False

    # -- for delivery ----------------------------------------------------------------------

    async def peek(self, endpoint: str, limit: int) -> list[Queued]:
        """The oldest events waiting for `endpoint`."""
        queue, thread = self._queue, self._queue_thread
        assert queue is not None and thread is not None
        return await asyncio.get_running_loop().run_in_executor(thread, queue.peek, endpoint, limit)

    async def ack(self, endpoint: str, upto: int) -> None:
        """Remove `endpoint`'s events up to `upto` from its queue (delivered, or refused)."""
        queue, thread = self._queue, self._queue_thread
        assert queue is not None and thread is not None
        await asyncio.get_running_loop().run_in_executor(thread, queue.ack, endpoint, upto)
        self._metrics.events_waiting(endpoint, queue.depth.get(endpoint, 0))

    def delivered(self, endpoint: str) -> None:
        """A delivery succeeded: a queue that fills up again is logged again."""
        self._dropping.discard(endpoint)

    async def arrival(self, endpoint: str, seconds: float) -> None:
        """Wait until events are queued for `endpoint` in this process, or `seconds` passed
        (an admin command may have queued some: the caller looks again)."""
        arrived = self._arrived[endpoint]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await arrived.wait()
        arrived.clear()

    # -- the kinds, and what their data holds ----------------------------------------------

    def pull(
        self,
        *,
        upstream: str,
        repository: str,
        reference: str,
        digest: object,
        media_type: str,
        size: int,
        method: str,
        client: str | None,
        user: str | None,
        outcome: str,
    ) -> Emitted:
        """A manifest answered (GET or HEAD), by tag or by digest."""
        if "pull" not in self._routes:
            return None
        tag = None if ":" in reference else reference  # a digest has one, a tag never
        return self.emit(
            "pull",
            {
                "upstream": upstream,
                "repository": repository,
                "tag": tag,
                "digest": str(digest),
                "media_type": media_type,
                "size": size,
                "method": method,
                "client": client,
                "user": user,
                "outcome": outcome,
            },
            f"{upstream}/{repository}@{digest}",
        )

    def blob_cached(
        self,
        *,
        digest: object,
        size: int,
        source: str,
        seconds: float,
        upstream: str,
        repository: str,
    ) -> Emitted:
        """A fill committed a verified blob to warm (from `upstream` or `cold`)."""
        if "blob.cached" not in self._routes:
            return None
        data = {
            "digest": str(digest),
            "size": size,
            "tier": "warm",
            "source": source,
            "seconds": round(seconds, 3),
            "upstream": upstream,
            "repository": repository,
        }
        return self.emit("blob.cached", data, str(digest))

    def blob_evicted(
        self, *, tier: str, reason: str, digests: Sequence[object], nbytes: int, to: str | None
    ) -> Emitted:
        """Blobs left `tier` for `reason` (metrics.EVICTION_REASONS); `to` is "cold" for a
        demotion, None when they were deleted."""
        if "blob.evicted" not in self._routes or not digests:
            return None
        data = {
            "tier": tier,
            "reason": reason,
            "digests": [str(d) for d in digests],
            "count": len(digests),
            "bytes": nbytes,
            "to": to,
        }
        return self.emit("blob.evicted", data)

    def digest_mismatch(
        self,
        *,
        what: str,
        source: str,
        upstream: str | None,
        repository: str | None,
        expected: object,
        actual: object | None,
        detail: str,
    ) -> Emitted:
        """A `manifest` or `blob` from `upstream` (or `cold`) that is not what its digest names;
        `actual` is what its bytes hash to, when they all arrived."""
        if "digest.mismatch" not in self._routes:
            return None
        data = {
            "what": what,
            "source": source,
            "upstream": upstream,
            "repository": repository,
            "expected": str(expected),
            "actual": None if actual is None else str(actual),
            "detail": detail,
        }
        return self.emit("digest.mismatch", data, str(expected))

    def tag_moved(
        self, *, upstream: str, repository: str, tag: str, old: object, new: object
    ) -> Emitted:
        """Revalidation found a tag naming another digest than the one cached."""
        if "tag.moved" not in self._routes:
            return None
        data = {
            "upstream": upstream,
            "repository": repository,
            "tag": tag,
            "old": str(old),
            "new": str(new),
        }
        return self.emit("tag.moved", data, f"{upstream}/{repository}:{tag}")

    def upstream_state(self, upstream: str, up: bool, reason: str = "") -> Emitted:
        """An upstream started failing (`upstream.down`: no answer, or 5xx) or answered again."""
        kind = "upstream.up" if up else "upstream.down"
        if kind not in self._routes:
            return None
        data = {"upstream": upstream} if up else {"upstream": upstream, "reason": reason}
        return self.emit(kind, data, upstream)

    def ratelimit_low(
        self, *, upstream: str, credential: str, remaining: int, limit: int, floor: int
    ) -> Emitted:
        """The upstream's pull budget fell below `pull_budget_floor`."""
        if "ratelimit.low" not in self._routes:
            return None
        data = {
            "upstream": upstream,
            "credential": credential,
            "remaining": remaining,
            "limit": limit,
            "floor": floor,
        }
        return self.emit("ratelimit.low", data, upstream)

    def exported(self, *, images: Iterable[str], signed: bool) -> Emitted:
        """`mirror export` wrote a bundle of these images (`<upstream>/<repository>:<tag>`)."""
        if "export.done" not in self._routes:
            return None
        return self.emit("export.done", {"images": list(images), "signed": signed})

    def imported(
        self,
        *,
        blobs: int,
        manifests: int,
        tags: int,
        signature: str,
        refused: str | None,
        failed: Iterable[str],
    ) -> Emitted:
        """`mirror import` read a bundle: what it took, what the signature said, and what it
        refused (the whole bundle) or failed (single tags)."""
        if "import.done" not in self._routes:
            return None
        data = {
            "blobs": blobs,
            "manifests": manifests,
            "tags": tags,
            "signature": signature,
            "refused": refused,
            "failed": list(failed),
        }
        return self.emit("import.done", data)

    def admin(
        self,
        *,
        action: str,
        via: str,
        who: Mapping[str, Any],
        params: Mapping[str, Any],
        result: str,
    ) -> Emitted:
        """An administrative action, through the admin API (`via` "api", `who` the client's
        address) or a command (`via` "cli", `who` the local user), and how it ended."""
        if "admin" not in self._routes:
            return None
        data = {"action": action, "via": via, **who, "params": dict(params), "result": result}
        return self.emit("admin", data, action)
