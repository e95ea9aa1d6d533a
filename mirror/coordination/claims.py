"""Who fills a digest for the whole host, and what every other process sees of that fill.

    <data_dir>/run/fills/<hex>.lock   flock'ed by the one process filling the digest; its
                                      content is that process's announcement (JSON: pid, size,
                                      source, and an error if the fill failed)
    <data_dir>/tmp/<hex>.partial      the fill's file, growing; there is one per digest, and
                                      whoever holds the lock writes it

A process that misses a digest tries the lock. If it gets it, it fills (resuming the partial
file if a holder before it died mid-way: those bytes are hashed again and upstream is asked
for the rest with Range). If not, it watches: the partial file's size says how far the fill
has come, the committed blob file says it is done, and the lock coming free without a blob
says the holder has gone — failed (its announcement carries the error, which every follower
then reports) or died (no error: the watcher tries the lock and carries the fill on). The
kernel frees the lock of a holder that dies, so no digest is ever stuck behind a dead fill.

Everything here blocks (files, flock): it runs in the store's executor threads.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

from mirror.locks import share, try_hold
from mirror.oci.reference import Digest
from mirror.store.layout import Layout


@dataclass(frozen=True, slots=True)
class Sighting:
    """What a watcher saw of another process's fill at one look."""

    #: The blob is committed: read it from the store (or keep reading the partial's inode).
    committed: bool = False
    #: The holder went away without committing or failing (it died): try to take over.
    gone: bool = False
    #: The holder failed: (code, message) as its own requesters saw it.
    error: tuple[str, str] | None = None
    #: The blob's size, once the holder has it from its source.
    size: int | None = None
    #: Where the holder reads from: "upstream" or "cold".
    source: str = "upstream"
    #: Bytes in the partial file now.
    written: int = 0


class Claim:
    """This process's side of one digest's host-wide fill: it holds the lock (`owned`) or
    watches the holder's. Close it (`release`) when done with either."""

    def __init__(self, layout: Layout, digest: Digest) -> None:
        self._layout = layout
        self.digest = digest
        layout.fills.mkdir(parents=True, exist_ok=True)
        self.owned, self._lock = try_hold(layout.fill_lock(digest))

    # -- the holder ------------------------------------------------------------------------

    def announce(self, size: int | None, source: str) -> None:
        """Tell watchers the size and the source, once the source answered."""
        self._write({"pid": os.getpid(), "size": size, "source": source, "error": None})

    def failed(self, code: str, message: str) -> None:
        """Tell watchers the fill failed and why, before the lock is let go."""
        self._write({"pid": os.getpid(), "error": [code, message]})

    def _write(self, announcement: dict[str, object]) -> None:
        assert self.owned
        self._lock.write(json.dumps(announcement).encode() + b"\n")

    # -- a watcher -------------------------------------------------------------------------

    def watch(self, partial: int | None) -> tuple[Sighting, int | None]:
        """One look at the holder's fill. `partial` is the caller's descriptor of the partial
        file (None until it exists): returned as it is, or newly opened at this look (the
        caller keeps and closes it: it is what its clients read)."""
        if self._layout.blob(self.digest).exists():
            return Sighting(committed=True), partial
        if self._lock.try_take(shared=True):  # the holder let go, or died
            self._lock.release()
            if self._layout.blob(self.digest).exists():
                return Sighting(committed=True), partial
            said = self._announcement()
            error = said.get("error")
            if isinstance(error, list) and len(error) == 2:
                return Sighting(error=(str(error[0]), str(error[1]))), partial
            if partial is not None and not self._same(partial):  # discarded: no resuming it
                dropped = ("UPSTREAM_UNAVAILABLE", "the fill this one followed was dropped")
                return Sighting(error=dropped), partial
            return Sighting(gone=True), partial
        if partial is None:
            with contextlib.suppress(FileNotFoundError):
                partial = os.open(
                    self._layout.fill_partial(self.digest), os.O_RDONLY | os.O_CLOEXEC
                )
                share(partial)  # followed here: the holder must not drop it as abandoned
        said = self._announcement()
        size = said.get("size")
        written = os.fstat(partial).st_size if partial is not None else 0
        seen = Sighting(
            size=size if isinstance(size, int) else None,
            source=str(said.get("source") or "upstream"),
            written=written,
        )
        return seen, partial

    def _same(self, partial: int) -> bool:
        """Whether the fill's path still names the partial file this process follows."""
        try:
            return (
                os.stat(self._layout.fill_partial(self.digest)).st_ino == os.fstat(partial).st_ino
            )
        except FileNotFoundError:
            return False

    def _announcement(self) -> dict[str, object]:
        """The holder's announcement; empty while it has written none (or half of one)."""
        try:
            said = json.loads(self._lock.read() or b"{}")
        except ValueError:
            return {}
        return said if isinstance(said, dict) else {}

    # -- both ------------------------------------------------------------------------------

    def release(self, unlink: bool = False) -> None:
        """Let the lock go (the holder unlinks it after a commit or a failure, so the lock
        directory does not grow; after a death or a drop the file stays for the next holder,
        who resumes the partial file)."""
        self._lock.close(unlink=unlink and self.owned)
