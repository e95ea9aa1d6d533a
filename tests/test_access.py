"""Client access control: htpasswd (bcrypt) users and static bearer tokens, each limited to the
repositories its grants name; a real skopeo logs in with credentials. Against a real process:
a flood of wrong passwords runs no more bcrypt checks at once than the bound, an unknown user
costs the same bcrypt check a known one does, and a password over bcrypt's 72 bytes is judged as
htpasswd judges it, never a 500; grant globs match within a path segment (`*`, `?`) or across
segments only as `**`."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import bcrypt
from conftest import PROJECT, MakeMirror, MirrorProcess, skopeo_copy
from images import ACCEPT_ALL, Image, Upstream, build_images
from prometheus_client.parser import text_string_to_metric_families
from registry import free_port
from upstream_sim import UpstreamSim

from mirror.http.access import PASSWORD_THREADS

IMAGE: Image = build_images()["test/single:1"]

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


# -- against a real process: what a password check costs and what it tells -------------------


def _htpasswd(tmp_path: Path, cost: int, **users: bytes) -> Path:
    """An htpasswd file of bcrypt entries, as `htpasswd -B -C <cost>` writes them (it keeps
    only a password's first 72 bytes)."""
    path = tmp_path / "htpasswd"
    path.write_text(
        "".join(
            f"{user}:{bcrypt.hashpw(password[:72], bcrypt.gensalt(cost)).decode()}\n"
            for user, password in users.items()
        )
    )
    return path


def _serve_with_auth(
    mirror_process: Callable[..., MirrorProcess], sim: UpstreamSim, tmp_path: Path, htpasswd: Path
) -> MirrorProcess:
    config = tmp_path / "mirror.toml"
    config.write_text(
        f'[auth]\nhtpasswd = "{htpasswd}"\n'
        f'[[auth.grants]]\nwho = "token:{TOKEN}"\nrepositories = ["docker.io/team/app"]\n'
    )
    return mirror_process(sim.url, env={"MIRROR_CONFIG": str(config)})


def _basic_raw(user: str, password: bytes) -> dict[str, str]:
    raw = user.encode() + b":" + password
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


async def _metric(client: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    """One sample of the process's /metrics, as a scraper reads it."""
    async with client.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def test_a_flood_of_wrong_passwords_runs_at_most_the_bound_of_bcrypt_checks(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Sixteen wrong passwords for a known user at once (bcrypt cost 12, a few hundred ms
    each): no sample of /metrics ever shows more than PASSWORD_THREADS checks running, some
    show checks waiting for a slot, /metrics and a token-authenticated pull are answered
    meanwhile, every attempt is a 401 and each ran exactly one check."""
    sim.add_image("team/app", "1", IMAGE)
    htpasswd = await asyncio.to_thread(_htpasswd, tmp_path, 12, dev=b"dev-pass")
    proc = _serve_with_auth(mirror_process, sim, tmp_path, htpasswd)
    await asyncio.to_thread(proc.start)
    running = "mirror_client_password_checks_in_progress"

    async def wrong() -> int:
        async with client.get(f"{proc.url}/v2/", headers=_basic("dev", "guess")) as resp:
            return resp.status

    flood = [asyncio.create_task(wrong()) for _ in range(16)]
    most, waited = 0.0, 0.0
    deadline = time.monotonic() + 60
    while not waited:
        assert time.monotonic() < deadline, "no check ever waited for a slot"
        most = max(most, await _metric(client, proc.url, running, state="running"))
        waited = await _metric(client, proc.url, running, state="waiting")
        await asyncio.sleep(0.01)  # ok: polling a condition with a deadline
    async with client.get(
        f"{proc.url}/v2/team/app/manifests/1",
        headers={"Authorization": f"Bearer {TOKEN}", "Accept": ACCEPT_ALL},
    ) as resp:
        assert resp.status == 200
    while not all(task.done() for task in flood):
        assert time.monotonic() < deadline, "the flood was not answered"
        most = max(most, await _metric(client, proc.url, running, state="running"))
        await asyncio.sleep(0.01)  # ok: polling a condition with a deadline
    assert [task.result() for task in flood] == [401] * 16
    assert 1 <= most <= PASSWORD_THREADS
    assert await _metric(client, proc.url, "mirror_client_password_checks_total") == 16
    assert await _metric(client, proc.url, running, state="running") == 0
    assert await _metric(client, proc.url, running, state="waiting") == 0


async def test_an_unknown_user_costs_the_bcrypt_check_a_known_one_does(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A user name that is not in the htpasswd file runs one bcrypt check, as a wrong password
    for a user that is does, and gets the very same 401: neither the answer nor the work
    behind it tells which user names exist."""
    htpasswd = await asyncio.to_thread(_htpasswd, tmp_path, 4, dev=b"dev-pass")
    proc = _serve_with_auth(mirror_process, sim, tmp_path, htpasswd)
    await asyncio.to_thread(proc.start)
    checks = "mirror_client_password_checks_total"
    answers = []
    for n, user in enumerate(("nobody", "dev", "somebody-else"), start=1):
        async with client.get(f"{proc.url}/v2/", headers=_basic(user, "guess")) as resp:
            answers.append((resp.status, resp.headers["WWW-Authenticate"], await resp.read()))
        assert await _metric(client, proc.url, checks) == n, user
    assert len(set(answers)) == 1 and answers[0][0] == 401


async def test_a_password_over_72_bytes_is_judged_by_its_first_72(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """bcrypt reads 72 bytes of a password and `htpasswd -B` stores the hash of those; bcrypt 5
    raises on a longer one. Sent whole, the 100-byte password is accepted, and so is anything
    with the same first 72 bytes; a long password that differs within them is a 401; no answer
    is a 500."""
    password = bytes(range(0x41, 0x41 + 26)) * 3 + b"0123456789-tail-past-72!"
    assert len(password) == 102
    htpasswd = await asyncio.to_thread(_htpasswd, tmp_path, 4, long=password)
    proc = _serve_with_auth(mirror_process, sim, tmp_path, htpasswd)
    await asyncio.to_thread(proc.start)
    wrong_within = b"x" + password[1:]
    for sent, status in (
        (password, 200),
        (password[:72] + b"another tail", 200),
        (password[:72], 200),
        (wrong_within, 401),
        (b"y" * 300, 401),
    ):
        async with client.get(f"{proc.url}/v2/", headers=_basic_raw("long", sent)) as resp:
            assert resp.status == status, (len(sent), await resp.text())
    assert "Traceback" not in proc.log.read_text()


def _start_refused(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`mirror serve` with `env` added, expected to stop before it serves."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "mirror", "serve", "--data-dir", str(tmp_path / "d")),
            *("--listen", f"127.0.0.1:{free_port()}"),
        ],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def test_a_malformed_bcrypt_entry_stops_the_start(tmp_path: Path) -> None:
    """An htpasswd entry that looks like bcrypt but is not one would fail every check with an
    error: the start refuses it, naming the user, with the configuration-error status."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("dev:$2y$05$too-short\n")
    done = _start_refused(tmp_path, {"MIRROR_AUTH__HTPASSWD": str(htpasswd)})
    assert done.returncode == 2, done.stderr
    assert "auth.htpasswd: 'dev' has a malformed bcrypt entry" in done.stderr


# -- grant globs, against a real process ------------------------------------------------------

ONE_LEVEL = "one-level-token-0123456789"
ANY_DEPTH = "any-depth-token-0123456789"


async def test_grant_globs_match_within_a_segment_and_double_star_across(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """`docker.io/org/*` pulls `org/app` but neither `org/team/app` (`*` stops at `/`) nor
    `org-evil/app`; `docker.io/org/**` pulls `org/app` and `org/team/app` and still not
    `org-evil/app`. A refusal is 403 DENIED."""
    for repo in ("org/app", "org/team/app", "org-evil/app"):
        sim.add_image(repo, "1", IMAGE)
    config = tmp_path / "mirror.toml"
    config.write_text(
        f'[[auth.grants]]\nwho = "token:{ONE_LEVEL}"\nrepositories = ["docker.io/org/*"]\n'
        f'[[auth.grants]]\nwho = "token:{ANY_DEPTH}"\nrepositories = ["docker.io/org/**"]\n'
    )
    proc = mirror_process(sim.url, env={"MIRROR_CONFIG": str(config)})
    await asyncio.to_thread(proc.start)
    for token, repo, status in (
        (ONE_LEVEL, "org/app", 200),
        (ONE_LEVEL, "org/team/app", 403),
        (ONE_LEVEL, "org-evil/app", 403),
        (ANY_DEPTH, "org/app", 200),
        (ANY_DEPTH, "org/team/app", 200),
        (ANY_DEPTH, "org-evil/app", 403),
    ):
        async with client.get(
            f"{proc.url}/v2/{repo}/manifests/1",
            headers={"Authorization": f"Bearer {token}", "Accept": ACCEPT_ALL},
        ) as resp:
            assert resp.status == status, (token, repo, await resp.text())
            if status == 403:
                assert (await resp.json())["errors"][0]["code"] == "DENIED"
            else:
                assert await resp.read() == IMAGE.data


def test_a_grant_that_is_not_upstream_slash_repository_stops_the_start(tmp_path: Path) -> None:
    """A bare `*` (once "everything", now a glob that could admit no name) and a `**` inside a
    segment are refused at start, naming the key, rather than silently admitting nothing or
    something else."""
    for pattern in ("*", "docker.io/org**"):
        config = tmp_path / "mirror.toml"
        config.write_text(
            f'[[auth.grants]]\nwho = "token:{ONE_LEVEL}"\nrepositories = ["{pattern}"]\n'
        )
        done = _start_refused(tmp_path, {"MIRROR_CONFIG": str(config)})
        assert done.returncode == 2, done.stderr
        assert "auth.grants[0].repositories: expected" in done.stderr, done.stderr
        assert repr(pattern) in done.stderr
