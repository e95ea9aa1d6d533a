"""Content-addressed blob files: temp → verify → fsync → rename, and opening for sendfile.

Every method that touches the disk is a plain blocking function meant to run in an executor
thread (`BlobStore.run`), in one hop per operation, so the event loop never waits on a disk.
A blob file exists under blobs/ only after its bytes were verified against its digest; a crash
at any point leaves at most a partial file in tmp/, which `sweep` removes at the next start.

Sealed files: a committed blob is made read-only and its mtime set to `SEAL_NS`. Any write to
it afterwards (an append, a truncation, a copy over it, a replacement) moves the mtime, which
`open` sees in the fstat it does anyway: such a file is hashed before a byte of it is served,
kept (and sealed again) if it still matches, and reported as `Corrupt` otherwise. Small blobs
are read whole on open and hashed every time. Anything subtler (bytes changed and the mtime
put back by hand, bit rot below the filesystem) is what `mirror fsck` is for.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from mirror.locks import FileLock
from mirror.oci.reference import Digest
from mirror.store.layout import Layout
from mirror.store.offload import offload

log = logging.getLogger("mirror.store")

#: Blobs up to this size (configs, small layers) are read whole and sent from memory.
SMALL_BLOB = 256 * 1024
#: Most buffers one writev call takes (Linux UIO_MAXIOV).
IOV_MAX = 1024
#: The mtime of every committed blob file (1970-01-01T00:00:01Z): see "Sealed files" above.
SEAL_NS = 1_000_000_000
#: Bytes per read when a blob is hashed on open.
HASH_CHUNK = 1024 * 1024
T = TypeVar("T")


@dataclass(slots=True)
class OpenBlob:
    """A cached blob: an open descriptor (the caller closes it), or for a small blob its bytes,
    read in the same executor hop so that sending it needs no second one."""

    fd: int
    size: int
    data: bytes | None = None
    #: Called once on close: the tiers count blobs being sent, which eviction leaves alone.
    release: Callable[[], None] | None = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.release is not None:
            self.release()
            self.release = None


class Corrupt(Exception):
    """A committed blob file whose bytes no longer match its digest."""

    def __init__(self, digest: Digest, size: int) -> None:
        super().__init__(f"{digest}: stored bytes do not match the digest")
        self.digest = digest
        self.size = size


def _matches(fd: int, digest: Digest) -> bool:
    """Whether the file's bytes hash to `digest` (blocking; reads it through once)."""
    h = hashlib.new(digest.algorithm)
    offset = 0
    while chunk := os.pread(fd, HASH_CHUNK, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest() == digest.hex


class BlobStore:
    """The warm tier's files: opened for sending, created and committed by fills, removed
    by eviction."""

    def __init__(self, layout: Layout, executor: ThreadPoolExecutor) -> None:
        self.layout = layout
        self._executor = executor

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run blocking file work in the store's executor."""
        return await offload(self._executor, fn, *args)

    def open(self, digest: Digest) -> OpenBlob | None:
        """Open a cached blob (blocking): None when it is not here. Raises Corrupt for a file
        whose bytes no longer match (see "Sealed files")."""
        try:
            fd = os.open(self.layout.blob(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            if st.st_size > SMALL_BLOB:
                if st.st_mtime_ns != SEAL_NS:
                    self._recheck(fd, digest, st.st_size)
                opened, fd = OpenBlob(fd, st.st_size), -1
                return opened
            data = os.read(fd, st.st_size + 1)
            if hashlib.new(digest.algorithm, data).hexdigest() != digest.hex:
                raise Corrupt(digest, len(data))
            return OpenBlob(-1, len(data), data)
        finally:
            if fd >= 0:
                os.close(fd)

    @staticmethod
    def _recheck(fd: int, digest: Digest, size: int) -> None:
        """A blob file written to since its commit, or copied without its times: hash it
        whole; seal it again if it still matches, else raise Corrupt."""
        log.warning("blob %s was modified after it was stored; checking its digest", digest)
        if not _matches(fd, digest):
            raise Corrupt(digest, size)
        with contextlib.suppress(OSError):  # a read-only store: it is checked again next time
            os.utime(fd, ns=(SEAL_NS, SEAL_NS))

    def verify(self, digest: Digest) -> bool:
        """Whether the committed file hashes to its digest (blocking; fsck). A file gone
        meanwhile (evicted) counts as fine: nothing wrong is left."""
        try:
            fd = os.open(self.layout.blob(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        try:
            return _matches(fd, digest)
        finally:
            os.close(fd)

    def exists(self, digest: Digest) -> bool:
        """Whether a committed blob file is there (blocking)."""
        return self.layout.blob(digest).exists()

    def path(self, digest: Digest) -> Path:
        """The committed file of a blob, to read it whole (export; demotion to cold)."""
        return self.layout.blob(digest)

    def read(self, digest: Digest) -> bytes:
        """A committed blob's bytes (blocking; small ones: manifests imported from a bundle)."""
        return self.layout.blob(digest).read_bytes()

    def size(self, digest: Digest) -> int:
        """A committed blob's size (blocking)."""
        return self.layout.blob(digest).stat().st_size

    def unwritable(self) -> str | None:
        """Blocking: write, sync and remove a probe file where fills write theirs; why that
        failed, or None when the store takes writes (readiness)."""
        path = self.layout.probe()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"ok")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.unlink(path)
        except OSError as e:
            return f"store not writable: {e.strerror}"
        return None

    def create_partial(self, digest: Digest) -> tuple[Path, int, int]:
        """Create a fill's temp file (blocking): its path, a write fd and a read fd."""
        path = self.layout.partial(digest)
        wfd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        rfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return path, wfd, rfd

    def open_fill(self, digest: Digest) -> tuple[Path, int, int, int]:
        """Open a digest's fill file for its lock's holder (blocking): its path, a write fd
        placed at its end, a read fd, and how many bytes it already holds (a holder before
        this one died or gave up mid-way; those bytes are hashed again, never trusted)."""
        path = self.layout.fill_partial(digest)
        wfd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            held = os.lseek(wfd, 0, os.SEEK_END)
            rfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(wfd)
            raise
        return path, wfd, rfd, held

    def commit(self, partial: Path, wfd: int, digest: Digest) -> None:
        """Seal a verified partial file, fsync it and rename it into place (blocking, atomic)."""
        os.fchmod(wfd, 0o444)
        os.utime(wfd, ns=(SEAL_NS, SEAL_NS))
        os.fsync(wfd)
        final = self.layout.blob(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(partial, final)
        dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    @staticmethod
    def discard(partial: Path) -> None:
        """Remove a failed fill's temp file (blocking)."""
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()

    def remove(self, digests: list[Digest]) -> int:
        """Delete committed blob files (blocking; eviction, after their records went); how
        many were there. A sender that has one open keeps reading it: POSIX unlink leaves
        open files whole."""
        removed = 0
        for digest in digests:
            try:
                os.unlink(self.layout.blob(digest))
                removed += 1
            except FileNotFoundError:
                pass
        return removed

    def scan(self) -> dict[Digest, tuple[int, float]]:
        """Every committed blob file: digest → (size, ctime, about when it was committed: the
        mtime is the seal) (blocking; reconcile at start). Files whose names are no digest
        are left out (and so never adopted)."""
        found: dict[Digest, tuple[int, float]] = {}
        for algo_dir in self.layout.blobs.iterdir():
            for fan in algo_dir.iterdir():
                with os.scandir(fan) as it:
                    for e in it:
                        digest = self.layout.digest_of(algo_dir.name, e.name)
                        if digest is not None:
                            st = e.stat()
                            found[digest] = (st.st_size, st.st_ctime)
        return found

    def partials(self, older_than: float) -> list[Path]:
        """Partial files not written to for `older_than` seconds and not held by a live fill
        (a stalled one keeps its file): a crash's leftovers (blocking; fsck)."""
        now = time.time()
        return [
            p
            for p in self.layout.tmp.iterdir()
            if now - p.stat().st_mtime > older_than and not self._filling(p)
        ]

    def _filling(self, partial: Path) -> bool:
        """Whether a live process holds the fill lock of this partial file."""
        path = self.layout.fills / f"{partial.name.split('.')[0]}.lock"
        if not path.exists():
            return False
        lock = FileLock(path)
        try:
            return not lock.try_take(shared=True)
        finally:
            lock.close()

    def sweep(self) -> int:
        """Remove temp files a crash left behind, and the lock files of the processes that
        ran before (blocking; once per host start, before any process serves)."""
        count = 0
        for path in self.layout.tmp.iterdir():
            path.unlink(missing_ok=True)
            count += 1
        for lock in self.layout.fills.glob("*.lock"):
            lock.unlink(missing_ok=True)
        if count:
            log.info("swept %d partial files left by an earlier run", count)
        return count


def write_all(fd: int, pieces: list[bytes]) -> None:
    """os.writev until every byte of `pieces` is down (a regular file may take less per call)."""
    views = [memoryview(p) for p in pieces]
    while views:
        n = os.writev(fd, views[:IOV_MAX])
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def rewrite_at(fd: int, offset: int, pieces: list[bytes]) -> None:
    """Cut the file back to `offset` and write `pieces` there again (a retry after ENOSPC left
    an unknown part of them written)."""
    os.ftruncate(fd, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    write_all(fd, pieces)
