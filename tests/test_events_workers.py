"""Events with several serving processes on one data directory: each writes a journal of its
own, one delivers at a time (the delivery lock), all append to one audit log.

The processes are real: `tests/events_worker.py <index>` runs the whole app as a worker of
`mirror serve --workers N` does (`build_app(config, worker=index)`), each on a port of its
own until the supervisor that puts them on one port exists. Receivers are real HTTP servers
on 127.0.0.1 that tell which process sent each delivery; the upstream is the simulator."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import MirrorProcess, lock_holder, wait_until
from images import make_image
from journals import journaled, waiting
from upstream_sim import UpstreamSim
from webhooks import Receiver

from mirror.events.journal import journal_name
from mirror.workers.deliverer import NICENESS

ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
WORKER = Path(__file__).resolve().parent / "events_worker.py"


class Worker(MirrorProcess):
    """A serving process of several on one data directory, by its index."""

    def __init__(
        self, index: int, data_dir: Path, upstream_url: str, extra_env: dict[str, str]
    ) -> None:
        super().__init__(data_dir, upstream_url, extra_env)
        self.index = index

    def command(self) -> list[str]:
        return [sys.executable, str(WORKER), str(self.index), *super().command()[4:-2]]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Factory of worker processes, all stopped at the end of the test."""
    started: list[Worker] = []

    def make(index: int, upstream_url: str, env: dict[str, str]) -> Worker:
        worker = Worker(index, tmp_path / "data", upstream_url, env)
        started.append(worker)
        return worker

    yield make
    for worker in started:
        worker.stop()


def _config(tmp_path: Path, body: str) -> dict[str, str]:
    path = tmp_path / "events.toml"
    path.write_text(body)
    return {"MIRROR_CONFIG": str(path)}


def _webhook(receiver: Receiver) -> str:
    return f'[[events.webhooks]]\nurl = "{receiver.url}"\nname = "receiver"\nevents = ["pull"]\n'


async def _pull(client: aiohttp.ClientSession, url: str, tag: str) -> None:
    async with client.get(f"{url}/v2/team/app/manifests/{tag}", headers=ACCEPT) as resp:
        assert resp.status == 200, await resp.text()


def _unique(events: list[dict[str, Any]]) -> Counter[str]:
    return Counter(e["id"] for e in events)


async def test_workers_deliver_every_pull_once_from_one_process_across_a_kill_9(
    sim: UpstreamSim,
    workers: Callable[..., Worker],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Two workers on one data directory, pulled from alternately. Only the one holding the
    delivery lock sends. With the receiver down, each is pulled from again and the
    deliverer is killed with SIGKILL right after its last answer: the other takes the lock
    over (and reads on from the cursors, the killed one's journal too), the killed one is
    started again with its index, the receiver comes up. It gets every pull exactly once,
    each worker's in the order of its pulls, all from the one deliverer of the moment; the
    audit log, written by one deliverer and then the other, rotated by size, has every pull
    once, each line whole."""
    tags = [f"w{w}-{i}" for i in range(8) for w in (0, 1)]
    for tag in tags:
        sim.add_image("team/app", tag, make_image(200, [1000]))
    receiver = await Receiver().start()
    audit = tmp_path / "audit.jsonl"
    toml = f'[events]\naudit_log = "{audit}"\naudit_max_bytes = 3000\naudit_keep = 100\n'
    env = _config(tmp_path, toml + _webhook(receiver))
    pool = [await asyncio.to_thread(workers(i, sim.url, env).start) for i in (0, 1)]
    receiver.senders = {w.pid for w in pool}
    lock = tmp_path / "data" / "events.deliver.lock"
    await wait_until(lambda: lock_holder(lock) in receiver.senders)
    deliverer = next(w for w in pool if w.pid == lock_holder(lock))
    other = next(w for w in pool if w is not deliverer)
    pulled: dict[int, list[str]] = {0: [], 1: []}

    async def pull_from(worker: Worker, tag: str) -> None:
        await _pull(client, worker.url, tag)
        pulled[worker.index].append(tag)

    for tag in tags[:8]:
        await pull_from(pool[int(tag[1])], tag)
    await wait_until(lambda: len(receiver.of("pull")) == 8)
    assert {a.sender for a in receiver.attempts} == {deliverer.pid}

    await receiver.stop()
    for tag in tags[8:]:
        await pull_from(pool[int(tag[1])], tag)
    last = next(t for t in reversed(tags) if int(t[1]) == deliverer.index)
    await pull_from(deliverer, last)
    await wait_until(lambda: journaled(tmp_path / "data", "team/app", [*tags[8:], last]))
    await asyncio.to_thread(deliverer.stop, signal.SIGKILL)  # its events journaled: killed
    await wait_until(lambda: lock_holder(lock) == other.pid, timeout=15)
    await asyncio.to_thread(deliverer.start)
    receiver.senders = {other.pid, deliverer.pid}
    before = len(receiver.attempts)
    await receiver.start()
    total = sum(len(p) for p in pulled.values())
    await wait_until(lambda: len(receiver.of("pull")) >= total, timeout=30)

    delivered = receiver.of("pull")
    assert max(_unique(delivered).values()) == 1, "an event was delivered twice"
    assert len(delivered) == total
    for index, mine in pulled.items():
        tag_order = [e["data"]["tag"] for e in delivered if e["data"]["tag"][1] == str(index)]
        assert tag_order == mine
    assert {a.sender for a in receiver.attempts[before:]} == {other.pid}
    assert lock_holder(lock) == other.pid, "the restarted worker does not take the lock back"

    await wait_until(lambda: not waiting(tmp_path / "data", "audit"))
    files = [audit, *audit.parent.glob("audit.jsonl.[0-9]*")]
    assert len(files) > 2, "the audit log rotated"
    assert all(p.stat().st_size <= 3000 for p in files)
    lines = [line for p in files for line in p.read_text().splitlines()]
    events = [json.loads(line) for line in lines]  # every line whole
    assert max(_unique(events).values()) == 1
    assert Counter(e["data"]["tag"] for e in events) == Counter(
        t for p in pulled.values() for t in p
    )
    await receiver.stop()


async def test_the_audit_log_takes_two_writers_rotating_it_by_size(
    sim: UpstreamSim,
    workers: Callable[..., Worker],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Two workers pulled from at once, 8 pulls in flight on each, the audit log rotating every
    dozen lines or so: every pull of both is in it once (written from both journals by the
    one deliverer), every line whole, no file past its size (6000 bytes)."""
    sim.add_image("team/app", "1.0", make_image(201, [1000]))
    audit = tmp_path / "audit.jsonl"
    env = _config(
        tmp_path, f'[events]\naudit_log = "{audit}"\naudit_max_bytes = 6000\naudit_keep = 500\n'
    )
    pool = [await asyncio.to_thread(workers(i, sim.url, env).start) for i in (0, 1)]
    gates = [asyncio.Semaphore(8) for _ in pool]  # a batch: at most 8 pulls' lines

    async def pull(index: int) -> None:
        async with gates[index]:
            await _pull(client, pool[index].url, "1.0")

    await asyncio.gather(*(pull(i % 2) for i in range(240)))
    await wait_until(lambda: not waiting(tmp_path / "data", "audit"))
    files = [audit, *audit.parent.glob("audit.jsonl.[0-9]*")]
    assert len(files) > 10, "it rotated, many times"
    assert all(p.stat().st_size <= 6000 for p in files)
    events = [json.loads(line) for p in files for line in p.read_text().splitlines()]
    assert len(events) == 240 and max(_unique(events).values()) == 1
    assert len({e["id"].split("-")[0] for e in events}) == 2, "both wrote"


async def test_sighup_reopens_the_audit_log_in_every_worker(
    sim: UpstreamSim,
    workers: Callable[..., Worker],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Left to logrotate (audit_max_bytes = 0): after it moves the file away, SIGHUP makes
    each worker reopen it (whichever delivers writes it), and nothing more goes to the old
    one."""
    sim.add_image("team/app", "1.0", make_image(202, [1000]))
    audit = tmp_path / "audit.jsonl"
    env = _config(tmp_path, f'[events]\naudit_log = "{audit}"\naudit_max_bytes = 0\n')
    pool = [await asyncio.to_thread(workers(i, sim.url, env).start) for i in (0, 1)]
    for worker in pool:
        await _pull(client, worker.url, "1.0")
    await wait_until(lambda: _lines(audit) == 2)
    moved = tmp_path / "rotated.jsonl"
    audit.rename(moved)
    for worker in pool:
        os.kill(worker.pid, signal.SIGHUP)
    for worker in pool:
        await wait_until(lambda w=worker: "audit log reopened" in w.log.read_text())  # type: ignore[misc]
    for worker in pool:
        await _pull(client, worker.url, "1.0")
    await wait_until(lambda: _lines(audit) == 2)
    assert len(moved.read_text().splitlines()) == 2


async def test_a_worker_index_serves_once(
    sim: UpstreamSim,
    workers: Callable[..., Worker],
    tmp_path: Path,
) -> None:
    """A second process started as a worker index that is running (or as a second single
    mirror on the data directory) stops at start, naming the journal the first one
    writes, and the first one goes on serving."""
    receiver = Receiver()
    env = _config(tmp_path, _webhook(receiver))
    first = await asyncio.to_thread(workers(0, sim.url, env).start)
    with pytest.raises(RuntimeError, match=r"another process writes the event journal .*worker-0"):
        await asyncio.to_thread(workers(0, sim.url, env).start)
    assert first.proc is not None and first.proc.poll() is None


async def test_workers_deliver_what_a_killed_single_mirror_journaled(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    workers: Callable[..., Worker],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A single `mirror serve` is killed with SIGKILL right after ten pulls while the
    receiver is down; two workers start on its data: the receiver gets the ten pulls exactly
    once and in order, and then the single mirror's journal, which nobody writes any more,
    is deleted."""
    tags = [f"v{i}" for i in range(10)]
    for tag in tags:
        sim.add_image("team/app", tag, make_image(203, [1000]))
    receiver = Receiver()
    env = _config(tmp_path, _webhook(receiver))
    single = await asyncio.to_thread(mirror_process(sim.url, tmp_path / "data", env).start)
    for tag in tags:
        await _pull(client, single.url, tag)
    await wait_until(lambda: journaled(tmp_path / "data", "team/app", tags))
    await asyncio.to_thread(single.stop, signal.SIGKILL)
    for index in (0, 1):
        await asyncio.to_thread(workers(index, sim.url, env).start)
    await receiver.start()
    try:
        await wait_until(lambda: len(receiver.of("pull")) >= 10, timeout=15)
        delivered = receiver.of("pull")
        assert [e["data"]["tag"] for e in delivered] == tags
        assert max(_unique(delivered).values()) == 1
        root = tmp_path / "data" / "events.journal"
        await wait_until(lambda: not list(root.glob("[0-9]*")))
    finally:
        await receiver.stop()


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_journals_are_named_by_worker() -> None:
    """A single process keeps the journal where it always was; workers each have their own."""
    assert journal_name(None) == ""
    assert journal_name(0) != journal_name(1) != journal_name(None)


async def test_mirror_serve_with_three_workers_delivers_every_pull_once_across_a_kill_9(
    sim: UpstreamSim,
    mirror_process: Callable[..., MirrorProcess],
    tmp_path: Path,
) -> None:
    """`mirror serve --workers 3`, the receiver down, twelve pulls spread over the workers
    (each on a connection of its own), then the deliverer killed with SIGKILL: the
    supervisor starts it again and it delivers on from the cursors; once the receiver is up
    it gets every pull exactly once. The deliverer is a process of its own beside the
    workers, not one of them, at a lower priority than they."""
    tags = [f"t{i}" for i in range(12)]
    for tag in tags:
        sim.add_image("team/app", tag, make_image(300, [1000]))
    receiver = await Receiver().start()
    proc = mirror_process(sim.url, env=_config(tmp_path, _webhook(receiver)), workers=3)
    await asyncio.to_thread(proc.start)
    journals = tmp_path / "data" / "events.journal"
    assert not list(journals.glob("command-*")), "the supervisor's start left a journal"
    lock = tmp_path / "data" / "events.deliver.lock"
    await wait_until(lambda: lock_holder(lock) is not None)
    assert proc.proc is not None
    holder = lock_holder(lock)
    children = Path(f"/proc/{proc.proc.pid}/task/{proc.proc.pid}/children").read_text().split()
    assert len(children) == 4 and str(holder) in children
    base = os.getpriority(os.PRIO_PROCESS, proc.proc.pid)  # the supervisor's
    lowered = min(base + NICENESS, 19)  # the kernel's lowest priority is 19
    niceness = {int(c): os.getpriority(os.PRIO_PROCESS, int(c)) for c in children}
    assert niceness.pop(holder) == lowered
    assert set(niceness.values()) == {base}, "the workers run at the supervisor's priority"
    await wait_until(lambda: f"the deliverer (pid {holder}) delivering" in proc.log.read_text())
    await receiver.stop()
    for tag in tags:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True), trust_env=False
        ) as session:
            await _pull(session, proc.url, tag)
    await wait_until(lambda: journaled(tmp_path / "data", "team/app", tags))
    deliverer = lock_holder(lock)
    assert deliverer is not None
    os.kill(deliverer, signal.SIGKILL)
    await wait_until(lambda: lock_holder(lock) not in (None, deliverer), timeout=20)
    assert f"the deliverer (pid {deliverer}) exited with signal 9" in proc.log.read_text()
    again = lock_holder(lock)
    assert again is not None
    assert os.getpriority(os.PRIO_PROCESS, again) == lowered
    await receiver.start()
    await wait_until(lambda: len(receiver.of("pull")) >= len(tags), timeout=30)
    delivered = receiver.of("pull")
    assert max(_unique(delivered).values()) == 1, "an event was delivered twice"
    assert sorted(e["data"]["tag"] for e in delivered) == sorted(tags)
    workers_seen = {
        re.search(r"\bworker=(\d+)", line)[1]  # type: ignore[index]
        for line in proc.log.read_text().splitlines()
        if "logger=mirror.access" in line and "/manifests/t" in line
    }
    assert len(workers_seen) >= 2, "the pulls reached several workers"
