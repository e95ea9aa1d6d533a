"""Delivery: in the one process holding the delivery lock, one task per webhook POSTs what
its cursor has not passed in the journals (feed.py), in order, in batches, and moves the
cursor past a batch only once the webhook answered 2xx; one task writes the audit log from
the journals the same way; one keeps each webhook at `max_queue` and deletes what every
cursor passed. Their reading, encoding and cursor moves run on one thread of their own
(the deliver thread), off the loop and off the request path.

One process of a host delivers at a time: the one holding `events.deliver.lock` in the data
directory (flock, lock.py). Every serving process tries to take it, at start and then every
LEAD_RETRY seconds while another holds it; the kernel releases it when its holder dies, so
another serving process takes over within LEAD_RETRY and goes on from the cursors
(`events.cursors`, cursors.py) over every process's journal, so no two processes send the
same batch. A process that stops releases the lock only once its last cursor move is saved.

    2xx                          delivered: passed, the next batch goes at once
    408, 429, 3xx, 5xx, no answer
      (refused, reset, timeout)  failed: kept, tried again after a back-off that doubles
                                 from FIRST_BACKOFF to MAX_BACKOFF (jittered), or after the
                                 answer's Retry-After (at most MAX_RETRY_AFTER)
    any other 4xx                refused: the receiver will not take this batch however
                                 often it is sent; dropped, logged and counted

Each try of a batch is signed afresh (a new timestamp), so a receiver refusing old
timestamps still takes a retry. A batch cut by a crash or a stop before its 2xx was
recorded is sent again after the restart: delivery is at least once, receivers dedupe by
the events' `id` (a deliverer killed between a 2xx and its cursor's save leaves that batch
to the next). A webhook that hangs costs one task waiting on one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiohttp

from mirror import __version__
from mirror.config import EventsConfig, Webhook, webhook_name
from mirror.events import AUDIT, Events, cursors
from mirror.events.cloudevents import BATCH_CONTENT_TYPE, SIGNATURE_HEADER, batch, signature
from mirror.events.feed import Consumer, Journals, Taken, collect
from mirror.locks import FileLock
from mirror.metrics import Metrics

log = logging.getLogger("mirror.events")

#: Most events in one delivery, and most bytes (a batch holds at least one event).
BATCH_EVENTS = 100
BATCH_BYTES = 1024 * 1024
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 300.0
#: A Retry-After longer than this is waited for this long.
MAX_RETRY_AFTER = 3600.0
#: Seconds an idle webhook's task waits before it looks at the journals again.
IDLE_LOOK = 0.5
#: Seconds the audit task waits, when it wrote everything, before it looks again.
AUDIT_LOOK = 0.2
#: Seconds between the passes that keep each webhook at `max_queue`, count what waits and
#: delete the journal files every cursor passed (while every webhook waits out its
#: TRIM_SECONDS, the next pass waits with them).
KEEP_SECONDS = 1.0
#: Seconds after a pass that dropped a webhook's oldest events before the next may drop
#: more: while a webhook stays down on a busy mirror every pass would find it past
#: `max_queue` again, and moving its cursor each second cost the serving workers some 2 % of
#: their manifest rate (bench/events.py); its queue holds at most `max_queue` and what comes
#: in these seconds. While every webhook is in this wait (all down, their queues full) the
#: passes wait too: counting the new lines each second was work for a depth that only grows
#: meanwhile (off against a dead webhook: 0.951 of its rate before, 0.957 after).
TRIM_SECONDS = 10.0
#: Seconds between tries of a process that does not hold the delivery lock.
LEAD_RETRY = 2.0
_RETRY = frozenset({408, 429})

T = TypeVar("T")


def _consumer_name(endpoint: str) -> str:
    return f"webhook:{endpoint}"


@dataclass
class _Batch:
    """What one delivery sends: the lines taken, their texts, when each was emitted."""

    taken: Taken
    bodies: list[str]
    ats: list[float]


class Deliveries:
    """The delivery tasks of every configured webhook and the audit log, while this process
    holds `lock`."""

    def __init__(self, config: EventsConfig, events: Events, metrics: Metrics, lock: Path) -> None:
        self._config = config
        self._events = events
        self._metrics = metrics
        self._lock = FileLock(lock)
        self._session: aiohttp.ClientSession | None = None
        self._lead: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="events-deliver")
        # the deliver thread's own, once this process delivers
        self._journals = Journals(events.journals)
        self._consumers: dict[str, Consumer] = {}
        self._saved: cursors.Places = {}
        #: Webhooks dropping events for a full queue (logged once, until they take some).
        self._dropping: set[str] = set()
        #: When each webhook that dropped events may be trimmed again (monotonic seconds).
        self._trim_at: dict[str, float] = {}

    def start(self) -> None:
        """Deliver once this process holds the lock (at once when nobody else does)."""
        if self._config.webhooks or self._events.audit is not None:
            self._lead = asyncio.create_task(self._take_lead(), name="event delivery lock")

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn` on the deliver thread, after everything handed to it before."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def _take_lead(self) -> None:
        """Try the lock until it is this process's or `stop` is called. Never cancelled, so
        that no try is left running on a thread when `stop` closes the lock."""
        waited = False
        while not self._stopping.is_set():
            try:
                if await self.run(self._lock.try_take):
                    log.info("this process delivers the events%s", " now" if waited else "")
                    await self.run(self._open)
                    self._deliver()
                    return
            except OSError as e:
                log.error("cannot take the delivery lock %s: %s", self._lock.path, e)
            if not waited:
                log.info("another process delivers the events: this one waits its turn")
                waited = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LEAD_RETRY):
                    await self._stopping.wait()

    # -- the deliver thread ----------------------------------------------------------------

    def _open(self) -> None:
        """The cursors as saved by the last deliverer; those of webhooks no longer configured
        are forgotten (logged: the journals are deleted behind the configured ones only)."""
        places = cursors.load(self._events.cursors_path)
        wanted = {_consumer_name(e): self._events.wanted(e) for e in self._events.endpoints}
        if self._events.audit is not None:
            wanted[AUDIT] = self._events.audit_kinds()
        for name in sorted(set(places) - set(wanted)):
            log.warning("events for %r, which is not configured any more, are not kept", name)
        self._consumers = {
            name: Consumer(name, kinds, places.get(name, {})) for name, kinds in wanted.items()
        }
        self._journals.refresh()
        for endpoint in self._events.endpoints:
            depth = self._consumers[_consumer_name(endpoint)].depth(self._journals)
            self._metrics.events_waiting(endpoint, depth)
        self._save()

    def _save(self) -> None:
        """Save the cursors when one moved since the last save."""
        places = {name: dict(c.cursor) for name, c in self._consumers.items()}
        if places != self._saved:
            cursors.save(self._events.cursors_path, places)
            self._saved = places

    def _batch(self, endpoint: str) -> _Batch | None:
        """The next batch for a webhook (None: nothing waits)."""
        consumer = self._consumers[_consumer_name(endpoint)]
        self._journals.refresh()
        taken = consumer.take(self._journals, BATCH_EVENTS)
        if not taken.lines:
            consumer.advance(taken)  # past lines it does not want
            return None
        kept: list[str] = []
        ats: list[float] = []
        size, cut = 0, len(taken.lines)
        for i, (_, name, end, line) in enumerate(taken.lines):
            events = self._events.encode(line, self._journals.ident(name, end, line))
            if events is None:
                self._metrics.events_lost(endpoint, "unwritable", 1)
                continue
            size += sum(len(body) + 1 for _, body in events)
            if size > BATCH_BYTES and kept:  # a line's events go together: a cursor passes lines
                cut = i
                break
            kept.extend(body for _, body in events)
            ats.extend(at for at, _ in events)
        if cut < len(taken.lines):
            lines = taken.lines[:cut]
            after = {name: end for _, name, end, _ in lines}
            taken = Taken(lines, after)
        return _Batch(taken, kept, ats)

    def _passed(self, endpoint: str, taken: Taken) -> None:
        """A batch done with: the cursor past it, saved."""
        consumer = self._consumers[_consumer_name(endpoint)]
        consumer.advance(taken)
        self._save()
        self._metrics.events_waiting(endpoint, consumer.depth(self._journals))

    def _keep(self) -> float:
        """Each webhook at `max_queue` at most (the oldest passed, counted; once in
        TRIM_SECONDS while it stays full), what waits counted, files behind every cursor
        deleted; returns the seconds to the next pass: KEEP_SECONDS, or while every webhook
        waits for its next trim, until the first of those (its depth counted then)."""
        self._journals.refresh()
        now = time.monotonic()
        for endpoint in self._events.endpoints:
            consumer = self._consumers[_consumer_name(endpoint)]
            if now >= self._trim_at.get(endpoint, now):
                self._trim(endpoint, consumer, now)
            self._metrics.events_waiting(endpoint, consumer.depth(self._journals))
        consumers = list(self._consumers.values())
        for name in collect(self._journals, consumers):
            for consumer in consumers:
                consumer.forget(name)
        self._save()
        waits = [self._trim_at.get(e, now) - now for e in self._events.endpoints]
        return max(KEEP_SECONDS, min(waits, default=0.0))

    def _trim(self, endpoint: str, consumer: Consumer, now: float) -> None:
        """A webhook's queue back to `max_queue`, the oldest passed and counted."""
        dropped = consumer.trim(self._journals, self._config.max_queue)
        if not dropped:
            self._dropping.discard(endpoint)  # it took events again: a new fill is logged
            return
        self._trim_at[endpoint] = now + TRIM_SECONDS
        self._metrics.events_lost(endpoint, "queue_full", dropped)
        if endpoint not in self._dropping:
            self._dropping.add(endpoint)
            log.warning(
                "webhook %s is not taking events and its queue is full: the oldest are dropped",
                endpoint,
            )

    def _audit(self) -> bool:
        consumer = self._consumers[AUDIT]
        self._journals.refresh()
        more = self._events.write_audit(self._journals, consumer)
        self._save()
        return more

    # -- on the loop -----------------------------------------------------------------------

    def _deliver(self) -> None:
        if self._config.webhooks:
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=2),
                trust_env=False,
                headers={"User-Agent": f"mirror/{__version__}"},
            )
            for hook in self._config.webhooks:
                sender = _Sender(hook, session, self, self._metrics)
                task = asyncio.create_task(sender.run(), name=f"webhook {sender.name}")
                self._tasks.append(task)
        self._tasks.append(asyncio.create_task(self._keep_forever(), name="event journals"))
        if AUDIT in self._consumers:
            self._tasks.append(asyncio.create_task(self._audit_forever(), name="audit log"))

    async def _keep_forever(self) -> None:
        wait = KEEP_SECONDS
        while True:
            await asyncio.sleep(wait)
            try:
                wait = await self.run(self._keep)
            except Exception:
                log.exception("keeping the event queues failed")
                wait = KEEP_SECONDS

    async def _audit_forever(self) -> None:
        while True:
            try:
                more = await self.run(self._audit)
            except Exception:
                log.exception("writing the audit log from the event journals failed")
                more = False
            if not more:
                await asyncio.sleep(AUDIT_LOOK)

    async def batch(self, endpoint: str) -> _Batch | None:
        return await self.run(self._batch, endpoint)

    async def passed(self, endpoint: str, taken: Taken) -> None:
        await self.run(self._passed, endpoint, taken)

    async def stop(self) -> None:
        """Cancel the tasks (a batch in flight stays: it goes again at the next start, or
        from the process that takes the lock next), then release the lock once the cursor
        moves handed to the deliver thread are saved."""
        if self._lead is not None:
            self._stopping.set()
            await self._lead
            self._lead = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._lock.held:
            try:
                await self.run(self._final)
            except OSError as e:
                log.error("the event cursors cannot be saved: %s", e)
        await asyncio.to_thread(self._thread.shutdown)
        await asyncio.to_thread(self._lock.close)

    def _final(self) -> None:
        """At stop: what the audit log has yet to take, and the cursors saved."""
        if AUDIT in self._consumers:
            self._journals.refresh()
            while self._events.write_audit(self._journals, self._consumers[AUDIT]):
                pass
        self._save()


class _Sender:
    """One webhook's delivery loop."""

    def __init__(
        self,
        hook: Webhook,
        session: aiohttp.ClientSession,
        deliveries: Deliveries,
        metrics: Metrics,
    ) -> None:
        self.name = webhook_name(hook)
        self._hook = hook
        self._session = session
        self._deliveries = deliveries
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=hook.timeout)
        self._headers = {**dict(hook.headers), "Content-Type": BATCH_CONTENT_TYPE}

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                found = await self._deliveries.batch(self.name)
            except Exception:
                log.exception("reading the event journals for webhook %s failed", self.name)
                await asyncio.sleep(IDLE_LOOK)
                continue
            if found is None:
                await asyncio.sleep(IDLE_LOOK)
                continue
            wait = await self._send(found, failures)
            if wait is None:
                failures = 0
                continue
            failures += 1
            self._metrics.event_delivery_failed(self.name)
            await asyncio.sleep(wait)

    async def _send(self, found: _Batch, failures: int) -> float | None:
        """Deliver one batch: None when it is done with (delivered, or refused and dropped),
        else the seconds to wait before it is tried again."""
        count = len(found.bodies)
        if not count:  # every line of it cut short: passed
            await self._deliveries.passed(self.name, found.taken)
            return None
        body = batch(found.bodies)
        headers = dict(self._headers)
        if self._hook.secret:
            headers[SIGNATURE_HEADER] = signature(self._hook.secret, int(time.time()), body)
        try:
            async with self._session.post(
                self._hook.url,
                data=body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                status, retry_after = resp.status, resp.headers.get("Retry-After")
                await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            reason = (str(e).splitlines() or [""])[0][:200] or type(e).__name__
            level = logging.WARNING if failures == 0 else logging.DEBUG
            log.log(level, "webhook %s unreachable (%s): %d events kept", self.name, reason, count)
            return _backoff(failures)
        if 200 <= status < 300:
            await self._deliveries.passed(self.name, found.taken)
            now = time.time()
            self._metrics.events_acknowledged(self.name, (now - at for at in found.ats))
            if failures:
                log.info("webhook %s takes events again", self.name)
            return None
        if 400 <= status < 500 and status not in _RETRY:
            log.error(
                "webhook %s refused a batch with %d: %d events dropped", self.name, status, count
            )
            await self._deliveries.passed(self.name, found.taken)
            self._metrics.events_lost(self.name, "rejected", count)
            return None
        level = logging.WARNING if failures == 0 else logging.DEBUG
        log.log(level, "webhook %s answered %d: %d events kept", self.name, status, count)
        after = _retry_after(retry_after)
        return after if after is not None else _backoff(failures)


def _backoff(failures: int) -> float:
    """Seconds before the next try after `failures` failures in a row (jittered)."""
    return float(min(MAX_BACKOFF, FIRST_BACKOFF * 2.0**failures) * random.uniform(0.5, 1.0))


def _retry_after(value: str | None) -> float | None:
    """A Retry-After (seconds, or an HTTP date) as seconds from now, at most MAX_RETRY_AFTER."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(when.timestamp() - time.time(), 0.0), MAX_RETRY_AFTER)
