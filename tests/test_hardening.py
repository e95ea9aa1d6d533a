"""What a client or an upstream must not be able to do to the mirror: grow its memory with
headers, keep state for requests that found nothing, learn what others cached, make it fetch
internal addresses, or serve something that is no manifest. Each attack is driven against a
real `python -m mirror serve` process (or, where the test must look inside, an in-process
mirror on real sockets)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sqlite3
import ssl
from collections.abc import Callable
from pathlib import Path

import aiohttp
import diskcache
from aiohttp import web
from conftest import MakeMirror, Mirror, MirrorProcess, error_codes, make_cert, wait_until
from images import make_image
from upstream_sim import UpstreamSim

from mirror.http.app import CACHE, METRICS
from mirror.oci import mediatypes

#: Nothing listens on the discard port: an upstream that refuses connections.
CLOSED_URL = "http://127.0.0.1:9"
REPO = "test/hardening"


def _port(mirror: Mirror) -> int:
    return int(mirror.url.rsplit(":", 1)[1])


def _rss_kib(proc: MirrorProcess) -> int:
    assert proc.proc is not None
    status = Path(f"/proc/{proc.proc.pid}/status").read_text()
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert found is not None
    return int(found[1])


async def test_a_flood_of_distinct_accept_headers_leaves_memory_flat(
    mirror_process: Callable[..., MirrorProcess],
) -> None:
    """Sixty requests, each with 100 distinct Accept fields of 8,000 bytes (about 800 KB a
    request, under aiohttp's own limits, no credentials), after twenty to warm up: the
    process keeps none of it (a mirror that remembered every Accept set grew by 146 MiB)."""
    mirror = mirror_process(CLOSED_URL, env={"MIRROR_RETRIES__ATTEMPTS": "1"}).start()
    async with aiohttp.ClientSession() as client:

        async def flood(i: int) -> int:
            fields = [("Accept", f"application/x-{i}-{j}-" + "a" * 8000) for j in range(100)]
            async with client.get(
                f"{mirror.url}/v2/library/x/manifests/latest", headers=fields
            ) as resp:
                await resp.read()
                return resp.status

        for i in range(20):  # warm up: the allocator's own high-water mark is not the point
            await flood(-1 - i)
        before = _rss_kib(mirror)
        statuses = [await flood(i) for i in range(60)]
    after = _rss_kib(mirror)
    assert set(statuses) == {502}, statuses  # answered (the upstream is down), not refused
    assert after - before < 24 * 1024, f"RSS grew {(after - before) // 1024} MiB"


async def test_only_manifests_are_kept_and_served_as_manifests(
    sim: UpstreamSim, mirror_process: Callable[..., MirrorProcess]
) -> None:
    """A tag answered with an HTML page and no Docker-Content-Digest is refused (502), kept
    nowhere, and asked again next time; a document that says what it is is served as that,
    whatever Content-Type upstream gave it, under every repository; every answer carries
    `X-Content-Type-Options: nosniff`."""
    sim.digest_header = False
    page = b"<html><script>document.cookie</script></html>"
    sim.add_manifest("test/page", "latest", page, "text/html")
    image = make_image(5, [100])
    sim.add_manifest("test/a", "1", image.data, mediatypes.OCI_MANIFEST)
    sim.add_manifest("test/b", "1", image.data, mediatypes.OCI_INDEX)  # upstream mislabels it
    mirror = mirror_process(sim.url).start()
    accept = {"Accept": "*/*"}
    async with aiohttp.ClientSession() as client:
        for _ in range(2):
            async with client.get(
                f"{mirror.url}/v2/test/page/manifests/latest", headers=accept
            ) as resp:
                assert resp.status == 502
                assert error_codes(await resp.read()) == ("UNKNOWN", "UPSTREAM_INVALID")
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert sim.requests[("GET", "/v2/test/page/manifests/latest")] == 2, "nothing was kept"
        for repo in ("test/a", "test/b", "test/a"):
            async with client.get(f"{mirror.url}/v2/{repo}/manifests/1", headers=accept) as resp:
                assert resp.status == 200 and await resp.read() == image.data
                assert resp.headers["Content-Type"] == mediatypes.OCI_MANIFEST
                assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_metrics_and_errors_keep_the_mirrors_own_details(
    sim: UpstreamSim, tmp_path: Path, mirror_process: Callable[..., MirrorProcess]
) -> None:
    """The upstream's user name is not a label on the open /metrics (a hash of it is), and a
    client whose pull fails because an upstream is unreachable is not told that upstream's
    internal address; the log is."""
    config = tmp_path / "mirror.toml"
    config.write_text(
        '[upstreams."docker.io"]\nusername = "ci-robot-7"\npassword = "s3cret-pass"\n'
        '[upstreams."internal.example"]\nurl = "http://127.0.0.1:9"\n'
    )
    sim.rate_limit(limit=100, remaining=50)
    sim.add_image("test/app", "1", make_image(6, [100]))
    mirror = mirror_process(
        sim.url, env={"MIRROR_CONFIG": str(config), "MIRROR_RETRIES__ATTEMPTS": "1"}
    ).start()
    async with aiohttp.ClientSession() as client:
        async with client.get(
            f"{mirror.url}/v2/test/app/manifests/1", headers={"Accept": "*/*"}
        ) as resp:
            assert resp.status == 200
        async with client.get(f"{mirror.url}/metrics") as resp:
            metrics = await resp.text()
        async with client.get(f"{mirror.url}/v2/internal.example/team/app/manifests/1") as resp:
            failed = await resp.text()
            assert resp.status == 502
    assert "ci-robot-7" not in metrics
    assert 'credential="account-' in metrics
    assert "127.0.0.1:9" not in failed and "Connect" not in failed, failed
    mirror.stop()
    said = [line for line in mirror.log.read_text().splitlines() if "failed" in line]
    assert any("internal.example manifest" in line and "127.0.0.1:9" in line for line in said)


async def test_requests_that_find_nothing_or_choose_their_own_answer_leave_nothing_on_disk(
    sim: UpstreamSim, mirror_process: Callable[..., MirrorProcess]
) -> None:
    """Two hundred made-up tags (upstream: 404) leave no pull record; fifty tag-list pages
    and referrers of fifty made-up digests are answered but kept in memory only (bounded by
    the hot budget); the one real tag pulled and the whole tag list are what is kept."""
    sim.add_image("test/app", "1", make_image(7, [100]))
    mirror = mirror_process(sim.url).start()
    accept = {"Accept": "*/*"}
    async with aiohttp.ClientSession() as client:
        for i in range(200):
            async with client.get(f"{mirror.url}/v2/test/app/manifests/made-up-{i}") as resp:
                assert resp.status == 404
        async with client.get(f"{mirror.url}/v2/test/app/manifests/1", headers=accept) as resp:
            assert resp.status == 200
        for n in range(1, 51):
            async with client.get(f"{mirror.url}/v2/test/app/tags/list?n={n}") as resp:
                assert resp.status == 200
            made_up = "sha256:" + f"{n:064x}"
            async with client.get(f"{mirror.url}/v2/test/app/referrers/{made_up}") as resp:
                assert resp.status in (200, 404)
        async with client.get(f"{mirror.url}/v2/test/app/tags/list") as resp:
            assert resp.status == 200
    mirror.stop()  # flushes what was counted
    with sqlite3.connect(mirror.data_dir / "index.sqlite") as db:
        rows = db.execute("SELECT upstream, repo, tag FROM tags").fetchall()
    assert rows == [("docker.io", "test/app", "1")]
    with diskcache.Cache(str(mirror.data_dir / "meta")) as meta:
        lists = [k for k in meta.iterkeys() if isinstance(k, tuple) and k[0] == "l"]
    assert lists == [("l", "docker.io", "test/app", "tags/list", "")]


# -- what one client can tie up -----------------------------------------------------------------


async def test_a_client_reading_a_byte_at_a_time_is_dropped(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """A client that keeps reading, but far below `timeouts.client_min_rate`, never falls
    silent long enough for the idle timeout; the pace floor drops it (counted as stalled),
    so it cannot hold a sender thread and a file for as long as it likes."""
    data = os.urandom(32 * 1024 * 1024)
    digest = sim.add_blob(data)
    toml = '[timeouts]\nread = 60\nclient_min_rate = "1MiB"\nrate_window = 1\n'
    mirror = await make_mirror(sim.url, toml=toml)
    url = f"{mirror.url}/v2/{REPO}/blobs/{digest}"
    async with client.get(url) as resp:
        assert await resp.read() == data
    await mirror.settled()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", _port(mirror)))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET /v2/{REPO}/blobs/{digest} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
    await writer.drain()
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    metrics = mirror.app[METRICS]  # type: ignore[index]
    received = 0
    try:
        for _ in range(3000):  # 1 KiB every 10 ms, about 100 KiB/s, for at most 30 s
            if metrics.total("mirror_client_aborts_total", reason="stalled"):
                break
            chunk = await asyncio.wait_for(reader.read(1024), 30)
            if not chunk:
                break
            received += len(chunk)
            await asyncio.sleep(0.01)  # ok: pacing a slow reader, not waiting for anything
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 30):
            received += len(chunk)
    except ConnectionError:
        pass  # the reset: what the kernel still held for this client was dropped
    writer.close()
    assert metrics.total("mirror_client_aborts_total", reason="stalled") == 1
    assert received < len(data), "the transfer was cut, not finished"


async def test_one_client_may_start_only_so_many_fills(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """`limits.max_fills_per_client = 2`: with two of its fills running, a third miss from
    the same address gets 429 with Retry-After; joining a fill already running is allowed."""
    blobs = [sim.add_blob(os.urandom(100_000)) for _ in range(3)]
    hang = sim.fault("blob", "hang")
    mirror = await make_mirror(sim.url, toml="[limits]\nmax_fills_per_client = 2\n")
    gets = [
        asyncio.ensure_future(client.get(f"{mirror.url}/v2/{REPO}/blobs/{d}")) for d in blobs[:2]
    ]
    await wait_until(lambda: hang.hits == 2)
    async with client.get(f"{mirror.url}/v2/{REPO}/blobs/{blobs[2]}") as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "1"
    joined = asyncio.ensure_future(client.get(f"{mirror.url}/v2/{REPO}/blobs/{blobs[0]}"))
    hang.gate.set()
    for resp in await asyncio.gather(*gets, joined):
        assert resp.status == 200
        resp.release()
    await mirror.settled()
    async with client.get(f"{mirror.url}/v2/{REPO}/blobs/{blobs[2]}") as resp:
        assert resp.status == 200, "with its fills done, the client may start another"


async def test_a_fill_nobody_follows_any_more_is_dropped_past_its_budget(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """A client starts the fill of a 16 MiB blob and goes away after the first bytes: with
    more than `limits.abandoned_fill_bytes` still to come, the fill is dropped (nothing
    kept, the upstream connection closed) instead of fetching a blob nobody reads; the next
    request fills it anew, whole."""
    data = os.urandom(16 * 1024 * 1024)
    digest = sim.add_blob(data)
    held = sim.fault(digest, "slow", part=1024 * 1024, times=1)
    mirror = await make_mirror(sim.url, toml='[limits]\nabandoned_fill_bytes = "1MiB"\n')
    url = f"{mirror.url}/v2/{REPO}/blobs/{digest}"
    async with client.get(url) as resp:
        await held.reached.wait()
        await resp.content.readexactly(1024)
        resp.close()  # the only client goes away
    coordinator = mirror.app[CACHE].coordinator  # type: ignore[index]
    await wait_until(lambda: not coordinator.filling())
    assert not mirror.partial_files() and not mirror.blob_files()
    async with client.get(url) as resp:
        assert resp.status == 200 and await resp.read() == data
    assert sim.requests[("GET", f"/v2/{REPO}/blobs/{digest}")] == 2


PUBLIC_TOKEN = "public-reader-0123456789"
ADMIN_TOKEN = "everything-0123456789abc"


async def test_with_auth_on_the_status_page_needs_credentials_and_shows_only_their_grants(
    sim: UpstreamSim, tmp_path: Path, mirror_process: Callable[..., MirrorProcess]
) -> None:
    """`[auth]` on: the status page answers 401 without credentials; with a token granted
    one repository it lists that repository's tags and not another's (private names stay
    private); a token granted everything sees both."""
    for repo in ("team/public", "team/private"):
        sim.add_image(repo, "1", make_image(8 if "public" in repo else 9, [100]))
    config = tmp_path / "mirror.toml"
    config.write_text(
        f'[[auth.grants]]\nwho = "token:{PUBLIC_TOKEN}"\nrepositories = ["docker.io/team/public"]\n'
        f'[[auth.grants]]\nwho = "token:{ADMIN_TOKEN}"\nrepositories = ["**"]\n'
    )
    mirror = mirror_process(sim.url, env={"MIRROR_CONFIG": str(config)}).start()
    everything = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Accept": "*/*"}
    public = {"Authorization": f"Bearer {PUBLIC_TOKEN}"}
    async with aiohttp.ClientSession() as client:
        for repo in ("team/public", "team/private"):
            async with client.get(
                f"{mirror.url}/v2/{repo}/manifests/1", headers=everything
            ) as resp:
                assert resp.status == 200
        async with client.get(f"{mirror.url}/_status") as resp:
            assert resp.status == 401 and "WWW-Authenticate" in resp.headers
        async with client.get(f"{mirror.url}/_status", headers=public) as resp:
            assert resp.status == 200
            page = await resp.text()
        async with client.get(f"{mirror.url}/_status", headers=everything) as resp:
            full = await resp.text()
    assert "docker.io/team/public" in page and "team/private" not in page
    assert "docker.io/team/public" in full and "docker.io/team/private" in full


# -- grants hold by digest too --------------------------------------------------------------


async def test_a_grant_for_one_repository_reads_no_other_repositorys_content_by_digest(
    sim: UpstreamSim, tmp_path: Path, mirror_process: Callable[..., MirrorProcess]
) -> None:
    """A token granted only `team/public` asks for blobs and a manifest that a token granted
    everything pulled from `team/private`, by their digests, under `team/public`: each is 404
    exactly as for a digest nobody cached (same body, no X-Mirror-Cache), and a HEAD tells no
    more; a blob `team/public` really has (shared with the private image) is served once
    upstream confirms it with a HEAD, and that is remembered."""
    shared = make_image(10, [50_000])
    private = make_image(11, [60_000, 70_000])
    public = make_image(12, [80_000])
    sim.add_image("team/private", "1", private)
    sim.add_image("team/public", "1", public)
    sim.only_in("team/private", private)
    sim.add_image("team/shared-source", "1", shared)
    config = tmp_path / "mirror.toml"
    config.write_text(
        f'[[auth.grants]]\nwho = "token:{PUBLIC_TOKEN}"\nrepositories = ["docker.io/team/public"]\n'
        f'[[auth.grants]]\nwho = "token:{ADMIN_TOKEN}"\nrepositories = ["**"]\n'
    )
    mirror = mirror_process(sim.url, env={"MIRROR_CONFIG": str(config)}).start()
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Accept": "*/*"}
    reader = {"Authorization": f"Bearer {PUBLIC_TOKEN}", "Accept": "*/*"}
    base = f"{mirror.url}/v2/team/public"
    layer = list(private.blobs)[-1]
    never = "sha256:" + "0" * 64
    async with aiohttp.ClientSession() as client:

        async def get(
            url: str, headers: dict[str, str], method: str = "GET"
        ) -> tuple[int, dict[str, str], bytes]:
            async with client.request(method, url, headers=headers) as resp:
                return resp.status, dict(resp.headers), await resp.read()

        for repo, image in (("team/private", private), ("team/shared-source", shared)):
            assert (await get(f"{mirror.url}/v2/{repo}/manifests/1", admin))[0] == 200
            for digest in image.blobs:
                assert (await get(f"{mirror.url}/v2/{repo}/blobs/{digest}", admin))[0] == 200
        for method in ("GET", "HEAD"):
            status, headers, body = await get(f"{base}/blobs/{layer}", reader, method)
            n_status, n_headers, n_body = await get(f"{base}/blobs/{never}", reader, method)
            assert status == n_status == 404, (status, n_status)
            assert "X-Mirror-Cache" not in headers and "X-Mirror-Cache" not in n_headers
            assert body.replace(layer.encode(), b"D") == n_body.replace(never.encode(), b"D")
        status, headers, _ = await get(f"{base}/manifests/{private.digest}", reader)
        assert status == 404 and "X-Mirror-Cache" not in headers
        # a layer the public repository has too: confirmed by upstream once, then remembered
        digest = list(shared.blobs)[-1]
        heads = sim.requests[("HEAD", f"/v2/team/public/blobs/{digest}")]
        for _ in range(2):
            status, headers, body = await get(f"{base}/blobs/{digest}", reader)
            assert status == 200 and headers["X-Mirror-Cache"] == "hit"
        assert sim.requests[("HEAD", f"/v2/team/public/blobs/{digest}")] == heads + 1
        # and what the public repository's own manifest names needs no confirmation at all
        assert (await get(f"{base}/manifests/1", reader))[0] == 200
        for digest in public.blobs:
            assert (await get(f"{base}/blobs/{digest}", reader))[0] == 200
            assert sim.requests[("HEAD", f"/v2/team/public/blobs/{digest}")] == 0


# -- an upstream that points the mirror at its own network ----------------------------------


async def _metadata_service(host: str) -> tuple[web.AppRunner, str, list[str]]:
    """A stand-in for a cloud metadata service on another loopback address: what only the
    mirror's own network reaches. Returns its runner, its URL and the paths it was asked."""
    asked: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.json_response(
            {
                "schemaVersion": 2,
                "mediaType": mediatypes.OCI_MANIFEST,
                "secret": "instance-role-credentials",
            }
        )

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://{host}:{port}", asked


async def test_an_upstream_cannot_send_the_mirror_to_its_own_network(
    tmp_path: Path, mirror_process: Callable[..., MirrorProcess]
) -> None:
    """An upstream (on 127.0.0.5) answers a tag with a redirect to a "metadata service" on
    127.0.0.1, by address and by a name that resolves to it, and a token realm there: the
    mirror dials none of them, serves and keeps nothing from them; an https upstream is
    never followed to http. With the address in `private_targets` the redirect is followed."""
    runner, internal, asked = await _metadata_service("127.0.0.1")
    name_url = internal.replace("127.0.0.1", "localhost")  # a name, resolving to it
    redirects = {
        "/v2/app/by-address/manifests/1": f"{internal}/latest/meta-data/",
        "/v2/app/by-name/manifests/1": f"{name_url}/latest/meta-data/",
    }

    async def upstream(request: web.Request) -> web.StreamResponse:
        if request.path == "/v2/app/realm/manifests/1":
            challenge = f'Bearer realm="{internal}/token",service="x"'
            return web.json_response({}, status=401, headers={"WWW-Authenticate": challenge})
        if request.path in redirects:
            raise web.HTTPFound(redirects[request.path])
        return web.json_response({"errors": []}, status=404)

    up = web.Application()
    up.router.add_route("*", "/{tail:.*}", upstream)
    up_runner = web.AppRunner(up)
    await up_runner.setup()
    await web.TCPSite(up_runner, "127.0.0.5", 0).start()  # the upstream is elsewhere
    up_url = f"http://127.0.0.5:{up_runner.addresses[0][1]}"
    try:
        mirror = mirror_process(up_url, env={"MIRROR_RETRIES__ATTEMPTS": "1"}).start()
        async with aiohttp.ClientSession() as client:
            for repo in ("by-address", "by-name", "realm"):
                async with client.get(
                    f"{mirror.url}/v2/app/{repo}/manifests/1", headers={"Accept": "*/*"}
                ) as resp:
                    body = await resp.text()
                    assert resp.status in (401, 502), (repo, resp.status, body)
                    assert "instance-role-credentials" not in body
        assert asked == [], f"the internal service was asked for {asked}"
        mirror.stop()
        config = tmp_path / "allow.toml"
        config.write_text('[upstreams."docker.io"]\nprivate_targets = ["127.0.0.1/32"]\n')
        allowed = mirror_process(
            up_url, data_dir=tmp_path / "allowed", env={"MIRROR_CONFIG": str(config)}
        ).start()
        async with aiohttp.ClientSession() as client:
            async with client.get(
                f"{allowed.url}/v2/app/by-address/manifests/1", headers={"Accept": "*/*"}
            ) as resp:
                await resp.read()
        assert asked, "with the address allowed, the redirect is followed"
    finally:
        await up_runner.cleanup()
        await runner.cleanup()


async def test_an_https_upstream_is_never_followed_to_http(
    tmp_path: Path, mirror_process: Callable[..., MirrorProcess]
) -> None:
    """A registry on https redirects its blobs to a CDN on plain http (an address even
    allowed in `private_targets`): the mirror does not follow, the CDN is never asked, and
    the client gets an upstream error rather than bytes that crossed the network in clear."""
    cert, key = make_cert(tmp_path, "registry")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    registry = UpstreamSim(tls=tls)
    await registry.start()
    try:
        registry.redirect_blobs = True
        digest = registry.add_blob(os.urandom(10_000))
        config = tmp_path / "mirror.toml"
        config.write_text('[upstreams."docker.io"]\nprivate_targets = ["127.0.0.2"]\n')
        env = {"SSL_CERT_FILE": str(cert), "MIRROR_CONFIG": str(config)}
        mirror = mirror_process(registry.url, env=env)
        await asyncio.to_thread(mirror.start)
        async with aiohttp.ClientSession() as client:
            async with client.get(f"{mirror.url}/v2/{REPO}/blobs/{digest}") as resp:
                assert resp.status == 502
                assert "https to http" in (await resp.json())["errors"][0]["message"]
        assert registry.requests[("GET", f"/v2/{REPO}/blobs/{digest}")] >= 1
        assert registry.cdn_requests == {}
    finally:
        await registry.stop()
