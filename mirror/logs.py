"""Logging off the event loop: every record goes through a queue to one writer thread.

A log line written from the loop is a blocking write to a file or pipe, on every request when
the access log is on (it halved manifest requests/s here). The loop only creates the record
and puts it on a queue; a `QueueListener` thread formats and writes it.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue


class _Deferred(logging.handlers.QueueHandler):
    """Enqueue the record as it is: formatting happens in the writer thread (the standard
    QueueHandler formats in the caller, which is the cost this avoids). Our log arguments are
    plain values, so formatting later gives the same line."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


def start(level: str, fmt: str = "%(asctime)s %(levelname)s %(name)s %(message)s") -> logging.handlers.QueueListener:
    """Route all logging through the queue; the caller stops the returned listener at exit
    (which writes whatever is still queued)."""
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    out = logging.StreamHandler()
    out.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [_Deferred(records)]
    root.setLevel(level.upper())
    listener = logging.handlers.QueueListener(records, out, respect_handler_level=False)
    listener.start()
    return listener
