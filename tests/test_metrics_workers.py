"""With worker processes the host exports one set of metrics: real forked workers
(tests/metric_workers.py) share a metrics directory, and whichever of them renders, counters
are the sums of what each counted, each gauge merges as its mode says, and a worker that
exits leaves its counts but not its live gauges. Whole `mirror serve` workers answer /metrics,
/readyz and the status page for the host. And one process without that mode keeps each
Metrics to itself, as before."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
from conftest import PROJECT, offline_builtins
from prometheus_client.parser import text_string_to_metric_families
from registry import free_port
from upstream_sim import UpstreamSim

from mirror.metrics import Metrics

HELPER = Path(__file__).resolve().parent / "metric_workers.py"
K = 4


def _samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            yield s.name, s.labels, s.value


def _one(text: str, name: str, **labels: str) -> float:
    """The value of the one sample `name` with exactly these labels."""
    found = [v for n, ls, v in _samples(text) if n == name and ls == labels]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def _per_pid(text: str, name: str) -> dict[int, float]:
    return {int(ls["pid"]): v for n, ls, v in _samples(text) if n == name}


def test_forked_workers_export_one_set_of_metrics(tmp_path: Path) -> None:
    directory, out = tmp_path / "metrics", tmp_path / "out"
    out.mkdir()
    directory.mkdir()
    (directory / "counter_1.db").write_bytes(b"left by an earlier start")  # must go
    done = subprocess.run(
        [sys.executable, str(HELPER), "count", str(directory), str(out), str(K)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    pids = json.loads(done.stdout)
    assert len(set(pids)) == K
    alive = [(out / f"alive-{i}.prom").read_text() for i in range(K)]
    assert len(set(alive)) == 1, "every worker renders the same host-wide set"
    text = alive[0]

    hits = sum(i + 1 for i in range(K))
    labels = {"route": "blob", "method": "GET", "status": "200", "outcome": "hit"}
    assert _one(text, "mirror_http_requests_total", **labels) == hits
    assert _one(text, "mirror_http_requests_total", **{**labels, "outcome": "miss"}) == 0
    assert _one(text, "mirror_blob_bytes_served_total", source="warm") == 1000 * K
    assert _one(text, "mirror_request_duration_seconds_count", route="blob") == K
    assert _one(text, "mirror_request_duration_seconds_sum", route="blob") == 0.25 * K
    assert _one(text, "mirror_request_duration_seconds_bucket", route="blob", le="0.25") == K
    assert _one(text, "mirror_request_duration_seconds_bucket", route="blob", le="0.1") == 0
    # livesum: the workers' own values, added up
    assert _one(text, "mirror_fills_in_flight") == hits
    assert _one(text, "mirror_client_password_checks_in_progress", state="waiting") == K
    assert _one(text, "mirror_tier_bytes", tier="hot") == 1000 * hits
    assert _one(text, "mirror_tier_objects", tier="hot") == hits
    # mostrecent: the last one set, by whichever worker; presets of later workers do not hide
    # what an earlier one learned, and stay where nobody learned anything
    assert _one(text, "mirror_tier_bytes", tier="warm") == 5000 + K - 1
    assert _one(text, "mirror_tier_bytes", tier="cold") == 0
    remaining = {"upstream": "docker.io", "credential": "anonymous"}
    assert _one(text, "mirror_upstream_ratelimit_remaining", **remaining) == 77
    assert _one(text, "mirror_upstream_ratelimit_limit", **remaining) == 100
    assert _one(text, "mirror_upstream_up", upstream="docker.io") == 1
    assert math.isnan(_one(text, "mirror_upstream_up", upstream="ghcr.io"))
    ghcr = {"upstream": "ghcr.io", "credential": "anonymous"}
    assert math.isnan(_one(text, "mirror_upstream_ratelimit_remaining", **ghcr))
    assert _one(text, "mirror_events_queue_depth", endpoint="hook") == 5
    # liveall: one series per worker
    assert _per_pid(text, "mirror_open_fds") == {pid: 100 + i for i, pid in enumerate(pids)}
    assert _per_pid(text, "mirror_asyncio_tasks") == {pid: 10 + i for i, pid in enumerate(pids)}
    # min: the first worker's start
    started = _one(text, "mirror_start_time_seconds")
    assert 0 < started <= time.time()

    # the last worker was killed and forgotten: its counts stay, its live gauges go
    after = (out / "after.prom").read_text()
    assert _one(after, "mirror_http_requests_total", **labels) == hits
    assert _one(after, "mirror_fills_in_flight") == hits - K
    assert _one(after, "mirror_client_password_checks_in_progress", state="waiting") == K - 1
    assert _one(after, "mirror_tier_bytes", tier="hot") == 1000 * (hits - K)
    assert _per_pid(after, "mirror_open_fds").keys() == set(pids[:-1])
    assert _one(after, "mirror_tier_bytes", tier="warm") == 5000 + K - 1, "a host fact stays"
    assert _one(after, "mirror_start_time_seconds") == started
    assert not (directory / "counter_1.db").exists()


def test_metrics_in_one_process_stay_apart() -> None:
    """Without multiprocess mode (this test process): two Metrics count apart, gauges carry
    no pid, and what no upstream has said is NaN."""
    one, other = Metrics(), Metrics()
    one.prefill([("docker.io", "anonymous")])
    other.prefill([("docker.io", "anonymous")])
    one.request("blob", "GET", 200, "hit")
    one.process(fills=1, fds=7, tasks=3)
    one.tier_usage("hot", 10, 1)
    assert not one.multiprocess
    assert one.total("mirror_http_requests_total", outcome="hit") == 1
    assert other.total("mirror_http_requests_total", outcome="hit") == 0
    text = one.render().decode()
    assert _one(text, "mirror_open_fds") == 7
    assert _one(text, "mirror_tier_bytes", tier="hot") == 10
    assert math.isnan(other.read().pulls_left("docker.io"))
    assert _one(other.render().decode(), "mirror_tier_bytes", tier="hot") == 0


async def _text(client: aiohttp.ClientSession, url: str) -> str:
    async with client.get(url) as resp:
        assert resp.status == 200, url
        return await resp.text()


def _counters(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every counter sample but those of requests to neither manifests nor blobs (scrapes and
    probes count themselves as they go)."""
    return {
        (n, tuple(sorted(ls.items()))): v
        for n, ls, v in _samples(text)
        if n.endswith("_total") and ls.get("route", "blob") in ("blob", "manifest")
    }


def _answered(text: str) -> tuple[float, float]:
    """Blob GETs answered 200 as a miss and as a hit."""
    blob = {"route": "blob", "method": "GET", "status": "200"}
    miss = _one(text, "mirror_http_requests_total", **blob, outcome="miss")
    return miss, _one(text, "mirror_http_requests_total", **blob, outcome="hit")


async def _settled(client: aiohttp.ClientSession, url: str, answered: tuple[int, int]) -> None:
    """Until the worker at `url` has no fill in flight and the host has counted `answered`
    (a client has its last byte before the fill is committed and the request counted)."""
    deadline = time.monotonic() + 30
    while True:
        text = await _text(client, f"{url}/metrics")
        if _one(text, "mirror_fills_in_flight") == 0 and _answered(text) == answered:
            return
        assert time.monotonic() < deadline, text
        await asyncio.sleep(0.05)  # ok: polling a condition with a deadline


async def test_serving_workers_answer_for_the_host(
    sim: UpstreamSim, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Three `mirror serve` workers (each with a data directory of its own here): a blob is
    pulled through the first twice and through the second once; then a scrape through any
    worker shows the same counters, /readyz through the third, which never asked upstream,
    says the upstream is ok, and its status page counts every worker's requests. A killed,
    forgotten worker's counts stay; its descriptor series goes."""
    size = 300_000
    digest = sim.add_blob(b"w" * size)
    directory = tmp_path / "metrics"
    ports = [free_port() for _ in range(3)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    helper = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HELPER),
        "serve",
        str(directory),
        str(tmp_path),
        sim.url,
        *map(str, ports),
        cwd=PROJECT,
        env={**os.environ, **offline_builtins("")},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert helper.stdin is not None and helper.stdout is not None
    try:
        pids = [
            int((await asyncio.wait_for(helper.stdout.readline(), 30)).split()[2]) for _ in ports
        ]
        deadline = time.monotonic() + 30
        for url in urls:
            while True:
                try:
                    async with client.get(f"{url}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "w0.log").read_text()[-2000:]
                await asyncio.sleep(0.05)  # ok: polling a condition with a deadline
        # a miss, a hit; a miss in the other worker's cache
        for url, answered in ((urls[0], (1, 0)), (urls[0], (1, 1)), (urls[1], (2, 1))):
            async with client.get(f"{url}/v2/test/x/blobs/{digest}") as resp:
                assert resp.status == 200 and len(await resp.read()) == size
            await _settled(client, url, answered)

        texts = [await _text(client, f"{url}/metrics") for url in urls]
        counters = [_counters(t) for t in texts]
        assert counters[0] == counters[1] == counters[2]
        for text in texts:
            assert _answered(text) == (2, 1)
            assert _one(text, "mirror_upstream_bytes_total", upstream="docker.io") == 2 * size
            assert _one(text, "mirror_upstream_up", upstream="docker.io") == 1
        # each worker sampled its own descriptors when scraped: one series per worker
        fds = _per_pid(texts[2], "mirror_open_fds")
        assert fds.keys() == set(pids) and all(n > 0 for n in fds.values())

        async with client.get(f"{urls[2]}/readyz") as resp:
            assert (await resp.json())["upstreams"]["docker.io"] == "ok"
        page = await _text(client, f"{urls[2]}/_status")
        assert "<td>1 of 3</td>" in page, "requests answered from the cache, host-wide"

        helper.stdin.write(b"kill 1\n")
        await helper.stdin.drain()
        assert (await asyncio.wait_for(helper.stdout.readline(), 30)).split() == [
            b"forgot",
            str(pids[1]).encode(),
        ]
        for url in (urls[0], urls[2]):
            text = await _text(client, f"{url}/metrics")
            assert _counters(text) == counters[0], "what the killed worker counted stays"
            assert _per_pid(text, "mirror_open_fds").keys() == {pids[0], pids[2]}
        helper.stdin.close()
        assert await asyncio.wait_for(helper.wait(), 60) == 0, "the others stopped cleanly"
    finally:
        if helper.returncode is None:
            os.killpg(helper.pid, signal.SIGKILL)  # the helper and the workers it forked
            await helper.wait()
