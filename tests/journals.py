"""What the event journals hold for a consumer, read from the data directory as the mirror
left it (events/journal.py, events/cursors.py): the lines past its saved cursor."""

from __future__ import annotations

from pathlib import Path

from mirror.events import cursors, record


def waiting(data: Path, consumer: str) -> list[record.Record]:
    """The journal lines past a consumer's cursor (`webhook:<name>`, `audit`), as saved."""
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
            found += [record.decode(line, "") for line in lines if not line.startswith(b"#\t")]
    return found


def journal_files(data: Path) -> list[Path]:
    """Every journal file there is, of every process."""
    return sorted(p for p in (data / "events.journal").rglob("*") if p.name.isdigit())


def journaled(data: Path, repository: str, tags: list[str]) -> bool:
    """Whether the journals hold a pull line for each of `tags` (a tag twice: two): a busy
    process writes the lines of the last 10 ms together, so a test that kills it waits for
    them first."""
    held = b"".join(f.read_bytes() for f in journal_files(data))
    return all(held.count(f"\t{repository}\t{tag}\t".encode()) >= tags.count(tag) for tag in tags)
