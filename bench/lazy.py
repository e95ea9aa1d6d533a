"""Lazy pulling: TTFB of a tail range of an uncached 1 GiB blob, mirror vs peers.

`python3 bench/lazy.py [--reps 3] [--rate 100m] [--size-mib 1024] [--targets peerA,peerB,mirror]`

A lazy-pull client (stargz, SOCI, nydus, zstd:chunked) starts by reading the footer or table of
contents at the end of a layer it does not have. This asks each target, with an empty cache
every repetition, for `Range: bytes=<size-65536>-<size-1>` of a 1 GiB blob it has never seen,
then for 64 KiB in the middle, and reports the time to the first and to the last byte, the
status (206, or 200 with the whole blob: a failure to answer the range), whether the bytes are
right, and how many bytes the upstream had sent by the time the client had its last byte.

Everything runs on loopback ports 5400-5420 with data under /tmp/bench-lazy:

* upstream (5401): nginx serving the blob statically at /v2/lazy/x/blobs/sha256:<hex>, Range
  supported, `limit_rate` to a remote-like bandwidth (`--rate`, nginx syntax), `/v2/` answers
  200 `{}`; its access log records `$body_bytes_sent` per request and the client port, and
  `ss` gives the bytes each open connection has sent so far;
* peerA (5402): CNCF distribution (Debian's `docker-registry`) in proxy mode;
* peerB (5403): nginx `proxy_cache` with `proxy_cache_lock on` (as in bench/conf);
* mirror (5404): `$PYTHON -m mirror serve` (default: the project's .venv/bin/python), default
  workers, run from the project root.

Standard library only; run by hand. Writes bench/results/lazy-<date>.json and .md. Stops
everything it started, also after an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from procs import HOST, Procs, nginx_user, port_free

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BASE = Path("/tmp/bench-lazy")
RUN = BASE / "run"
BLOB_ROOT = BASE / "upstream"
REPO = "lazy/x"
READ = 65536
PORTS = {"upstream": 5401, "peerA": 5402, "peerB": 5403, "mirror": 5404}
TARGETS = ("peerA", "peerB", "mirror")
WHAT = {
    "peerA": "CNCF distribution (docker-registry) in proxy mode",
    "peerB": "nginx proxy_cache, proxy_cache_lock on",
    "mirror": "mirror serve, default workers",
}


def upstream_conf(rate: str) -> str:
    return f"""{nginx_user()}worker_processes 1;
daemon off;
pid {RUN}/upstream/nginx.pid;
error_log {RUN}/upstream/error.log warn;
events {{ worker_connections 1024; }}
http {{
    sendfile on;
    keepalive_timeout 65;
    keepalive_requests 100000;
    log_format cnt '$msec $remote_port $request_method $request_uri $status $body_bytes_sent '
                   '$request_time "$http_range"';
    access_log {RUN}/upstream-access.log cnt;
    client_body_temp_path {RUN}/upstream/client_body;
    server {{
        listen {HOST}:{PORTS["upstream"]} backlog=1024;
        root {BLOB_ROOT};
        add_header Docker-Distribution-Api-Version registry/2.0 always;
        location = /_bench/status {{ stub_status; access_log off; }}
        location = /v2/ {{ default_type application/json; return 200 '{{}}'; }}
        location ~ "^/v2/.+/blobs/(sha256:[0-9a-f]{{64}})$" {{
            default_type application/octet-stream;
            add_header Docker-Content-Digest $1 always;
            limit_rate {rate};
        }}
    }}
}}
"""


def peer_b_conf() -> str:
    # The blob and ping parts of bench/conf/nginx-peerB.conf.
    up = f"{HOST}:{PORTS['upstream']}"
    return f"""{nginx_user()}worker_processes auto;
daemon off;
pid {RUN}/peerB/nginx.pid;
error_log {RUN}/peerB/error.log warn;
events {{ worker_connections 8192; }}
http {{
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    keepalive_requests 100000;
    access_log off;
    client_body_temp_path {RUN}/peerB/client_body;
    proxy_temp_path {RUN}/peerB/proxy_temp;
    proxy_cache_path {BASE}/peerB/cache levels=1:2 keys_zone=registry:16m max_size=8g inactive=365d use_temp_path=off;
    upstream upstream_registry {{ server {up}; keepalive 32; }}
    server {{
        listen {HOST}:{PORTS["peerB"]} backlog=1024;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host {up};
        proxy_read_timeout 900s;
        proxy_send_timeout 900s;
        send_timeout 900s;
        proxy_buffers 32 64k;
        proxy_busy_buffers_size 256k;
        proxy_ignore_headers Cache-Control Expires Set-Cookie Vary X-Accel-Expires;
        proxy_cache_lock on;
        proxy_cache_lock_timeout 900s;
        proxy_cache_lock_age 900s;
        add_header X-Cache-Status $upstream_cache_status always;
        location ~ "^/v2/.+/blobs/sha256:[0-9a-f]{{64}}$" {{
            proxy_pass http://upstream_registry;
            proxy_cache registry;
            proxy_cache_key $uri;
            proxy_cache_valid 200 365d;
        }}
        location /v2/ {{ proxy_pass http://upstream_registry; }}
    }}
}}
"""


def peer_a_conf() -> str:
    # bench/conf/registry-peerA.yml
    return f"""version: 0.1
log:
  level: warn
  formatter: text
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {BASE}/peerA
  cache:
    blobdescriptor: inmemory
  delete:
    enabled: true
http:
  addr: {HOST}:{PORTS["peerA"]}
proxy:
  remoteurl: http://{HOST}:{PORTS["upstream"]}
"""


def wait_ping(procs: Procs, name: str, timeout: float = 30.0) -> None:
    url = f"http://{HOST}:{PORTS[name]}/v2/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procs.alive(name):
            raise RuntimeError(f"{name} exited; see {RUN}/{name}.out")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{name}: no 200 from {url} in {timeout:.0f} s")


def python() -> str:
    if os.environ.get("PYTHON"):
        return os.environ["PYTHON"]
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def start_target(procs: Procs, name: str) -> None:
    """Start a target with empty storage and wait until it answers /v2/."""
    procs.stop(name)
    store = BASE / name
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    if name == "peerA":
        conf = RUN / "registry-peerA.yml"
        conf.write_text(peer_a_conf())
        procs.start(name, ["docker-registry", "serve", str(conf)])
    elif name == "peerB":
        d = RUN / "peerB"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        (d / "nginx.conf").write_text(peer_b_conf())
        procs.start(
            name, ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf")]
        )
    else:
        argv = [python(), "-m", "mirror", "serve", "--listen", f"{HOST}:{PORTS['mirror']}"]
        argv += ["--data-dir", str(store), "--upstream", f"http://{HOST}:{PORTS['upstream']}"]
        procs.start(name, argv, cwd=ROOT)
    wait_ping(procs, name)


def start_upstream(procs: Procs, rate: str) -> None:
    d = RUN / "upstream"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "nginx.conf").write_text(upstream_conf(rate))
    (RUN / "upstream-access.log").unlink(missing_ok=True)
    procs.start(
        "upstream", ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf")]
    )
    wait_ping(procs, "upstream")


# --- the blob --------------------------------------------------------------------------------


def make_blob(size: int) -> tuple[str, Path]:
    """A random blob of `size` bytes, kept between runs (its digest in a side file)."""
    blobs = BLOB_ROOT / "v2" / REPO / "blobs"
    side = BASE / f"blob-{size}.digest"
    if side.exists():
        hexd = side.read_text().strip()
        path = blobs / f"sha256:{hexd}"
        if path.exists() and path.stat().st_size == size:
            return hexd, path
    shutil.rmtree(BLOB_ROOT, ignore_errors=True)
    blobs.mkdir(parents=True)
    tmp = blobs / "tmp"
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 8 << 20))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    hexd = h.hexdigest()
    path = blobs / f"sha256:{hexd}"
    tmp.rename(path)
    side.write_text(hexd)
    return hexd, path


# --- upstream accounting ---------------------------------------------------------------------


def ss_sent() -> dict[int, int]:
    """Bytes each established connection of the upstream has sent (and had acked) so far."""
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{PORTS['upstream']} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sent: dict[int, int] = {}
    port = None
    for line in out.splitlines():
        if not line[:1].isspace():
            cols = line.split()
            port = int(cols[-1].rsplit(":", 1)[1]) if cols else None
            continue
        m = re.search(r"bytes_acked:(\d+)", line)
        if port is not None:
            sent[port] = int(m.group(1)) if m else 0
    return sent


@dataclass
class LogLine:
    t: float
    port: int
    method: str
    uri: str
    status: int
    bytes: int
    range: str
    seconds: float = 0.0


def log_lines(offset: int) -> list[LogLine]:
    lines = []
    with open(RUN / "upstream-access.log", "rb") as f:
        f.seek(offset)
        for raw in f.read().decode().splitlines():
            m = re.match(r'(\S+) (\d+) (\S+) (\S+) (\d+) (\d+) (\S+) "(.*)"$', raw)
            if m:
                t, port, method, uri, status, nbytes, secs, rng = m.groups()
                lines.append(
                    LogLine(
                        float(t), int(port), method, uri, int(status), int(nbytes), rng, float(secs)
                    )
                )
    return lines


def log_size() -> int:
    return (RUN / "upstream-access.log").stat().st_size


def sent_between(
    before: dict[int, int], after: dict[int, int], logs: list[LogLine], t0: float, t1: float
) -> int:
    """Upstream bytes sent in [t0, t1]: open connections by `ss`, closed ones by the log."""
    total = sum(n - before.get(port, 0) for port, n in after.items())
    total += sum(line.bytes for line in logs if line.port not in after and t0 <= line.t <= t1)
    return total


def upstream_writing() -> int:
    url = f"http://{HOST}:{PORTS['upstream']}/_bench/status"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return int(re.search(r"Writing: (\d+)", text).group(1))


def settle(timeout: float) -> float:
    """Wait until upstream sends nothing (only our status request writing) for 1 s."""
    start = time.monotonic()
    quiet_since = None
    while time.monotonic() - start < timeout:
        if upstream_writing() <= 1:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= 1.0:
                break
        else:
            quiet_since = None
        time.sleep(0.2)
    return time.monotonic() - start


# --- one measurement -------------------------------------------------------------------------


@dataclass
class Read:
    target: str
    rep: int
    which: str  # "tail" or "mid"
    first: int
    last: int
    status: int = 0
    content_range: str = ""
    body_bytes: int = 0
    ttfb_ms: float = 0.0
    total_ms: float = 0.0
    bytes_ok: bool = False
    error: str = ""
    upstream_bytes_during: int = 0
    headers: dict[str, str] = field(default_factory=dict)


def ask(target: str, rep: int, which: str, first: int, last: int, path: str, blob: Path) -> Read:
    r = Read(target, rep, which, first, last)
    with open(blob, "rb") as f:
        f.seek(first)
        want = f.read(last - first + 1)
    before = ss_sent()
    offset = log_size()
    t0 = time.time()
    m0 = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, PORTS[target], timeout=600)
    got: list[bytes] = []
    try:
        conn.request("GET", path, headers={"Range": f"bytes={first}-{last}"})
        resp = conn.getresponse()
        r.ttfb_ms = (time.perf_counter() - m0) * 1000
        r.status = resp.status
        r.content_range = resp.getheader("Content-Range", "")
        r.headers = {k: v for k, v in resp.getheaders() if k.lower() != "date"}
        # Keep the bytes at [first, last] of the blob: all of a 206, that slice of a 200.
        pos = first if r.status == 206 else 0
        while chunk := resp.read(1 << 20):
            lo, hi = max(first - pos, 0), min(last + 1 - pos, len(chunk))
            if lo < hi:
                got.append(chunk[lo:hi])
            pos += len(chunk)
            r.body_bytes += len(chunk)
        r.total_ms = (time.perf_counter() - m0) * 1000
    except (OSError, http.client.HTTPException) as e:
        r.error = f"{type(e).__name__}: {e}"
        r.total_ms = (time.perf_counter() - m0) * 1000
    finally:
        conn.close()
    after = ss_sent()
    t1 = time.time()
    r.upstream_bytes_during = sent_between(before, after, log_lines(offset), t0, t1)
    if r.status == 206:
        whole = blob.stat().st_size
        r.bytes_ok = (
            r.body_bytes == len(want)
            and b"".join(got) == want
            and r.content_range == f"bytes {first}-{last}/{whole}"
        )
    elif r.status == 200:  # the whole blob: right if it is whole and the range's bytes are
        r.bytes_ok = r.body_bytes == blob.stat().st_size and b"".join(got) == want
    return r


# --- report ----------------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def statuses(reads: list[Read]) -> str:
    out = []
    for st in sorted({r.status for r in reads}):
        n = sum(r.status == st for r in reads)
        label = {206: "206", 200: "200 whole blob", 0: "error"}.get(st, str(st))
        out.append(f"{label} ×{n}")
    return ", ".join(out)


def table(result: dict) -> str:
    reads = [Read(**r) for r in result["reads"]]
    reps = result["reps_detail"]
    lines = [
        "| target | range | TTFB ms | total ms | status | bytes right | upstream MiB by the last byte "
        "| upstream MiB for the repetition | upstream requests |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for target in result["targets"]:
        rep_rows = [x for x in reps if x["target"] == target]
        for which in ("tail", "mid"):
            rs = [r for r in reads if r.target == target and r.which == which]
            if not rs:
                continue
            ok = sum(r.bytes_ok for r in rs)
            if which == "tail":
                rep_bytes = mib(median([x["upstream_bytes"] for x in rep_rows]))
                logs = [[LogLine(**y) for y in x["upstream_log"]] for x in rep_rows]
                rep_reqs = ", ".join(sorted({summarize(x, result["size"]) for x in logs}))
            else:
                rep_bytes = rep_reqs = "″"
            rng = "last 64 KiB" if which == "tail" else "64 KiB in the middle"
            lines.append(
                f"| {target} | {rng} | {median([r.ttfb_ms for r in rs]):,.0f} "
                f"| {median([r.total_ms for r in rs]):,.0f} | {statuses(rs)} | {ok}/{len(rs)} "
                f"| {mib(median([r.upstream_bytes_during for r in rs]))} | {rep_bytes} | {rep_reqs} |"
            )
    return "\n".join(lines)


def report(result: dict) -> str:
    load = result["loadavg_start"][0], result["loadavg_end"][0]
    return (
        f"# Lazy pulling: a tail range of an uncached {result['size'] >> 20} MiB blob "
        f"({result['started']})\n\n"
        f"upstream: nginx static, limit_rate {result['rate']}; {result['reps']} repetitions, empty "
        f"cache each; medians. {result['cpus']} CPUs, load average {load[0]:.2f} at the start, "
        f"{load[1]:.2f} at the end.\n\n" + table(result) + "\n"
    )


def summarize(logs: list[LogLine], size: int) -> str:
    """The upstream requests of one repetition, e.g. 'GET full, GET range' (pings left out)."""
    parts = []
    for line in sorted(logs, key=lambda x: x.t - x.seconds):  # by when they started
        if "/blobs/" not in line.uri:
            continue
        if line.method != "GET":
            parts.append(line.method)
            continue
        kind = "range" if line.range != "-" else "full"
        if kind == "full" and line.bytes < size:
            kind = "full, cut short"
        parts.append(f"GET {kind}")
    return "; ".join(parts) or "none"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--rate", default="100m", help="upstream limit_rate, nginx syntax (default 100m)"
    )
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--no-mid", action="store_true", help="skip the second range (the middle)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results JSON (default bench/results/lazy-<date>.json)",
    )
    parser.add_argument(
        "--report", type=Path, default=None, help="print (and rewrite the .md of) a results JSON"
    )
    args = parser.parse_args()
    if args.report:
        md = report(json.loads(args.report.read_text()))
        args.report.with_suffix(".md").write_text(md)
        print(md)
        return 0
    targets = [t for t in args.targets.split(",") if t]
    for t in targets:
        if t not in TARGETS:
            parser.error(f"unknown target {t}")
    size = args.size_mib << 20
    stamp = time.strftime("%Y-%m-%d_%H%M%S")
    out = args.out or BENCH / "results" / f"lazy-{stamp}.json"

    for name in ["upstream", *targets]:
        if not port_free(PORTS[name]):
            print(f"port {PORTS[name]} ({name}) is in use", file=sys.stderr)
            return 2
    RUN.mkdir(parents=True, exist_ok=True)
    procs = Procs(RUN)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # also when started in the background, SIGINT ignored
    reads: list[Read] = []
    reps_detail: list[dict] = []
    try:
        print(f"blob: {args.size_mib} MiB ...", flush=True)
        hexd, blob = make_blob(size)
        path = f"/v2/{REPO}/blobs/sha256:{hexd}"
        start_upstream(procs, args.rate)
        started = time.strftime("%Y-%m-%d %H:%M")
        load_start = os.getloadavg()
        for rep in range(1, args.reps + 1):
            for target in targets:
                settle(120)
                start_target(procs, target)
                settle(30)
                offset = log_size()
                load = os.getloadavg()[0]
                rep_reads = [ask(target, rep, "tail", size - READ, size - 1, path, blob)]
                if not args.no_mid:
                    mid = size // 2
                    rep_reads.append(ask(target, rep, "mid", mid, mid + READ - 1, path, blob))
                # Let whatever the target goes on fetching finish, then count it all.
                waited = settle(size / 2**20 + 60)
                logs = log_lines(offset)
                detail = {
                    "target": target,
                    "rep": rep,
                    "load1_before": load,
                    "settle_s": round(waited, 1),
                    "upstream_bytes": sum(x.bytes for x in logs),
                    "upstream_summary": summarize(logs, size),
                    "upstream_log": [asdict(x) for x in logs],
                }
                reps_detail.append(detail)
                reads += rep_reads
                for r in rep_reads:
                    print(
                        f"rep {rep} {target:6} {r.which:4} status {r.status} ttfb {r.ttfb_ms:8.1f} ms "
                        f"total {r.total_ms:8.1f} ms ok {r.bytes_ok} upstream-during {mib(r.upstream_bytes_during)} MiB"
                        + (f" error {r.error}" if r.error else ""),
                        flush=True,
                    )
                print(
                    f"      upstream for the rep: {mib(detail['upstream_bytes'])} MiB: {detail['upstream_summary']}"
                )
                procs.stop(target)
        result = {
            "started": started,
            "size": size,
            "rate": args.rate,
            "reps": args.reps,
            "targets": targets,
            "what": {t: WHAT[t] for t in targets},
            "cpus": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "reads": [asdict(r) for r in reads],
            "reps_detail": reps_detail,
        }
        md = report(result)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(md)
        print()
        print(md)
        print(f"results: {out} and {out.with_suffix('.md')}")
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        for name in TARGETS:
            shutil.rmtree(BASE / name, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
