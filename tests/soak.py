"""A mixed soak against a real mirror process: warm manifests and blobs, HEADs, Range reads,
cold fills (new blobs, several clients each), and clients that disconnect mid-stream, for a
given time; the upstream is the simulator in this process. A small warm budget keeps eviction
running throughout.

Every complete blob body is checked against its digest. The mirror's open descriptors and
asyncio tasks (its /metrics) and RSS (/proc) are sampled through the run; `start` is taken
after a warm-up and `end` after the load stopped and every client connection closed, so a
leak shows as end > start. `tests/test_soak.py` runs it briefly; `bench/soak.py` runs it for
ten minutes and writes the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from images import ACCEPT_ALL, Image, make_image
from registry import free_port
from upstream_sim import UpstreamSim

PROJECT = Path(__file__).resolve().parent.parent
#: (action, weight) of what each client does next.
MIX = (
    ("manifest_tag", 25),
    ("manifest_digest", 10),
    ("head", 10),
    ("warm_blob", 25),
    ("range", 15),
    ("cold_fill", 5),
    ("disconnect", 10),
)
WORKERS = 12


@dataclass
class Sample:
    at: float
    #: Descriptors in all, and those on blob or partial files (the ones a request could
    #: leak; the rest are sockets and per-thread SQLite connections, bounded by the pools).
    fds: int
    blob_files: int
    tasks: int
    rss_kib: int


@dataclass
class Report:
    seconds: float = 0.0
    requests: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    server_errors: int = 0
    wrong_bytes: int = 0
    client_errors: list[str] = field(default_factory=list)
    bytes_read: int = 0
    start: Sample | None = None
    end: Sample | None = None
    peak_rss_kib: int = 0
    #: From the mirror's /metrics at the end: blobs evicted, fills that committed or failed.
    evicted: float = 0.0
    fills: dict[str, float] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)

    def total(self) -> int:
        return sum(self.requests.values())

    def as_dict(self) -> dict[str, Any]:
        out = {
            k: v
            for k, v in vars(self).items()
            if k not in ("requests", "statuses", "start", "end", "samples")
        }
        out |= {
            "requests": dict(self.requests),
            "statuses": dict(self.statuses),
            "total_requests": self.total(),
            "start": asdict(self.start) if self.start else None,
            "end": asdict(self.end) if self.end else None,
            "samples": [asdict(s) for s in self.samples],
        }
        return out


class Soak:
    """The simulator, the mirror process and the clients, for one run."""

    def __init__(self, data_dir: Path, warm_budget: str = "192MiB") -> None:
        self.data_dir = data_dir.resolve()
        self.warm_budget = warm_budget
        self.sim = UpstreamSim()
        self.images: dict[str, Image] = {}
        self.blobs: dict[str, bytes] = {}
        self.report = Report()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._cold_seq = 0
        self._rng = random.Random(1)

    async def __aenter__(self) -> Soak:
        await self.sim.start()
        for i in range(12):
            sizes = [8_000 + 3_000 * i, 300_000 + 50_000 * i] + ([4_000_000] if i % 3 == 0 else [])
            image = make_image(9000 + i, sizes)
            self.sim.add_image(f"soak/app{i}", "latest", image)
            self.images[f"soak/app{i}"] = image
            self.blobs.update(image.blobs)
        env = {
            **os.environ,
            "MIRROR_WARM__MAX_BYTES": self.warm_budget,
            "MIRROR_ACCESS_LOG": "false",
            "MIRROR_EVICTION__INTERVAL": "2",
        }
        log = (self.data_dir.parent / "soak-mirror.log").open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mirror",
                "serve",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--data-dir",
                str(self.data_dir),
                "--upstream",
                self.sim.url,
            ],
            cwd=PROJECT,
            env=env,
            stdout=log,
            stderr=log,
        )
        log.close()
        await self._wait_ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            await asyncio.to_thread(self.proc.wait, 30)
        await self.sim.stop()

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession(trust_env=False) as session:
            while True:
                assert self.proc is not None and self.proc.poll() is None, "the mirror exited"
                try:
                    async with session.get(self.url + "/v2/") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "the mirror did not start"
                await asyncio.sleep(0.05)  # ok: polling a condition with a deadline

    # -- measurements ----------------------------------------------------------------------

    async def sample(self, session: aiohttp.ClientSession) -> Sample:
        async with session.get(self.url + "/metrics") as resp:
            text = await resp.text()
        assert self.proc is not None

        def gauge(name: str) -> int:
            found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
            return int(float(found[1])) if found else -1

        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        rss = int(re.search(r"VmRSS:\s+(\d+)", status)[1])  # type: ignore[index]
        blob_files = 0
        held = (str(self.data_dir / "blobs"), str(self.data_dir / "tmp"))
        for fd in Path(f"/proc/{self.proc.pid}/fd").iterdir():
            with contextlib.suppress(OSError):  # closed meanwhile
                blob_files += os.readlink(fd).startswith(held)
        found = Sample(
            time.monotonic(),
            gauge("mirror_open_fds"),
            blob_files,
            gauge("mirror_asyncio_tasks"),
            rss,
        )
        self.report.peak_rss_kib = max(self.report.peak_rss_kib, rss)
        self.report.samples.append(found)
        return found

    async def settled(self, baseline: Sample | None = None) -> Sample:
        """A sample once no fill runs and (against `baseline`) descriptors are back down,
        or after 25 s (idle upstream connections close after 15 s): whatever is still held
        then is what the report shows."""
        deadline = time.monotonic() + 25
        async with aiohttp.ClientSession(
            trust_env=False, connector=aiohttp.TCPConnector(force_close=True)
        ) as s:
            while True:
                async with s.get(self.url + "/metrics") as resp:
                    fills = re.search(
                        r"^mirror_fills_in_flight (\S+)$", await resp.text(), re.MULTILINE
                    )
                got = await self.sample(s)
                idle = fills is not None and float(fills[1]) == 0
                if (
                    idle and (baseline is None or (got.fds <= baseline.fds and not got.blob_files))
                ) or time.monotonic() > deadline:
                    return got
                await asyncio.sleep(0.1)  # ok: polling a condition with a deadline

    # -- load ------------------------------------------------------------------------------

    def _count(self, action: str, status: int) -> None:
        self.report.requests[action] += 1
        self.report.statuses[str(status)] += 1
        if status >= 500:
            self.report.server_errors += 1

    def _check(self, digest: str, body: bytes) -> None:
        self.report.bytes_read += len(body)
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            self.report.wrong_bytes += 1

    async def _manifest(self, session: aiohttp.ClientSession, by_digest: bool) -> None:
        repo = self._rng.choice(list(self.images))
        ref = self.images[repo].digest if by_digest else "latest"
        async with session.get(
            f"{self.url}/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT_ALL}
        ) as resp:
            body = await resp.read()
            self._count("manifest_digest" if by_digest else "manifest_tag", resp.status)
            if resp.status == 200:
                self._check(self.images[repo].digest, body)

    async def _head(self, session: aiohttp.ClientSession) -> None:
        digest = self._rng.choice(list(self.blobs))
        async with session.head(f"{self.url}/v2/soak/app0/blobs/{digest}") as resp:
            self._count("head", resp.status)

    async def _warm_blob(self, session: aiohttp.ClientSession) -> None:
        digest = self._rng.choice(list(self.blobs))
        async with session.get(f"{self.url}/v2/soak/app0/blobs/{digest}") as resp:
            body = await resp.read()
            self._count("warm_blob", resp.status)
            if resp.status == 200:
                self._check(digest, body)

    async def _range(self, session: aiohttp.ClientSession) -> None:
        digest, data = self._rng.choice(list(self.blobs.items()))
        start = self._rng.randrange(len(data))
        end = min(len(data), start + self._rng.randrange(1, 200_000))
        headers = {"Range": f"bytes={start}-{end - 1}"}
        async with session.get(f"{self.url}/v2/soak/app0/blobs/{digest}", headers=headers) as resp:
            body = await resp.read()
            self._count("range", resp.status)
            if resp.status == 206 and body != data[start:end]:
                self.report.wrong_bytes += 1

    async def _cold_fill(self, session: aiohttp.ClientSession) -> None:
        """A blob no one asked for yet, fetched by 1-4 clients at once; then forgotten by
        the simulator (it is never asked for again), so the run's memory stays flat."""
        self._cold_seq += 1
        size = self._rng.randrange(500_000, 4_000_000)
        data = hashlib.sha256(b"cold-%d" % self._cold_seq).digest() * (size // 32)
        digest = self.sim.add_blob(data)
        url = f"{self.url}/v2/soak/cold/blobs/{digest}"

        async def one() -> None:
            async with session.get(url) as resp:
                body = await resp.read()
                self._count("cold_fill", resp.status)
                if resp.status == 200:
                    self._check(digest, body)

        await asyncio.gather(*(one() for _ in range(self._rng.randint(1, 4))))
        del self.sim.blobs[digest]

    async def _disconnect(self) -> None:
        """Ask for the largest blob, read a little, and drop the connection."""
        digest = max(self.blobs, key=lambda d: len(self.blobs[d]))
        async with aiohttp.ClientSession(trust_env=False) as own:
            async with own.get(f"{self.url}/v2/soak/app0/blobs/{digest}") as resp:
                await resp.content.readexactly(min(65536, len(self.blobs[digest])))
                self._count("disconnect", resp.status)
                resp.close()

    async def _worker(self, session: aiohttp.ClientSession, until: float) -> None:
        actions = [a for a, _ in MIX]
        weights = [w for _, w in MIX]
        while time.monotonic() < until:
            action = self._rng.choices(actions, weights)[0]
            try:
                if action.startswith("manifest"):
                    await self._manifest(session, action == "manifest_digest")
                elif action == "head":
                    await self._head(session)
                elif action == "warm_blob":
                    await self._warm_blob(session)
                elif action == "range":
                    await self._range(session)
                elif action == "cold_fill":
                    await self._cold_fill(session)
                else:
                    await self._disconnect()
            except (TimeoutError, aiohttp.ClientError) as e:
                if len(self.report.client_errors) < 50:
                    self.report.client_errors.append(f"{action}: {type(e).__name__}: {e}")

    async def run(self, seconds: float, sample_every: float = 10.0) -> Report:
        """Warm up (pull every image once), take the start sample, load for `seconds`,
        close every client connection, take the end sample."""
        async with aiohttp.ClientSession(trust_env=False) as session:
            for repo in self.images:
                await self._manifest_of(session, repo)
            for digest in self.blobs:
                async with session.get(f"{self.url}/v2/soak/app0/blobs/{digest}") as resp:
                    self._check(digest, await resp.read())
        self.report.start = await self.settled()
        began = time.monotonic()
        until = began + seconds
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(trust_env=False, timeout=timeout) as session:
            workers = [asyncio.ensure_future(self._worker(session, until)) for _ in range(WORKERS)]
            while time.monotonic() < until:
                await asyncio.sleep(
                    min(sample_every, max(0.0, until - time.monotonic()))
                )  # ok: sampling pace
                await self.sample(session)
            await asyncio.gather(*workers)
        self.report.seconds = time.monotonic() - began
        self.report.end = await self.settled(self.report.start)
        await self._totals()
        return self.report

    async def _totals(self) -> None:
        async with aiohttp.ClientSession(trust_env=False) as session:
            async with session.get(self.url + "/metrics") as resp:
                text = await resp.text()
        for line in text.splitlines():
            if line.startswith("mirror_evictions_total{"):
                self.report.evicted += float(line.rsplit(" ", 1)[1])
            elif line.startswith("mirror_fill_duration_seconds_count{"):
                result = re.search(r'result="(\w+)"', line)
                if result:
                    self.report.fills[result[1]] = self.report.fills.get(result[1], 0) + float(
                        line.rsplit(" ", 1)[1]
                    )

    async def _manifest_of(self, session: aiohttp.ClientSession, repo: str) -> None:
        async with session.get(
            f"{self.url}/v2/{repo}/manifests/latest", headers={"Accept": ACCEPT_ALL}
        ) as resp:
            self._check(self.images[repo].digest, await resp.read())


async def soak(seconds: float, data_dir: Path | None = None, sample_every: float = 10.0) -> Report:
    """One soak run in a fresh data directory (a temporary one unless given)."""
    if data_dir is not None:
        async with Soak(data_dir) as run:
            return await run.run(seconds, sample_every)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        async with Soak(Path(tmp) / "data") as run:
            return await run.run(seconds, sample_every)
