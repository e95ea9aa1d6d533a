"""Cluster mode and the hit path (run by hand; numbers go to the README): wrk against a
manifest by tag (a hit within its TTL) on a real `mirror serve` with `[cluster]` on (one
Redis), and the same without it. A hit within the TTL asks Redis nothing (tests/test_cluster.py
counts it), so the two should be alike.

  .venv/bin/python bench/cluster_hits.py [--reps 24] [--seconds 2] [--restart 4] [--connections 16]

The upstream is the test suite's simulator and Redis is Debian's `redis-server`, each in a
process of its own on a free port; the mirror runs its default workers; runs are interleaved.
Needs wrk and redis-server.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

from events import _free_port, _get, arguments, interleaved, start_upstream, table

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
    args = arguments()
    upstream, upstream_url = start_upstream()
    ttl = '[upstreams."docker.io"]\ntag_ttl = 3600\n'

    def joined(name: str, url: str, manifest: str) -> None:
        if name == "cluster":
            ready = json.loads(_get(f"{url}/readyz"))
            assert ready["cluster"] == "joined", ready

    with tempfile.TemporaryDirectory(prefix="bench-cluster-hits-") as tmp:
        work = Path(tmp)
        redis, redis_url = _redis(work)
        configs = {
            "off": ttl,
            "cluster": f'{ttl}[cluster]\nredis_url = "{redis_url}"\nsecret = "{SECRET}"\n'
            'advertise = "http://127.0.0.1:9"\n',
        }
        try:
            results = interleaved(work, upstream_url, configs, args, joined)
        finally:
            redis.terminate()
            redis.wait()
            upstream.terminate()
            upstream.wait()
    table("cluster", results)


if __name__ == "__main__":
    main()
