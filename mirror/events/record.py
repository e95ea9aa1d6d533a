"""A journal line: what an emitter appends for one event (on the loop, nothing encoded) and
what delivery reads back, encoding (cloudevents.py) only what it sends. Lines are built as
text; the emitter writes them as UTF-8.

    <kind>\\t<emitted at, ns since the epoch>\\t<payload>\\n

A `pull`, one per manifest answered, is the common line: its payload is its fields in `PULL`
order, joined with tabs, a None as `\\N`, a tab, newline, backslash or RUN in a value escaped
(`\\t`, `\\n`, `\\\\`, `\\u`); joining ten strings costs about a microsecond where JSON costs
five. The pulls of one manifest by one reference that come one after the other share a line
(at most RUN_PULLS of them): after the first, each further one is RUN, its nanoseconds after
the first, and, unless they are the same as the pull's before it, a tab and its last four
fields (method, client, user, outcome):

    pull\\t<at>\\t<upstream>\\t…\\t<outcome>␟<ns later>␟<ns later>\\t<method>\\t…\\t<outcome>\\n

so a busy process's hundred pulls of a tag in one write are a few lines of a few hundred
bytes, not a hundred of two hundred each. Every other kind's payload is the JSON of
`[subject, data]` (JSON text holds no raw tab, newline or RUN). The kind leads the line, so
what a consumer wants is counted in the bytes (`b"\\n<kind>\\t"`, and RUN for the further
pulls) without reading a line; a line, its events together, is what a cursor passes. An
event's id is no part of its line: it is where the line is, the random token of its file
(journal.py) and the line's byte offset in it, and for a further pull its place in the line
(`.1`, `.2`, …), the same each time it is read. A line an older version journaled
(`<kind>\\t<emitted at, seconds>\\t<CloudEvents text>`) is read as the text it holds (an
older version reads a line of a run as one cut short). Pure.
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
#: What leads each further pull of a pull line (ASCII's unit separator).
RUN = "\x1f"
_RUN = RUN.encode()
#: Most pulls one line holds (half a webhook batch: delivery.BATCH_EVENTS).
RUN_PULLS = 50
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", RUN: "\\u"}
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "u": RUN}
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
    """The fields a pull ends with, escaped: the same for the pulls of one client with one
    method and outcome, so the emitter keeps them too. The method and the outcome are the
    mirror's own words; the client and the user are escaped only when they hold a tab,
    newline, backslash or RUN."""
    if client is None:
        client = NONE
    elif "\\" in client or not client.isprintable():
        client = _escape(client)
    if user is None:
        user = NONE
    elif "\\" in user or not user.isprintable():
        user = _escape(user)
    return f"{method}\t{client}\t{user}\t{outcome}"


def pull_line(at: int, head: str, tail: str, *more: tuple[int, str | None]) -> str:
    """A pull line, its first pull emitted at `at` (ns since the epoch) with its `pull_head`
    and `pull_tail`, and `more` pulls of that head (each emitted when, and its tail, None:
    the one before it's). The emitter builds the same text inline (events/__init__.py)."""
    runs = "".join(f"{RUN}{w - at}" if t is None else f"{RUN}{w - at}\t{t}" for w, t in more)
    return f"pull\t{at}\t{head}{tail}{runs}\n"


def events_in(line: bytes) -> int:
    """The events a line holds (several for a pull line of a run; only pull lines hold RUN)."""
    return 1 + line.count(_RUN)


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


def decode(line: bytes, ident: str) -> list[Record]:
    """A line (without its newline) read back as its events (several for a pull line of a
    run), the first's id `ident`; ValueError when it is no line of ours (cut short by a full
    disk)."""
    text = line.decode()
    kind, at, body = text.split("\t", 2)
    if body.startswith("{"):  # an older version's: the CloudEvents text itself
        return [Record(kind, seconds(at), "", None, None, body)]
    if kind != "pull":
        subject, data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("an event's data is an object")
        return [Record(kind, seconds(at), ident, subject, data)]
    first, *more = body.split(RUN)
    values = _fields(first, len(PULL))
    data = dict(zip(PULL, values, strict=True))
    data["size"] = int(values[5] or 0)
    subject = f"{data['upstream']}/{data['repository']}@{data['digest']}"
    found = [Record(kind, seconds(at), ident, subject, data)]
    if more:
        start = int(at)
        for i, entry in enumerate(more, 1):
            later, tab, rest = entry.partition("\t")
            data = dict(data)  # its own: a receiver's handler may change what it is given
            if tab:
                data.update(zip(PULL[6:], _fields(rest, 4), strict=True))
            found.append(Record(kind, (start + int(later)) / 1e9, f"{ident}.{i}", subject, data))
    return found


def _fields(text: str, count: int) -> list[str | None]:
    """A pull's tab-separated fields, unescaped; ValueError unless there are `count`."""
    parts = text.split("\t")
    if len(parts) != count:
        raise ValueError("a pull line holds every field")
    if text.count("\\") == parts.count(NONE):
        return [None if p == NONE else p for p in parts]
    return [_unescape(p) for p in parts]
