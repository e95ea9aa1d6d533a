"""The group commit: how an event leaves the event loop.

The loop only appends an event's data to a list (`add`). The events thread takes everything
gathered since its last write, encodes it and hands it to the writer at once (the audit
lines, the journal: a full queue and a dead webhook cost a pull an append and a share of one
write, not a disk write of its own); whatever arrives meanwhile is the next batch. A batch
has one future, made on the loop by its first event and done (on the loop) once the writer
returned: every pull in it awaits that one future.

A write that takes longer than MAX_WAIT (a stalled disk) stops holding the pulls waiting on
it: they are answered, their events follow when the disk does.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mirror.events.kinds import Emitted
from mirror.events.routes import Route

log = logging.getLogger("mirror.events")

#: Longest a pull waits for its event's write before it is answered anyway.
MAX_WAIT = 1.0


@dataclass(frozen=True, slots=True)
class Pending:
    """An event not yet encoded (the events thread encodes it, in emission order)."""

    kind: str
    at: float
    data: dict[str, Any]
    subject: str | None
    route: Route


@dataclass(frozen=True, slots=True)
class Encoded:
    kind: str
    at: float
    body: str
    route: Route


#: Encodes one event: (kind, data, subject, emitted at) → its text.
Encode = Callable[[str, dict[str, Any], str | None, float], str]
#: Writes one encoded batch (on the events thread); never raises.
Write = Callable[[list[Encoded]], None]


class GroupCommit:
    """Add on the loop it is attached to, or, unattached (the admin commands), from one
    thread; `close` writes what is left."""

    def __init__(self, encode: Encode, write: Write) -> None:
        self._encode = encode
        self._write = write
        self._lock = threading.Lock()
        self._pending: list[Pending] = []
        #: Done once the events pending now are written: the one future of their batch.
        self._batch: asyncio.Future[None] | None = None
        self._flushing = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        #: Batch futures not yet done, with when each was made, oldest first (loop only).
        self._waiting: collections.deque[tuple[float, asyncio.Future[None]]] = collections.deque()
        self._watchdog = False
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="events")

    def add(self, kind: str, data: dict[str, Any], subject: str | None, route: Route) -> Emitted:
        """Hand the event to the events thread; a future of its batch when on the loop."""
        now = time.time()
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            loop = None
        made = None
        with self._lock:
            self._pending.append(Pending(kind, now, data, subject, route))
            done = self._batch
            if done is None and loop is not None:
                done = made = self._batch = loop.create_future()
            start, self._flushing = not self._flushing, True
        if start:
            self._submit(self._flush)
        if made is not None and loop is not None:
            self._waiting.append((now, made))
            if not self._watchdog:
                self._watchdog = True
                loop.call_later(MAX_WAIT, self._overdue)
        return done

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make futures on `loop` (running on this thread) from now on."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def detach(self) -> None:
        """Stop making futures; release those still waiting."""
        self._loop = None
        while self._waiting:
            _, done = self._waiting.popleft()
            if not done.done():
                done.set_result(None)

    def run(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the events thread, after the batches handed to it so far (so that
        what writes the sinks never runs beside a write)."""
        self._submit(fn)

    def close(self) -> None:
        """Blocking: write what is still pending; nothing is written afterwards."""
        self._thread.submit(self._flush).result()
        self._thread.shutdown(wait=True)  # after a last batch that arrived meanwhile
        self._closed = True

    def _submit(self, fn: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # shutting down: `close` writes what is left
            self._thread.submit(fn)

    # -- the events thread -----------------------------------------------------------------

    def _flush(self) -> None:
        """Write one batch: everything pending now. Whatever arrives meanwhile is the next
        batch, submitted behind anything else queued for the thread (a reopen)."""
        with self._lock:
            batch, self._pending = self._pending, []
            done, self._batch = self._batch, None
        if batch and not self._closed:
            encode = self._encode
            self._write(
                [
                    Encoded(p.kind, p.at, encode(p.kind, p.data, p.subject, p.at), p.route)
                    for p in batch
                ]
            )
            loop = self._loop
            if loop is not None and done is not None:
                with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
                    loop.call_soon_threadsafe(self._settle, done)
        with self._lock:
            again = bool(self._pending) and not self._closed
            self._flushing = again
        if again:
            self._submit(self._flush)

    # -- back on the loop ------------------------------------------------------------------

    def _settle(self, done: asyncio.Future[None]) -> None:
        if not done.done():
            done.set_result(None)
        waiting = self._waiting
        while waiting and waiting[0][1].done():
            waiting.popleft()

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
