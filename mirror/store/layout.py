"""Every path of the store, in one place.

    <data_dir>/
      blobs/
        sha256/
          ab/
            ab12…ef          a verified blob (layer or config), one file per digest,
                             shared by every repository and upstream; never written in place
      tmp/
        ab12…ef.<rand>.partial
                             a fill in progress (same filesystem as blobs/, so the final
                             rename is atomic); whatever is here at start is a crash's
                             leftover and is swept
      meta/                  diskcache (SQLite): manifests by digest, tag → digest records,
                             cached tag lists and referrers
      index.sqlite           blob metadata: tier, size, stored, last access, hits; run-time
                             pins (store/index.py)

Only a `Digest` (grammar-checked: known algorithm, fixed-length lowercase hex) becomes a path
component, so no request can name a file outside these folders.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from mirror.oci.reference import Digest


class Layout:
    """Paths under one data directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        self.meta = self.root / "meta"
        self.index = self.root / "index.sqlite"

    def blob(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.hex[:2] / digest.hex

    def partial(self, digest: Digest) -> Path:
        return self.tmp / f"{digest.hex}.{secrets.token_hex(4)}.partial"

    def create(self) -> None:
        for d in (self.blobs, self.tmp, self.meta):
            d.mkdir(parents=True, exist_ok=True)
