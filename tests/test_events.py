"""Events: webhooks that get every event at least once and in order, through a receiver that
is down, failing, slow or refusing, across a kill -9; and the audit log of who pulled what.

Receivers are real HTTP servers on 127.0.0.1 (tests/webhooks.py); the mirror is a real
`python -m mirror serve` process; the upstream is the simulator."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from conftest import PROJECT, MirrorProcess, wait_until
from images import Image, make_image
from journals import journal_files, journaled, waiting
from upstream_sim import UpstreamSim
from webhooks import Attempt, Receiver

from mirror.config import EventsConfig, Webhook, load_config
from mirror.errors import ConfigError
from mirror.events import Events, record
from mirror.events.delivery import TRIM_SECONDS
from mirror.events.journal import LOCK_NAME
from mirror.locks import FileLock
from mirror.metrics import Metrics

SECRET = "receiver-shared-secret-0123"
ADMIN_TOKEN = "admin-token-for-events-0123"
ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


def _config(tmp_path: Path, body: str) -> dict[str, str]:
    path = tmp_path / "events.toml"
    path.write_text(body)
    return {"MIRROR_CONFIG": str(path)}


def _webhook(receiver: Receiver, events: str = '["*"]', extra: str = "") -> str:
    return (
        f'[[events.webhooks]]\nurl = "{receiver.url}"\nname = "receiver"\n'
        f'events = {events}\nsecret = "{SECRET}"\n{extra}'
    )


async def _start(
    make: Callable[..., MirrorProcess], sim: UpstreamSim, data: Path, env: dict[str, str]
) -> MirrorProcess:
    return await asyncio.to_thread(make(sim.url, data, env).start)


async def _pull_manifest(client: aiohttp.ClientSession, url: str, repo: str, tag: str) -> str:
    async with client.get(f"{url}/v2/{repo}/manifests/{tag}", headers=ACCEPT) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["Docker-Content-Digest"]


async def _pull(client: aiohttp.ClientSession, url: str, repo: str, tag: str, image: Image) -> str:
    digest = await _pull_manifest(client, url, repo, tag)
    for blob in image.blobs:
        async with client.get(f"{url}/v2/{repo}/blobs/{blob}") as resp:
            assert resp.status == 200
            await resp.read()
    return digest


async def _metric(client: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    async with client.get(f"{url}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not exported")


def _reading(
    client: aiohttp.ClientSession, url: str, name: str, **labels: str
) -> Callable[[], Awaitable[float]]:
    """A metric to poll (`_until`): what the mirror counts once it has a receiver's answer
    comes a moment after the receiver has the batch."""
    return lambda: _metric(client, url, name, **labels)


def _verify(attempt: Attempt) -> None:
    """What a receiver does with the secret (the README's three lines)."""
    t, v1 = (p.split("=", 1)[1] for p in attempt.headers["Mirror-Signature"].split(","))
    assert abs(time.time() - int(t)) < 300, "an old timestamp is a replay"
    expected = hmac.new(SECRET.encode(), f"{t}.".encode() + attempt.body, hashlib.sha256)
    assert hmac.compare_digest(v1, expected.hexdigest())


async def test_a_pull_is_told_as_cloudevents_signed_with_the_secret(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A pull through the mirror: the receiver gets a `pull` event naming the repository and
    the manifest's digest, and a `blob.cached` for every blob the pull fetched, as
    CloudEvents 1.0 batches, signed with the webhook's secret."""
    image = make_image(70, [200_000, 300_000])
    sim.add_image("team/app", "1.0", image)
    receiver = await Receiver().start()
    try:
        env = _config(tmp_path, _webhook(receiver))
        proc = await _start(mirror_process, sim, tmp_path / "data", env)
        digest = await _pull(client, proc.url, "team/app", "1.0", image)
        await wait_until(lambda: len(receiver.of("blob.cached")) == len(image.blobs))
        await wait_until(lambda: bool(receiver.of("pull")))
        [pull] = receiver.of("pull")
        assert pull["data"]["repository"] == "team/app"
        assert pull["data"]["digest"] == digest
        assert pull["data"]["tag"] == "1.0"
        assert pull["data"]["upstream"] == "docker.io"
        assert pull["data"]["outcome"] == "miss"
        assert pull["data"]["client"] == "127.0.0.1"
        cached = {e["data"]["digest"]: e["data"] for e in receiver.of("blob.cached")}
        assert cached.keys() == image.blobs.keys()
        assert all(cached[d]["size"] == len(b) for d, b in image.blobs.items())
        for event in receiver.delivered():
            assert event["specversion"] == "1.0"
            assert event["datacontenttype"] == "application/json"
            assert event["source"].startswith("urn:mirror:")
            assert event["time"].endswith("Z") and "T" in event["time"]
        ids = [e["id"] for e in receiver.delivered()]
        assert len(set(ids)) == len(ids)
        for attempt in receiver.attempts:
            assert attempt.headers["Content-Type"] == "application/cloudevents-batch+json"
            _verify(attempt)
    finally:
        await receiver.stop()


async def test_events_survive_a_dead_receiver_and_a_kill_9_in_order(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """The receiver is down for ten pulls, the mirror is killed with SIGKILL right after the
    last answer and started again, then the receiver comes up: it gets all ten `pull`
    events, in the order of the pulls. Delivery is at least once: after deduplication by id
    none is missing and the order holds."""
    image = make_image(71, [1000])
    tags = [f"v{i}" for i in range(10)]
    for tag in tags:
        sim.add_image("team/app", tag, image)
    receiver = Receiver()  # not listening yet: connections are refused
    env = _config(tmp_path, _webhook(receiver, '["pull"]'))
    data = tmp_path / "data"
    proc = await _start(mirror_process, sim, data, env)
    for tag in tags:
        await _pull_manifest(client, proc.url, "team/app", tag)
    await wait_until(lambda: journaled(data, "team/app", tags))  # what a kill -9 keeps
    await asyncio.to_thread(proc.stop, signal.SIGKILL)
    await _start(mirror_process, sim, data, env)
    await receiver.start()
    try:
        await wait_until(lambda: len({e["id"] for e in receiver.of("pull")}) >= 10, timeout=30)
        seen: dict[str, dict[str, Any]] = {}
        for event in receiver.of("pull"):
            seen.setdefault(event["id"], event)
        assert [e["data"]["tag"] for e in seen.values()] == tags
    finally:
        await receiver.stop()


async def test_a_503_with_retry_after_is_retried_and_then_delivered(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """The receiver answers 503 with Retry-After: 2, then 200: the same batch goes again and
    is delivered; the failure and the delivery are counted."""
    sim.add_image("team/app", "1.0", make_image(72, [1000]))
    receiver = await Receiver(answers=[(503, {"Retry-After": "2"})]).start()
    try:
        env = _config(tmp_path, _webhook(receiver, '["pull"]'))
        proc = await _start(mirror_process, sim, tmp_path / "data", env)
        await _pull_manifest(client, proc.url, "team/app", "1.0")
        await wait_until(lambda: bool(receiver.of("pull")), timeout=15)
        first, second = receiver.attempts[:2]
        assert (first.status, second.status) == (503, 200)
        assert [e["id"] for e in first.events] == [e["id"] for e in second.events]
        _verify(second)
        hook = {"endpoint": "receiver"}
        await _until(_reading(client, proc.url, "mirror_events_delivered_total", **hook), 1)
        await _until(_reading(client, proc.url, "mirror_events_queue_depth", **hook), 0)
        assert await _metric(client, proc.url, "mirror_events_failed_total", **hook) == 1
    finally:
        await receiver.stop()


async def test_a_receiver_that_never_answers_costs_pulls_nothing(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A receiver that takes the request and never answers: every pull is answered; the
    queue on disk comes back to max_queue, the oldest events dropped and counted (a trim
    at most every TRIM_SECONDS). (Twenty tags: pulls of one tag may share a line, which a
    trim passes whole.)"""
    tags = [f"t{i}" for i in range(20)]
    for tag in tags:
        sim.add_image("team/app", tag, make_image(73, [1000]))
    receiver = await Receiver(hang=True).start()
    try:
        hook = _webhook(receiver, '["pull"]', "timeout = 600\n")
        env = _config(tmp_path, "[events]\nmax_queue = 5\n" + hook)
        proc = await _start(mirror_process, sim, tmp_path / "data", env)
        for tag in tags:
            await _pull_manifest(client, proc.url, "team/app", tag)
        await wait_until(lambda: bool(receiver.attempts))
        depth = _reading(client, proc.url, "mirror_events_queue_depth", endpoint="receiver")
        await _until(depth, 5, timeout=TRIM_SECONDS + 10)  # a trim waits for the last's
        dropped = await _metric(
            client,
            proc.url,
            "mirror_events_dropped_total",
            endpoint="receiver",
            reason="queue_full",
        )
        assert dropped == 15
        assert await _metric(client, proc.url, "mirror_events_emitted_total", kind="pull") == 20
        kept = waiting(tmp_path / "data", "webhook:receiver")
        assert [r.kind for r in kept] == ["pull"] * 5
    finally:
        await receiver.stop()


async def _until(value: Callable[[], Any], expected: float, timeout: float = 10.0) -> None:
    """Poll an async reading until it is `expected`, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (seen := await value()) != expected:
        assert time.monotonic() < deadline, f"still {seen}, not {expected}"
        await asyncio.sleep(0.05)  # ok: polling a condition with a deadline


async def test_past_max_queue_the_oldest_are_dropped_and_the_newest_delivered(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """The receiver is down for twelve pulls with max_queue = 5: seven are dropped and
    counted, and once it is up it gets the newest five, in order, and nothing else."""
    tags = [f"q{i}" for i in range(12)]
    for tag in tags:
        sim.add_image("team/app", tag, make_image(74, [1000]))
    receiver = Receiver()  # not listening yet
    env = _config(tmp_path, "[events]\nmax_queue = 5\n" + _webhook(receiver, '["pull"]'))
    proc = await _start(mirror_process, sim, tmp_path / "data", env)
    for tag in tags:
        await _pull_manifest(client, proc.url, "team/app", tag)
    dropped = _reading(
        client, proc.url, "mirror_events_dropped_total", endpoint="receiver", reason="queue_full"
    )
    await _until(dropped, 7, timeout=TRIM_SECONDS + 10)  # a trim waits for the last's
    await receiver.start()
    try:
        await wait_until(lambda: len(receiver.of("pull")) >= 5, timeout=15)
        assert [e["data"]["tag"] for e in receiver.of("pull")] == tags[-5:]
        depth = _reading(client, proc.url, "mirror_events_queue_depth", endpoint="receiver")
        await _until(depth, 0)
    finally:
        await receiver.stop()


async def test_the_cursor_survives_a_restart_and_files_behind_it_are_deleted(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Five pulls delivered, the mirror stopped and started again, three more: the receiver
    gets each of the eight once (what it acknowledged is not sent again), and the journal
    file of the first run, behind every cursor, is deleted."""
    tags = [f"r{i}" for i in range(8)]
    for tag in tags:
        sim.add_image("team/app", tag, make_image(75, [1000]))
    receiver = await Receiver().start()
    try:
        env = _config(tmp_path, _webhook(receiver, '["pull"]'))
        data = tmp_path / "data"
        proc = await _start(mirror_process, sim, data, env)
        for tag in tags[:5]:
            await _pull_manifest(client, proc.url, "team/app", tag)
        await wait_until(lambda: len(receiver.of("pull")) == 5)
        first = journal_files(data)
        assert len(first) == 1
        await asyncio.to_thread(proc.stop)
        proc = await _start(mirror_process, sim, data, env)
        for tag in tags[5:]:
            await _pull_manifest(client, proc.url, "team/app", tag)
        await wait_until(lambda: len(receiver.of("pull")) >= 8)
        await wait_until(lambda: not set(first) & set(journal_files(data)))
        assert [e["data"]["tag"] for e in receiver.of("pull")] == tags
        assert len(journal_files(data)) == 1, "the running mirror's own file stays"
        assert not waiting(data, "webhook:receiver")
    finally:
        await receiver.stop()


async def test_a_burst_of_pulls_is_journaled_and_then_delivered_each_once_by_its_own_id(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    tmp_path: Path,
) -> None:
    """Eighty pulls at once (they come closer together than a write per line: they wait and
    go in a few writes, runs of them in a line each), then SIGTERM at once: the journal holds
    each pull once, in lines that read back whole; started again with the receiver up, the
    receiver gets each once, each by an id of its own, in the order they were journaled."""
    sim.add_image("team/app", "burst", make_image(72, [1000]))
    receiver = Receiver()  # not up yet: nothing delivered, nothing deleted
    data = tmp_path / "data"
    proc = await _start(mirror_process, sim, data, _config(tmp_path, _webhook(receiver)))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        await asyncio.gather(
            *(_pull_manifest(session, proc.url, "team/app", "burst") for _ in range(80))
        )
    await asyncio.to_thread(proc.stop)
    lines = b"".join(f.read_bytes() for f in journal_files(data)).split(b"\n")[:-1]
    pulls = [p for line in lines if line.startswith(b"pull\t") for p in record.decode(line, "")]
    assert len(pulls) == 80
    assert {p.data["tag"] for p in pulls if p.data} == {"burst"}
    assert len({p.at for p in pulls}) == 80, "each pull once"
    await receiver.start()
    try:
        proc = await _start(mirror_process, sim, data, _config(tmp_path, _webhook(receiver)))
        await wait_until(lambda: len(receiver.of("pull")) >= 80)
        await asyncio.to_thread(proc.stop)
        told = receiver.of("pull")
        assert len(told) == 80
        assert len({e["id"] for e in told}) == 80
        assert [e["time"] for e in told] == sorted(e["time"] for e in told)
    finally:
        await receiver.stop()


def test_a_journal_line_reads_back_as_the_event_it_was() -> None:
    """A pull's compact line, its odd values escaped and its None fields kept apart from
    text; any other kind's data as JSON; a line cut short refused."""
    digest = "sha256:" + "a" * 64
    before = time.time()
    head = record.pull_head("docker.io", "team/app", None, digest, "x\ty\\N", 12)
    text = record.pull_line(time.time_ns(), head, record.pull_tail("GET", None, "u\nv\\", "hit"))
    line = text.encode()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    [pull] = record.decode(line[:-1], "id-1")
    assert (pull.kind, pull.id) == ("pull", "id-1")
    assert before <= pull.at <= time.time()
    assert pull.data == {
        "upstream": "docker.io",
        "repository": "team/app",
        "tag": None,
        "digest": digest,
        "media_type": "x\ty\\N",
        "size": 12,
        "method": "GET",
        "client": None,
        "user": "u\nv\\",
        "outcome": "hit",
    }
    assert pull.subject == f"docker.io/team/app@{digest}"
    plain = record.pull_line(
        1,
        record.pull_head("d", "r", "1.0", digest, "m", 1),
        record.pull_tail("HEAD", "::1", None, "miss"),
    ).encode()
    fields = plain.decode().split("\t")[2:]
    assert fields == ["d", "r", "1.0", digest, "m", "1", "HEAD", "::1", "\\N", "miss\n"]
    assert record.decode(plain[:-1], "i")[0].data == {
        **dict.fromkeys(record.PULL),
        "upstream": "d",
        "repository": "r",
        "tag": "1.0",
        "digest": digest,
        "media_type": "m",
        "size": 1,
        "method": "HEAD",
        "client": "::1",
        "outcome": "miss",
    }
    [other] = record.decode(
        record.line("tag.moved", record.payload("s", {"a": [1]})).encode()[:-1], "i"
    )
    assert (other.subject, other.data) == ("s", {"a": [1]})
    with pytest.raises(ValueError):
        record.decode(b"pull\t4\tcut sho", "i")

    with pytest.raises(ValueError):
        record.decode(b"pull\t4\td\tr\tt\tdg\tm\t1\tGET\tc\tu\thit\x1f5\tGET\tc", "i")


def test_a_run_of_pulls_in_one_line_reads_back_as_each_pull() -> None:
    """A line of three pulls of one head: the second only its time (the first's tail), the
    third its own tail, its client holding RUN itself (escaped, so it splits nothing): each
    pull its own event, its own time and id, its own data."""
    digest = "sha256:" + "b" * 64
    head = record.pull_head("docker.io", "library/alpine", "3", digest, "m", 7)
    at = 1_700_000_000_123_456_789
    odd = f"10.0.0.1{record.RUN}x"
    text = record.pull_line(
        at,
        head,
        record.pull_tail("GET", "::1", None, "hit"),
        (at + 5, None),
        (at + 9_000, record.pull_tail("HEAD", odd, "ci", "stale")),
    )
    assert text.count(record.RUN) == 2 and text.endswith("\n")
    line = text[:-1].encode()
    assert record.events_in(line) == 3
    first, second, third = record.decode(line, "tok-1f")
    assert [r.id for r in (first, second, third)] == ["tok-1f", "tok-1f.1", "tok-1f.2"]
    assert (second.at - first.at, third.at - first.at) == pytest.approx((5e-9, 9e-6), abs=1e-7)
    assert first.data is not None and second.data is not None and third.data is not None
    assert second.data == first.data and second.data is not first.data
    assert {k: third.data[k] for k in ("method", "client", "user", "outcome")} == {
        "method": "HEAD",
        "client": odd,
        "user": "ci",
        "outcome": "stale",
    }
    assert (third.data["repository"], third.data["digest"]) == ("library/alpine", digest)
    assert third.subject == first.subject == f"docker.io/library/alpine@{digest}"


async def test_pulls_alike_wait_as_their_times_and_keep_their_order_among_other_lines(
    tmp_path: Path,
) -> None:
    """The emitter on a loop: pulls alike one after the other wait as one key and their times
    (up to RUN_PULLS a line), an event of another kind between them closes the run, and a
    pull of another client joins the line of the same manifest with its own tail: read back,
    every event once, in the order emitted."""
    webhook = Webhook(url="http://127.0.0.1:9/hook", name="hook", events=("*",))
    config = EventsConfig(webhooks=(webhook,))
    root = tmp_path / "events.journal"
    events = Events(config, Metrics(), root, tmp_path / "cursors", tmp_path / "lock", True)
    events.attach()
    upstream = SimpleNamespace(name="docker.io")
    target = SimpleNamespace(upstream=upstream, repo="library/alpine")
    manifest = SimpleNamespace(
        digest="sha256:" + "c" * 64,
        media_type="application/vnd.oci.image.manifest.v1+json",
        data=b"{}",
    )
    expected: list[str | None] = []
    try:
        for i in range(record.RUN_PULLS + 40):
            client = "10.0.0.2" if i == 5 else "10.0.0.1"
            events.pull(target, "3", manifest, "GET", client, None, "hit")
            expected.append(client)
            if i == 70:
                events.emit("upstream.down", {"upstream": "docker.io"}, "docker.io")
                expected.append(None)
    finally:
        events.detach()
        events.close()
    lines = b"".join(f.read_bytes() for f in journal_files(tmp_path)).split(b"\n")[:-1]
    told = [r for line in lines if not line.startswith(b"#\t") for r in record.decode(line, "")]
    assert [r.data.get("client") if r.kind == "pull" else None for r in told if r.data] == expected
    assert [r.at for r in told] == sorted(r.at for r in told)
    # the first written at once (a quiet loop), the rest together: the fifth pull's other
    # client in the line of the four before it, then a full run, the rest up to the other
    # kind's line, and those after it
    pull_lines = [line for line in lines if line.startswith(b"pull\t")]
    assert [record.events_in(line) for line in pull_lines] == [1, 5, record.RUN_PULLS, 15, 19]


async def test_the_audit_log_has_every_pull_and_admin_action(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """With `audit_log` and no webhook: one JSON line per pull (written from the journal
    shortly after the answer), per admin API request (a refused one too) and per `mirror
    cache` command, the same CloudEvents a webhook would get."""
    audit = tmp_path / "audit.jsonl"
    digests = {}
    for i, tag in enumerate(("a", "b", "c")):
        digests[tag] = sim.add_image("team/app", tag, make_image(80 + i, [1000]))
    env = _config(
        tmp_path,
        f'[events]\naudit_log = "{audit}"\n[admin]\nenabled = true\ntoken = "{ADMIN_TOKEN}"\n',
    )
    data = tmp_path / "data"
    proc = await _start(mirror_process, sim, data, env)
    for tag in digests:
        await _pull_manifest(client, proc.url, "team/app", tag)
    await wait_until(lambda: _lines(audit) >= 3)
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(e["type"], e["data"]["tag"], e["data"]["digest"]) for e in lines] == [
        ("io.mirror.pull", tag, digest) for tag, digest in digests.items()
    ]
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with client.get(f"{proc.url}/_mirror/catalog", headers=auth) as resp:
        assert resp.status == 200
    async with client.post(f"{proc.url}/_mirror/pins", json={"pattern": "x"}) as resp:
        assert resp.status == 401
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mirror", "cache", "pin", "docker.io/team/app:a"],
        cwd=PROJECT,
        env={**proc.env, "MIRROR_DATA_DIR": str(data)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    await wait_until(lambda: _lines(audit) >= 6)
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    admin = [e["data"] for e in lines if e["type"] == "io.mirror.admin"]
    assert admin[0] == {
        "action": "GET catalog",
        "via": "api",
        "client": "127.0.0.1",
        "params": {},
        "result": "ok",
    }
    assert admin[1]["action"] == "POST pins" and admin[1]["result"] == "UNAUTHORIZED"
    assert admin[2]["action"] == "cache pin" and admin[2]["via"] == "cli"
    assert admin[2]["params"] == {"pattern": "docker.io/team/app:a"}
    assert admin[2]["result"] == "ok" and admin[2]["uid"] >= 0
    # the command's journal, read to its end by the one consumer, is gone
    await wait_until(lambda: not list((data / "events.journal").glob("command-*")))


async def test_a_command_journal_with_nothing_in_it_does_not_stay(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    tmp_path: Path,
) -> None:
    """An admin command that emits nothing removes its journal as it ends, and the serving
    deliverer removes the empty journal of a command killed before it emitted anything;
    while a command holds its journal's lock, its journal stays, however old."""
    receiver = await Receiver().start()
    try:
        data = tmp_path / "data"
        env = _config(tmp_path, _webhook(receiver, '["pull"]'))
        proc = await _start(mirror_process, sim, data, env)
        root = data / "events.journal"
        await _cli(proc.env, data, "cache", "du")
        assert not list(root.glob("command-*")), "the command left its empty journal"
        held = FileLock(root / "command-100000-0a0a0a0a" / LOCK_NAME)
        held.path.parent.mkdir(parents=True)
        assert held.try_take()
        killed = root / "command-999999-0b0b0b0b"
        killed.mkdir()
        (killed / LOCK_NAME).touch()
        old = time.time() - 60
        for path in (held.path.parent, killed):
            os.utime(path, (old, old))
        await wait_until(lambda: not killed.exists())
        assert held.path.exists(), "a running command's journal was removed"
        held.close()
        await wait_until(lambda: not held.path.parent.exists())
    finally:
        await receiver.stop()


async def test_the_audit_log_rotates_by_size_and_reopens_on_sighup(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Past audit_max_bytes the log moves to .1 (and .1 to .2, at most audit_keep files);
    after logrotate moves it away, SIGHUP makes the mirror write a new file at the path."""
    audit = tmp_path / "audit.jsonl"
    sim.add_image("team/app", "1.0", make_image(85, [1000]))
    env = _config(tmp_path, f'[events]\naudit_log = "{audit}"\naudit_max_bytes = 1500\n')
    proc = await _start(mirror_process, sim, tmp_path / "data", env)
    for _ in range(20):
        await _pull_manifest(client, proc.url, "team/app", "1.0")
    await wait_until(lambda: not waiting(tmp_path / "data", "audit"))
    kept = [audit, *(tmp_path / f"audit.jsonl.{n}" for n in range(1, 6))]
    assert all(p.exists() for p in kept) and not (tmp_path / "audit.jsonl.6").exists()
    assert all(p.stat().st_size <= 1500 for p in kept)
    lines = [line for p in kept for line in p.read_text().splitlines()]
    assert all(json.loads(line)["type"] == "io.mirror.pull" for line in lines)
    moved = tmp_path / "rotated.jsonl"
    audit.rename(moved)
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGHUP)
    await wait_until(lambda: audit.exists() and "audit log reopened" in proc.log.read_text())
    before = len(moved.read_text().splitlines())
    await _pull_manifest(client, proc.url, "team/app", "1.0")
    await wait_until(lambda: _lines(audit) == 1)
    assert len(moved.read_text().splitlines()) == before


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def _cli(env: dict[str, str], data: Path, *args: str) -> str:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mirror", *args],
        cwd=PROJECT,
        env={**env, "MIRROR_DATA_DIR": str(data)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def test_every_kind_is_told_where_it_happens(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A tag that moved upstream, a blob upstream sends wrong, an upstream that goes down and
    comes back, a pull budget that falls below its floor, and — from commands run against the
    serving mirror's data, queued by them and delivered by the mirror — an eviction, an
    export and an import: each is one event of its kind, with what happened."""
    old, new = make_image(90, [1000]), make_image(91, [2000])
    old_digest = sim.add_image("team/app", "1.0", old)
    receiver = await Receiver().start()
    try:
        env = _config(
            tmp_path,
            f'{_webhook(receiver)}[upstreams."docker.io"]\ntag_ttl = 0\npull_budget_floor = 10\n',
        )
        data = tmp_path / "data"
        proc = await _start(mirror_process, sim, data, env)
        await _pull(client, proc.url, "team/app", "1.0", old)
        new_digest = sim.add_image("team/app", "1.0", new)
        await _pull_manifest(client, proc.url, "team/app", "1.0")
        await wait_until(lambda: bool(receiver.of("tag.moved")))
        [moved] = receiver.of("tag.moved")
        assert moved["data"] == {
            "upstream": "docker.io",
            "repository": "team/app",
            "tag": "1.0",
            "old": old_digest,
            "new": new_digest,
        }

        wrong = next(iter(new.blobs))
        sim.fault(wrong, "wrong", times=1)
        async with client.get(f"{proc.url}/v2/team/app/blobs/{wrong}") as resp:
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        await wait_until(lambda: bool(receiver.of("digest.mismatch")))
        [mismatch] = receiver.of("digest.mismatch")
        assert mismatch["data"]["what"] == "blob" and mismatch["data"]["expected"] == wrong
        assert mismatch["data"]["actual"] not in (None, wrong)

        await sim.down()
        async with client.get(f"{proc.url}/v2/team/app/manifests/1.0", headers=ACCEPT) as resp:
            assert resp.headers["X-Mirror-Cache"] == "stale"
        await wait_until(lambda: bool(receiver.of("upstream.down")))
        await sim.up()
        await _pull_manifest(client, proc.url, "team/app", "1.0")
        await wait_until(lambda: bool(receiver.of("upstream.up")))
        assert [
            e["type"] for e in receiver.delivered() if ".up" in e["type"] or ".down" in e["type"]
        ] == [
            "io.mirror.upstream.down",
            "io.mirror.upstream.up",
        ]

        sim.rate_limit(limit=100, remaining=3)
        await _pull_manifest(client, proc.url, "team/app", "1.0")
        await wait_until(lambda: bool(receiver.of("ratelimit.low")))
        [low] = receiver.of("ratelimit.low")
        assert (low["data"]["remaining"], low["data"]["floor"]) == (3, 10)

        await _pull(client, proc.url, "team/app", "1.0", new)  # the blob whole this time
        bundle = tmp_path / "bundle.tar"
        await _cli(proc.env, data, "export", "--out", str(bundle), "docker.io/team/app:1.0")
        await _cli(proc.env, data, "cache", "evict", "--repo", "docker.io/team/app")
        await _cli(proc.env, data, "import", str(bundle))
        await wait_until(lambda: bool(receiver.of("import.done")), timeout=15)
        [exported] = receiver.of("export.done")
        assert exported["data"]["images"] == ["docker.io/team/app:1.0"]
        evicted = {d for e in receiver.of("blob.evicted") for d in e["data"]["digests"]}
        assert set(new.blobs) <= evicted  # what the tag holds now
        [imported] = receiver.of("import.done")
        assert imported["data"]["tags"] == 1 and imported["data"]["refused"] is None
        kinds = [e["type"] for e in receiver.delivered()]
        assert kinds.index("io.mirror.export.done") < kinds.index("io.mirror.blob.evicted")
        assert kinds.index("io.mirror.blob.evicted") < kinds.index("io.mirror.import.done")
    finally:
        await receiver.stop()


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[[events.webhooks]]\nurl = "ftp://x"\n', "events.webhooks[0].url"),
        ('[[events.webhooks]]\nurl = "http://u:p@h/x"\n', "events.webhooks[0].url"),
        (
            '[[events.webhooks]]\nurl = "http://h/x"\nevents = ["pul"]\n',
            "events.webhooks[0].events",
        ),
        (
            '[[events.webhooks]]\nurl = "http://h/x"\nsecret = "short"\n',
            "events.webhooks[0].secret",
        ),
        ('[[events.webhooks]]\nurl = "http://h/x"\ntimeout = 0\n', "events.webhooks[0].timeout"),
        (
            '[[events.webhooks]]\nurl = "http://h/x"\nheaders = { Content-Type = "x" }\n',
            "events.webhooks[0].headers",
        ),
        (
            '[[events.webhooks]]\nurl = "http://h/x"\nheaders = ["x"]\n',
            "events.webhooks[0].headers",
        ),
        (
            '[[events.webhooks]]\nurl = "http://h/a"\n[[events.webhooks]]\nurl = "http://h/b"\n',
            "events.webhooks[1].name",
        ),
        ("[events]\nmax_queue = 0\n", "events.max_queue"),
        ('[events]\naudit_log = "/nonexistent/dir/audit"\n', "events.audit_log"),
        ("[events]\naudit_max_bytes = 10\naudit_keep = 0\n", "events.audit_keep"),
        ("[events]\nwebhooks = 3\n", "events.webhooks"),
    ],
)
def test_bad_event_settings_stop_the_start_naming_the_key(
    tmp_path: Path, toml: str, key: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(path, env={})
