"""Events and the pull path (run by hand; numbers go to the README): wrk against a manifest by
tag (a hit: hot tier, no upstream request) on a real `mirror serve`, with

    off        no [events]
    off again  the same, a mirror of its own: how far apart two runs of one thing come out
    no pulls   a webhook that refuses connections and wants no pulls (blob.*): what having
               events on costs a pull that journals nothing
    dead       a webhook that refuses connections, for pulls, its queue full (max_queue events
               on disk before the measurement: each pull appends one and drops the oldest)
    audit      the same, and the audit log on

  .venv/bin/python bench/events.py [--reps 24] [--seconds 2] [--restart 4]
                                   [--only off,"off again",dead] [--access-log] [--together]

(--only: those configurations alone, more rounds in the same time; --together: each round
measures them all at once, see `interleaved`.)

The upstream is the test suite's simulator, in a process of its own; every port is free at
start; the mirrors run side by side and are measured in turn, round by round, started afresh
every few rounds (`interleaved`). Needs wrk.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
ACCEPT = "application/vnd.oci.image.manifest.v1+json"
MAX_QUEUE = 10000
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

UPSTREAM = """
import asyncio, sys
sys.path.insert(0, "tests")
from images import make_image
from upstream_sim import UpstreamSim

async def main():
    sim = UpstreamSim()
    sim.add_image("team/app", "1.0", make_image(1, [1000]))
    await sim.start()
    print(sim.url, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> str:
    req = urllib.request.Request(url, headers={"Accept": ACCEPT})
    with OPENER.open(req, timeout=5) as resp:
        return str(resp.read().decode(errors="replace"))


def _serve(work: Path, upstream: str, toml: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    config = work / f"config-{port}.toml"
    config.write_text(toml)
    data = work / f"data-{port}"
    env = {**os.environ, "MIRROR_CONFIG": str(config), "MIRROR_ACCESS_LOG": ACCESS_LOG[0]}
    cmd = [sys.executable, "-m", "mirror", "serve", "--listen", f"127.0.0.1:{port}"]
    cmd += ["--data-dir", str(data), "--upstream", upstream]
    proc = subprocess.Popen(cmd, cwd=PROJECT, env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            _get(f"{url}/healthz")
            return proc, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("mirror did not start")


#: The configurations whose webhook wants pulls (its queue is full while measured).
FULL = ("dead", "audit")
#: wrk's connections (--connections).
CONNECTIONS = [16]
#: Whether the mirrors write their access log (--access-log; off: what is measured is the
#: pull path itself, not the log's lines to stderr, which the bench throws away).
ACCESS_LOG = ["false"]


def _cpu_seconds(pid: int) -> float:
    """CPU seconds (user and system, every thread) of `pid` and its children so far."""
    ticks = 0
    pids = [pid]
    while pids:
        each = pids.pop()
        for task in Path(f"/proc/{each}/task").iterdir():
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            ticks += int(fields[11]) + int(fields[12])
            pids += [int(c) for c in (task / "children").read_text().split()]
    return ticks / os.sysconf("SC_CLK_TCK")


def _wrk_start(url: str, seconds: int) -> subprocess.Popen[str]:
    """wrk against `url` for `seconds`, started (`_wrk_rate` reads its req/s)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f'wrk.headers["Accept"] = "{ACCEPT}"\n')
    cmd = ["wrk", "-t1", f"-c{CONNECTIONS[0]}", f"-d{seconds}s", "-s", script.name, url]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def _wrk_rate(wrk: subprocess.Popen[str]) -> float:
    out = wrk.communicate()[0]
    os.unlink(wrk.args[-2])
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert wrk.returncode == 0 and m and "Non-2xx" not in out, out
    return float(m[1])


def _wrk(url: str, seconds: int) -> float:
    return _wrk_rate(_wrk_start(url, seconds))


def _metric(url: str, name: str) -> float:
    for line in _get(f"{url}/metrics").splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(name)


def arguments() -> argparse.Namespace:
    """--reps (rounds), --seconds (of each run), --restart (rounds between fresh processes),
    --connections (wrk's, for every run after it), --only (the configurations measured),
    --access-log (the mirrors' access log on, as it is by default), --together (every
    configuration measured at once, see `interleaved`)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=24)
    parser.add_argument("--seconds", type=int, default=2)
    parser.add_argument("--restart", type=int, default=4)
    parser.add_argument("--connections", type=int, default=CONNECTIONS[0])
    parser.add_argument("--only", default="", help="configurations, comma-separated")
    parser.add_argument("--access-log", action="store_true", help="the access log on")
    parser.add_argument("--together", action="store_true", help="measure them at once")
    args = parser.parse_args()
    CONNECTIONS[0] = args.connections
    ACCESS_LOG[0] = "true" if args.access_log else "false"
    return args


def start_upstream() -> tuple[subprocess.Popen[str], str]:
    """The simulator holding team/app:1.0, in a process of its own, and its URL."""
    upstream = subprocess.Popen(
        [sys.executable, "-c", UPSTREAM], cwd=PROJECT, stdout=subprocess.PIPE, text=True
    )
    assert upstream.stdout is not None
    return upstream, upstream.stdout.readline().strip()


#: Readies a mirror for its measured run: (configuration name, mirror URL, manifest URL).
Prepare = Callable[[str, str, str], None]


def interleaved(
    work: Path,
    upstream_url: str,
    configs: dict[str, str],
    args: argparse.Namespace,
    prepare: Prepare,
    after: Prepare | None = None,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """wrk against the manifest by tag on a `mirror serve` of each configuration, measured in
    turn, `args.reps` rounds of `args.seconds` each, the order reversed every other round:
    req/s per configuration, in run order, and into `cpu` the mirror's CPU microseconds per
    request (every process and thread: a measure that does not hang on how the kernel spread
    wrk's connections over the workers). Every configuration's mirror runs side by side (the
    ones not measured sit idle), readied by `prepare` once, and the whole set is started
    afresh every `args.restart` rounds: this machine's speed drifts by a third from one
    minute to the next and by little within seconds, so short runs side by side meet the same
    machine; and two processes of one configuration differ by some percent between them
    (where the hash seed and the memory layout fell), so each configuration is measured over
    several. `after` (a check of what it measured) runs after each run.

    `args.together`: each round measures every configuration at once instead, a wrk of its
    own against each, over the same seconds: the machine's drift within a round then meets
    them all alike. The mirrors share the cores, each busy process getting its share (the
    kernel's fair scheduler), so each one's req/s follows what a request costs it, wrk's
    own cost not diluting the difference as it does when one runs alone."""
    results: dict[str, list[float]] = {k: [] for k in configs}
    rep = 0
    while rep < args.reps:
        running: dict[str, tuple[subprocess.Popen[bytes], str, str]] = {}
        try:
            for name, toml in configs.items():
                proc, url = _serve(work, upstream_url, toml)
                manifest = f"{url}/v2/team/app/manifests/1.0"
                running[name] = (proc, url, manifest)
                _get(manifest)
                _wrk(manifest, 3)  # warm up: every worker has served the tag
                prepare(name, url, manifest)
            for _ in range(min(args.restart, args.reps - rep)):
                order = list(configs)[:: -1 if rep % 2 else 1]
                for group in [order] if args.together else [[name] for name in order]:
                    used = {name: _cpu_seconds(running[name][0].pid) for name in group}
                    wrks = {name: _wrk_start(running[name][2], args.seconds) for name in group}
                    for name, wrk in wrks.items():
                        proc, url, manifest = running[name]
                        rate = _wrk_rate(wrk)
                        spent = _cpu_seconds(proc.pid) - used[name]
                        results[name].append(rate)
                        if cpu is not None:
                            cpu.setdefault(name, []).append(spent / (rate * args.seconds) * 1e6)
                    if after is not None:
                        for name in group:
                            after(name, *running[name][1:])
                rep += 1
                print(f"rep {rep}: { ({k: v[-1] for k, v in results.items()}) }", file=sys.stderr)
        finally:
            for proc, _, _ in running.values():
                proc.terminate()
                proc.wait()
    return results


def interval(ratios: list[float]) -> tuple[float, float]:
    """The 95 % confidence interval of the geometric mean of `ratios` (normal on their logs):
    whether a series shows a ratio above a bound, or only a median that happens to be."""
    logs = [math.log(r) for r in ratios]
    if len(logs) < 2:
        return ratios[0], ratios[0]
    half = 1.96 * statistics.stdev(logs) / math.sqrt(len(logs))
    mean = statistics.fmean(logs)
    return math.exp(mean - half), math.exp(mean + half)


def table(
    what: str, results: dict[str, list[float]], cpu: dict[str, list[float]] | None = None
) -> None:
    """The markdown table: median req/s, every run, the ratio to the first row's (of the
    medians, and the median of the ratios within each rep, which a machine's drift from one
    rep to the next moves less, and the 95 % interval of their geometric mean); with `cpu`,
    the median CPU µs per request, every run, and the first row's over it."""
    first_runs = next(iter(results.values()))
    first = statistics.median(first_runs)
    head = f"| {what} | manifest by tag req/s (median) | runs | vs off | vs off, rep by rep |"
    head += " rep by rep, 95 % interval |"
    line = "|---|---|---|---|---|---|"
    if cpu:
        head += " CPU µs/req (median) | runs | off's CPU over it | rep by rep |"
        line += "---|---|---|---|"
        first_cpus = next(iter(cpu.values()))
        first_cpu = statistics.median(first_cpus)
    print(f"{head}\n{line}")
    for name, runs in results.items():
        med = statistics.median(runs)
        shown = ", ".join(f"{r:.0f}" for r in runs)
        ratios = [r / f for r, f in zip(runs, first_runs, strict=True)]
        low, high = interval(ratios)
        row = f"| {name} | {med:.0f} | {shown} | {med / first:.3f} | "
        row += f"{statistics.median(ratios):.3f} | {low:.3f}–{high:.3f} |"
        if cpu:
            used = statistics.median(cpu[name])
            each = ", ".join(f"{c:.1f}" for c in cpu[name])
            over = statistics.median(f / c for f, c in zip(first_cpus, cpu[name], strict=True))
            row += f" {used:.1f} | {each} | {first_cpu / used:.3f} | {over:.3f} |"
        print(row)


def main() -> None:
    args = arguments()
    upstream, upstream_url = start_upstream()
    dead = f"http://127.0.0.1:{_free_port()}/hook"  # nothing listens there

    def fill_queue(name: str, url: str, manifest: str) -> None:
        if name in FULL:  # a webhook for pulls: its queue full before the measurement
            while _metric(url, "mirror_events_queue_depth") < MAX_QUEUE:
                _wrk(manifest, 2)

    def was_full(name: str, url: str, manifest: str) -> None:
        if name in FULL:
            dropped = _metric(
                url, 'mirror_events_dropped_total{endpoint="dead",reason="queue_full"}'
            )
            assert dropped > 0, "the queue was full while measured"

    with tempfile.TemporaryDirectory(prefix="bench-events-") as tmp:
        work = Path(tmp)
        hook = f'[[events.webhooks]]\nurl = "{dead}"\nname = "dead"\nevents = ["pull"]\n'
        blobs = hook.replace('["pull"]', '["blob.*"]')
        configs = {
            "off": "",
            "off again": "",  # the same as off: what the method's own noise is
            "no pulls": f"[events]\nmax_queue = {MAX_QUEUE}\n{blobs}",
            "dead": f"[events]\nmax_queue = {MAX_QUEUE}\n{hook}",
            "audit": f'[events]\nmax_queue = {MAX_QUEUE}\naudit_log = "{work}/audit.log"\n{hook}',
        }
        if args.only:
            configs = {k: configs[k] for k in args.only.split(",")}
        try:
            cpu: dict[str, list[float]] = {}
            results = interleaved(work, upstream_url, configs, args, fill_queue, was_full, cpu)
        finally:
            upstream.terminate()
            upstream.wait()
    table("events", results, cpu)


if __name__ == "__main__":
    main()
