"""A journal line: what an emitter appends for one event (on the loop, nothing encoded) and
what delivery reads back, encoding (cloudevents.py) only what it sends. Lines are built as
text; the emitter writes them as UTF-8.

    <kind>\\t<emitted at, ns since the epoch>\\t<payload>\\n

A `pull`, one per manifest answered, is the common line: its payload is its fields in `PULL`
order, joined with tabs, a None as `\\N`, a tab, newline or backslash in a value escaped
(`\\t`, `\\n`, `\\\\`); joining ten strings costs about a microsecond where JSON costs five.
Every other kind's payload is the JSON of `[subject, data]` (JSON text holds no raw tab or
newline). The kind leads the line, so what a consumer wants is counted in the bytes
(`b"\\n<kind>\\t"`) without reading a line. An event's id is no part of its line: it is
where the line is, the random token of its file (journal.py) and the line's byte offset in
it, the same each time it is read. A line an older version journaled (`<kind>\\t<emitted
at, seconds>\\t<CloudEvents text>`) is read as the text it holds. Pure.
"""

from __future__ import annotations

import json
import re
import time
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


def pull_head(
    upstream: str,
    repository: str,
    tag: str | None,
    digest: object,
    media_type: str,
    size: int,
) -> str:
    """The fields a pull line starts with, escaped, each followed by its tab: the same for
    every pull of one manifest by one reference, so the emitter keeps them and builds only
    the rest per pull (events/__init__.py)."""
    if isinstance(digest, tuple):  # a Digest: its text without a call of its __str__
        algorithm, encoded = digest
    else:
        algorithm, _, encoded = str(digest).partition(":")
    fields = (upstream, repository, tag, f"{algorithm}:{encoded}", media_type, str(size))
    return "".join(f"{NONE if f is None else _escape(f)}\t" for f in fields)


def pull_tail(method: str, client: str | None, user: str | None, outcome: str) -> str:
    """The fields a pull line ends with, escaped, and its newline: the same for the pulls of
    one client with one method and outcome, so the emitter keeps them too. The method and
    the outcome are the mirror's own words; the client and the user are escaped only when
    they hold a tab, newline or backslash."""
    if client is None:
        client = NONE
    elif "\\" in client or not client.isprintable():
        client = _escape(client)
    if user is None:
        user = NONE
    elif "\\" in user or not user.isprintable():
        user = _escape(user)
    return f"{method}\t{client}\t{user}\t{outcome}\n"


def pull_line(at: int, head: str, tail: str) -> str:
    """A pull's whole line, emitted at `at` (ns since the epoch): its `pull_head` and its
    `pull_tail` around the time."""
    return f"pull\t{at}\t{head}{tail}"


def line(kind: str, payload: str) -> str:
    """A line of `kind` with its payload, emitted now."""
    return f"{kind}\t{time.time_ns()}\t{payload}\n"


def payload(subject: str | None, data: dict[str, Any]) -> str:
    """Any other kind's payload."""
    return _json([subject, data])


def _escape(value: str) -> str:
    return "".join(_ESCAPES.get(c, c) for c in value)


def _unescape(value: str) -> str | None:
    if value == NONE:
        return None
    return _ESCAPED.sub(lambda m: _UNESCAPES.get(m[1], m[1]), value)


def seconds(at: bytes | str) -> float:
    """An emitted-at field as seconds (a line of an older version's holds seconds already)."""
    value = float(at)
    return value / 1e9 if value > 1e11 else value


def decode(line: bytes, ident: str) -> Record:
    """A line (without its newline) read back, its id `ident`; ValueError when it is no line
    of ours (cut short by a full disk)."""
    text = line.decode()
    kind, at, body = text.split("\t", 2)
    if body.startswith("{"):  # an older version's: the CloudEvents text itself
        return Record(kind, seconds(at), "", None, None, body)
    if kind != "pull":
        subject, data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("an event's data is an object")
        return Record(kind, seconds(at), ident, subject, data)
    parts = body.split("\t")
    if len(parts) != len(PULL):
        raise ValueError("a pull line holds every field")
    values = (
        [None if p == NONE else p for p in parts]
        if body.count("\\") == parts.count(NONE)
        else [_unescape(p) for p in parts]
    )
    data = dict(zip(PULL, values, strict=True))
    data["size"] = int(values[5] or 0)
    subject = f"{data['upstream']}/{data['repository']}@{data['digest']}"
    return Record(kind, seconds(at), ident, subject, data)
