"""The queue thread: the one thread that uses this process's connection to the queues
(queue.py). It commits what the journal holds to the queues (every ENQUEUE_GATHER, off the
path of any pull), reads and acknowledges them for delivery, and at start commits what the
journals held that the queues had not taken.

At the start of a serving process: its own journal is claimed (journal.py: a start that
cannot claim it within CLAIM_SECONDS stops, since another process writes it), then every
journal no process holds (a dead worker's whose index is not run now, a single process's
from before workers) is claimed, committed and released, and then its own. Each commit
records the journal's name and how far into it the queues got in the same transaction, so
each journaled event reaches its queues exactly once.

An admin command has no journal: its events thread commits its events here directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mirror.errors import ConfigError
from mirror.events.journal import SINGLE, Journal, Line, Position, journal_names
from mirror.events.queue import EventQueue, Queued
from mirror.metrics import Metrics

log = logging.getLogger("mirror.events")

#: Seconds the queue thread lets journaled events gather before it commits them.
ENQUEUE_GATHER = 0.05

#: Events for the queues: webhook name → (emitted at, encoded event), in order.
Rows = dict[str, list[tuple[float, str]]]
#: Routes journaled lines to the queues that want their kind now.
Route = Callable[[list[Line]], Rows]


class Enqueuer:
    """Owns the queues' connection and the queue thread (see the module docstring)."""

    def __init__(self, queue: EventQueue, endpoints: Iterable[str], metrics: Metrics) -> None:
        self._queue = queue
        self._endpoints = tuple(endpoints)
        self._metrics = metrics
        self._lock = threading.Lock()
        #: Journaled events the queue thread has yet to commit (and how far they reach).
        self._journaled: list[tuple[Rows, Position]] = []
        self._enqueuing = False
        self._closing = False
        self._journal: Journal | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._arrived: dict[str, asyncio.Event] = {}
        #: Webhooks whose queue is dropping events (logged once, until a commit drops none).
        self._dropping: set[str] = set()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="event-queue")

    def open(self) -> None:
        """Blocking, at start: open (and create) the queues, so that a start fails on an
        unwritable one."""
        try:
            self._queue.open()
        except (sqlite3.Error, OSError) as e:
            raise ConfigError(f"events: cannot open the event queue {self._queue.path}: {e}") from e
        for name in self._endpoints:
            self._metrics.events_waiting(name, self._queue.depth[name])

    def start_journal(self, root: Path, name: str, route: Route) -> Journal:
        """Blocking, at start: claim this process's journal and commit what it and every
        journal nobody holds had not given the queues (see the module docstring)."""
        try:
            own = Journal(root, name)
            claimed = own.claim()
        except OSError as e:
            raise ConfigError(f"events: cannot open the event journal {root}: {e}") from e
        if not claimed:
            where = "a single mirror" if name == SINGLE else name
            raise ConfigError(
                f"events: another process writes the event journal {own.directory} "
                f"({where}): only one may serve this data directory as that"
            )
        try:
            for other in journal_names(root):
                if other != name:
                    orphan = Journal(root, other)
                    if orphan.try_claim():
                        try:
                            self._replay(orphan, route)
                        finally:
                            orphan.close()
            self._replay(own, route)
        except (sqlite3.Error, OSError, ValueError) as e:
            own.close()
            raise ConfigError(f"events: cannot replay the event journal {root}: {e}") from e
        self._journal = own
        return own

    def _replay(self, journal: Journal, route: Route) -> None:
        journal.start(self._queue.taken(journal.name))
        lines = journal.replay()
        self._queue.append(route(lines), (journal.name, journal.position))
        journal.consumed(journal.position)
        if lines:
            where = f"{journal.name}'s journal" if journal.name else "the journal"
            log.info("%d events from %s queued", len(lines), where)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Tell delivery on `loop` of events this process queued (`arrival`)."""
        self._loop = loop
        self._arrived = {name: asyncio.Event() for name in self._endpoints}

    def detach(self) -> None:
        self._loop = None

    # -- from the events thread ------------------------------------------------------------

    def journaled(self, rows: Rows, position: Position) -> None:
        """These events are in the journal up to `position`: commit them soon."""
        with self._lock:
            self._journaled.append((rows, position))
            start, self._enqueuing = not self._enqueuing, True
        if start:
            self._submit(self._enqueue)

    def commit(self, rows: Rows, taken: Position | None = None) -> bool:
        """Commit to the queues now (the queue thread's, or a command's events thread);
        False when the database would not take them (logged, counted)."""
        queue = self._queue
        journal = self._journal
        try:
            dropped = queue.append(
                rows, (journal.name, taken) if taken is not None and journal else None
            )
        except sqlite3.Error as e:
            unwritable(self._metrics, rows, "queue", e)
            return False
        for name in rows:
            if name in dropped:
                self._metrics.events_lost(name, "queue_full", dropped[name])
                if name not in self._dropping:
                    self._dropping.add(name)
                    log.warning(
                        "webhook %s is not taking events and its queue is full: "
                        "the oldest are dropped",
                        name,
                    )
            else:
                self._dropping.discard(name)  # it took events again: a new fill is logged
            self._metrics.events_waiting(name, queue.depth.get(name, 0))
        return True

    # -- the queue thread ------------------------------------------------------------------

    def _submit(self, fn: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # shutting down: `close` commits what is left
            self._thread.submit(fn)

    def _enqueue(self) -> None:
        """Commit what the journal holds to the queues, all of it in one transaction. It
        lets ENQUEUE_GATHER pass first: a transaction costs the same for one event or
        hundreds, and every one of them takes the interpreter from the loop for a while."""
        if not self._closing:
            time.sleep(ENQUEUE_GATHER)  # ok: gathering a batch, on the queue thread
        with self._lock:
            taken, self._journaled = self._journaled, []
        if taken:
            rows: Rows = {}
            for part, _ in taken:
                for name, events in part.items():
                    rows.setdefault(name, []).extend(events)
            position = taken[-1][1]
            if self.commit(rows, position) and self._journal is not None:
                self._journal.consumed(position)
            loop = self._loop
            if loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop closed
                    loop.call_soon_threadsafe(self._arrive, set(rows))
        with self._lock:
            again = bool(self._journaled)
            self._enqueuing = again
        if again:
            self._submit(self._enqueue)

    def _arrive(self, names: set[str]) -> None:
        for name in names:
            arrived = self._arrived.get(name)
            if arrived is not None:
                arrived.set()

    # -- for delivery (on the loop) --------------------------------------------------------

    async def peek(self, endpoint: str, limit: int) -> list[Queued]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._queue.peek, endpoint, limit)

    async def ack(self, endpoint: str, upto: int) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._queue.ack, endpoint, upto)
        self._metrics.events_waiting(endpoint, self._queue.depth.get(endpoint, 0))

    async def synced(self) -> None:
        """Wait until the queue thread did everything handed to it so far (an acknowledgement
        whose awaiting task was cancelled is still committed)."""
        await asyncio.get_running_loop().run_in_executor(self._thread, lambda: None)

    async def arrival(self, endpoint: str, seconds: float) -> None:
        arrived = self._arrived[endpoint]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await arrived.wait()
        arrived.clear()

    def close(self) -> None:
        """Blocking: commit what the journal still holds, then close the queues and release
        the journal."""
        self._closing = True
        self._thread.submit(self._enqueue).result()
        self._thread.shutdown(wait=True)
        self._queue.close()
        if self._journal is not None:
            self._journal.close()


def unwritable(metrics: Metrics, rows: Rows, what: str, e: Exception) -> None:
    """Events the disk would not take: logged and counted, per webhook."""
    lost = sum(len(events) for events in rows.values())
    log.error("the event %s cannot be written (%s): %d events lost", what, e, lost)
    for name, events in rows.items():
        metrics.events_lost(name, "unwritable", len(events))
