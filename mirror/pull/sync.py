"""The sync list (`[[sync]]`): images the running mirror keeps fresh on a schedule and pinned.

Every `every` seconds each entry's tag globs are matched against the repository's tag list
(cached for `list_ttl`, like any tags/list answer), and each matching tag goes through the
service as a client's pull would: revalidated with a HEAD once its `tag_ttl` has passed,
fetched again only when the digest moved, and its blobs (every platform of an index) filled
through the shared single-flight fills. What the entries match is pinned (`Config.all_pins`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from fnmatch import fnmatchcase

from mirror import errors
from mirror.config import Config, SyncEntry
from mirror.oci import mediatypes
from mirror.oci.reference import Reference
from mirror.pull.service import MirrorService
from mirror.upstream.routing import Router, Target

log = logging.getLogger("mirror.sync")

ACCEPT = mediatypes.parse_accept([mediatypes.UPSTREAM_ACCEPT])


class Syncer:
    def __init__(self, config: Config, service: MirrorService) -> None:
        self._config = config
        self._service = service
        self._router = Router(config)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._forever(e), name=f"sync {e.image}") for e in self._config.sync
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _forever(self, entry: SyncEntry) -> None:
        while True:
            try:
                await self.sync(entry)
            except Exception:
                log.exception("sync of %s failed; next try in %.0fs", entry.image, entry.every)
            await asyncio.sleep(entry.every)

    async def sync(self, entry: SyncEntry) -> list[str]:
        """Bring the entry's matching tags up to date; returns the tags synced."""
        upstream, _, repo = entry.image.partition("/")
        target = self._router.route(repo, upstream)
        tags = await self._tags(target, entry)
        done = []
        for tag in tags:
            try:
                answer = await self._service.manifests.get(target, Reference(tag=tag), ACCEPT)
                await self._service.ahead.fetch_all(target, answer.manifest)
                done.append(tag)
            except errors.MirrorError as e:
                log.warning("sync of %s:%s failed: %s", entry.image, tag, e)
        log.info("synced %s: %s", entry.image, ", ".join(done) or "nothing")
        return done

    async def _tags(self, target: Target, entry: SyncEntry) -> list[str]:
        literal = [t for t in entry.tags if not any(c in t for c in "*?[")]
        if len(literal) == len(entry.tags):
            return literal
        listing, _ = await self._service.manifests.listing(target, "tags/list", {})
        available = json.loads(listing.body).get("tags") or []
        return sorted(
            {t for t in available if any(fnmatchcase(t, p) for p in entry.tags)} | set(literal)
        )
