"""With worker processes the host exports one set of metrics: real forked workers
(tests/metric_workers.py) share a metrics directory, and whichever of them renders, counters
are the sums of what each counted, each gauge merges as its mode says, and a worker that
exits leaves its counts but not its live gauges. Whole `mirror serve` workers answer /metrics,
/readyz and the status page for the host. And one process without that mode keeps each
Metrics to itself, as before."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import PROJECT
from prometheus_client.parser import text_string_to_metric_families

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
