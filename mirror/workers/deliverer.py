"""The deliverer: with worker processes and events to deliver, the process beside the workers
(supervisor.py) that delivers every worker's journal to the webhooks and writes the audit log
(events/delivery.py), and serves nothing.

Why a process of its own: delivery in a serving process (as a single `mirror serve` does it)
reads the journals on a thread of that process, and each of its turns takes the interpreter
lock from the serving loop and its caches with it. Here the workers only append their
lines; what reads them forward, trims the queues and posts the batches shares no interpreter
with a request. It holds the delivery lock as a serving deliverer would, so the failover is
the same: killed, it is started again under the supervisor and goes on from the cursors.

It runs at a lower priority (NICENESS): on a machine whose cores the workers keep busy, the
kernel gives a request's turn before the deliverer's. Delivery is never waited for; what it
cannot send meanwhile waits in the journals, bounded by `max_queue`, and goes once the rush
is over.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import uvloop

from mirror import logs
from mirror.config import Config
from mirror.errors import ConfigError
from mirror.events import Events
from mirror.events.delivery import Deliveries
from mirror.metrics import Metrics
from mirror.store.layout import Layout
from mirror.workers.supervisor import CONFIG_ERROR

#: Added to the deliverer's nice value (that of `nice`: 10 gives it a tenth of a worker's
#: share of a busy core).
NICENESS = 10


def wanted(config: Config) -> bool:
    """Whether the configuration has events to deliver (webhooks, or an audit log)."""
    return bool(config.events.webhooks or config.events.audit_log)


def run(config: Config, ready: int) -> int:
    """Deliver until SIGTERM or SIGINT, writing a byte to `ready` once delivering; the exit
    status (CONFIG_ERROR for an audit log it cannot open)."""
    os.nice(NICENESS)
    listener = logs.start(config.log_level, config.log_format)
    try:
        layout = Layout(config.data_dir)
        metrics = Metrics()
        events = Events(
            config.events,
            metrics,
            layout.events_journal,
            layout.events_cursors,
            layout.events_deliver,
            serving=True,
            emits=False,
        )
    except ConfigError as e:
        print(f"mirror: configuration error: {e}", file=sys.stderr)
        listener.stop()
        return CONFIG_ERROR
    try:
        uvloop.run(_deliver(events, metrics, ready))
    finally:
        events.close()
        listener.stop()
    return 0


async def _deliver(events: Events, metrics: Metrics, ready: int) -> None:
    deliveries = Deliveries(events.config, events, metrics, events.deliver_lock)
    deliveries.start()
    os.write(ready, b"r")
    os.close(ready)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, events.reopen)  # the audit log, after logrotate
    try:
        await stop.wait()
    finally:
        await deliveries.stop()
