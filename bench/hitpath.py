#!/usr/bin/env python3
"""The manifest hit path, measured apart: what one cached manifest costs the mirror per request,
in CPU µs, and where that time goes.

It starts a `mirror serve` of this checkout as ONE process (`--workers 1` where the command has
it) on a free port with an empty data dir, against the benchmark's upstream (`bench/upstream.sh
start && bench/upstream.sh populate`), caches the manifest of `meta.json`'s `manifest_test`, and
then, round after round:

  ref     wrk against the reference (nginx static from `bench/peers.sh start static`), if it answers
  tag     wrk against the mirror, the manifest by tag
  digest  wrk against the mirror, the manifest by digest
  bare    wrk against a bare aiohttp + uvloop handler answering the same bytes and headers
          from memory (the floor a Python process on this stack starts from)

For each wrk run of a Python server it reads the process's CPU time, thread by thread, from
/proc before and after: CPU µs per request is the cost that does not depend on how busy the rest
of the machine was (req/s does). With `--pin` (the default on a machine with two or more cores)
the server runs on the last core and wrk on the first, so they do not take turns on one core.

With `--profile SECONDS`, py-spy samples the mirror's threads during an extra wrk run by tag and
each sample of the event-loop thread is put in the stage its innermost known frame belongs to
(parser, routing, middleware, auth, handler, metrics, access log, response, socket write, event
loop); a stage's µs per request is its share of the samples times the event-loop thread's CPU µs
per request. Other threads (the log writers, the store's threads) are reported by their own CPU
time per request, named through `py-spy dump`.

    python3 bench/hitpath.py                          # 5 rounds of 5 s each, pinned
    python3 bench/hitpath.py --profile 10 --rounds 3
    python3 bench/hitpath.py --env MIRROR_ACCESS_LOG=false --no-bare --out /tmp/h.json

Standard library only (like run.py, whose wrk and HTTP client it uses); py-spy for --profile.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run

PROJECT = Path(__file__).resolve().parent.parent
CLK = os.sysconf("SC_CLK_TCK")

#: A bare aiohttp + uvloop server answering every GET with one body and fixed headers.
BARE_SERVER = r"""
import asyncio, json, sys
import uvloop
from aiohttp import web
port, body_path, headers = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
body = open(body_path, "rb").read()
async def answer(_request):
    return web.Response(body=body, headers=headers)
async def main():
    app = web.Application()
    app.router.add_get("/{tail:.+}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()
uvloop.run(main())
"""

#: (path fragment, function fragment or "") -> stage; checked for each frame from the innermost
#: outwards, the first frame that matches a rule decides the sample's stage.
STAGES: list[tuple[str, str, str]] = [
    ("mirror/logs.py", "", "access log"),
    ("aiohttp/web_log.py", "", "access log"),
    ("mirror/http/middleware.py", "AccessLogger", "access log"),
    ("aiohttp/web_protocol.py", "log_access", "access log"),
    ("logging/", "", "access log"),
    ("prometheus_client/", "", "metrics"),
    ("mirror/metrics.py", "", "metrics"),
    ("mirror/http/access.py", "", "auth"),
    ("aiohttp/http_writer.py", "_writelines", "socket write"),
    ("aiohttp/http_writer.py", "_write", "socket write"),
    ("aiohttp/web_response.py", "", "response"),
    ("aiohttp/http_writer.py", "", "response"),
    ("mirror/http/routes.py", "dispatch", "routing"),
    ("mirror/http/routes.py", "front_door", "routing"),
    ("mirror/upstream/routing.py", "", "routing"),
    ("aiohttp/web_urldispatcher.py", "", "routing"),
    ("mirror/http/middleware.py", "", "middleware"),
    ("aiohttp/web_middlewares.py", "", "middleware"),
    ("mirror/", "", "handler"),
    ("aiohttp/web_protocol.py", "data_received", "parser"),
    ("aiohttp/http_parser.py", "", "parser"),
    ("aiohttp/_http_parser", "", "parser"),
    ("aiohttp/", "", "request (aiohttp)"),
    ("multidict/", "", "request (aiohttp)"),
    ("yarl/", "", "request (aiohttp)"),
    ("asyncio/", "", "event loop"),
    ("uvloop/", "", "event loop"),
]
STAGE_ORDER = [
    "parser",
    "request (aiohttp)",
    "routing",
    "middleware",
    "auth",
    "handler",
    "metrics",
    "access log",
    "response",
    "socket write",
    "event loop",
    "other",
]


def log(*a: object) -> None:
    print(f"[hitpath {time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def thread_cpu(pid: int) -> dict[int, float]:
    """tid -> CPU seconds (user + system) of every thread of `pid`."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rfind(")") + 2 :].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / CLK
    return out


#: The mirror's interpreter (set by main); py-spy is looked for next to it too.
PYTHON = sys.executable


def py_spy() -> str | None:
    """py-spy on PATH, or next to the mirror's interpreter (pip installs it there)."""
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(PYTHON).parent))


def thread_names(pid: int) -> dict[int, str]:
    """tid -> Python thread name (py-spy dump), the event-loop thread as MainThread."""
    names = {pid: "MainThread"}
    spy = py_spy()
    if spy is None:
        return names
    dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True)
    for line in dump.stdout.splitlines():
        # Thread 21569 (idle): "access-log"
        if line.startswith("Thread ") and '"' in line:
            tid = line.split()[1]
            if tid.isdigit():
                names[int(tid)] = line.split('"')[1]
    return names


def group(name: str) -> str:
    """Threads of a pool are reported together (`store_0`, `store_1` -> `store`)."""
    head, _, tail = name.rpartition("_")
    return head if head and tail.isdigit() else name


class Server:
    """A Python HTTP server process under test, pinned to `cpu` if given."""

    def __init__(
        self,
        name: str,
        port: int,
        cmd: list[str],
        env: dict[str, str],
        out: Path,
        cpu: int | None,
        cwd: Path = PROJECT,
    ):
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        if cpu is not None:
            cmd = ["taskset", "-c", str(cpu), *cmd]
        self._out = open(out, "ab")
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=self._out, stderr=subprocess.STDOUT
        )
        self.pid = self.proc.pid
        self.names: dict[int, str] = {}

    def wait(self, deadline_s: float = 60) -> None:
        url = self.url
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"{self.name} exited ({self.proc.returncode}); see {self._out.name}")
            try:
                if run.http_get(url, "/v2/", timeout=2)["status"] == 200:
                    return
            except (OSError, run.HTTPError):
                pass
            time.sleep(0.1)  # ok: polling for readiness with a deadline
        sys.exit(f"{self.name} did not answer {url}/v2/ within {deadline_s} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def start_mirror(
    name: str,
    root: Path,
    python: str,
    upstream: str,
    env: dict[str, str],
    work: Path,
    cpu: int | None,
) -> Server:
    """`mirror serve` of the checkout at `root`, one process, an empty data dir."""
    port = free_port()
    cmd = [python, "-m", "mirror", "serve", "--listen", f"127.0.0.1:{port}"]
    cmd += ["--data-dir", str(work / f"{name}-data"), "--upstream", upstream]
    usage = subprocess.run(
        [python, "-m", "mirror", "serve", "--help"], cwd=root, capture_output=True, text=True
    ).stdout
    if "--workers" in usage:
        cmd += ["--workers", "1"]
    return Server(name, port, cmd, env, work / f"{name}.out", cpu, cwd=root)


def measure(a: argparse.Namespace, url: str, path: str, server: Server | None) -> dict:
    """One wrk run; with `server`, its CPU per request by thread."""
    before = thread_cpu(server.pid) if server else {}
    res = run.wrk(url, a.accept, a, path)
    if server is None:
        return res
    after = thread_cpu(server.pid)
    requests = res["requests"] or 1
    by: collections.Counter[str] = collections.Counter()
    for tid, cpu in after.items():
        name = group(server.names.get(tid, "other threads"))
        by[name] += (cpu - before.get(tid, 0.0)) * 1e6 / requests
    res["cpu_us_per_req"] = sum(by.values())
    res["cpu_us_by_thread"] = dict(by)
    return res


def profile(a: argparse.Namespace, url: str, path: str, server: Server, out: Path) -> dict:
    """py-spy raw samples during one wrk run, event-loop samples put into stages."""
    spy = py_spy()
    if spy is None:
        sys.exit("--profile needs py-spy (pip install py-spy)")
    secs = a.profile
    wrk_args = argparse.Namespace(**{**vars(a), "wrk_duration": f"{secs + 2}s"})
    raw = out / f"pyspy-{server.name}.txt"
    sampler = subprocess.Popen(
        [spy, "record", "--pid", str(server.pid), "--duration", str(secs), "--rate", "250"]
        + ["--format", "raw", "--threads", "--nonblocking", "-o", str(raw)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    res = measure(wrk_args, url, path, server)
    sampler.wait()
    stages: collections.Counter[str] = collections.Counter()
    frames_self: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not frames[0].endswith("MainThread"):
            continue
        n = int(count)
        total += n
        stages[classify(frames[1:])] += n
        frames_self[frames[-1]] += n
    return {
        "wrk": res,
        "samples": total,
        "stage_share": {k: v / total for k, v in stages.items()},
        "top_frames": [(f, n / total) for f, n in frames_self.most_common(25)],
        "raw": str(raw),
    }


def classify(frames: list[str]) -> str:
    """The stage of one sample: its innermost frame that a rule knows (none at all: the
    thread is in uvloop's C code, between Python callbacks)."""
    if not frames:
        return "event loop"
    for frame in reversed(frames):
        # "Function (path/to/file.py:123)"
        func, _, where = frame.partition(" (")
        for path_part, func_part, stage in STAGES:
            if path_part in where and func_part in func:
                return stage
    return "other"


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--upstream", default="http://127.0.0.1:5101")
    ap.add_argument("--meta", default=run.DEFAULT_META)
    ap.add_argument("--ref", default="http://127.0.0.1:5104", help="reference URL ('' for none)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--wrk-duration", default="5s")
    ap.add_argument("--wrk-conns", type=int, default=16)
    ap.add_argument("--wrk-threads", type=int, default=1)
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=os.cpu_count() != 1)
    ap.add_argument("--bare", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--profile", type=int, default=0, help="py-spy seconds (0: no profile)")
    ap.add_argument("--env", action="append", default=[], help="K=V for the mirror process")
    ap.add_argument(
        "--baseline",
        help="another checkout (e.g. `git archive REV | tar -x -C DIR`) measured "
        "round by round alongside this one",
    )
    ap.add_argument("--python", default=str(PROJECT / ".venv/bin/python"))
    ap.add_argument("--out", help="write the JSON results here")
    a = ap.parse_args()
    global PYTHON
    python = PYTHON = a.python if Path(a.python).exists() else sys.executable

    meta = json.load(open(a.meta))
    mt = meta["manifest_test"]
    a.accept = meta["accept"]
    paths = {
        "tag": f"/v2/{mt['repo']}/manifests/{mt['tag']}",
        "digest": f"/v2/{mt['repo']}/manifests/{mt['digest']}",
    }
    ref = a.ref or None
    if ref:
        try:
            run.http_get(ref, paths["digest"], headers={"Accept": a.accept}, timeout=2)
        except OSError:
            log(f"no reference at {ref}: measuring without one")
            ref = None

    cpus = sorted(os.sched_getaffinity(0))
    server_cpu = cpus[-1] if a.pin else None
    work = Path(tempfile.mkdtemp(prefix="hitpath-"))
    env = dict(os.environ)
    env.update(kv.split("=", 1) for kv in a.env)  # type: ignore[misc]
    mirror = start_mirror("mirror", PROJECT, python, a.upstream, env, work, server_cpu)
    servers = [mirror]
    mirrors = {"": mirror}
    if a.baseline:
        base = start_mirror("baseline", Path(a.baseline), python, a.upstream, env, work, server_cpu)
        servers.append(base)
        mirrors["baseline "] = base
    results: dict = {"rounds": [], "args": vars(a), "pin": a.pin}
    try:
        for m in mirrors.values():
            m.wait()
            for kind, path in paths.items():
                for _ in range(2):  # the first fills, the second must be a hit
                    r = run.http_get(m.url, path, headers={"Accept": a.accept}, keep_body=True)
                if r["status"] != 200 or r["headers"].get("x-mirror-cache") != "hit":
                    sys.exit(f"{m.name}: manifest by {kind}: {r['status']} {r['headers']}")
            m.names = thread_names(m.pid)
        bare = None
        if a.bare:
            bport = free_port()
            body = work / "manifest"
            r = run.http_get(mirror.url, paths["tag"], headers={"Accept": a.accept}, keep_body=True)
            body.write_bytes(r["body"])
            keep = ("content-type", "docker-content-digest", "etag", "x-mirror-cache")
            headers = {k: v for k, v in r["headers"].items() if k in keep}
            headers["Docker-Distribution-API-Version"] = "registry/2.0"
            headers["X-Content-Type-Options"] = "nosniff"
            cmd = [python, "-c", BARE_SERVER, str(bport), str(body), json.dumps(headers)]
            bare = Server("bare", bport, cmd, env, work / "bare.out", server_cpu)
            servers.append(bare)
            bare.wait()
            bare.names = thread_names(bare.pid)
        if a.pin:
            os.sched_setaffinity(0, {cpus[0]})  # wrk inherits it
        for i in range(a.rounds):
            rnd = {}
            if ref:
                rnd["ref"] = measure(a, ref, paths["tag"], None)
            # alternate the order of the mirrors round by round
            for prefix, m in list(mirrors.items())[:: 1 if i % 2 == 0 else -1]:
                rnd[prefix + "tag"] = measure(a, m.url, paths["tag"], m)
                rnd[prefix + "digest"] = measure(a, m.url, paths["digest"], m)
            if bare is not None:
                rnd["bare"] = measure(a, bare.url, paths["tag"], bare)
            log(
                f"round {i + 1}: "
                + "  ".join(
                    f"{k} {v['rps']:,.0f}/s p99 {v['p99_ms']:.2f} ms"
                    + (f" {v['cpu_us_per_req']:.0f} µs" if "cpu_us_per_req" in v else "")
                    for k, v in rnd.items()
                )
            )
            results["rounds"].append(rnd)
        if a.profile:
            for prefix, m in mirrors.items():
                m.names = thread_names(m.pid)
                results[prefix + "profile"] = profile(a, m.url, paths["tag"], m, work)
    finally:
        for s in servers:
            s.stop()
    print(report(results))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    log(f"logs and samples in {work}")


def report(results: dict) -> str:
    rounds = results["rounds"]
    order = ("ref", "tag", "digest", "baseline tag", "baseline digest", "bare")
    kinds = [k for k in order if rounds and k in rounds[0]]
    lines = [
        f"| median of {len(rounds)} rounds | req/s | p50 ms | p99 ms | CPU µs/req | × ref |",
        "|---|---|---|---|---|---|",
    ]
    for k in kinds:
        rps = med([r[k]["rps"] for r in rounds])
        cpu = med([r[k]["cpu_us_per_req"] for r in rounds if "cpu_us_per_req" in r[k]])
        ratio = med([r[k]["rps"] / r["ref"]["rps"] for r in rounds]) if "ref" in kinds else None
        lines.append(
            f"| {k} | {rps:,.0f} | {med([r[k]['p50_ms'] for r in rounds]):.2f} "
            f"| {med([r[k]['p99_ms'] for r in rounds]):.2f} "
            f"| {'–' if cpu is None else f'{cpu:.1f}'} "
            f"| {'–' if ratio is None else f'{ratio:.2f}'} |"
        )
    cpu_kinds = [k for k in kinds if "cpu_us_by_thread" in rounds[0][k]]
    threads = sorted({t for r in rounds for k in cpu_kinds for t in r[k]["cpu_us_by_thread"]})
    lines += [
        "",
        "| CPU µs/req by thread (median) | " + " | ".join(cpu_kinds) + " |",
        "|---|" + "---|" * len(cpu_kinds),
    ]
    for t in threads:
        cells = [med([r[k]["cpu_us_by_thread"].get(t, 0.0) for r in rounds]) for k in cpu_kinds]
        if any(cells):
            lines.append(f"| {t} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    profiles = {k[: -len("profile")]: v for k, v in results.items() if k.endswith("profile")}
    if not profiles:
        return "\n".join(lines)
    # a stage's µs: its share of the event-loop samples times the event-loop thread's CPU per
    # request measured without the sampler (median of the rounds by tag)
    main_us = {
        prefix: med([r[prefix + "tag"]["cpu_us_by_thread"].get("MainThread", 0.0) for r in rounds])
        for prefix in profiles
    }
    names = [prefix + "tag" for prefix in profiles]
    lines += [
        "",
        "Event-loop thread by stage (py-spy, during wrk by tag; µs/req = share × the thread's "
        "median CPU µs/req above):",
        "",
        "| stage | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for stage in STAGE_ORDER:
        cells = []
        for prefix, p in profiles.items():
            share = p["stage_share"].get(stage, 0.0)
            cells.append(f"{share * main_us[prefix]:.1f} ({share * 100:.0f}%)")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append("| total | " + " | ".join(f"{main_us[p]:.1f}" for p in profiles) + " |")
    for prefix, p in profiles.items():
        lines += ["", f"{prefix}tag: innermost frames (share of {p['samples']} samples):"]
        lines += [f"  {share * 100:5.1f}%  {f}" for f, share in p["top_frames"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
