"""At start (and on `fsck --repair`): make the index agree with the files.

A crash between a commit and its record leaves a file the index lacks (adopted here); an
eviction that removed files after their records leaves nothing to do; a store from before
the index has only files. Rows whose files are gone (deleted by hand, a disk that lost them)
are dropped. Records follow files, never lead them.
"""

from __future__ import annotations

import logging

from mirror.store.blobs import BlobStore
from mirror.store.index import BlobIndex
from mirror.store.usage import Usage

log = logging.getLogger("mirror.store")


async def reconcile(blobs: BlobStore, index: BlobIndex, usage: Usage) -> tuple[int, int]:
    """Adopt warm files the index lacks and drop rows whose files are gone: (added, dropped)."""
    files = await blobs.run(blobs.scan)
    known = await index.call(index.digests, "warm")
    adopt = [(d, "warm", size, ctime) for d, (size, ctime) in files.items() if d not in known]
    gone = [d for d in known if d not in files]
    if adopt:
        await index.call(index.record_many, adopt)
    if gone:
        await index.call(index.forget_many, "warm", gone)
    await usage.refresh()
    if adopt or gone:
        log.info(
            "index reconciled with the store: %d files adopted, %d records dropped",
            len(adopt),
            len(gone),
        )
    return len(adopt), len(gone)
