"""What operators see: /metrics moving as scripted pulls say they should, /healthz and /readyz,
structured logs from a real process, and the status page rendered by a real headless Chromium."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import aiohttp
from conftest import MakeMirror, Mirror, MirrorProcess
from images import make_image
from upstream_sim import UpstreamSim

ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


def _value(text: str, name: str, **labels: str) -> float:
    """A sample's value from the exposition text (0 when absent); labelled or not."""
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.split("{")[0] == name and all(f'{k}="{v}"' in sample for k, v in labels.items()):
            return float(value)
    return 0.0


async def _metrics(client: aiohttp.ClientSession, mirror: Mirror) -> str:
    async with client.get(f"{mirror.url}/metrics") as resp:
        return await resp.text()


async def test_metrics_follow_scripted_pulls(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    sim.rate_limit(limit=100, remaining=77)
    image = make_image(60, [3_000_000])
    sim.add_image("obs/app", "1", image)
    layer = next(d for d, b in image.blobs.items() if len(b) > 1_000_000)
    mirror = await make_mirror(sim.url)
    for _ in range(2):  # a miss, then a hit
        async with client.get(f"{mirror.url}/v2/obs/app/manifests/1", headers=ACCEPT) as resp:
            assert resp.status == 200
    hold = sim.fault(layer, "slow", part=1_600_000)  # past the first 1 MiB piece
    started = [asyncio.Event() for _ in range(5)]

    async def pull(i: int) -> bytes:
        async with client.get(f"{mirror.url}/v2/obs/app/blobs/{layer}") as resp:
            head = await resp.content.readexactly(1000)
            started[i].set()
            return head + await resp.read()

    first = asyncio.create_task(pull(0))
    await hold.reached.wait()
    rest = [asyncio.create_task(pull(i)) for i in range(1, 5)]
    await asyncio.gather(*(e.wait() for e in started))  # all five stream from the one fill
    hold.gate.set()
    bodies = await asyncio.gather(first, *rest)
    assert all(b == image.blobs[layer] for b in bodies)
    await mirror.settled()
    text = await _metrics(client, mirror)
    assert _value(text, "mirror_http_requests_total", route="manifest", outcome="miss") == 1
    assert _value(text, "mirror_http_requests_total", route="manifest", outcome="hit") == 1
    miss = _value(text, "mirror_http_requests_total", route="blob", outcome="miss")
    coalesced = _value(text, "mirror_http_requests_total", route="blob", outcome="coalesced")
    assert (miss, miss + coalesced) == (1, 5), "one fill; each follower counted once"
    assert (
        _value(
            text, "mirror_upstream_requests_total", upstream="docker.io", kind="blob", status="200"
        )
        == 1
    )
    assert _value(text, "mirror_upstream_bytes_total", upstream="docker.io") == len(
        image.blobs[layer]
    )
    assert _value(text, "mirror_fill_followers_count") == 1
    assert _value(text, "mirror_fill_followers_sum") == miss + coalesced
    assert _value(text, "mirror_request_duration_seconds_count", route="manifest") == 2
    # one manifest GET reached upstream, which counted it against the 77 left
    assert (
        _value(
            text,
            "mirror_upstream_ratelimit_remaining",
            upstream="docker.io",
            credential="anonymous",
        )
        == 76
    )
    assert (
        _value(
            text, "mirror_upstream_ratelimit_limit", upstream="docker.io", credential="anonymous"
        )
        == 100
    )
    assert _value(text, "mirror_blob_lookups_total", source="upstream") == 5
    assert _value(text, "mirror_upstream_up", upstream="docker.io") == 1
    assert _value(text, "mirror_open_fds") > 0 and _value(text, "mirror_asyncio_tasks") > 0


async def test_health_and_readiness(
    sim: UpstreamSim,
    make_mirror: MakeMirror,
    client: aiohttp.ClientSession,
    small_disk: Callable[[int], Path],
) -> None:
    disk = small_disk(8 * 1024 * 1024)
    mirror = await make_mirror(sim.url, "[warm]\nmin_free_bytes = 0\n", data_dir=disk)
    async with client.get(f"{mirror.url}/healthz") as resp:
        assert resp.status == 200
    async with client.get(f"{mirror.url}/readyz") as resp:
        body = await resp.json()
        assert resp.status == 200 and body["store"] == "writable"
        assert body["upstreams"]["docker.io"] == "not contacted yet"
        assert set(body["upstreams"].values()) == {"not contacted yet"}
    ballast = disk / "ballast"  # another program fills the disk: the store cannot take writes
    with ballast.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    async with client.get(f"{mirror.url}/readyz") as resp:
        assert resp.status == 503 and "not writable" in (await resp.json())["store"]
    async with client.get(f"{mirror.url}/healthz") as resp:
        assert resp.status == 200, "alive, though not ready"
    ballast.unlink()
    async with client.get(f"{mirror.url}/readyz") as resp:
        assert resp.status == 200


async def test_json_logs_from_a_real_process(
    sim: UpstreamSim, mirror_process: Callable[..., MirrorProcess], client: aiohttp.ClientSession
) -> None:
    sim.require_bearer("robot", "hunter2-password")
    digest = sim.add_blob(b"j" * 5000)
    proc = await asyncio.to_thread(
        mirror_process(
            sim.url,
            env={
                "MIRROR_LOG_FORMAT": "json",
                "MIRROR_UPSTREAMS__DOCKER_IO__USERNAME": "robot",
                "MIRROR_UPSTREAMS__DOCKER_IO__PASSWORD": "hunter2-password",
            },
        ).start
    )
    async with client.get(
        f"{proc.url}/v2/obs/x/blobs/{digest}", headers={"Authorization": "Bearer client-secret"}
    ) as resp:
        assert resp.status == 200
        await resp.read()
    await asyncio.to_thread(proc.stop)
    lines = [json.loads(line) for line in proc.log.read_text().splitlines() if line.startswith("{")]
    access = [
        e for e in lines if e["logger"] == "mirror.access" and e["path"].startswith("/v2/obs/")
    ]
    assert access and access[0]["status"] == 200 and access[0]["outcome"] == "miss"
    assert access[0]["upstream"] == "docker.io" and access[0]["bytes"] == 5000
    assert access[0]["remote"] == "127.0.0.1"  # the connection's address, kept as it opened
    assert any("effective configuration" in e.get("msg", "") for e in lines)
    text = proc.log.read_text()
    assert "hunter2" not in text and "client-secret" not in text and "Bearer " not in text


def _png_pixels_vary(png: bytes) -> bool:
    """True unless the image is one flat colour (decompress the IDAT stream and compare rows)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(png):
        length = int.from_bytes(png[pos : pos + 4], "big")
        kind = png[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += png[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    return len(set(raw[1:4096])) > 2


async def test_status_page_renders_its_tables_in_chromium(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    image = make_image(61, [100_000])
    sim.add_image("team/web", "2.1", image)
    mirror = await make_mirror(sim.url)
    async with client.get(f"{mirror.url}/v2/team/web/manifests/2.1", headers=ACCEPT) as resp:
        assert resp.status == 200
    for digest in image.blobs:
        async with client.get(f"{mirror.url}/v2/team/web/blobs/{digest}") as resp:
            await resp.read()
    await mirror.settled()
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium package is installed by `make test`"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=412,915",
    ]
    url = f"{mirror.url}/_status"

    async def run(*args: str) -> bytes:
        proc = await asyncio.create_subprocess_exec(
            chromium, *flags, *args, url, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return out

    dom = (await run("--dump-dom")).decode()
    for heading in ("Summary", "Tiers", "Upstreams", "Cached images"):
        assert f"<h2>{heading}</h2>" in dom
    assert dom.count("<table>") == 4
    assert "docker.io/team/web" in dom and "2.1" in dom
    shot = tmp_path / "status.png"
    await run(f"--screenshot={shot}")
    assert shot.exists() and _png_pixels_vary(shot.read_bytes())
