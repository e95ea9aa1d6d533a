"""A parent that forks worker processes sharing one metrics directory, as a host serving with
several workers does: it prepares the directory, each worker calls `use_multiprocess` right
after the fork, and the parent forgets a worker once it has exited. Run by
tests/test_metrics_workers.py with the project's Python (tests/test_workers.py runs the
real supervisor, `mirror serve --workers 3`):

    metric_workers.py count DIR OUT K
        K workers, told one at a time to build their Metrics and make known updates (worker i
        counts i+1 blob hits, ...; see `_count`), then each renders the host's metrics to
        OUT/alive-<i>.prom; the last is killed with SIGKILL and forgotten, and worker 0 renders
        OUT/after.prom. Prints the workers' pids as JSON.

The parent runs no event loop and no thread, so forking is safe.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import IO

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from mirror.metrics import (  # noqa: E402
    Metrics,
    forget_process,
    prepare_multiprocess,
    use_multiprocess,
)


def _count(i: int, metrics: Metrics) -> None:
    """Worker i's updates, each of a kind whose merge the test checks."""
    metrics.prefill([("docker.io", "anonymous"), ("ghcr.io", "anonymous")])
    metrics.prefill_events(["pull"], ["hook"])
    for _ in range(i + 1):
        metrics.request("blob", "GET", 200, "hit")  # counter: summed
    metrics.took("blob", 0.25)  # histogram: summed
    metrics.served("warm", 1000)
    metrics.process(fills=i + 1, fds=100 + i, tasks=10 + i)  # livesum; liveall per pid
    metrics.tier_usage("hot", 1000 * (i + 1), i + 1)  # each worker's memory: livesum
    metrics.tier_usage("warm", 5000 + i, 3)  # the host's: the last one set
    if i == 0:  # learned by the first worker only: the later ones' presets must not hide it
        metrics.rate_limit("docker.io", "anonymous", limit=100, remaining=77)
        metrics.upstream("docker.io", "manifest", 200)
    if i == 1:
        metrics.events_waiting("hook", 5)


def _counting_worker(i: int, directory: Path, commands: IO[str], replies: IO[str]) -> None:
    use_multiprocess(directory)
    metrics: Metrics | None = None
    waiting = None
    for line in commands:
        word, *args = line.split()
        if word == "go":
            metrics = Metrics()
            _count(i, metrics)
            waiting = metrics.password_check_waiting()  # held until the worker ends: livesum
            waiting.__enter__()
        elif word == "render" and metrics is not None:
            Path(args[0]).write_bytes(metrics.render())
        elif word == "exit":
            return
        replies.write(f"{word} {i}\n")
        replies.flush()


def count(directory: Path, out: Path, k: int) -> None:
    prepare_multiprocess(directory)
    replies_r, replies_w = os.pipe()
    workers: list[tuple[int, IO[str]]] = []
    for i in range(k):
        commands_r, commands_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(commands_w)
            os.close(replies_r)
            with os.fdopen(commands_r) as commands, os.fdopen(replies_w, "w") as replies:
                _counting_worker(i, directory, commands, replies)
            os._exit(0)
        os.close(commands_r)
        workers.append((pid, os.fdopen(commands_w, "w")))
    os.close(replies_w)
    replies = os.fdopen(replies_r)

    def tell(i: int, command: str) -> None:
        pipe = workers[i][1]
        pipe.write(command + "\n")
        pipe.flush()
        answer = replies.readline().split()
        assert answer == [command.split()[0], str(i)], answer

    for i in range(k):  # one at a time: the order of the `mostrecent` gauges' sets is known
        tell(i, "go")
    for i in range(k):
        tell(i, f"render {out / f'alive-{i}.prom'}")
    last = workers[-1][0]
    os.kill(last, signal.SIGKILL)
    os.waitpid(last, 0)
    forget_process(last, directory)
    tell(0, f"render {out / 'after.prom'}")
    for pid, pipe in workers[:-1]:
        pipe.write("exit\n")
        pipe.flush()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    print(json.dumps([pid for pid, _ in workers]), flush=True)


if __name__ == "__main__":
    count(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
