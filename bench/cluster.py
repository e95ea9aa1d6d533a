"""Cluster mode: 30 cold clients of a 1 GiB blob through three replicas behind nginx, against
one mirror.

`python3 bench/cluster.py [--reps 1] [--clients 30] [--rate 100m] [--size-mib 1024]`

Each repetition, with empty caches and an empty Redis:

* **cluster**: three `mirror serve` replicas with `[cluster]` (one Redis, each its own data
  directory, `--workers 1` each: this machine has 2 cores, and the three replicas already are
  three processes), nginx round-robin in front; 30 clients at once GET the blob through nginx.
* **single**: one `mirror serve --workers 1` without `[cluster]`; the same 30 clients GET the
  blob from it directly (a single mirror has no load balancer).
* **cluster+l4** (with `--phases`; Debian's libnginx-mod-stream): the same replicas behind
  nginx's `stream` module, TCP round-robin per connection: nginx still, but no HTTP parsing
  or buffering of bodies.
* **cluster+kernel** (with `--phases`; root and iptables): the same replicas behind the
  kernel's NAT instead of nginx, round-robin per connection as kube-proxy's iptables mode
  balances a Service (bodies never pass through user space on their way to the client).
* **single+lb** (with `--phases`): the single mirror behind the same nginx, to tell the load
  balancer's cost from the cluster's.

Reported: the upstream GETs of the blob (goal: 1 for the cluster), each client's TTFB (first
body byte; goal p50 ≤ 100 ms), the wall time from the first request to the last byte of the
last client (goal: cluster ≤ 1.2× single), and every body checked against its sha256.

Everything runs on loopback ports 5500-5520 with data under /tmp/bench-cluster:

* upstream (5501): nginx serving the blob statically at /v2/bench/cluster/blobs/sha256:<hex>
  with `limit_rate` (`--rate`, nginx syntax) to a remote-like bandwidth; its access log
  counts the requests;
* redis (5502): Debian's `redis-server`, no persistence;
* lb (5510): nginx round-robin over the replicas, as deploy/nginx-cluster.conf;
* replicas (5511-5513), single (5520): `$PYTHON -m mirror serve` (default: the project's
  .venv/bin/python), run from the project root.

Standard library only; run by hand. Writes bench/results/cluster-<date>.json and .md. Stops
everything it started, also after an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from procs import HOST, Procs, nginx_user, port_free

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BASE = Path("/tmp/bench-cluster")
RUN = BASE / "run"
BLOB_ROOT = BASE / "upstream"
REPO = "bench/cluster"
PORTS = {
    "upstream": 5501,
    "redis": 5502,
    "lb": 5510,
    "r1": 5511,
    "r2": 5512,
    "r3": 5513,
    "single": 5520,
}
REPLICAS = ("r1", "r2", "r3")
SECRET = "bench-cluster-secret-0123456789abcdef"


def upstream_conf(rate: str) -> str:
    return f"""{nginx_user()}worker_processes 1;
daemon off;
pid {RUN}/upstream/nginx.pid;
error_log {RUN}/upstream/error.log warn;
events {{ worker_connections 1024; }}
http {{
    sendfile on;
    keepalive_timeout 65;
    log_format cnt '$msec $request_method $request_uri $status $body_bytes_sent "$http_range"';
    access_log {RUN}/upstream-access.log cnt;
    client_body_temp_path {RUN}/upstream/client_body;
    server {{
        listen {HOST}:{PORTS["upstream"]} backlog=1024;
        root {BLOB_ROOT};
        add_header Docker-Distribution-Api-Version registry/2.0 always;
        location = /v2/ {{ default_type application/json; return 200 '{{}}'; }}
        location ~ "^/v2/.+/blobs/(sha256:[0-9a-f]{{64}})$" {{
            default_type application/octet-stream;
            add_header Docker-Content-Digest $1 always;
            limit_rate {rate};
        }}
    }}
}}
"""


def lb_conf(behind: tuple[str, ...] = REPLICAS) -> str:
    # deploy/nginx-cluster.conf, on loopback ports; X-Bench-Upstream says who answered
    servers = "\n".join(f"        server {HOST}:{PORTS[r]};" for r in behind)
    return f"""{nginx_user()}worker_processes 1;
daemon off;
pid {RUN}/lb/nginx.pid;
error_log {RUN}/lb/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {RUN}/lb/client_body;
    proxy_temp_path {RUN}/lb/proxy_temp;
    upstream mirror {{
{servers}
        keepalive 64;
    }}
    server {{
        listen {HOST}:{PORTS["lb"]} backlog=1024;
        client_max_body_size 0;
        location / {{
            proxy_pass http://mirror;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            # read the replica in large pieces into memory, never spool a blob to disk
            proxy_buffering on;
            proxy_buffer_size 64k;
            proxy_buffers 8 256k;
            proxy_busy_buffers_size 512k;
            proxy_max_temp_file_size 0;
            proxy_request_buffering off;
            proxy_read_timeout 900s;
            proxy_send_timeout 900s;
            add_header X-Bench-Upstream $upstream_addr always;
        }}
    }}
}}
"""


def lb_stream_conf(behind: tuple[str, ...] = REPLICAS) -> str:
    """nginx as a TCP (L4) balancer: its `stream` module, round-robin per connection; it
    still copies every byte through its process, but parses no HTTP and buffers nothing."""
    servers = "\n".join(f"        server {HOST}:{PORTS[r]};" for r in behind)
    return f"""{nginx_user()}worker_processes 1;
load_module {STREAM_MODULE};
daemon off;
pid {RUN}/lb/nginx.pid;
error_log {RUN}/lb/error.log warn;
events {{ worker_connections 4096; }}
stream {{
    upstream mirror {{
{servers}
    }}
    server {{
        listen {HOST}:{PORTS["lb"]} backlog=1024;
        proxy_pass mirror;
        proxy_buffer_size 256k;
        proxy_timeout 900s;
    }}
}}
"""


#: Debian's dynamic module for nginx's `stream` (package libnginx-mod-stream).
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"

#: The iptables chain of the in-kernel balancer (`cluster+kernel`).
CHAIN = "MIRROR_BENCH_LB"


def iptables(*args: str, check: bool = True) -> None:
    subprocess.run(["iptables", "-t", "nat", *args], check=check, capture_output=True)


def kernel_lb(behind: tuple[str, ...] = REPLICAS) -> None:
    """Round-robin over `behind` by connection in the kernel's NAT, as kube-proxy's iptables
    mode does for a Service: each new connection to the lb port is DNATed to the next
    replica (`statistic --mode nth`), and no byte of a body passes through user space."""
    kernel_lb_off()
    iptables("-N", CHAIN)
    for i, r in enumerate(behind):
        left = len(behind) - i
        match = ["-m", "statistic", "--mode", "nth", "--every", str(left), "--packet", "0"]
        to = ["-j", "DNAT", "--to-destination", f"{HOST}:{PORTS[r]}"]
        iptables("-A", CHAIN, "-p", "tcp", *(match if left > 1 else []), *to)
    iptables("-A", "OUTPUT", "-p", "tcp", "-d", HOST, "--dport", str(PORTS["lb"]), "-j", CHAIN)


def kernel_lb_off() -> None:
    iptables(
        "-D",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        HOST,
        "--dport",
        str(PORTS["lb"]),
        "-j",
        CHAIN,
        check=False,
    )
    iptables("-F", CHAIN, check=False)
    iptables("-X", CHAIN, check=False)


def mirror_conf(name: str, cluster: bool) -> str:
    text = (
        f'listen = "{HOST}:{PORTS[name]}"\ndata_dir = "{BASE / name}"\nworkers = 1\n'
        # every client of a replica arrives from nginx's address
        "[limits]\nmax_connections_per_client = 0\nmax_fills_per_client = 0\n"
        f'[upstreams."docker.io"]\nurl = "http://{HOST}:{PORTS["upstream"]}"\n'
    )
    if cluster:
        text += (
            f'[cluster]\nredis_url = "redis://{HOST}:{PORTS["redis"]}/0"\n'
            f'advertise = "http://{HOST}:{PORTS[name]}"\nsecret = "{SECRET}"\n'
        )
    return text


def python() -> str:
    if os.environ.get("PYTHON"):
        return os.environ["PYTHON"]
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def get(port: int, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=2) as r:
        return r.status, r.read()


def wait_for(procs: Procs, name: str, ok: object, timeout: float = 30.0) -> None:
    """Poll until `ok()` is true; the process must stay alive meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procs.alive(name):
            raise RuntimeError(f"{name} exited; see {RUN}/{name}.out")
        try:
            if ok():  # type: ignore[operator]
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{name}: not ready in {timeout:.0f} s; see {RUN}/{name}.out")


def start_nginx(procs: Procs, name: str, conf: str) -> None:
    d = RUN / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "nginx.conf").write_text(conf)
    procs.start(
        name, ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf")]
    )


def start_mirror(procs: Procs, name: str, cluster: bool) -> None:
    shutil.rmtree(BASE / name, ignore_errors=True)
    (BASE / name).mkdir(parents=True)
    conf = RUN / f"{name}.toml"
    conf.write_text(mirror_conf(name, cluster))
    procs.start(name, [python(), "-m", "mirror", "serve", "--config", str(conf)], cwd=ROOT)

    def ready() -> bool:
        status, body = get(PORTS[name], "/readyz")
        return status == 200 and (not cluster or json.loads(body).get("cluster") == "joined")

    wait_for(procs, name, ready)


def start_redis(procs: Procs) -> None:
    d = RUN / "redis"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    argv = ["redis-server", "--bind", HOST, "--port", str(PORTS["redis"]), "--dir", str(d)]
    procs.start("redis", [*argv, "--save", "", "--appendonly", "no"])

    def pong() -> bool:
        with socket.create_connection((HOST, PORTS["redis"]), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    wait_for(procs, "redis", pong)


def make_blob(size: int) -> tuple[str, Path]:
    """A random blob of `size` bytes, kept between runs (its digest in a side file)."""
    blobs = BLOB_ROOT / "v2" / REPO / "blobs"
    side = BASE / f"blob-{size}.digest"
    if side.exists():
        path = blobs / f"sha256:{side.read_text().strip()}"
        if path.exists() and path.stat().st_size == size:
            return side.read_text().strip(), path
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
    tmp.rename(blobs / f"sha256:{h.hexdigest()}")
    side.write_text(h.hexdigest())
    return h.hexdigest(), blobs / f"sha256:{h.hexdigest()}"


def upstream_gets(offset: int, path: str) -> list[str]:
    """The upstream's blob GETs since `offset` of its log: 'full' or the Range asked."""
    with open(RUN / "upstream-access.log", "rb") as f:
        f.seek(offset)
        lines = f.read().decode().splitlines()
    out = []
    for line in lines:
        parts = line.split(" ", 5)
        if len(parts) == 6 and parts[1] == "GET" and parts[2] == path:
            out.append("full" if parts[5] == '"-"' else parts[5].strip('"'))
    return out


def client(port: int, path: str, start: threading.Barrier, result: dict) -> None:
    start.wait()
    t0 = time.perf_counter()
    result["t0"] = t0
    conn = http.client.HTTPConnection(HOST, port, timeout=900)
    h = hashlib.sha256()
    n = 0
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        result["status"] = resp.status
        result["served_by"] = resp.getheader("X-Bench-Upstream", f"{HOST}:{port}")
        first = resp.read1(1 << 20)
        result["ttfb_ms"] = (time.perf_counter() - t0) * 1000
        h.update(first)
        n = len(first)
        while chunk := resp.read(4 << 20):
            h.update(chunk)
            n += len(chunk)
    except (OSError, http.client.HTTPException) as e:
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    result["t1"] = time.perf_counter()
    result["bytes"] = n
    result["sha256"] = h.hexdigest()


def run_clients(port: int, path: str, count: int, hexd: str, size: int) -> dict:
    results: list[dict] = [{} for _ in range(count)]
    start = threading.Barrier(count)
    threads = [
        threading.Thread(target=client, args=(port, path, start, r), daemon=True) for r in results
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ttfb = [r["ttfb_ms"] for r in results if "ttfb_ms" in r]
    return {
        "wall_s": max(r["t1"] for r in results) - min(r["t0"] for r in results),
        "ttfb_p50_ms": statistics.median(ttfb) if ttfb else float("nan"),
        "ttfb_max_ms": max(ttfb, default=float("nan")),
        "ok": sum(
            r.get("status") == 200 and r.get("bytes") == size and r.get("sha256") == hexd
            for r in results
        ),
        "errors": sorted({r["error"] for r in results if "error" in r}),
        "clients": count,
        "per_client": [
            {k: r.get(k) for k in ("served_by", "status", "ttfb_ms", "error")}
            | {"total_s": r["t1"] - r["t0"], "bytes": r.get("bytes")}
            for r in results
        ],
    }


def log_size() -> int:
    return (RUN / "upstream-access.log").stat().st_size


def settle_upstream(path: str, offset: int, timeout: float = 120.0) -> None:
    """The upstream writes a log line when a response ends: wait (bounded) until every fill's
    transfer has been logged, i.e. the mirrors have stopped fetching."""
    deadline = time.monotonic() + timeout
    last = -1
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        size = log_size()
        if size != last:
            last, stable_since = size, time.monotonic()
        elif time.monotonic() - stable_since > 2.0:
            return
        time.sleep(0.2)


def phase(procs: Procs, which: str, path: str, clients: int, hexd: str, size: int) -> dict:
    offset = log_size()
    load = os.getloadavg()[0]
    if which.startswith("cluster"):
        start_redis(procs)
        for r in REPLICAS:
            start_mirror(procs, r, cluster=True)
        if which == "cluster+kernel":
            kernel_lb()
        else:
            start_nginx(procs, "lb", lb_stream_conf() if which == "cluster+l4" else lb_conf())
        watched = "r1" if which == "cluster+kernel" else "lb"
        wait_for(procs, watched, lambda: get(PORTS["lb"], "/v2/")[0] == 200)
        port = PORTS["lb"]
    elif which == "single+lb":
        start_mirror(procs, "single", cluster=False)
        start_nginx(procs, "lb", lb_conf(("single",)))
        wait_for(procs, "lb", lambda: get(PORTS["lb"], "/v2/")[0] == 200)
        port = PORTS["lb"]
    else:
        start_mirror(procs, "single", cluster=False)
        port = PORTS["single"]
    offset = log_size()
    out = run_clients(port, path, clients, hexd, size)
    settle_upstream(path, offset)
    out["upstream_gets"] = upstream_gets(offset, path)
    out["load1_before"] = load
    out["phase"] = which
    kernel_lb_off()
    for name in ("lb", *REPLICAS, "redis", "single"):
        procs.stop(name)
    return out


def table(result: dict) -> str:
    lines = [
        "| setup | rep | clients right | upstream GETs of the blob | TTFB p50 ms | TTFB max ms "
        "| wall s | last client done s, by replica | load before |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["phases"]:
        gets = len(p["upstream_gets"])
        kinds = ", ".join(sorted(set(p["upstream_gets"]))) or "none"
        lines.append(
            f"| {p['phase']} | {p['rep']} | {p['ok']}/{p['clients']} | {gets} ({kinds}) "
            f"| {p['ttfb_p50_ms']:,.0f} | {p['ttfb_max_ms']:,.0f} | {p['wall_s']:.1f} "
            f"| {by_replica(p)} | {p['load1_before']:.2f} |"
        )
    walls = {
        w: statistics.median([p["wall_s"] for p in result["phases"] if p["phase"] == w] or [0])
        for w in ("cluster", "cluster+l4", "cluster+kernel", "single", "single+lb")
    }
    lines.append("")
    if walls["cluster"] and walls["single"]:
        lines.append(
            f"Cluster wall / single wall (medians): {walls['cluster'] / walls['single']:.2f}× "
            "(goal ≤ 1.2×)."
        )
    if walls["cluster+l4"] and walls["single"]:
        lines.append(
            f"Cluster behind nginx's stream (L4) balancer / single wall (medians): "
            f"{walls['cluster+l4'] / walls['single']:.2f}× (goal ≤ 1.2×)."
        )
    if walls["cluster+kernel"] and walls["single"]:
        lines.append(
            f"Cluster behind the kernel's NAT / single wall (medians): "
            f"{walls['cluster+kernel'] / walls['single']:.2f}× (goal ≤ 1.2×)."
        )
    if walls["single+lb"] and walls["single"]:
        lines.append(
            f"Single behind the load balancer / single direct: "
            f"{walls['single+lb'] / walls['single']:.2f}×."
        )
    return "\n".join(lines)


def by_replica(p: dict) -> str:
    """The slowest client's time per replica that served (port: seconds, clients)."""
    done: dict[str, list[float]] = {}
    for c in p.get("per_client", []):
        done.setdefault(str(c["served_by"]).rsplit(":", 1)[-1], []).append(c["total_s"])
    return ", ".join(f"{port}: {max(ts):.0f} ({len(ts)})" for port, ts in sorted(done.items()))


def report(result: dict) -> str:
    load = result["loadavg_start"][0], result["loadavg_end"][0]
    return (
        f"# Cluster mode: {result['clients']} cold clients of a {result['size'] >> 20} MiB blob "
        f"({result['started']})\n\n"
        f"cluster: 3 replicas (`--workers 1` each) with one redis-server, nginx round-robin in "
        f"front (cluster+kernel: the kernel's NAT round-robin instead); single: one mirror (`--workers 1`), clients direct. Upstream: nginx static, "
        f"limit_rate {result['rate']}. {result['cpus']} CPUs, load average {load[0]:.2f} at the "
        f"start, {load[1]:.2f} at the end.\n\n" + table(result) + "\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--rate", default="100m", help="upstream limit_rate (nginx syntax)")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument(
        "--phases",
        default="cluster,single",
        help="of cluster, cluster+l4 (the replicas behind nginx's stream module, TCP "
        "round-robin; needs libnginx-mod-stream), cluster+kernel (the replicas behind the "
        "kernel's NAT instead of "
        "nginx; needs root and iptables), single, single+lb (one mirror behind the same "
        "nginx), in order",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--report", type=Path, default=None, help="print a results JSON again")
    args = parser.parse_args()
    if args.report:
        md = report(json.loads(args.report.read_text()))
        args.report.with_suffix(".md").write_text(md)
        print(md)
        return 0
    size = args.size_mib << 20
    out = args.out or BENCH / "results" / f"cluster-{time.strftime('%Y-%m-%d_%H%M%S')}.json"
    busy = [f"{p} ({n})" for n, p in PORTS.items() if not port_free(p)]
    if busy:
        print(f"ports in use: {', '.join(busy)}", file=sys.stderr)
        return 2
    RUN.mkdir(parents=True, exist_ok=True)
    procs = Procs(RUN)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    phases = []
    try:
        print(f"blob: {args.size_mib} MiB ...", flush=True)
        hexd, _ = make_blob(size)
        path = f"/v2/{REPO}/blobs/sha256:{hexd}"
        (RUN / "upstream-access.log").unlink(missing_ok=True)
        start_nginx(procs, "upstream", upstream_conf(args.rate))
        wait_for(procs, "upstream", lambda: get(PORTS["upstream"], "/v2/")[0] == 200)
        started = time.strftime("%Y-%m-%d %H:%M")
        load_start = os.getloadavg()
        for rep in range(1, args.reps + 1):
            for which in args.phases.split(","):
                p = phase(procs, which, path, args.clients, hexd, size)
                p["rep"] = rep
                phases.append(p)
                print(
                    f"rep {rep} {which:7} ok {p['ok']}/{p['clients']} upstream GETs "
                    f"{p['upstream_gets']} ttfb p50 {p['ttfb_p50_ms']:.0f} ms wall {p['wall_s']:.1f} s"
                    + (f" errors {p['errors']}" if p["errors"] else ""),
                    flush=True,
                )
        result = {
            "started": started,
            "size": size,
            "rate": args.rate,
            "reps": args.reps,
            "clients": args.clients,
            "cpus": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "phases": phases,
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
        kernel_lb_off()
        procs.stop_all()
        for name in (*REPLICAS, "single"):
            shutil.rmtree(BASE / name, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
