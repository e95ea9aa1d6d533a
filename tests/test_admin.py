"""Cache administration: `mirror cache …` and `mirror fsck` as real commands against the data
directory of a mirror that keeps serving meanwhile, and the admin HTTP API."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
from conftest import PROJECT, MakeMirror, Mirror
from images import make_image
from upstream_sim import UpstreamSim

from mirror.http.app import CACHE

TOKEN = "s3cret-admin-token-0123"
ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


async def _mirror_cli(data: Path, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mirror",
        *args,
        "--data-dir",
        str(data),
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def _cli_json(data: Path, *args: str) -> Any:
    code, out = await _mirror_cli(data, *args, "--json")
    assert code == 0, out
    return json.loads(out)


async def _pull(
    client: aiohttp.ClientSession, mirror: Mirror, repo: str, tag: str, image: Any
) -> None:
    async with client.get(f"{mirror.url}/v2/{repo}/manifests/{tag}", headers=ACCEPT) as resp:
        assert resp.status == 200
    for digest in image.blobs:
        async with client.get(f"{mirror.url}/v2/{repo}/blobs/{digest}") as resp:
            assert resp.status == 200
            await resp.read()
    await mirror.settled()


async def _filled(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession, toml: str = ""
) -> tuple[Mirror, Any, Any]:
    app, db = make_image(90, [300_000, 200_000]), make_image(91, [400_000])
    sim.add_image("team/app", "1.0", app)
    sim.add_image("team/db", "stable", db)
    mirror = await make_mirror(sim.url, toml)
    await _pull(client, mirror, "team/app", "1.0", app)
    await _pull(client, mirror, "team/db", "stable", db)
    await mirror.app[CACHE].tiers.accesses.flush()  # type: ignore[index]
    return mirror, app, db


async def test_ls_du_and_evict_on_a_running_mirrors_data(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    mirror, app, db = await _filled(sim, make_mirror, client)
    images = {
        (i["repository"], i["tag"]): i for i in await _cli_json(mirror.data_dir, "cache", "ls")
    }
    assert images[("team/app", "1.0")]["size"] == sum(map(len, app.blobs.values()))
    assert images[("team/db", "stable")]["tiers"] == ["warm"]
    code, text = await _mirror_cli(mirror.data_dir, "cache", "ls")
    assert code == 0 and "docker.io/team/app" in text and "1.0" in text
    usage = await _cli_json(mirror.data_dir, "cache", "du")
    total = sum(map(len, app.blobs.values())) + sum(map(len, db.blobs.values()))
    assert usage["tiers"]["warm"] == {"bytes": total, "blobs": 5}
    assert usage["upstreams"]["docker.io"]["bytes"] == total
    # dry run: lists, changes nothing
    would = await _cli_json(
        mirror.data_dir, "cache", "evict", "--dry-run", "--repo", "docker.io/team/db"
    )
    assert {e["digest"] for e in would} == set(db.blobs)
    assert len(mirror.blob_files()) == 5
    # nothing is older than an hour
    assert await _cli_json(mirror.data_dir, "cache", "evict", "--older-than", "3600") == []
    gone = await _cli_json(mirror.data_dir, "cache", "evict", "--repo", "docker.io/team/db")
    assert {e["digest"] for e in gone} == set(db.blobs)
    assert {f"sha256:{p.name}" for p in mirror.blob_files()} == set(app.blobs)
    # the mirror keeps serving, and fetches the evicted blob again
    body = db.blobs[next(iter(db.blobs))]
    async with client.get(f"{mirror.url}/v2/team/db/blobs/{next(iter(db.blobs))}") as resp:
        assert await resp.read() == body and resp.headers["X-Mirror-Cache"] == "miss"


async def test_pins_survive_evict_and_round_trip(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    mirror, app, _ = await _filled(sim, make_mirror, client)
    assert await _cli_json(mirror.data_dir, "cache", "pin", "docker.io/team/app:1.*") == [
        "docker.io/team/app:1.*"
    ]
    code, out = await _mirror_cli(mirror.data_dir, "cache", "pin", "no-slash")
    assert code == 2 and "pin" in out
    await _cli_json(mirror.data_dir, "cache", "evict")
    assert {f"sha256:{p.name}" for p in mirror.blob_files()} == set(app.blobs)
    # the running mirror's own passes see the pin too
    protected = await mirror.app[CACHE].evictions.protected()  # type: ignore[index]
    assert set(app.blobs) <= {str(d) for d in protected}
    assert (await _mirror_cli(mirror.data_dir, "cache", "unpin", "docker.io/team/app:1.*"))[0] == 0
    assert (await _mirror_cli(mirror.data_dir, "cache", "unpin", "docker.io/team/app:1.*"))[0] == 1
    await _cli_json(mirror.data_dir, "cache", "evict")
    assert mirror.blob_files() == []


async def test_fsck_finds_a_flipped_byte_and_repair_removes_it(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    mirror, app, _ = await _filled(sim, make_mirror, client)
    assert (await _cli_json(mirror.data_dir, "fsck"))["clean"]
    victim = next(p for p in mirror.blob_files() if f"sha256:{p.name}" in app.blobs)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    code, out = await _mirror_cli(mirror.data_dir, "fsck")
    assert code == 1 and f"corrupt: sha256:{victim.name}" in out
    report = await _cli_json(mirror.data_dir, "fsck", "--repair")
    assert report["corrupt"] == [f"sha256:{victim.name}"] and report["repaired"]
    assert not victim.exists()
    assert (await _cli_json(mirror.data_dir, "fsck"))["clean"]
    # the hot copy of a small blob aside, the mirror now fetches correct bytes again
    digest = f"sha256:{victim.name}"
    async with client.get(f"{mirror.url}/v2/team/app/blobs/{digest}") as resp:
        assert await resp.read() == app.blobs[digest]


async def test_admin_api_is_off_by_default_and_needs_its_token(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    off = await make_mirror(sim.url)
    async with client.get(f"{off.url}/_mirror/catalog") as resp:
        assert resp.status == 404
    mirror, app, _db = await _filled(
        sim, make_mirror, client, f'[admin]\nenabled = true\ntoken = "{TOKEN}"\n'
    )
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-wrong-token"},
        {"Authorization": TOKEN},
    ):
        async with client.get(f"{mirror.url}/_mirror/catalog", headers=headers) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == 'Bearer realm="mirror-admin"'
            assert (await resp.json())["errors"][0]["code"] == "UNAUTHORIZED"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with client.get(f"{mirror.url}/_mirror/catalog", headers=auth) as resp:
        assert resp.status == 200
        assert {i["repository"] for i in await resp.json()} == {"team/app", "team/db"}
    async with client.post(
        f"{mirror.url}/_mirror/pins", headers=auth, json={"pattern": "docker.io/team/db:*"}
    ) as resp:
        assert await resp.json() == ["docker.io/team/db:*"]
    async with client.post(
        f"{mirror.url}/_mirror/evict", headers=auth, json={"dry_run": False}
    ) as resp:
        assert {e["digest"] for e in await resp.json()} == set(app.blobs)
    async with client.post(f"{mirror.url}/_mirror/pins", headers=auth, data=b"{not json") as resp:
        assert resp.status == 400
    async with client.post(f"{mirror.url}/_mirror/fsck", headers=auth, json={}) as resp:
        assert (await resp.json())["clean"]
