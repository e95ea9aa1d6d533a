"""Tier benchmarks (run by hand; numbers go to the README):

eviction   an eviction pass over N indexed warm blobs (default 100,000) for each policy:
           the pass's wall time and the event loop's worst stall meanwhile (a 5 ms ticker)
tracking   the hit path with access tracking on and off: wrk against a small (hot) blob and
           a manifest by tag, and curl of a 256 MiB warm blob, against a real `mirror serve`
           whose `Accesses.hit` is replaced by a no-op for "off"

  .venv/bin/python bench/tiers.py eviction [--blobs 100000]
  .venv/bin/python bench/tiers.py tracking   # needs wrk, curl, and the bench upstream:
                                             # bash bench/upstream.sh start
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from mirror.cache import open_cache  # noqa: E402
from mirror.config import load_config  # noqa: E402
from mirror.metrics import Metrics  # noqa: E402
from mirror.oci.reference import parse_digest  # noqa: E402
from mirror.policies import POLICIES  # noqa: E402
from mirror.store.index import BlobIndex  # noqa: E402
from mirror.store.layout import Layout  # noqa: E402


def _populate(layout: Layout, index: BlobIndex, n: int, size: int) -> None:
    """n warm blobs: files of `size` bytes (content need not match: nothing re-hashes here)
    and index rows with spread access times and hit counts."""
    now = time.time()
    rows = []
    payload = b"x" * size
    for i in range(n):
        hexd = hashlib.sha256(i.to_bytes(8, "big")).hexdigest()
        path = layout.blobs / "sha256" / hexd[:2] / hexd
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        rows.append((parse_digest(f"sha256:{hexd}"), "warm", size, now - (n - i)))
    index.record_many(rows)
    with index.db:
        index.db.executemany(
            "UPDATE blobs SET hits = ? WHERE digest = ?",
            ((i % 97, str(d)) for i, (d, *_rest) in enumerate(rows)),
        )


async def _lag_probe(stop: asyncio.Event, tick: float = 0.005) -> float:
    """Worst delay of a `tick` timer while `stop` is unset: how long the loop stalled."""
    worst = 0.0
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t0 = loop.time()
        await asyncio.sleep(tick)
        worst = max(worst, loop.time() - t0 - tick)
    return worst


async def _one_pass(data: Path, policy: str, evict: int, size: int) -> dict[str, float]:
    """One eviction pass that must evict `evict` blobs from the tier as it now stands."""
    layout = Layout(data)
    index = BlobIndex(layout.index, [POLICIES[policy].sql])
    n = (await asyncio.to_thread(index.usage))["warm"][1]
    await asyncio.to_thread(index._close)
    budget = (n - evict) * size / 0.4  # low watermark 0.4: the pass stops after `evict` blobs
    config = load_config(
        env={
            "MIRROR_WARM__MAX_BYTES": str(int(budget)),
            "MIRROR_WARM__POLICY": policy,
            "MIRROR_WARM__MIN_FREE_BYTES": "0",
            "MIRROR_WARM__HIGH_WATERMARK": "0.401",
            "MIRROR_WARM__LOW_WATERMARK": "0.4",
            "MIRROR_EVICTION__MAX_PER_PASS": str(evict),
        },
        flags={"data_dir": str(data)},
    )
    pool = ThreadPoolExecutor(16)
    cache = open_cache(config, pool, Metrics())
    await cache.usage.refresh()
    for i in range(1000):  # hits counted on the request path, flushed by the pass
        hexd = hashlib.sha256(i.to_bytes(8, "big")).hexdigest()
        cache.tiers.accesses.hit(parse_digest(f"sha256:{hexd}"))
    stop = asyncio.Event()
    probe = asyncio.create_task(_lag_probe(stop))
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    report = await cache.evictions.evict_pass()
    took = time.perf_counter() - t0
    stop.set()
    lag = await probe
    await asyncio.to_thread(cache.close)
    pool.shutdown()
    return {
        "policy": policy,
        "blobs": n,
        "evicted": report.deleted,
        "seconds": round(took, 3),
        "max_loop_stall_ms": round(lag * 1000, 1),
    }


def eviction(args: argparse.Namespace) -> None:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-evict-", dir=args.dir) as tmp:
        data = Path(tmp)
        layout = Layout(data)
        layout.create()
        t0 = time.perf_counter()
        index = BlobIndex(layout.index)
        _populate(layout, index, args.blobs, 64)
        index._close()
        print(f"populated {args.blobs} blobs in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        for evict in args.evict:
            for policy in ("lru", "lfu", "gdsf"):
                results.append(asyncio.run(_one_pass(data, policy, evict, 64)))
                print(json.dumps(results[-1]), file=sys.stderr)
    print(
        "| policy | indexed blobs | evicted in the pass | pass s | max loop stall ms |\n|---|---|---|---|---|"
    )
    for r in results:
        print(
            f"| {r['policy']} | {r['blobs']} | {r['evicted']} | {r['seconds']} | {r['max_loop_stall_ms']} |"
        )


# -- tracking on/off ---------------------------------------------------------------------------

UPSTREAM = "http://127.0.0.1:5101"
PORT = 5090
OFF = (
    "import mirror.store.index as i; i.Accesses.hit = lambda self, digest: None; "
    "i.Accesses.tag_pulled = lambda self, key: None; "
)


def _serve(data: Path, tracking: bool) -> subprocess.Popen[bytes]:
    code = ("" if tracking else OFF) + (
        "from mirror.cli import main; import sys; "
        f"sys.exit(main(['serve', '--listen', '127.0.0.1:{PORT}', '--data-dir', '{data}', '--upstream', '{UPSTREAM}']))"
    )
    env = {**os.environ, "MIRROR_ACCESS_LOG": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{PORT}/v2/", timeout=1)
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("mirror did not start")


def _wrk(url: str, accept: str | None = None) -> float:
    script = None
    cmd = ["wrk", "-t1", "-c16", "-d5s", url]
    if accept:
        script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
        script.write(f'wrk.headers["Accept"] = "{accept}"\n')
        script.close()
        cmd[4:4] = ["-s", script.name]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert m, out
    return float(m[1])


def _curl_gbps(url: str) -> float:
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{speed_download}", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(out) / 1e9


def tracking(args: argparse.Namespace) -> None:
    meta = json.load(open("/tmp/bench-run/meta.json"))
    small_repo = meta["manifest_test"]["repo"]
    blob_repo, small_blob = min(
        ((img["repo"], b) for img in meta["pull_images"] for b in img["blobs"]),
        key=lambda rb: rb[1]["size"],
    )
    big = meta["big_blob"]
    base = f"http://127.0.0.1:{PORT}"
    urls = {
        "small blob (hot) req/s": f"{base}/v2/{blob_repo}/blobs/{small_blob['digest']}",
        "manifest by tag req/s": f"{base}/v2/{small_repo}/manifests/{meta['manifest_test']['tag']}",
        "1 GiB warm blob GB/s": f"{base}{big['path']}",
    }
    results: dict[str, dict[bool, list[float]]] = {k: {True: [], False: []} for k in urls}
    with tempfile.TemporaryDirectory(prefix="bench-track-") as tmp:
        data = Path(tmp)
        for rep in range(args.reps):
            for on in (True, False):
                proc = _serve(data, on)
                try:
                    for name, url in urls.items():
                        subprocess.run(
                            [
                                "curl",
                                "-sf",
                                "-o",
                                "/dev/null",
                                "-H",
                                f"Accept: {meta['accept']}",
                                url,
                            ],
                            check=True,
                        )
                        if name.endswith("GB/s"):
                            results[name][on].append(
                                statistics.median(_curl_gbps(url) for _ in range(3))
                            )
                        else:
                            results[name][on].append(
                                _wrk(url, meta["accept"] if "manifest" in name else None)
                            )
                finally:
                    proc.terminate()
                    proc.wait()
            print(
                f"rep {rep + 1}: "
                + json.dumps({k: {str(o): v[o][-1] for o in v} for k, v in results.items()}),
                file=sys.stderr,
            )
    print(f"tracking cost per hit, measured alone: {_per_hit_ns():.0f} ns\n")
    print("| hit path | tracking on | tracking off | on/off |\n|---|---|---|---|")
    for name, by in results.items():
        on, off = statistics.median(by[True]), statistics.median(by[False])
        print(f"| {name} | {on:.2f} | {off:.2f} | {on / off:.3f} |")


def _per_hit_ns() -> float:
    """What one blob hit plus one tag pull add on the request path, timed in isolation."""
    import timeit

    from mirror.store.index import Accesses

    acc = Accesses(None)  # type: ignore[arg-type]  # flush is never called here
    from mirror.store.keys import TagKey

    keys = [parse_digest(f"sha256:{i:064x}") for i in range(1000)]
    tag = TagKey("docker.io", "library/x", "1")
    n = 200_000
    t = timeit.timeit(lambda: (acc.hit(keys[7]), acc.tag_pulled(tag)), number=n)
    return t / n * 1e9


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="what", required=True)
    ev = sub.add_parser("eviction")
    ev.add_argument("--blobs", type=int, default=100_000)
    ev.add_argument(
        "--evict", type=int, nargs="+", default=[1000, 10_000], help="blobs one pass must evict"
    )
    ev.add_argument("--dir", default=None, help="where the test store goes (default: the temp dir)")
    tr = sub.add_parser("tracking")
    tr.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    {"eviction": eviction, "tracking": tracking}[args.what](args)


if __name__ == "__main__":
    main()
