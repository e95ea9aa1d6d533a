"""kill -9 of a real mirror process in the middle of fills, then a restart on the same data: no
partial or unverified blob is ever served, temp files are swept, the index agrees with the
files (fsck finds nothing), and the blobs come whole on the next pull."""

from __future__ import annotations

import asyncio
import hashlib
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
        sim: UpstreamSim, mirror_process: Callable[..., MirrorProcess], client: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    blobs = [hashlib.sha256(str(i).encode()).digest() * (4 * MiB // 32) for i in range(3)]
    digests = [sim.add_blob(b) for b in blobs]
    holds = [sim.fault(d, "slow", part=int(1.5 * MiB)) for d in digests]
    proc = await asyncio.to_thread(mirror_process(sim.url, data).start)
    pulls = [asyncio.create_task(client.get(f"{proc.url}/v2/crash/x/blobs/{d}")) for d in digests]
    for hold in holds:
        await hold.reached.wait()
    deadline = time.monotonic() + 10
    while len(list((data / "tmp").iterdir())) < len(digests):   # every fill is writing
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
    assert not [p for p in (data / "blobs").rglob("*") if p.is_file()], "nothing unverified was kept"
    sim.clear_faults()
    proc = await asyncio.to_thread(mirror_process(sim.url, data).start)
    assert list((data / "tmp").iterdir()) == [], "the crash's partial files were swept"
    for digest, body in zip(digests, blobs):
        async with client.get(f"{proc.url}/v2/crash/x/blobs/{digest}") as resp:
            assert resp.status == 200 and await resp.read() == body
    await asyncio.to_thread(proc.stop)
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "mirror", "fsck", "--data-dir", str(data)],
                                   cwd=PROJECT, capture_output=True, text=True)
    assert done.returncode == 0 and "clean" in done.stdout, done.stdout + done.stderr
