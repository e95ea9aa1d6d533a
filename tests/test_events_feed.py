"""The journals read forward (events/feed.py), on real files: two processes' journals merged
by when each event was emitted, taken in batches across them, trimmed oldest first."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mirror.events import record
from mirror.events.feed import Consumer, Journals
from mirror.events.journal import Journal


def _write(journal: Journal, tags: list[str]) -> None:
    for tag in tags:
        journal.append(record.line("pull" if tag[0] != "x" else "tag.moved", tag).encode())


def _tags(journals: Journals, consumer: Consumer, limit: int) -> list[str]:
    taken = consumer.take(journals, limit)
    consumer.advance(taken)
    return [line.split(b"\t", 2)[2].decode() for _, _, _, line in taken.lines]


def _trimmed(root: Path, wanted: int, most: int) -> list[str]:
    """Trim a consumer of pulls (at the journals' beginnings, `wanted` of them waiting) to
    `most`, and what it then takes, in order: exactly `most` are kept."""
    journals = Journals(root)
    journals.refresh()
    consumer = Consumer("webhook:one", ["pull"], {})
    assert consumer.depth(journals) == wanted
    assert consumer.trim(journals, most) == wanted - most
    assert consumer.depth(journals) == most
    kept = []
    while taken := _tags(journals, consumer, 1000):
        kept += taken
    assert len(kept) == most
    return kept


def test_two_journals_are_taken_in_emission_order_and_trimmed_oldest_first(
    tmp_path: Path,
) -> None:
    """150 pulls in one journal, then 150 in another with a kind nobody wants between them:
    batches of 100 come in the order they were emitted, across both, what the consumer does
    not want passed over; a trim to 30 drops the oldest and says how many."""
    root = tmp_path / "events.journal"
    first, second = Journal(root, "worker-0"), Journal(root, "worker-1")
    assert first.claim() and second.claim()
    a = [f"a{i}" for i in range(150)]
    b = [f"b{i}" for i in range(150)]
    _write(first, a)
    _write(second, [t if i % 10 else f"x{t}" for i, t in enumerate(b)])
    journals = Journals(root)
    journals.refresh()
    pulls = Consumer("webhook:one", ["pull"], {})
    assert pulls.depth(journals) == 150 + 135
    got = _tags(journals, pulls, 100) + _tags(journals, pulls, 100)
    assert got == a[:100] + a[100:] + [t for i, t in enumerate(b[:56]) if i % 10]
    assert pulls.depth(journals) == 135 - 50

    everything = Consumer("webhook:two", ["pull", "tag.moved"], {})
    assert everything.trim(journals, 30) == 300 - 30
    assert everything.depth(journals) == 30
    rest = _tags(journals, everything, 100)
    assert rest == [t if i % 10 else f"x{t}" for i, t in enumerate(b)][-30:]
    assert everything.trim(journals, 30) == 0, "nothing more to drop"
    first.close()
    second.close()


def test_a_trim_keeps_the_newest_across_journals_whatever_their_sizes_and_ties(
    tmp_path: Path,
) -> None:
    """Three journals written at different rates (one more than a read chunk), lines of the
    very same nanosecond among them, a kind the consumer does not want between: trimmed to
    `most`, exactly `most` wanted lines wait, and none of those dropped is newer than one
    kept. A journal that ended long ago caps nothing."""
    root = tmp_path / "events.journal"
    names = ["worker-0", "worker-1", "worker-2"]
    writers = {name: Journal(root, name) for name in names}
    assert all(w.claim() for w in writers.values())
    base = 1_700_000_000_000_000_000
    wanted: list[tuple[int, str]] = []
    writers["worker-2"].append(f"pull\t{base - 10**9}\told\n".encode())  # long before the rest
    wanted.append((base - 10**9, "old"))
    for i in range(40_000):
        at = base + (i // 3) * 1000  # three lines share each time
        name = names[0] if i % 4 else names[1]
        kind = "tag.moved" if i % 7 == 0 else "pull"
        writers[name].append(f"{kind}\t{at}\t{name}-{i}\n".encode())
        if kind == "pull":
            wanted.append((at, f"{name}-{i}"))
    kept = _trimmed(root, len(wanted), 5_000)
    times = {tag: at for at, tag in wanted}
    dropped = set(times) - set(kept)
    assert max(times[t] for t in dropped) <= min(times[t] for t in kept)
    for writer in writers.values():
        writer.close()


def test_a_trim_reads_past_what_the_consumer_does_not_want_and_an_older_versions_lines(
    tmp_path: Path,
) -> None:
    """One journal opens with lines of an older version (seconds, not nanoseconds), then
    more lines of a kind the consumer does not want than one read holds, then pulls; another
    holds pulls all along. A trim goes on past the unwanted lines to the pulls behind them
    and keeps exactly the newest `most`."""
    root = tmp_path / "events.journal"
    first, second = Journal(root, "worker-0"), Journal(root, "worker-1")
    assert first.claim() and second.claim()
    base = 1_700_000_000_000_000_000
    wanted: list[tuple[int, str]] = []
    for i in range(3):
        first.append(f"pull\t{base / 1e9 - 10 + i:.3f}\t{{}}\n".encode())
        wanted.append((base - (10 - i) * 10**9, f"old-{i}"))
    for i in range(30_000):
        first.append(f"tag.moved\t{base + i * 1000}\tmoved-{i}\n".encode())
    for i in range(4_000):  # a microsecond apart: what a take's merge tells apart
        at = base + 30_000_000 + 2000 * i
        first.append(f"pull\t{at}\tfirst-{i}\n".encode())
        second.append(f"pull\t{at + 1000}\tsecond-{i}\n".encode())
        wanted += [(at, f"first-{i}"), (at + 1000, f"second-{i}")]
    assert _trimmed(root, len(wanted), 1_000) == [tag for _, tag in sorted(wanted)[-1_000:]]
    first.close()
    second.close()


@pytest.mark.parametrize("seed", range(6))
def test_a_trim_of_many_blocks_keeps_exactly_the_newest(tmp_path: Path, seed: int) -> None:
    """One to three journals of megabytes (many of the blocks a count marks, which a trim
    passes unread), lines of random lengths, ties and a kind nobody wants among them, trimmed
    to a random `most`: exactly `most` are kept, none of those dropped newer than one kept."""
    rnd = random.Random(seed)
    root = tmp_path / "events.journal"
    names = [f"worker-{i}" for i in range(rnd.randint(1, 3))]
    writers = {name: Journal(root, name) for name in names}
    assert all(w.claim() for w in writers.values())
    times: dict[str, int] = {}
    at = 1_700_000_000_000_000_000
    for i in range(20_000):
        at += rnd.choice((0, 0, 1000))  # each journal's lines in the order of their times
        name = rnd.choice(names)
        kind = "tag.moved" if rnd.random() < 0.15 else "pull"
        writers[name].append(f"{kind}\t{at}\t{name}-{i}-{'x' * rnd.randint(0, 200)}\n".encode())
        if kind == "pull":
            times[f"{name}-{i}"] = at
    most = rnd.randint(1, len(times) - 1)
    kept = [tag.rstrip("x").rstrip("-") for tag in _trimmed(root, len(times), most)]
    dropped = set(times) - set(kept)
    assert max(times[t] for t in dropped) <= min(times[t] for t in kept)
    for writer in writers.values():
        writer.close()


def test_a_run_of_pulls_in_one_line_counts_takes_and_passes_as_its_events(
    tmp_path: Path,
) -> None:
    """Lines of runs (several pulls each, record.RUN between them) among single ones: the
    depth counts their events, a take holds about `limit` events but never splits a line
    (though one line is always taken), an advance passes the line's events together, and a
    consumer that wants no pulls does not count a run's."""
    root = tmp_path / "events.journal"
    first, second = Journal(root, "worker-0"), Journal(root, "worker-1")
    assert first.claim() and second.claim()
    base = 1_700_000_000_000_000_000  # lines a microsecond or more apart (a take tells them)
    run = record.RUN
    first.append(f"pull\t{base}\ta{run}5{run}9\n".encode())  # three pulls
    first.append(f"tag.moved\t{base + 10_000}\tx\n".encode())
    first.append(f"pull\t{base + 20_000}\tb\n".encode())
    first.append(f"pull\t{base + 30_000}\tc{f'{run}1' * 49}\n".encode())  # fifty
    for i in range(5):
        second.append(f"pull\t{base + 25_000 + i * 10_000}\td{i}\n".encode())
    journals = Journals(root)
    journals.refresh()
    pulls = Consumer("webhook:one", ["pull"], {})
    assert pulls.depth(journals) == 3 + 1 + 50 + 5
    moves = Consumer("webhook:two", ["tag.moved"], {})
    assert moves.depth(journals) == 1

    taken = pulls.take(journals, 2)
    assert [line.split(b"\t")[2] for *_, line in taken.lines] == [f"a{run}5{run}9".encode()]
    assert pulls.advance(taken) == 3
    assert pulls.depth(journals) == 56
    taken = pulls.take(journals, 4)  # b, d0, then c's fifty would be too many
    assert [line.split(b"\t")[2][:2] for *_, line in taken.lines] == [b"b", b"d0"]
    assert pulls.advance(taken) == 2
    assert pulls.depth(journals) == 54
    taken = pulls.take(journals, 100)
    heads = [line.split(b"\t")[2][:2] for *_, line in taken.lines]
    assert heads == [b"c" + run.encode(), b"d1", b"d2", b"d3", b"d4"]
    assert pulls.advance(taken) == 54
    assert pulls.depth(journals) == 0
    first.close()
    second.close()


@pytest.mark.parametrize("seed", range(3))
def test_a_trim_of_runs_keeps_the_newest_and_passes_a_line_whole(tmp_path: Path, seed: int) -> None:
    """Journals of lines holding runs of 1 to RUN_PULLS pulls, trimmed to a random `most`:
    what waits after is what a take then finds, at most `most` and fewer only by part of one
    line's run (a line passes whole), and no line dropped is newer than one kept."""
    rnd = random.Random(seed)
    root = tmp_path / "events.journal"
    names = [f"worker-{i}" for i in range(rnd.randint(1, 3))]
    writers = {name: Journal(root, name) for name in names}
    assert all(w.claim() for w in writers.values())
    times: dict[str, tuple[int, int]] = {}  # line → its time, its pulls
    at = 1_700_000_000_000_000_000
    for i in range(8_000):
        at += rnd.choice((0, 1000))
        name = rnd.choice(names)
        pulls = rnd.randint(1, record.RUN_PULLS) if rnd.random() < 0.3 else 1
        more = "".join(f"{record.RUN}{rnd.randint(0, 999)}" for _ in range(pulls - 1))
        writers[name].append(f"pull\t{at}\t{name}-{i}{more}\n".encode())
        times[f"{name}-{i}"] = (at, pulls)
    total = sum(n for _, n in times.values())
    most = rnd.randint(1, total - 1)
    journals = Journals(root)
    journals.refresh()
    consumer = Consumer("webhook:one", ["pull"], {})
    assert consumer.depth(journals) == total
    dropped = consumer.trim(journals, most)
    left = consumer.depth(journals)
    assert left == total - dropped
    assert most - record.RUN_PULLS < left <= most
    kept = []
    while taken := _tags(journals, consumer, 1000):
        kept += [tag.split(record.RUN)[0] for tag in taken]
    assert sum(times[tag][1] for tag in kept) == left
    gone = set(times) - set(kept)
    assert max(times[t][0] for t in gone) <= min(times[t][0] for t in kept)
    for writer in writers.values():
        writer.close()
