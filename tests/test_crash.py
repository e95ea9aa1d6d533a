"""kill -9 of a real mirror process in the middle of fills or of an eviction pass, then a
restart on the same data: no partial or unverified blob is ever served, temp files are swept,
the index agrees with the files (fsck finds nothing), and the blobs come whole on the next
pull."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from conftest import PROJECT, MirrorProcess
from upstream_sim import UpstreamSim

MiB = 1024 * 1024


async def test_kill_9_during_fills_loses_and_corrupts_nothing(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    blobs = [hashlib.sha256(str(i).encode()).digest() * (4 * MiB // 32) for i in range(3)]
    digests = [sim.add_blob(b) for b in blobs]
    holds = [sim.fault(d, "slow", part=int(1.5 * MiB)) for d in digests]
    proc = await asyncio.to_thread(mirror_process(sim.url, data).start)
    pulls = [asyncio.create_task(client.get(f"{proc.url}/v2/crash/x/blobs/{d}")) for d in digests]
    for hold in holds:
        await hold.reached.wait()
    deadline = time.monotonic() + 10
    while len(list((data / "tmp").iterdir())) < len(digests):  # every fill is writing
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)  # ok: polling a condition with a deadline
    await asyncio.to_thread(proc.stop, signal.SIGKILL)
    for pull in pulls:
        try:
            resp = await pull
            body = await resp.read()
            assert len(body) < 4 * MiB, "a killed fill never completes a transfer"
        except aiohttp.ClientError:
            pass
    assert not [p for p in (data / "blobs").rglob("*") if p.is_file()], (
        "nothing unverified was kept"
    )
    sim.clear_faults()
    proc = await asyncio.to_thread(mirror_process(sim.url, data).start)
    assert list((data / "tmp").iterdir()) == [], "the crash's partial files were swept"
    for digest, body in zip(digests, blobs, strict=False):
        async with client.get(f"{proc.url}/v2/crash/x/blobs/{digest}") as resp:
            assert resp.status == 200 and await resp.read() == body
    await asyncio.to_thread(proc.stop)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mirror", "fsck", "--data-dir", str(data)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "clean" in done.stdout, done.stdout + done.stderr


def _write_store(data: Path, count: int, size: int) -> dict[str, bytes]:
    """Blob files laid out as the mirror keeps them (it adopts them at start): digest → bytes."""
    made: dict[str, bytes] = {}
    for i in range(count):
        body = hashlib.sha256(b"evict-%d" % i).digest() * (size // 32)
        hexd = hashlib.sha256(body).hexdigest()
        folder = data / "blobs" / "sha256" / hexd[:2]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / hexd).write_bytes(body)
        made["sha256:" + hexd] = body
    return made


async def _fsck(data: Path) -> dict[str, object]:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mirror", "fsck", "--json", "--data-dir", str(data)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
    )
    report: dict[str, object] = json.loads(done.stdout)
    return report


async def test_kill_9_during_an_eviction_pass_loses_and_corrupts_nothing(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """5,000 blobs against a budget that fits a few hundred: bounded passes of 250 run
    back to back; the process is killed once the first has finished, so mid-way through a
    later one. Right after: no record points at a missing file (records go first) and no file
    is corrupt. After a restart, which adopts the files whose records had gone, fsck is clean
    and every blob still held is served whole."""
    data = tmp_path / "data"
    made = await asyncio.to_thread(_write_store, data, 5_000, 64)
    env = {
        "MIRROR_WARM__MAX_BYTES": "20000",
        "MIRROR_EVICTION__INTERVAL": "0.1",
        "MIRROR_EVICTION__MAX_PER_PASS": "250",
    }
    proc = await asyncio.to_thread(mirror_process(sim.url, data, env=env).start)
    deadline = time.monotonic() + 60
    while "eviction pass:" not in proc.log.read_text():
        assert time.monotonic() < deadline, "no eviction pass finished"
        await asyncio.sleep(0.01)  # ok: polling a condition with a deadline
    await asyncio.to_thread(proc.stop, signal.SIGKILL)
    left = {p.name for p in (data / "blobs").rglob("*") if p.is_file()}
    assert 0 < len(left) < len(made), "killed part-way through the eviction"
    report = await _fsck(data)
    assert report["records_without_files"] == [] and report["corrupt"] == []
    proc = await asyncio.to_thread(mirror_process(sim.url, data).start)
    sample = sorted(d for d in made if d.split(":")[1] in left)[:20]
    for digest in sample:
        async with client.get(f"{proc.url}/v2/crash/x/blobs/{digest}") as resp:
            assert resp.status == 200 and await resp.read() == made[digest]
    await asyncio.to_thread(proc.stop)
    report = await _fsck(data)
    assert report["clean"], report
