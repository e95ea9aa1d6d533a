"""How far each consumer of the journals got: one small JSON file in the data directory,
`events.cursors`, `{consumer: {journal: [file, offset]}}`, replaced whole (written aside,
then renamed over it) each time a cursor moves, so a reader finds the old one or the new
one, never half of either. Only the process holding the delivery lock writes it (and an
admin command writing the audit log while no mirror serves, under the same lock).

No fsync: a kill -9 loses nothing (the rename is in the kernel), a power loss may take the
last moves, and then a batch goes again (delivery is at least once). Blocking: the deliver
thread's, or a command's.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from mirror.events.journal import Position

log = logging.getLogger("mirror.events")

#: consumer → journal name → its place there.
Places = dict[str, dict[str, Position]]


def load(path: Path) -> Places:
    """The cursors as last saved (none: every consumer at the journals' beginnings)."""
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except ValueError as e:
        log.error("the event cursors %s cannot be read (%s): reading the journals again", path, e)
        return {}
    return {
        consumer: {name: (int(p[0]), int(p[1])) for name, p in places.items()}
        for consumer, places in raw.items()
    }


def save(path: Path, places: Places) -> None:
    """Replace the file whole (see the module docstring)."""
    aside = path.with_name(f"{path.name}.{os.getpid()}.new")
    data = json.dumps({c: {n: list(p) for n, p in ps.items()} for c, ps in places.items()})
    aside.write_text(data)
    os.replace(aside, path)
