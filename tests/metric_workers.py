"""A parent that forks worker processes sharing one metrics directory, as a host serving with
several workers does: it prepares the directory, each worker calls `use_multiprocess` right
after the fork, and the parent forgets a worker once it has exited. Run by
tests/test_metrics_workers.py with the project's Python, in two ways:

    metric_workers.py count DIR OUT K
        K workers, told one at a time to build their Metrics and make known updates (worker i
        counts i+1 blob hits, ...; see `_count`), then each renders the host's metrics to
        OUT/alive-<i>.prom; the last is killed with SIGKILL and forgotten, and worker 0 renders
        OUT/after.prom. Prints the workers' pids as JSON.

    metric_workers.py serve DIR ROOT UPSTREAM PORT...
        One worker per port, each a whole `mirror serve` on 127.0.0.1:PORT with its data in
        ROOT/w<i> (its log in ROOT/w<i>.log). Prints `worker <i> <pid>` for each; then reads
        lines from stdin: `kill <i>` kills that worker with SIGKILL, waits for it, forgets it
        and prints `forgot <pid>`. At the end of stdin it stops the others with SIGTERM and
        exits 0 when each of them exited 0.

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

from mirror import cli  # noqa: E402
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


def serve(directory: Path, root: Path, upstream: str, ports: list[int]) -> int:
    prepare_multiprocess(directory)
    pids: list[int] = []
    for i, port in enumerate(ports):
        pid = os.fork()
        if pid == 0:
            log = os.open(root / f"w{i}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            use_multiprocess(directory)
            argv = ["serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(root / f"w{i}")]
            os._exit(cli.main([*argv, "--upstream", upstream]))
        pids.append(pid)
        print(f"worker {i} {pid}", flush=True)
    alive = set(pids)
    for line in sys.stdin:
        word, which = line.split()
        if word == "kill":
            pid = pids[int(which)]
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            alive.discard(pid)
            forget_process(pid, directory)
            print(f"forgot {pid}", flush=True)
    codes = []
    for pid in alive:
        os.kill(pid, signal.SIGTERM)
    for pid in alive:
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    return 0 if all(code == 0 for code in codes) else 1


if __name__ == "__main__":
    if sys.argv[1] == "count":
        count(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(
            serve(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], list(map(int, sys.argv[5:])))
        )
