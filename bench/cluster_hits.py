"""Cluster mode and the hit path (run by hand; numbers go to the README): wrk against a
manifest by tag (a hit within its TTL) on a real `mirror serve` with `[cluster]` on (one
Redis), and the same without it. A hit within the TTL asks Redis nothing (tests/test_cluster.py
counts it), so the two should be alike.

  .venv/bin/python bench/cluster_hits.py [--reps 3] [--seconds 10] [--connections 16]

The upstream is the test suite's simulator and Redis is Debian's `redis-server`, each in a
process of its own on a free port; the mirror runs its default workers; runs are interleaved.
Needs wrk and redis-server.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from events import CONNECTIONS, PROJECT, UPSTREAM, _free_port, _get, _serve, _wrk

SECRET = "bench-cluster-secret-0123456789abcdef"


def _redis(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--dir", str(work)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout != (
        b"PONG\n"
    ):
        if time.monotonic() > deadline:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=CONNECTIONS[0])
    args = parser.parse_args()
    CONNECTIONS[0] = args.connections
    upstream = subprocess.Popen(
        [sys.executable, "-c", UPSTREAM], cwd=PROJECT, stdout=subprocess.PIPE, text=True
    )
    assert upstream.stdout is not None
    upstream_url = upstream.stdout.readline().strip()
    ttl = '[upstreams."docker.io"]\ntag_ttl = 3600\n'
    with tempfile.TemporaryDirectory(prefix="bench-cluster-hits-") as tmp:
        work = Path(tmp)
        redis, redis_url = _redis(work)
        configs = {
            "off": ttl,
            "cluster": f'{ttl}[cluster]\nredis_url = "{redis_url}"\nsecret = "{SECRET}"\n'
            'advertise = "http://127.0.0.1:9"\n',
        }
        results: dict[str, list[float]] = {k: [] for k in configs}
        try:
            for rep in range(args.reps):
                for name, toml in configs.items():
                    proc, url = _serve(work, upstream_url, toml)
                    try:
                        manifest = f"{url}/v2/team/app/manifests/1.0"
                        _get(manifest)
                        _wrk(manifest, 3)  # warm up: every worker has served the tag
                        if name == "cluster":
                            ready = json.loads(_get(f"{url}/readyz"))
                            assert ready["cluster"] == "joined", ready
                        results[name].append(_wrk(manifest, args.seconds))
                    finally:
                        proc.terminate()
                        proc.wait()
                print(
                    f"rep {rep + 1}: { ({k: v[-1] for k, v in results.items()}) }", file=sys.stderr
                )
        finally:
            redis.terminate()
            redis.wait()
            upstream.terminate()
            upstream.wait()
    off = statistics.median(results["off"])
    print("| cluster | manifest by tag req/s (median) | runs | vs off |\n|---|---|---|---|")
    for name, runs in results.items():
        med = statistics.median(runs)
        shown = ", ".join(f"{r:.0f}" for r in runs)
        print(f"| {name} | {med:.0f} | {shown} | {med / off:.3f} |")


if __name__ == "__main__":
    main()
