"""Client access control: htpasswd (bcrypt) users and static bearer tokens, each limited to the
repositories its grants name; a real skopeo logs in with credentials."""

from __future__ import annotations

import base64
from pathlib import Path

import aiohttp
import bcrypt
from conftest import MakeMirror, skopeo_copy
from images import Upstream

TOKEN = "ci-token-0123456789abcdef"


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _config(tmp_path: Path) -> str:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(
        "".join(
            f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()}\n"
            for u, p in (("dev", "dev-pass"), ("ci", "ci-pass"))
        )
    )
    return (
        f'[auth]\nhtpasswd = "{htpasswd}"\n'
        '[[auth.grants]]\nwho = "ci"\nrepositories = ["docker.io/test/single"]\n'
        f'[[auth.grants]]\nwho = "token:{TOKEN}"\nrepositories = ["docker.io/test/*"]\n'
    )


async def test_clients_must_authenticate_and_stay_within_their_grants(
    upstream: Upstream, make_mirror: MakeMirror, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    mirror = await make_mirror(upstream.url, _config(tmp_path))
    manifest = f"{mirror.url}/v2/test/multi/manifests/1"
    for headers in (
        {},
        _basic("dev", "wrong"),
        _basic("nobody", "x"),
        {"Authorization": "Bearer nope"},
    ):
        for url in (f"{mirror.url}/v2/", manifest):
            async with client.get(url, headers=headers) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"] == 'Basic realm="mirror"'
                assert (await resp.json())["errors"][0]["code"] == "UNAUTHORIZED"
    async with client.get(manifest, headers=_basic("dev", "dev-pass")) as resp:
        assert resp.status == 200, "a user without grants may pull everything"
    async with client.get(manifest, headers=_basic("ci", "ci-pass")) as resp:
        assert resp.status == 403 and (await resp.json())["errors"][0]["code"] == "DENIED"
    async with client.get(
        f"{mirror.url}/v2/test/single/manifests/1", headers=_basic("ci", "ci-pass")
    ) as resp:
        assert resp.status == 200
    async with client.get(manifest, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        assert resp.status == 200
    async with client.get(
        f"{mirror.url}/v2/other/x/manifests/1", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as resp:
        assert resp.status == 403


async def test_skopeo_pulls_with_credentials(
    upstream: Upstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    mirror = await make_mirror(upstream.url, _config(tmp_path))
    code, out = await skopeo_copy(f"docker://{mirror.host}/test/single:1", tmp_path / "no-creds")
    assert code != 0
    code, out = await skopeo_copy(
        f"docker://{mirror.host}/test/single:1", tmp_path / "ok", "--src-creds", "ci:ci-pass"
    )
    assert code == 0, out
