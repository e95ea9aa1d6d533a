"""A blob fill: one upstream fetch into a partial file that every requester reads as it grows.

The fill runs as a detached task (the coordinator's `fill`): a client that goes away never
cancels it. Across the processes of a host there is one fill per digest too (the
coordinator's `claim`): the process that holds the claim fetches; a `Fill` in any other
process follows that fill's partial file as it grows (`host`), and carries the fill on itself,
from the bytes the file holds, if the holder dies.

Followers read the partial file through their own dup of its descriptor, so the final rename
(or an unlink on failure) does not disturb them, and they never send the last byte of a
whole-blob answer before the digest is verified (in another process's fill: before the blob
is committed): a cut or lying upstream reaches every client of the whole blob as a failed
transfer, never as a complete wrong blob. A range answer's bytes go as they land (`landed`),
as they would straight from upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Protocol

from mirror import errors
from mirror.body import BlobBody
from mirror.coordination.claims import Claim
from mirror.locks import shared_elsewhere
from mirror.oci.reference import Digest
from mirror.oci.verify import Mismatch, Verifier
from mirror.store.blobs import BlobStore, Corrupt, rewrite_at, write_all

log = logging.getLogger("mirror.fill")

#: Bytes gathered before one executor hop writes and hashes them.
WRITE_CHUNK = 1024 * 1024

#: A fill starts flushing its file to disk each time this many more bytes have landed, in a lane
#: of its own that the copy never waits for (while one flush runs, no other starts): the final
#: fsync is short, dirty pages do not pile up, and clients are not held to the disk's pace,
#: which another writer may be eating. They get their last byte once the digest checks out;
#: the fsync and rename that keep the blob follow.
SYNC_EVERY = 32 * 1024 * 1024
#: Seconds a waiting follower thread sleeps at most before it looks at its stop flag again.
FOLLOWER_WAKE = 0.2


class Stop(Protocol):
    """Tells a waiting follower thread to give up (a threading.Event, or more)."""

    def is_set(self) -> bool: ...


#: Seconds between two looks at a fill that another process of the host runs.
FOLLOW_POLL = 0.01

#: Where a fill reads from, from byte `offset` on: an upstream answer, a cold-tier object
#: being promoted, or another replica's fill (pull/peers.py). The body's `size` is the whole
#: blob's.
BlobSource = Callable[[int], AbstractAsyncContextManager[BlobBody]]
#: The host-wide claim on a digest's fill (the coordinator's `claim`).
Claims = Callable[[], Awaitable[Claim]]
#: Make room on the store's disk for this many more bytes (evicting); False if it cannot.
Room = Callable[[int], Awaitable[bool]]


class Fill:
    """Progress of one blob fill, shared by the filling task and every follower."""

    def __init__(self, digest: Digest) -> None:
        self.digest = digest
        self.size: int | None = None
        self.written = 0
        self.done = False
        #: Every byte arrived and hashed to the digest (the commit may still be under way).
        self.verified = False
        self._syncing: asyncio.Future[None] | None = None
        self.error: errors.MirrorError | None = None
        self.followers = 0
        #: Clients sending from this fill right now.
        self.watchers = 0
        #: Wanted whether or not a client follows it (pull-ahead, the sync list).
        self.wanted = False
        #: Called when the last client following it goes away before the end.
        self.on_abandoned: Callable[[Fill], None] | None = None
        #: Where the bytes come from: "upstream", "cold" for a promotion, "peer" for another
        #: replica's fill.
        self.source = "upstream"
        #: This process fetched (some of) it, rather than only following another's fill.
        self.fetched = False
        self._room: Room | None = None
        self._read_fd: int | None = None
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._changed = asyncio.Event()
        self._progress = threading.Condition()

    @contextlib.contextmanager
    def watched(self) -> Iterator[None]:
        """Held by a client while it sends from this fill; the last one to leave before the
        end tells `on_abandoned` (which may drop a fill nobody wants any more)."""
        self.watchers += 1
        try:
            yield
        finally:
            self.watchers -= 1
            left = self.watchers == 0 and not self.done and self.error is None
            if left and not self.wanted and self.on_abandoned is not None:
                self.on_abandoned(self)

    @property
    def remaining(self) -> int | None:
        """Bytes still to come, when the size is known."""
        return None if self.size is None else self.size - self.written

    async def ready(self) -> None:
        """Wait until the size is known and the partial file exists (or the fill failed)."""
        await asyncio.shield(self._ready)

    def attach(self) -> int | None:
        """A follower's own descriptor of the partial file; None once the blob is committed
        (read it from the store then). Synchronous, so it cannot race the fill's end."""
        if self.error is not None:
            raise self.error
        if self.done or self._read_fd is None:
            return None
        self.followers += 1
        return os.dup(self._read_fd)

    async def finished(self) -> None:
        """Wait for the fill's end; raise its error if it failed."""
        while not self.done:
            if self.error is not None:
                raise self.error
            await self._changed.wait()

    def available(self, pos: int, end: int, stop: Stop) -> int:
        """Blocking, for a follower's sender thread: wait until bytes past `pos` (of a response
        ending at `end`) may be sent and return how far; the last byte of a response only once
        the digest is verified. Returns `pos` if `stop` is set (it is looked at every
        FOLLOWER_WAKE seconds); raises the fill's error.
        Followers wait here rather than on the event loop so that a fill with many followers
        costs the loop one notify per piece, not a thread hop per piece per follower."""
        return self._wait(pos, end, stop, hold_last=True)

    def landed(self, pos: int, end: int, stop: Stop) -> int:
        """`available` for a range answer: its bytes go as they land, the last one too. They
        are upstream's bytes, unverified, as a range passed through from upstream is: only a
        whole blob can be checked against its digest (lazy-pull clients check each chunk
        against their table of contents), and what the mirror keeps is still the whole,
        verified."""
        return self._wait(pos, end, stop, hold_last=False)

    def _wait(self, pos: int, end: int, stop: Stop, hold_last: bool) -> int:
        with self._progress:
            while True:
                if self.error is not None:
                    raise self.error
                limit = (
                    end
                    if self.done or self.verified
                    else min(self.written, end - 1 if hold_last else end)
                )
                if limit > pos or stop.is_set():
                    return limit if limit > pos else pos
                self._progress.wait(FOLLOWER_WAKE)

    def behind(self, end: int) -> bool:
        """Whether a range ending at `end` lies past what this fill has written, the fill
        reading upstream: such a range is asked of upstream on its own rather than waited for.
        A promotion from cold is waited for: upstream is not asked for what the mirror holds."""
        return self.source == "upstream" and not self.done and self.written < end

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        with self._progress:
            self._progress.notify_all()

    async def host(
        self,
        store: BlobStore,
        claims: Claims,
        source: BlobSource,
        room: Room | None = None,
        max_size: int = 0,
    ) -> bool:
        """This process's part in the host's one fill of the digest: fetch it if this process
        holds the claim, else follow the holder's partial file, and take the claim over if the
        holder dies. True when this process committed a new blob."""
        while True:
            try:
                try:
                    claim = await claims()
                except OSError as e:
                    raise self._unwritable(e) from e
            except BaseException as e:
                self._fail(e)
                if not isinstance(e, Exception):
                    raise
                return False
            if claim.owned:
                return await self.run(store, source, claim, room, max_size)
            try:
                if await self._follow(store, claim):
                    return False
            except BaseException as e:
                self._fail(e)
                if not isinstance(e, Exception):
                    raise
                return False
            finally:
                await store.run(claim.release)

    async def watch(self, store: BlobStore, claims: Claims) -> None:
        """Follow another process's fill of the host without ever carrying it on (what a
        peer replica streams must not make this one fetch): BLOB_UNKNOWN when no process of
        the host fills the digest, a failure when the holder goes away."""
        try:
            claim = await claims()
            try:
                if claim.owned:  # no process fills it now: committed since looked for?
                    if await store.run(store.exists, self.digest):
                        self._finish()
                        return
                    raise errors.BlobUnknown(detail={"digest": str(self.digest)})
                if not await self._follow(store, claim):
                    raise errors.UpstreamUnavailable("the process filling it went away")
            finally:
                await store.run(claim.release)
        except asyncio.CancelledError:  # the peer's answer is over: no failure to tell
            self._close_read()
            raise
        except Exception as e:
            self._fail(e)

    async def _follow(self, store: BlobStore, claim: Claim) -> bool:
        """Follow another process's fill until it is committed (True) or its holder went
        away without a word (False: it died, or dropped the fill); raise its failure."""
        while True:
            seen, self._read_fd = await store.run(claim.watch, self._read_fd)
            if seen.committed:
                self._finish()
                return True
            if seen.error is not None:
                raise _error_of(*seen.error)
            if seen.gone:
                return False
            self.source = seen.source
            if seen.size is not None:
                self.size = seen.size
            if seen.written > self.written:
                self.written = seen.written
                self._notify()
            if self.size is not None and self._read_fd is not None and not self._ready.done():
                self._ready.set_result(None)
                self._notify()
            await asyncio.sleep(FOLLOW_POLL)

    async def run(
        self,
        store: BlobStore,
        source: BlobSource,
        claim: Claim,
        room: Room | None = None,
        max_size: int = 0,
    ) -> bool:
        """Fetch, write, hash, verify, commit, holding `claim`; on any failure keep nothing
        and tell everyone (in this process and, through the claim, in the others). True when
        this fill committed a new blob.

        The fill file may hold bytes already (a holder before this one died): they are hashed
        again from the file, and the source is asked from where they end. A fill that fails
        here (a dropped one too) removes its file and tells its followers in other processes.

        Disk space: a blob of known size that does not fit even after `room` evicted fails at
        once with DiskFull, before any byte is written (its requesters stream it through
        instead); a write that hits ENOSPC mid-way asks `room` and is retried once."""
        self._room = room
        self.fetched = True
        partial: Path | None = None
        wfd: int | None = None
        unlink = False
        try:
            if await store.run(self._already_stored, store):
                self._finish()
                unlink = True
                return False
            partial, wfd, held = await self._open(store)
            async with source(held) as stream:
                self.size = stream.size
                if max_size and (stream.size or 0) > max_size:
                    raise errors.Denied(
                        "blob larger than this mirror takes from that upstream",
                        detail={"digest": str(self.digest), "size": stream.size, "max": max_size},
                    )
                need = None if stream.size is None else stream.size - held
                if room is not None and need is not None and not await room(need):
                    raise errors.DiskFull(detail={"digest": str(self.digest), "size": stream.size})
                verifier = Verifier(self.digest, stream.size, max_size or None)
                if held:
                    log.warning(
                        "carrying the fill of %s on from byte %d, where a process that went "
                        "away left it",
                        self.digest,
                        held,
                    )
                    await store.run(_rehash, self._read_fd, held, verifier)
                await store.run(claim.announce, self.size, self.source)
                if not self._ready.done():
                    self._ready.set_result(None)
                self._notify()
                started = time.monotonic()
                await self._copy(store, stream, wfd, verifier)
            copied = time.monotonic()
            await store.run(verifier.check)
            self.verified = True
            self._notify()
            await self._synced()
            await store.run(store.commit, partial, wfd, self.digest)
            log.info(
                "fill of %s: %d bytes (%d resumed), copy %.2fs, verify+fsync+rename %.2fs",
                self.digest,
                self.written,
                held,
                copied - started,
                time.monotonic() - copied,
            )
            partial = None
            unlink = True
            self._finish()
            return True
        except BaseException as e:
            self._fail(e)
            if self.error is not None:
                unlink = True
                await store.run(claim.failed, self.error.code, self.error.message)
            if partial is not None:
                await store.run(store.discard, partial)
            if not isinstance(e, Exception):
                raise
            return False
        finally:
            if self._syncing is not None:  # never close the file under a flush still running
                await asyncio.wait([self._syncing])
                if not self._syncing.cancelled():
                    self._syncing.exception()
            self._close(wfd)
            await asyncio.shield(store.run(claim.release, unlink))

    async def _open(self, store: BlobStore) -> tuple[Path, int, int]:
        """The fill file (made before the source is asked: a store that cannot take a new
        file — read-only, no inodes or quota left — costs no upstream request, and the blob
        streams through instead, like a full disk's): its path, a write descriptor at its
        end, and the bytes it holds already."""
        try:
            path, wfd, rfd, held = await store.run(store.open_fill, self.digest)
        except OSError as e:
            raise self._unwritable(e) from e
        if self._read_fd is None:
            self._read_fd = rfd
        else:  # followed before this process took the claim over: its clients read that one
            self._close(rfd)
        self.written = held
        return path, wfd, held

    def watched_elsewhere(self) -> bool:
        """Blocking: whether another process follows this fill's partial file now (its
        followers hold a shared lock on it), so that it is not abandoned."""
        return self._read_fd is not None and shared_elsewhere(self._read_fd)

    def _unwritable(self, e: OSError) -> Exception:
        """A store that cannot take a new file: read-only or full (the blob streams through),
        or broken otherwise."""
        if e.errno == errno.EROFS:
            return errors.StoreReadOnly(detail={"digest": str(self.digest)})
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return errors.DiskFull(detail={"digest": str(self.digest)})
        return e

    async def _copy(self, store: BlobStore, stream: BlobBody, wfd: int, verifier: Verifier) -> None:
        """Read upstream in WRITE_CHUNK pieces; each piece is written and hashed in two
        executor lanes while the next one is read, so the fill runs at the pace of the slowest
        of network, disk and hash rather than their sum. Followers see a piece once written."""
        pieces: list[bytes] = []
        pending = 0
        landing: asyncio.Future[None] | None = None
        try:
            async for chunk in stream.chunks():
                pieces.append(chunk)
                pending += len(chunk)
                if pending >= WRITE_CHUNK:
                    if landing is not None:
                        await landing
                    landing = asyncio.ensure_future(
                        self._land(store, wfd, verifier, pieces, pending)
                    )
                    pieces, pending = [], 0
            if landing is not None:
                await landing
            if pieces:
                await self._land(store, wfd, verifier, pieces, pending)
        finally:
            if landing is not None:  # never close the file under a write still running
                await asyncio.wait([landing])
                if not landing.cancelled():
                    landing.exception()

    async def _land(
        self, store: BlobStore, wfd: int, verifier: Verifier, pieces: list[bytes], size: int
    ) -> None:
        """Write and hash one piece (as received, no copy) in parallel; then followers may read it."""
        crossed = (self.written + size) // SYNC_EVERY > self.written // SYNC_EVERY
        if crossed and (self._syncing is None or self._syncing.done()):
            await self._synced()  # raises a failed flush's error (EIO): the fill fails
            self._syncing = asyncio.ensure_future(store.run(os.fdatasync, wfd))
        lanes = [
            asyncio.ensure_future(self._write(store, wfd, pieces)),
            asyncio.ensure_future(store.run(verifier.update_all, pieces)),
        ]
        await asyncio.wait(lanes)
        for lane in lanes:
            lane.result()
        self.written += size
        self._notify()

    async def _synced(self) -> None:
        """Wait for the flush in flight, if any (its error, e.g. EIO, fails the fill)."""
        syncing, self._syncing = self._syncing, None
        if syncing is not None:
            await syncing

    async def _write(self, store: BlobStore, wfd: int, pieces: list[bytes]) -> None:
        """Write one piece at offset `written`; on ENOSPC make room and write it again, once."""
        try:
            await store.run(write_all, wfd, pieces)
        except OSError as e:
            if e.errno != errno.ENOSPC or self._room is None:
                raise
            need = max((self.size or 0) - self.written, sum(map(len, pieces)))
            log.warning(
                "disk full during the fill of %s; evicting to make room for %d bytes",
                self.digest,
                need,
            )
            if not await self._room(need):
                raise errors.DiskFull(detail={"digest": str(self.digest)}) from e
            try:
                await store.run(rewrite_at, wfd, self.written, pieces)
            except OSError as again:
                if again.errno == errno.ENOSPC:
                    raise errors.DiskFull(detail={"digest": str(self.digest)}) from again
                raise

    def _already_stored(self, store: BlobStore) -> bool:
        """A fill that lost a race with one just committed has nothing to do."""
        try:
            found = store.open(self.digest)
        except Corrupt:  # the commit will put a verified file in its place
            return False
        if found is None:
            return False
        self.size = found.size
        found.close()
        return True

    def _finish(self) -> None:
        self.done = True
        if self.size is None:
            self.size = self.written
        self.written = self.size
        if not self._ready.done():
            self._ready.set_result(None)
        self._close_read()
        self._notify()

    def _fail(self, e: BaseException) -> None:
        if isinstance(e, errors.MirrorError):
            self.error = e
        elif isinstance(e, Mismatch):
            where = {"cold": "cold copy", "peer": "the filling replica's copy"}.get(
                self.source, "upstream content"
            )
            self.error = errors.DigestMismatch(f"{where} {e.message}", detail=e.detail)
        elif isinstance(e, OSError):
            self.error = errors.StoreUnavailable(detail={"error": e.strerror or str(e)})
        elif isinstance(e, asyncio.CancelledError):
            self.error = errors.UpstreamUnavailable("blob fill dropped: nobody follows it")
        else:
            self.error = errors.UpstreamUnavailable("blob fill aborted")
            log.error("fill of %s aborted by an unexpected error", self.digest, exc_info=e)
        log.warning(
            "fill of %s failed: %s",
            self.digest,
            self.error,
            extra={"digest": str(self.digest), "code": self.error.code},
        )
        if not self._ready.done():
            self._ready.set_exception(self.error)
            self._ready.exception()
        self._close_read()
        self._notify()

    def _close_read(self) -> None:
        fd, self._read_fd = self._read_fd, None
        self._close(fd)

    @staticmethod
    def _close(fd: int | None) -> None:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _rehash(fd: int | None, size: int, verifier: Verifier) -> None:
    """Hash the first `size` bytes of a fill file written by an earlier holder (blocking)."""
    assert fd is not None
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(WRITE_CHUNK, size - offset), offset)
        if not chunk:
            raise errors.StoreUnavailable(detail={"reason": "fill file shorter than it was"})
        verifier.update(chunk)
        offset += len(chunk)


def _error_of(code: str, message: str) -> errors.MirrorError:
    """The error another process's fill failed with, as its own requesters saw it."""
    pending: list[type[errors.MirrorError]] = [errors.MirrorError]
    while pending:
        cls = pending.pop()
        if cls.code == code:
            try:
                return cls(message)
            except TypeError:  # one that needs more than a message
                break
        pending.extend(cls.__subclasses__())
    return errors.UpstreamUnavailable(message)
