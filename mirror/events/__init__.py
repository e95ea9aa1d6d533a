"""Events: what happens in the mirror, told to webhooks and kept in an audit trail.

`Events` is the one emitter, handed to the constructors of what emits (tiers, eviction
passes, the upstream client, manifests and blobs, the HTTP handlers, bundles and the admin
commands). Each kind has a method (kinds.py) that says what its data holds; with no webhook
and no audit log wanting a kind (routes.py), that method returns at its first line and
builds nothing.

What "emitted" means: an event is emitted once it is on disk for every webhook that wants it
and written to the audit log if that keeps its kind. The loop only appends its data to a
list; the events thread (group.py) encodes (cloudevents.py) and writes everything gathered
since its last write at once: the audit lines (audit.py), then, in a serving process, its
journal (journal.py), one write(2) each; in an admin command, which has no journal, the
queues' SQLite commit. Either is in the kernel once it returns, so it survives a kill -9 (a
power loss may take what was not yet flushed). The queue thread (enqueue.py) then commits
the journaled events to their queues (queue.py), off the path of any pull.

A method returns a future that is done once its event is emitted; the pull handler awaits it
before the answer goes out, so a pull a client saw answered is on disk. Other emitters do
not wait: what a kill -9 can lose is an event of theirs still in the list, the few
milliseconds before its write.

Several serving processes (workers) may share one data directory: each writes a journal of
its own (its index's) and commits it to the one set of queues; delivery (delivery.py) runs
in whichever process holds the delivery lock, reads the queues in order, in batches, and
removes what a webhook acknowledged: at least once, in order per webhook.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from pathlib import Path
from typing import Any

from mirror.config import EVENT_KINDS, EventsConfig, webhook_name
from mirror.errors import ConfigError
from mirror.events.audit import AuditFile
from mirror.events.cloudevents import Envelope
from mirror.events.enqueue import Enqueuer, Rows, unwritable
from mirror.events.group import Encoded, GroupCommit
from mirror.events.journal import Journal, Line, journal_name
from mirror.events.kinds import Emitted, Kinds
from mirror.events.queue import EventQueue, Queued
from mirror.events.routes import Route, routes
from mirror.metrics import Metrics

__all__ = ["Emitted", "Events"]

log = logging.getLogger("mirror.events")


class Events(Kinds):
    """The emitter (see the module docstring). Emit on the event loop it is attached to, or,
    unattached (the admin commands), from one thread; `close` writes what is left.

    `journals`: the directory of the serving processes' journals (None for a command);
    `worker`: this process's index among several serving processes (None: the only one)."""

    def __init__(
        self,
        config: EventsConfig,
        metrics: Metrics,
        queue_path: Path,
        journals: Path | None = None,
        worker: int | None = None,
    ) -> None:
        self._metrics = metrics
        self.endpoints = tuple(webhook_name(h) for h in config.webhooks)
        self._routes: dict[str, Route] = routes(config)
        metrics.prefill_events(EVENT_KINDS, self.endpoints)
        self._enqueuer: Enqueuer | None = None
        self._journal: Journal | None = None
        self._audit: AuditFile | None = None
        self._group: GroupCommit | None = None
        if not self._routes:
            return
        if self.endpoints:
            queue = EventQueue(queue_path, self.endpoints, config.max_queue)
            self._enqueuer = Enqueuer(queue, self.endpoints, metrics)
            self._enqueuer.open()
            if journals is not None:
                name = journal_name(worker)
                self._journal = self._enqueuer.start_journal(journals, name, self._rows_of)
        if config.audit_log:
            try:
                self._audit = AuditFile(config.audit_log, config.audit_max_bytes, config.audit_keep)
            except OSError as e:
                raise ConfigError(f"events.audit_log: cannot open it: {e.strerror}") from e
        envelope = Envelope(config.source or f"urn:mirror:{socket.gethostname()}")
        self._group = GroupCommit(envelope.encode, self._write)

    def _rows_of(self, lines: list[Line]) -> Rows:
        """Journaled lines for the queues of the webhooks that want their kinds now."""
        rows: Rows = {}
        for kind, at, body in lines:
            route = self._routes.get(kind)
            for name in route.endpoints if route is not None else ():
                rows.setdefault(name, []).append((at, body))
        return rows

    # -- the emitter -----------------------------------------------------------------------

    def emit(self, kind: str, data: dict[str, Any], subject: str | None = None) -> Emitted:
        """Hand the event to the events thread, which encodes and writes it; see the module
        docstring. `data` is the event's own: nothing may change it afterwards."""
        route = self._routes.get(kind)
        if route is None or self._group is None:
            return None
        return self._group.add(kind, data, subject, route)

    def attach(self) -> None:
        """Make futures on the running loop from now on (the server, at start)."""
        loop = asyncio.get_running_loop()
        if self._group is not None:
            self._group.attach(loop)
        if self._enqueuer is not None:
            self._enqueuer.attach(loop)

    def detach(self) -> None:
        """Stop making futures; release those still waiting (the server, at stop)."""
        if self._group is not None:
            self._group.detach()
        if self._enqueuer is not None:
            self._enqueuer.detach()

    def reopen(self) -> None:
        """Reopen the audit log on the events thread (SIGHUP, after logrotate)."""
        audit, group = self._audit, self._group
        if audit is not None and group is not None:
            group.run(lambda: _reopen(audit))

    def close(self) -> None:
        """Blocking: write what is still pending, commit the journaled events to their
        queues, then close the queues, the journal and the audit log."""
        group = self._group
        if group is None:
            return
        self._routes = {}
        group.close()
        if self._enqueuer is not None:
            self._enqueuer.close()
        if self._audit is not None:
            self._audit.close()

    # -- the events thread -----------------------------------------------------------------

    def _write(self, batch: list[Encoded]) -> None:
        """Audit lines, then the journal (or, in a command, the queues), then the counts.
        Never raises: a disk that will not take them costs those events (logged, counted),
        not the pull."""
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
        written = True
        if rows and self._enqueuer is not None:
            if self._journal is not None:
                journaled = [(p.kind, p.at, p.body) for p in batch if p.route.endpoints]
                try:
                    position = self._journal.write(journaled)
                except OSError as e:
                    written = False
                    unwritable(self._metrics, rows, "journal", e)
                else:
                    self._enqueuer.journaled(rows, position)
            else:
                written = self._enqueuer.commit(rows)
        if written:
            for kind, count in Counter(p.kind for p in batch).items():
                self._metrics.event_emitted(kind, count)

    # -- for delivery ----------------------------------------------------------------------

    @property
    def _queues(self) -> Enqueuer:
        assert self._enqueuer is not None, "no webhook is configured"
        return self._enqueuer

    async def peek(self, endpoint: str, limit: int) -> list[Queued]:
        """The oldest events waiting for `endpoint`."""
        return await self._queues.peek(endpoint, limit)

    async def ack(self, endpoint: str, upto: int) -> None:
        """Remove `endpoint`'s events up to `upto` from its queue (delivered, or refused)."""
        await self._queues.ack(endpoint, upto)

    async def synced(self) -> None:
        """Wait until every acknowledgement handed to the queue thread is committed."""
        await self._queues.synced()

    async def arrival(self, endpoint: str, seconds: float) -> None:
        """Wait until events are queued for `endpoint` in this process, or `seconds` passed
        (another process may have queued some: the caller looks again)."""
        await self._queues.arrival(endpoint, seconds)


def _reopen(audit: AuditFile) -> None:
    try:
        audit.reopen()
        log.info("audit log reopened: %s", audit.path)
    except OSError as e:
        log.error("cannot reopen the audit log %s, writing on to the old file: %s", audit.path, e)
