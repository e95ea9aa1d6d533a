"""The parent of worker processes: it prepares the host once, forks the workers and keeps
them running.

- Host start, before any worker serves: partial files a crash left are swept and the index
  reconciled with the files (`prepare`), so that no worker sweeps the partial file another
  one is filling.
- One port for all: the parent binds it with SO_REUSEPORT and keeps it bound (a port 0 gets
  its number here), each worker listens on it with SO_REUSEPORT, and the kernel spreads new
  connections over the workers. A worker that dies loses only the connections it held.
- The parent runs no event loop and no thread, so forking a replacement is always safe. It
  waits for signals (through a wakeup pipe) and for each worker's "serving" byte:
  a worker that exits is replaced under the same index (after a pause that doubles while
  workers keep dying young, to 30 s); one that fails its start with a configuration error
  (exit status 2) stops the whole server with status 2. SIGHUP is passed on to every worker
  (TLS and audit-log reopen); SIGTERM or SIGINT is passed on and the parent waits for every
  worker to drain (fills in flight finish), killing any still there after `STOP_SECONDS`.
- With events to deliver, one more process runs beside the workers, kept running as they
  are: the deliverer (events/delivery.py), which serves nothing, so that no serving loop
  shares its interpreter (the GIL, the caches) with the reading of the journals.
- Each worker is killed with its parent (PR_SET_PDEATHSIG, SIGKILL): a `kill -9` of the
  parent is a `kill -9` of the server, and never leaves workers serving the port behind it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("mirror.workers")

#: How long workers get to drain after SIGTERM before they are killed.
STOP_SECONDS = 60.0
#: A worker that ran less than this long died young: the next one waits (doubling).
YOUNG_SECONDS = 5.0
#: The longest wait before a replacement.
MAX_PAUSE = 30.0
#: Exit status of a worker whose start found a configuration error.
CONFIG_ERROR = 2
#: The index `beside` is run with.
BESIDE = -1
_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1

#: What a worker runs: given its index and the descriptor to write b"r" on once it serves;
#: returns the exit status.
Work = Callable[[int, int], int]


@dataclass
class _Worker:
    #: The worker's index; BESIDE for the process beside the workers.
    index: int
    pid: int = 0
    started: float = 0.0
    ready: int = -1
    serving: bool = False
    #: Seconds to wait before the next replacement (grows while workers die young).
    pause: float = 0.0
    due: float = 0.0

    @property
    def name(self) -> str:
        return "the deliverer" if self.index == BESIDE else f"worker {self.index}"


@dataclass
class Supervisor:
    """Forks `count` workers running `work` (and `beside`, when given, as one process more)
    and keeps them running until told to stop."""

    count: int
    work: Work
    beside: Work | None = None
    #: Called with a worker's pid once it has exited (its metrics files are let go).
    exited: Callable[[int], None] = lambda _pid: None
    #: Descriptors of the parent's own that a worker closes (the reserved port).
    private: tuple[int, ...] = ()
    _wake: tuple[int, int] = (-1, -1)
    _workers: list[_Worker] = field(default_factory=list)
    _selector: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)
    _stopping: float = 0.0
    _status: int = 0

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT and every worker has exited; the exit status."""
        if threading.active_count() > 1:
            log.warning("forking workers with %d threads running", threading.active_count())
        wake_r, wake_w = self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        handlers = {sig: signal.signal(sig, _noted) for sig in _SIGNALS}
        self._selector.register(wake_r, selectors.EVENT_READ, None)
        try:
            self._workers = [_Worker(i) for i in range(self.count)]
            if self.beside is not None:
                self._workers.append(_Worker(BESIDE))
            for worker in self._workers:
                self._spawn(worker)
            while self._workers:
                self._step(wake_r)
        finally:
            signal.set_wakeup_fd(previous)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self._selector.unregister(wake_r)
            os.close(wake_r)
            os.close(wake_w)
        log.info("all workers have exited")
        return self._status

    def _step(self, wake_r: int) -> None:
        now = time.monotonic()
        due = [w.due for w in self._workers if not w.pid]
        timeout = max(0.0, min(due) - now) if due else 1.0
        for key, _ in self._selector.select(min(timeout, 1.0)):
            if key.data is None:
                self._signals(os.read(wake_r, 256))
            else:
                self._ready(key.data)
        self._reap()
        now = time.monotonic()
        for worker in self._workers:
            if not worker.pid and not self._stopping and worker.due <= now:
                self._spawn(worker)
        if self._stopping and now > self._stopping:
            for worker in self._workers:
                if worker.pid:
                    log.error("%s (pid %d) still running: killed", worker.name, worker.pid)
                    _signal(worker.pid, signal.SIGKILL)

    def _signals(self, got: bytes) -> None:
        for number in got:
            if number in (signal.SIGTERM, signal.SIGINT) and not self._stopping:
                log.info("stopping: %d workers drain", sum(1 for w in self._workers if w.pid))
                self._stop(signal.SIGTERM)
            elif number == signal.SIGHUP:
                for worker in self._workers:
                    if worker.pid:
                        _signal(worker.pid, signal.SIGHUP)

    def _stop(self, sig: int) -> None:
        self._stopping = time.monotonic() + STOP_SECONDS
        for worker in self._workers:
            if worker.pid:
                _signal(worker.pid, sig)
        self._workers = [w for w in self._workers if w.pid]

    def _ready(self, worker: _Worker) -> None:
        try:
            got = os.read(worker.ready, 16)
        except OSError:
            got = b""
        if got:
            worker.serving = True
            worker.pause = 0.0
            what = "delivering" if worker.index == BESIDE else "serving"
            log.info("%s (pid %d) %s", worker.name, worker.pid, what)
            if all(w.serving for w in self._workers):
                log.info("%d workers serving", self.count)
            return
        self._selector.unregister(worker.ready)
        os.close(worker.ready)
        worker.ready = -1

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.exited(pid)
            worker = next((w for w in self._workers if w.pid == pid), None)
            if worker is None:
                continue
            self._gone(worker, os.waitstatus_to_exitcode(status))

    def _gone(self, worker: _Worker, code: int) -> None:
        if worker.ready >= 0:
            self._selector.unregister(worker.ready)
            os.close(worker.ready)
            worker.ready = -1
        pid, worker.pid = worker.pid, 0
        if self._stopping:
            self._workers = [w for w in self._workers if w.pid]
            return
        if code == CONFIG_ERROR and not worker.serving:
            log.error("%s could not start (configuration error): stopping", worker.name)
            self._status = CONFIG_ERROR
            self._stop(signal.SIGTERM)
            return
        lived = time.monotonic() - worker.started
        worker.pause = min(MAX_PAUSE, max(0.5, worker.pause * 2)) if lived < YOUNG_SECONDS else 0.0
        worker.due = time.monotonic() + worker.pause
        worker.serving = False
        how = f"signal {-code}" if code < 0 else f"status {code}"
        log.warning(
            "%s (pid %d) exited with %s after %.1fs; starting another in %.1fs",
            worker.name,
            pid,
            how,
            lived,
            worker.pause,
        )

    def _spawn(self, worker: _Worker) -> None:
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(ready_r)
                self._child(parent)
                work = self.beside if worker.index == BESIDE else self.work
                assert work is not None
                code = work(worker.index, ready_w)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                logging.getLogger("mirror").exception("%s failed", worker.name)
            finally:
                os._exit(code)
        os.close(ready_w)
        worker.pid, worker.started, worker.ready = pid, time.monotonic(), ready_r
        self._selector.register(ready_r, selectors.EVENT_READ, worker)

    def _child(self, parent: int) -> None:
        """In a new worker: the parent's signal handling and descriptors are not its own."""
        signal.set_wakeup_fd(-1)
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        self._selector.close()
        for fd in (*self._wake, *self.private, *(w.ready for w in self._workers)):
            if fd >= 0:
                os.close(fd)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)


def _noted(_signum: int, _frame: object) -> None:
    """Signals are read from the wakeup pipe; the handler only keeps their default away."""


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError as e:
        if e.errno != errno.ESRCH:
            raise


def reserve(host: str, port: int) -> socket.socket:
    """Bind the port for the workers (SO_REUSEPORT, not listening): a port 0 gets its number,
    and the port stays this server's while workers come and go."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock
