"""`mirror serve --workers 3` as a real process: one port, one data directory, and still one
upstream fetch per blob and one revalidation per tag TTL for the whole host, a fill carried on
by another worker when its owner is killed, and a supervisor that replaces a dead worker."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from conftest import PROJECT, MirrorProcess, lock_holder
from images import make_image
from prometheus_client.parser import text_string_to_metric_families
from upstream_sim import UpstreamSim

MiB = 1024 * 1024
WORKERS = 3


def _config(tmp_path: Path, text: str) -> dict[str, str]:
    config = tmp_path / "workers.toml"
    config.write_text(text)
    return {"MIRROR_CONFIG": str(config)}


async def _started(
    make: Callable[..., MirrorProcess], url: str, data: Path, env: dict[str, str] | None = None
) -> MirrorProcess:
    """`mirror serve --workers 3`, once every worker serves (the supervisor says so)."""
    proc = await asyncio.to_thread(make(url, data, env, workers=WORKERS).start)
    deadline = time.monotonic() + 20
    while f"{WORKERS} workers serving" not in proc.log.read_text():
        assert time.monotonic() < deadline, proc.log.read_text()[-2000:]
        await asyncio.sleep(0.05)  # ok: polling a condition with a deadline
    return proc


async def _workers_seen(proc: MirrorProcess, path: str, answered: int) -> set[str]:
    """Which workers answered the `answered` requests for `path`, from the access log's
    `worker` field (each worker writes its lines a batch at a time: wait for all of them)."""
    deadline = time.monotonic() + 10
    while True:
        lines = [
            line
            for line in proc.log.read_text().splitlines()
            if "logger=mirror.access" in line and f"path={path} " in line
        ]
        if len(lines) >= answered:
            break
        assert time.monotonic() < deadline, lines
        await asyncio.sleep(0.05)  # ok: polling a condition with a deadline
    found = set()
    for line in lines:
        m = re.search(r"\bworker=(\d+)", line)
        assert m, line
        found.add(m[1])
    return found


async def _get(url: str) -> tuple[int, bytes]:
    """One GET on a connection of its own (so that the kernel may hand it to any worker)."""
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True), trust_env=False
        ) as session,
        session.get(url) as resp,
    ):
        return resp.status, await resp.read()


async def test_twenty_clients_over_three_workers_cost_one_upstream_get(
    sim: UpstreamSim, mirror_process: Callable[..., MirrorProcess], tmp_path: Path
) -> None:
    blob = os.urandom(32 * MiB)
    digest = sim.add_blob(blob)
    proc = await _started(mirror_process, sim.url, tmp_path / "data")
    path = f"/v2/w/x/blobs/{digest}"
    answers = await asyncio.gather(*(_get(proc.url + path) for _ in range(20)))
    assert all(status == 200 and body == blob for status, body in answers)
    assert sim.requests[("GET", path)] == 1, sim.requests
    assert len(await _workers_seen(proc, path, 20)) >= 2, "the clients reached several workers"
    outcomes = [
        re.search(r"\boutcome=(\w+)", line)[1]  # type: ignore[index]
        for line in proc.log.read_text().splitlines()
        if "logger=mirror.access" in line and f"path={path} " in line
    ]
    assert outcomes.count("miss") == 1, outcomes  # the others followed that one fetch
    # afterwards every worker has it as a hit, with no upstream request
    again = await asyncio.gather(*(_get(proc.url + path) for _ in range(12)))
    assert all(status == 200 and body == blob for status, body in again)
    assert sim.requests[("GET", path)] == 1


async def test_kill_9_of_the_filling_worker_is_carried_on_by_another(
    sim: UpstreamSim, mirror_process: Callable[..., MirrorProcess], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    blob = os.urandom(32 * MiB)
    digest = sim.add_blob(blob)
    hold = sim.fault(digest, "slow", part=12 * MiB, times=1)
    proc = await _started(mirror_process, sim.url, data)
    url = f"{proc.url}/v2/w/x/blobs/{digest}"

    async def pull() -> bytes:
        """A client that tries again when its connection is cut (as docker and containerd do)."""
        for _ in range(5):
            try:
                status, body = await _get(url)
            except aiohttp.ClientError:
                continue
            if status == 200 and len(body) == len(blob):
                return body
        raise AssertionError("no whole blob after 5 tries")

    first = asyncio.create_task(pull())
    await hold.reached.wait()
    lock = data / "run" / "fills" / f"{digest.split(':')[1]}.lock"
    partial = data / "tmp" / f"{digest.split(':')[1]}.partial"
    deadline = time.monotonic() + 10
    # the fill writes what it gathered a MiB at a time: most of the 12 MiB are on disk
    while not (lock.exists() and lock.read_bytes() and partial.stat().st_size >= 8 * MiB):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)  # ok: polling a condition with a deadline
    owner = json.loads(lock.read_bytes())["pid"]
    others = [asyncio.create_task(pull()) for _ in range(9)]
    assert proc.proc is not None
    followers = _children(proc.proc.pid) - {owner}
    deadline = time.monotonic() + 10
    while not any(_holds(pid, partial) for pid in followers):  # another worker follows it
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)  # ok: polling a condition with a deadline
    os.kill(owner, signal.SIGKILL)
    bodies = await asyncio.gather(first, *others)
    assert all(body == blob for body in bodies), "every client got the right bytes"
    gets = [s for s in sim.log if s.method == "GET" and s.path.endswith(digest)]
    assert len(gets) == 2, gets
    assert gets[1].headers.get("Range", "").startswith("bytes="), "the fill was resumed"
    resumed_at = int(gets[1].headers["Range"][6:].rstrip("-"))
    assert resumed_at >= 8 * MiB, "the bytes the killed worker had written were kept"
    # whichever worker took it over (a follower, or a client's retry), it says so
    assert f"carrying the fill of {digest} on from byte {resumed_at}" in proc.log.read_text()
    blob_file = data / "blobs" / "sha256" / digest[7:9] / digest[7:]
    assert hashlib.sha256(blob_file.read_bytes()).hexdigest() == digest[7:]
    deadline = time.monotonic() + 20  # the supervisor starts a replacement
    while proc.log.read_text().count(f"{WORKERS} workers serving") < 2:
        assert time.monotonic() < deadline, proc.log.read_text()[-2000:]
        await asyncio.sleep(0.05)  # ok: polling a condition with a deadline
    assert f"(pid {owner}) exited with signal 9" in proc.log.read_text()
    await asyncio.to_thread(proc.stop)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mirror", "fsck", "--data-dir", str(data)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "clean" in done.stdout, done.stdout + done.stderr


async def test_a_tag_past_its_ttl_through_every_worker_costs_one_head(
    sim: UpstreamSim, mirror_process: Callable[..., MirrorProcess], tmp_path: Path
) -> None:
    image = make_image(7, [4096])
    sim.add_image("w/tag", "v1", image)
    env = _config(tmp_path, '[upstreams."docker.io"]\ntag_ttl = 1\n')
    proc = await _started(mirror_process, sim.url, tmp_path / "data", env)
    path = "/v2/w/tag/manifests/v1"
    status, body = await _get(proc.url + path)
    assert status == 200 and body == image.data
    checked = time.monotonic()
    while time.monotonic() < checked + 1.2:  # the record's TTL runs out (time must pass)
        await asyncio.sleep(0.1)  # ok: waiting for a TTL to expire, not for an event
    heads_before = sim.requests[("HEAD", path)]
    answers = await asyncio.gather(*(_get(proc.url + path) for _ in range(24)))
    assert all(status == 200 and body == image.data for status, body in answers)
    assert sim.requests[("HEAD", path)] - heads_before == 1, sim.requests
    assert sim.requests[("GET", path)] == 1
    assert len(await _workers_seen(proc, path, 25)) == WORKERS, "every worker was asked"


async def test_sighup_reaches_every_worker_and_sigterm_stops_them_all(
    sim: UpstreamSim, mirror_process: Callable[..., MirrorProcess], tmp_path: Path
) -> None:
    proc = await _started(mirror_process, sim.url, tmp_path / "data")
    assert proc.proc is not None
    workers = _children(proc.proc.pid)
    assert len(workers) == WORKERS
    proc.proc.send_signal(signal.SIGHUP)
    status, _ = await _get(f"{proc.url}/healthz")
    assert status == 200 and _children(proc.proc.pid) == workers, "no worker died of SIGHUP"
    await asyncio.to_thread(proc.stop)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    assert "all workers have exited" in proc.log.read_text()


async def test_a_fill_followed_by_every_worker_counts_once_in_flight(
    sim: UpstreamSim, mirror_process: Callable[..., MirrorProcess], tmp_path: Path
) -> None:
    """`mirror_fills_in_flight` is the host's fills: one fill, held part-way upstream and
    streamed by clients of several workers, is 1 once each worker has sampled itself (as it
    answers a scrape), not one per worker that follows it."""
    data = tmp_path / "data"
    blob = os.urandom(16 * MiB)
    digest = sim.add_blob(blob)
    hold = sim.fault(digest, "slow", part=4 * MiB, times=1)
    proc = await _started(mirror_process, sim.url, data)
    url = f"{proc.url}/v2/w/x/blobs/{digest}"
    pulls = [asyncio.create_task(_get(url)) for _ in range(12)]
    await hold.reached.wait()
    partial = data / "tmp" / f"{digest.split(':')[1]}.partial"
    assert proc.proc is not None
    pids = {proc.proc.pid} | _children(proc.proc.pid)
    deadline = time.monotonic() + 10
    while sum(_holds(pid, partial) for pid in pids) < 2:  # the filler and a follower
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)  # ok: polling a condition with a deadline
    try:
        scrapes = 0
        deadline = time.monotonic() + 20
        while len(await _workers_seen(proc, "/metrics", scrapes)) < WORKERS:
            assert time.monotonic() < deadline
            answers = await asyncio.gather(*(_get(f"{proc.url}/metrics") for _ in range(6)))
            scrapes += len(answers)
        # every worker has sampled itself: a scrape from now on sums what each one set (one
        # of the scrapes above may have been rendered before the filler's own sample)
        _, body = await _get(f"{proc.url}/metrics")
        found = re.search(rb"^mirror_fills_in_flight (\S+)$", body, re.MULTILINE)
        assert found is not None and float(found[1]) == 1.0, found
    finally:
        hold.gate.set()  # a failed assertion leaves no fill for the stop to wait out
    assert all(answer == (200, blob) for answer in await asyncio.gather(*pulls))
    assert sim.requests[("GET", f"/v2/w/x/blobs/{digest}")] == 1


def _holds(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` open."""
    try:
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


def _children(pid: int) -> set[int]:
    found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {int(c) for c in found}


async def test_a_pull_budget_below_its_floor_is_known_to_every_worker(
    sim: UpstreamSim, mirror_process: Callable[..., MirrorProcess], tmp_path: Path
) -> None:
    """Docker Hub says 3 pulls are left (floor 10) on the first pull, through one worker: past
    the tag's TTL, no worker spends a pull on revalidating it — each serves it as cached."""
    image = make_image(8, [4096])
    sim.add_image("w/budget", "v1", image)
    sim.rate_limit(limit=100, remaining=3)
    env = _config(tmp_path, '[upstreams."docker.io"]\ntag_ttl = 1\npull_budget_floor = 10\n')
    proc = await _started(mirror_process, sim.url, tmp_path / "data", env)
    path = "/v2/w/budget/manifests/v1"
    status, body = await _get(proc.url + path)
    assert status == 200 and body == image.data
    checked = time.monotonic()
    while time.monotonic() < checked + 1.2:  # the record's TTL runs out (time must pass)
        await asyncio.sleep(0.1)  # ok: waiting for a TTL to expire, not for an event
    answers = await asyncio.gather(*(_get(proc.url + path) for _ in range(24)))
    assert all(status == 200 and body == image.data for status, body in answers)
    assert sim.requests[("HEAD", path)] == 0, sim.requests
    assert sim.requests[("GET", path)] == 1
    assert len(await _workers_seen(proc, path, 25)) == WORKERS, "every worker was asked"


async def test_metrics_through_any_worker_add_up_what_every_worker_answered(
    sim: UpstreamSim, mirror_process: Callable[..., MirrorProcess], tmp_path: Path
) -> None:
    """Thirty manifest pulls and ten blob pulls spread over three workers: a scrape through
    any of them counts all forty, and the blob bytes they all sent."""
    image = make_image(9, [64 * 1024])
    sim.add_image("w/metrics", "v1", image)
    proc = await _started(mirror_process, sim.url, tmp_path / "data")
    manifest = f"{proc.url}/v2/w/metrics/manifests/v1"
    layer, data = max(image.blobs.items(), key=lambda blob: len(blob[1]))
    pulls = [_get(manifest) for _ in range(30)]
    pulls += [_get(f"{proc.url}/v2/w/metrics/blobs/{layer}") for _ in range(10)]
    assert all(status == 200 for status, _ in await asyncio.gather(*pulls))
    await _workers_seen(proc, "/v2/w/metrics/manifests/v1", 30)
    assert len(await _workers_seen(proc, "/v2/w/metrics/manifests/v1", 30)) >= 2
    scrapes = [_get(f"{proc.url}/metrics") for _ in range(9)]
    for status, text in await asyncio.gather(*scrapes):
        assert status == 200
        samples = [s for f in text_string_to_metric_families(text.decode()) for s in f.samples]
        manifests = sum(
            s.value
            for s in samples
            if s.name == "mirror_http_requests_total" and s.labels.get("route") == "manifest"
        )
        blobs = sum(
            s.value
            for s in samples
            if s.name == "mirror_http_requests_total" and s.labels.get("route") == "blob"
        )
        served = sum(s.value for s in samples if s.name == "mirror_blob_bytes_served_total")
        assert (manifests, blobs, served) == (30, 10, 10 * len(data))
    assert len(await _workers_seen(proc, "/metrics", 9)) >= 2, "scraped through several"
    for status, body in await asyncio.gather(*(_get(f"{proc.url}/readyz") for _ in range(9))):
        assert status == 200 and json.loads(body)["upstreams"]["docker.io"] == "ok"
    for status, page in await asyncio.gather(*(_get(f"{proc.url}/_status") for _ in range(9))):
        assert status == 200 and b" of 40</td>" in page, "the status page counts the host"
    assert len(await _workers_seen(proc, "/readyz", 9)) >= 2

    # a worker killed: what it counted stays counted, its own series (descriptors) go
    assert proc.proc is not None
    victim = min(_children(proc.proc.pid))
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while proc.log.read_text().count(f"{WORKERS} workers serving") < 2:
        assert time.monotonic() < deadline, proc.log.read_text()[-2000:]
        await asyncio.sleep(0.05)  # ok: polling a condition with a deadline
    status, text = await _get(f"{proc.url}/metrics")
    samples = [s for f in text_string_to_metric_families(text.decode()) for s in f.samples]
    blobs = sum(
        s.value
        for s in samples
        if s.name == "mirror_http_requests_total" and s.labels.get("route") == "blob"
    )
    fds = {s.labels["pid"] for s in samples if s.name == "mirror_open_fds"}
    assert blobs == 10 and str(victim) not in fds


async def test_one_worker_runs_the_evictor_and_another_takes_over_when_it_dies(
    sim: UpstreamSim, mirror_process: Callable[..., MirrorProcess], tmp_path: Path
) -> None:
    """The periodic eviction passes are one worker's (it holds run/locks/evictor.lead); when
    it is killed, another worker holds the lead within a pass interval."""
    env = _config(tmp_path, "[eviction]\ninterval = 0.2\n")
    data = tmp_path / "data"
    proc = await _started(mirror_process, sim.url, data, env)
    lead = data / "run" / "locks" / "evictor.lead"
    assert proc.proc is not None
    workers = _children(proc.proc.pid)
    deadline = time.monotonic() + 10
    while lock_holder(lead) is None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)  # ok: polling a condition with a deadline
    first = lock_holder(lead)
    assert first in workers
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while lock_holder(lead) in (None, first):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)  # ok: polling a condition with a deadline
    assert lock_holder(lead) in _children(proc.proc.pid)
