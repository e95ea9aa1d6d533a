"""What the event journals hold for a consumer, read from the data directory as the mirror
left it (events/journal.py, events/cursors.py): the lines past its saved cursor."""

from __future__ import annotations

from pathlib import Path

from mirror.events import cursors, record


def waiting(data: Path, consumer: str) -> list[record.Record]:
    """The events of the journal lines past a consumer's cursor (`webhook:<name>`, `audit`),
    as saved."""
    place = cursors.load(data / "events.cursors").get(consumer, {})
    found = []
    root = data / "events.journal"
    for directory in [root, *(p for p in root.iterdir() if p.is_dir())]:
        name = "" if directory == root else directory.name
        file, offset = place.get(name, (0, 0))
        for number in sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()):
            if number < file:
                continue
            data_ = (directory / str(number)).read_bytes()[offset if number == file else 0 :]
            lines = data_.split(b"\n")[:-1]
            for line in lines:
                if not line.startswith(b"#\t"):
                    found += record.decode(line, "")
    return found


def journal_files(data: Path) -> list[Path]:
    """Every journal file there is, of every process."""
    return sorted(p for p in (data / "events.journal").rglob("*") if p.name.isdigit())


def journaled(data: Path, repository: str, tags: list[str]) -> bool:
    """Whether the journals hold a pull for each of `tags` (a tag twice: two): a busy
    process writes the lines of the last 10 ms together, so a test that kills it waits for
    them first. A line's pulls share their head (record.py): its tag, and its count."""
    lines = b"".join(f.read_bytes() for f in journal_files(data)).split(b"\n")[:-1]
    for tag in set(tags):
        head = f"\t{repository}\t{tag}\t".encode()
        held = sum(record.events_in(line) for line in lines if head in line)
        if held < tags.count(tag):
            return False
    return True
