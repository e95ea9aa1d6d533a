"""A journal line: what an emitter appends for one event (on the loop, nothing encoded) and
what delivery reads back, encoding (cloudevents.py) only what it sends.

    <kind>\\t<emitted at>\\t<id>\\t<payload>\\n

A `pull`, one per manifest answered, is the common line: its payload is its fields in `PULL`
order, joined with tabs, a None as `\\N`, a tab, newline or backslash in a value escaped
(`\\t`, `\\n`, `\\\\`); joining ten strings costs about a microsecond where JSON costs five.
Every other kind's payload is the JSON of `[subject, data]` (JSON text holds no raw tab or
newline). The kind leads the line, so what a consumer wants is counted in the bytes
(`b"\\n<kind>\\t"`) without reading a line. A line an older version journaled
(`<kind>\\t<emitted at>\\t<CloudEvents text>`) is read as the text it holds. Pure.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

#: A pull's fields, in the order its line holds them (`size` as its decimal text).
PULL = (
    "upstream",
    "repository",
    "tag",
    "digest",
    "media_type",
    "size",
    "method",
    "client",
    "user",
    "outcome",
)
#: A None field of a pull line.
NONE = "\\N"
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n"}
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n"}
_ESCAPED = re.compile(r"\\(.)")
#: Compact JSON; anything that is no JSON type (a Digest) as its str.
_json = json.JSONEncoder(separators=(",", ":"), default=str).encode


@dataclass(frozen=True, slots=True)
class Record:
    """One journaled event, read back: `data` None for an older version's line, whose
    `text` is its CloudEvents text already."""

    kind: str
    at: float
    id: str
    subject: str | None
    data: dict[str, Any] | None
    text: str = ""


def pull_payload(fields: tuple[str | None, ...]) -> str:
    """A pull's payload (see the module docstring): the fields joined, escaped only when a
    value needs it (checked on the joined text, once)."""
    nones = fields.count(None)
    text = "\t".join([NONE if f is None else f for f in fields])
    if text.count("\t") == len(PULL) - 1 and "\n" not in text and text.count("\\") == nones:
        return text
    return "\t".join([NONE if f is None else _escape(f) for f in fields])


def payload(subject: str | None, data: dict[str, Any]) -> str:
    """Any other kind's payload."""
    return _json([subject, data])


def _escape(value: str) -> str:
    return "".join(_ESCAPES.get(c, c) for c in value)


def _unescape(value: str) -> str | None:
    if value == NONE:
        return None
    return _ESCAPED.sub(lambda m: _UNESCAPES.get(m[1], m[1]), value)


def decode(line: bytes) -> Record:
    """A line (without its newline) read back; ValueError when it is no line of ours (cut
    short by a full disk)."""
    text = line.decode()
    kind, at, rest = text.split("\t", 2)
    if rest.startswith("{"):  # an older version's: the CloudEvents text itself
        return Record(kind, float(at), "", None, None, rest)
    ident, body = rest.split("\t", 1)
    if kind != "pull":
        subject, data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("an event's data is an object")
        return Record(kind, float(at), ident, subject, data)
    parts = body.split("\t")
    if len(parts) != len(PULL):
        raise ValueError("a pull line holds every field")
    values = (
        [None if p == NONE else p for p in parts]
        if "\\" not in body or body.count("\\") == parts.count(NONE)
        else [_unescape(p) for p in parts]
    )
    data = dict(zip(PULL, values, strict=True))
    data["size"] = int(values[5] or 0)
    subject = f"{data['upstream']}/{data['repository']}@{data['digest']}"
    return Record(kind, float(at), ident, subject, data)
