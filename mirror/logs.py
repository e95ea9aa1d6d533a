"""Structured logs (logfmt or JSON, one line per record) written off the event loop, in whole
lines.

A log line written from the loop is a blocking write to a file or pipe. Ordinary records go
through a queue to a `QueueListener` thread that formats and writes them. Access lines, one per
request, are cheaper still: the loop appends the request's fields to a deque as one tuple (no
LogRecord, no dict, no thread wake-up per request), and a writer thread formats and writes what
has gathered every `ACCESS_FLUSH` seconds. Measured on a manifest hit (bench/hitpath.py): one
LogRecord through the queue per request cost a third of the requests/s; the batch of dicts,
formatted field by field, 14 µs of CPU per request in the writer thread; the tuples and the
line formatted in one f-string, a few µs.

Several worker processes write to the same standard error, a pipe or a file opened with
O_APPEND. The kernel keeps a write(2) of at most PIPE_BUF bytes to a pipe in one piece, and an
O_APPEND write at the end of the file in one piece, so every write here is whole lines, at most
PIPE_BUF bytes of them (a longer line goes alone in a write of its own): lines of different
processes never mix within a line. `start(worker=n)` puts `worker=<n>` in every line, so a
line tells which process wrote it.

Nothing here logs headers, so credentials and tokens cannot reach a log line.
"""

from __future__ import annotations

import collections
import json
import logging
import logging.handlers
import os
import queue
import re
import select
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

#: Seconds between writes of gathered access lines.
ACCESS_FLUSH = 0.1
#: The largest write a pipe keeps in one piece (POSIX: at least 512; Linux: 4096).
PIPE_BUF = select.PIPE_BUF

#: A value logfmt writes as it is: not empty, no space, quote, equals sign, newline or tab.
_PLAIN = re.compile(r'[^ "=\n\t]+').fullmatch
_QUOTED = re.compile(r'[ "=\n\t]').search

#: One request, as the loop gathers it: time (epoch s), method, path and query, status, body
#: bytes (None: unknown), duration (s), cache outcome, upstream, client address.
Access = tuple[float, str, str, int, int | None, float, str | None, str | None, str | None]


def render(entry: dict[str, Any], as_json: bool) -> str:
    """One line: JSON, or logfmt (values quoted only when they need it)."""
    if as_json:
        return json.dumps(entry, default=str)
    return " ".join(f"{k}={_logfmt(v)}" for k, v in entry.items())


def _logfmt(value: object) -> str:
    if value is None:
        return "-"
    text = value if type(value) is str else str(value)
    return text if _PLAIN(text) else json.dumps(text)


#: The last millisecond `_stamp` formatted and its text, and the same for the whole second
#: (tuples: the writer threads swap them whole). A busy server logs many lines a millisecond.
_milli: tuple[int, str] = (-1, "")
_second: tuple[int, str] = (-1, "")


def _stamp(created: float) -> str:
    """ISO 8601 UTC with milliseconds."""
    global _milli, _second
    ms = int(created * 1000)
    at, text = _milli
    if at == ms:
        return text
    whole = ms // 1000
    at, prefix = _second
    if at != whole:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second = (whole, prefix)
    text = f"{prefix}.{ms % 1000:03d}Z"
    _milli = (ms, text)
    return text


class Lines:
    """Writes lines to a file descriptor in whole lines: each write(2) at most PIPE_BUF bytes
    of whole lines, or one longer line alone (see the module docstring)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def write(self, lines: Iterable[str]) -> None:
        """The lines (none holding a newline: render escapes them), encoded at once and cut at
        the last newline within each PIPE_BUF bytes."""
        text = "\n".join(lines)
        if not text:
            return
        data = (text + "\n").encode("utf-8", "backslashreplace")
        view = memoryview(data)
        start, end = 0, len(data)
        while start < end:
            cut = end
            if end - start > PIPE_BUF:
                cut = data.rfind(b"\n", start, start + PIPE_BUF) + 1
                if cut <= start:  # one line longer than PIPE_BUF: alone, to its end
                    cut = data.find(b"\n", start + PIPE_BUF) + 1
            self._write(view[start:cut])
            start = cut

    def _write(self, data: memoryview) -> None:
        """All of `data` in one write; only a signal or a full disk makes the kernel take part
        of it, and then the rest follows (the best there is)."""
        with self._lock:  # the writers of one process take turns, a whole chunk each
            view = data
            while view:
                try:
                    written = os.write(self._fd, view)  # retried on EINTR (PEP 475)
                except BlockingIOError:  # a non-blocking standard error: wait until it takes more
                    waiting = select.poll()
                    waiting.register(self._fd, select.POLLOUT)
                    waiting.poll()
                    continue
                except OSError:
                    return  # a closed or full standard error: the line is lost, not the process
                view = view[written:]


class _Deferred(logging.handlers.QueueHandler):
    """Enqueue the record as it is: formatting happens in the writer thread (the standard
    QueueHandler formats in the caller). Our log arguments are plain values, so formatting
    later gives the same line."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class _Structured(logging.Formatter):
    """ts, level, logger, worker (if any), msg (and the traceback, if any)."""

    def __init__(self, as_json: bool, worker: int | None) -> None:
        super().__init__()
        self._json = as_json
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _stamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if self._worker is not None:
            entry["worker"] = self._worker
        entry["msg"] = record.getMessage()
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return render(entry, self._json)


class _LineHandler(logging.Handler):
    """The QueueListener's handler: one record, one line, one write of whole lines."""

    def __init__(self, out: Lines) -> None:
        super().__init__()
        self._out = out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._out.write((line,))


class AccessLog:
    """Access lines gathered on the loop, written in batches by a thread of their own."""

    def __init__(self, as_json: bool, out: Lines, worker: int | None = None) -> None:
        self._json = as_json
        self._out = out
        self._worker = worker
        #: logfmt: what follows the timestamp up to the method, the same on every line
        self._head = " level=info logger=mirror.access" + (
            "" if worker is None else f" worker={worker}"
        )
        self._pending: collections.deque[Access] = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def add(self, entry: Access) -> None:
        """On the loop: O(1), thread-safe (deque.append), no I/O."""
        self._pending.append(entry)

    def _run(self) -> None:
        while not self._stop.wait(ACCESS_FLUSH):
            self.flush()

    def flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        entries = []
        while pending:
            entries.append(pending.popleft())
        line = self._json_line if self._json else self._logfmt_line
        self._out.write(map(line, entries))

    def _logfmt_line(self, e: Access) -> str:
        at, method, path, status, nbytes, took, outcome, upstream, remote = e
        texts = (
            method,
            path,
            "-" if outcome is None else outcome,
            "-" if upstream is None else upstream,
            "-" if remote is None else remote,
        )
        # one search over all the values instead of one per value: they rarely need quotes
        if "" in texts or _QUOTED("\0".join(texts)):
            texts = (
                _logfmt(method),
                _logfmt(path),
                _logfmt(outcome),
                _logfmt(upstream),
                _logfmt(remote),
            )
        method, path, outcome, upstream, remote = texts
        return (
            f"ts={_stamp(at)}{self._head} method={method} path={path} status={status}"
            f" bytes={'-' if nbytes is None else nbytes} duration_ms={round(took * 1000, 2)}"
            f" outcome={outcome} upstream={upstream} remote={remote}"
        )

    def _json_line(self, e: Access) -> str:
        at, method, path, status, nbytes, took, outcome, upstream, remote = e
        entry: dict[str, Any] = {"ts": _stamp(at), "level": "info", "logger": "mirror.access"}
        if self._worker is not None:
            entry["worker"] = self._worker
        entry.update(
            method=method,
            path=path,
            status=status,
            bytes=nbytes,
            duration_ms=round(took * 1000, 2),
            outcome=outcome,
            upstream=upstream,
            remote=remote,
        )
        return json.dumps(entry, default=str)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.flush()


#: The running server's access log (set by `start`); None in-process without `mirror serve`.
access: AccessLog | None = None


class Logging:
    """What `start` set up; `stop` writes whatever is still queued."""

    def __init__(self, listener: logging.handlers.QueueListener, access_log: AccessLog) -> None:
        self._listener = listener
        self._access = access_log

    def stop(self) -> None:
        global access
        access = None
        self._access.stop()
        self._listener.stop()


def start(level: str, kind: str = "logfmt", worker: int | None = None) -> Logging:
    """Route all logging through the queue and start the access-log writer, both writing to
    the process's standard error; `worker`: the worker process's index, on every line."""
    global access
    as_json = kind == "json"
    out = Lines(sys.stderr.fileno())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handler = _LineHandler(out)
    handler.setFormatter(_Structured(as_json, worker))
    root = logging.getLogger()
    root.handlers[:] = [_Deferred(records)]
    root.setLevel(level.upper())
    listener = logging.handlers.QueueListener(records, handler, respect_handler_level=False)
    listener.start()
    access = AccessLog(as_json, out, worker)
    return Logging(listener, access)


def direct(level: str, kind: str = "logfmt") -> None:
    """Structured lines written by the caller itself, with no thread: for the supervisor of
    worker processes, which must stay free of threads to fork (and writes little)."""
    handler = _LineHandler(Lines(sys.stderr.fileno()))
    handler.setFormatter(_Structured(kind == "json", None))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
