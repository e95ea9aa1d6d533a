"""How admin answers are shown: JSON for scripts and the API, tables and sizes for people."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from mirror.oci.reference import Digest
from mirror.ops.admin import FsckReport


def as_json(value: Any) -> Any:
    """Dataclasses, entries and digests as plain JSON values."""
    if isinstance(value, list):
        return [as_json(v) for v in value]
    if isinstance(value, Digest):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: as_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, FsckReport):
            out["clean"] = value.clean
        return out
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    return value


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def table(rows: Iterable[Iterable[object]], header: list[str]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in cells]
    return "\n".join(lines)
