"""Delivery: one background task per webhook POSTs its queue in order, in batches, and
removes a batch from the queue only once the webhook answered 2xx.

One process of a host delivers at a time: the one holding `events.deliver.lock` in the data
directory (flock, lock.py). Every serving process tries to take it, at start and then every
LEAD_RETRY seconds while another holds it; the kernel releases it when its holder dies, so
another serving process takes over within LEAD_RETRY and goes on from what the queues hold.
The queues are the same for all (events.sqlite, written by every process), so the one
delivering sends every process's events, and no two processes send the same batch. A
process that stops releases the lock only once its last acknowledgement is committed.

    2xx                          delivered: removed, the next batch goes at once
    408, 429, 3xx, 5xx, no answer
      (refused, reset, timeout)  failed: kept, tried again after a back-off that doubles
                                 from FIRST_BACKOFF to MAX_BACKOFF (jittered), or after the
                                 answer's Retry-After (at most MAX_RETRY_AFTER)
    any other 4xx                refused: the receiver will not take this batch however
                                 often it is sent; dropped, logged and counted

Each try of a batch is signed afresh (a new timestamp), so a receiver refusing old
timestamps still takes a retry. A batch cut by a crash or a stop before its 2xx was
recorded is sent again after the restart: delivery is at least once, receivers dedupe by
the events' `id` (a deliverer killed between a 2xx and its commit leaves that batch to the
next). Nothing here runs on the request path; a webhook that hangs costs one task waiting on
one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import time
from pathlib import Path

import aiohttp

from mirror import __version__
from mirror.config import EventsConfig, Webhook, webhook_name
from mirror.events import Events
from mirror.events.cloudevents import BATCH_CONTENT_TYPE, SIGNATURE_HEADER, batch, signature
from mirror.events.queue import Queued
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
#: Seconds an idle webhook's task waits before it looks at its queue again (events appended
#: by another process, a worker or an admin command, wake nobody here).
IDLE_LOOK = 1.0
#: Seconds between tries of a process that does not hold the delivery lock.
LEAD_RETRY = 2.0
_RETRY = frozenset({408, 429})


class Deliveries:
    """The delivery tasks of every configured webhook, while this process holds `lock`."""

    def __init__(self, config: EventsConfig, events: Events, metrics: Metrics, lock: Path) -> None:
        self._config = config
        self._events = events
        self._metrics = metrics
        self._lock = FileLock(lock)
        self._session: aiohttp.ClientSession | None = None
        self._lead: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Deliver once this process holds the lock (at once when nobody else does)."""
        if self._config.webhooks:
            self._lead = asyncio.create_task(self._take_lead(), name="webhook delivery lock")

    async def _take_lead(self) -> None:
        """Try the lock until it is this process's or `stop` is called. Never cancelled, so
        that no try is left running on a thread when `stop` closes the lock."""
        waited = False
        while not self._stopping.is_set():
            try:
                if await asyncio.to_thread(self._lock.try_take):
                    log.info(
                        "this process delivers the webhooks' events%s", " now" if waited else ""
                    )
                    self._deliver()
                    return
            except OSError as e:
                log.error("cannot take the delivery lock %s: %s", self._lock.path, e)
            if not waited:
                log.info("another process delivers the webhooks' events: this one waits its turn")
                waited = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LEAD_RETRY):
                    await self._stopping.wait()

    def _deliver(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=2),
            trust_env=False,
            headers={"User-Agent": f"mirror/{__version__}"},
        )
        for hook in self._config.webhooks:
            sender = _Sender(hook, self._session, self._events, self._metrics)
            self._tasks.append(asyncio.create_task(sender.run(), name=f"webhook {sender.name}"))

    async def stop(self) -> None:
        """Cancel the tasks (a batch in flight stays queued: it goes again at the next start,
        or from the process that takes the lock next), then release the lock once the
        acknowledgements handed to the queue thread are committed."""
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
            await self._events.synced()
        await asyncio.to_thread(self._lock.close)


class _Sender:
    """One webhook's delivery loop."""

    def __init__(
        self, hook: Webhook, session: aiohttp.ClientSession, events: Events, metrics: Metrics
    ) -> None:
        self.name = webhook_name(hook)
        self._hook = hook
        self._session = session
        self._events = events
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=hook.timeout)
        self._headers = {**dict(hook.headers), "Content-Type": BATCH_CONTENT_TYPE}

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                rows = _fitting(await self._events.peek(self.name, BATCH_EVENTS))
            except Exception:
                log.exception("reading the event queue of webhook %s failed", self.name)
                await asyncio.sleep(IDLE_LOOK)
                continue
            if not rows:
                await self._events.arrival(self.name, IDLE_LOOK)
                continue
            wait = await self._send(rows, failures)
            if wait is None:
                failures = 0
                continue
            failures += 1
            self._metrics.event_delivery_failed(self.name)
            await asyncio.sleep(wait)

    async def _send(self, rows: list[Queued], failures: int) -> float | None:
        """Deliver one batch: None when it is done with (delivered, or refused and dropped),
        else the seconds to wait before it is tried again."""
        body = batch([r.body for r in rows])
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
            log.log(
                level, "webhook %s unreachable (%s): %d events kept", self.name, reason, len(rows)
            )
            return _backoff(failures)
        if 200 <= status < 300:
            await self._events.ack(self.name, rows[-1].seq)
            now = time.time()
            self._metrics.events_acknowledged(self.name, (now - r.at for r in rows))
            if failures:
                log.info("webhook %s takes events again", self.name)
            return None
        if 400 <= status < 500 and status not in _RETRY:
            log.error(
                "webhook %s refused a batch with %d: %d events dropped",
                self.name,
                status,
                len(rows),
            )
            await self._events.ack(self.name, rows[-1].seq)
            self._metrics.events_lost(self.name, "rejected", len(rows))
            return None
        level = logging.WARNING if failures == 0 else logging.DEBUG
        log.log(level, "webhook %s answered %d: %d events kept", self.name, status, len(rows))
        after = _retry_after(retry_after)
        return after if after is not None else _backoff(failures)


def _fitting(rows: list[Queued]) -> list[Queued]:
    """The first rows whose bodies fit BATCH_BYTES (the first one always)."""
    total = 0
    for i, row in enumerate(rows):
        total += len(row.body) + 1
        if total > BATCH_BYTES and i:
            return rows[:i]
    return rows


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
