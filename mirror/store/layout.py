"""Every path of the store, in one place.

    <data_dir>/
      blobs/
        sha256/
          ab/
            ab12…ef          a verified blob (layer or config), one file per digest,
                             shared by every repository and upstream; never written in place
      tmp/
        ab12…ef.partial      a fill in progress, one per digest, written by whichever process
                             holds run/fills/ab12…ef.lock (same filesystem as blobs/, so the
                             final rename is atomic); whatever is here at start is a crash's
                             leftover and is swept
        ab12…ef.<rand>.partial
                             a blob being imported from a bundle
      run/                   this host's running processes: emptied at each start
        fills/ab12…ef.lock   held by the process filling that digest (coordination/claims.py)
        locks/               locks of the work done once for the host (coordination/host.py)
        metrics/             the worker processes' Prometheus values (prometheus_client's
                             multiprocess files), merged by whichever worker is scraped
      meta/                  diskcache (SQLite): manifests by digest, tag → digest records,
                             whole tag lists
      index.sqlite           blob metadata: tier, size, stored, last access, hits; run-time
                             pins; when each tag was last pulled; which repository holds
                             which digest, with [auth] on (store/index.py)
      events.journal/<n>     a single serving process's events, one line each: the
                             webhooks' and the audit log's queue (events/journal.py)
      events.journal/worker-<i>/<n>
                             worker i's, with several serving processes
      events.journal/command-<pid>-<r>/<n>
                             an admin command's, until every consumer read it
      events.cursors         how far each webhook and the audit log got in each journal
                             (events/cursors.py)
      events.deliver.lock    flock: held by the one process delivering webhooks and
                             writing the audit log (events/delivery.py)

    <cold tier URL>/         object storage or a directory (store/cold.py)
      blobs/sha256/ab/ab12…ef
                             a blob demoted from warm, under the same key scheme

Only a `Digest` (grammar-checked: known algorithm, fixed-length lowercase hex) becomes a path
component, so no request can name a file outside these folders.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from mirror.errors import DigestInvalid
from mirror.oci.reference import Digest, parse_digest


class Layout:
    """Paths under one data directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        self.meta = self.root / "meta"
        self.index = self.root / "index.sqlite"
        self.events_cursors = self.root / "events.cursors"
        self.events_journal = self.root / "events.journal"
        self.run = self.root / "run"
        self.fills = self.run / "fills"
        self.locks = self.run / "locks"
        self.metrics = self.run / "metrics"
        self.events_deliver = self.root / "events.deliver.lock"

    def blob(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.hex[:2] / digest.hex

    def partial(self, digest: Digest) -> Path:
        """A file of its own for one writer (an import)."""
        return self.tmp / f"{digest.hex}.{secrets.token_hex(4)}.partial"

    def fill_partial(self, digest: Digest) -> Path:
        """The one partial file of a digest's fill, shared by every process of the host."""
        return self.tmp / f"{digest.hex}.partial"

    def fill_lock(self, digest: Digest) -> Path:
        return self.fills / f"{digest.hex}.lock"

    def probe(self) -> Path:
        """Where a readiness check writes a file: tmp/, where fills write theirs."""
        return self.tmp / f".ready-{secrets.token_hex(4)}"

    def create(self) -> None:
        for d in (self.blobs, self.tmp, self.meta, self.fills, self.locks):
            d.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def digest_of(algorithm_dir: str, name: str) -> Digest | None:
        """The digest a file under blobs/<algorithm>/<fan>/ stands for; None for a file that
        is no blob (a stray, a name outside the grammar)."""
        try:
            return parse_digest(f"{algorithm_dir}:{name}")
        except DigestInvalid:
            return None


#: Where object keys start in the cold tier (under the URL's own prefix).
OBJECT_PREFIX = "blobs/"


def object_key(digest: Digest) -> str:
    """A blob's key in the cold tier: the warm tier's relative path."""
    return f"{OBJECT_PREFIX}{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def digest_of_key(key: str) -> Digest | None:
    """The blob a cold-tier key names, or None for an object that is no blob of ours."""
    parts = key.split("/")
    if len(parts) != 4 or f"{parts[0]}/" != OBJECT_PREFIX or parts[2] != parts[3][:2]:
        return None
    return Layout.digest_of(parts[1], parts[3])
