"""Byte ranges of a blob (RFC 9110 §14): a `Range` header read, its parts placed in a blob of
known size, the close ones merged, and the framing of a `multipart/byteranges` answer.

A Range costs at most what a GET of the whole blob does, however many parts it names: parts
that overlap or lie within GAP of each other become one (the gap costs less than another
part, and far less than another upstream request when the blob is not cached yet), and past
MAX_PARTS the answer is the one range that covers them all (RFC 9110 §14.2 lets a server
coalesce). Parts are answered in the blob's order; a client of a multipart answer reads each
part's `Content-Range`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Parts closer than this (bytes) are answered as one.
GAP = 64 * 1024
#: Parts of one multipart answer at most; more are answered as the one range covering them.
MAX_PARTS = 16
#: Digits read of a position: more than any blob has (longer numbers are past every end).
_DIGITS = 20
_SPEC = re.compile(r"([0-9]*)-([0-9]*)")

#: [start, end) in the blob.
Span = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Spec:
    """One range-spec as the client wrote it: `first-last`, `first-` (to the end; `last` is
    None) or `-last` (the last `last` bytes; `first` is None)."""

    first: int | None
    last: int | None

    def span(self, size: int) -> Span | None:
        """Where it lies in a blob of `size` bytes; None when it is unsatisfiable there."""
        if self.first is None:
            assert self.last is not None
            return (max(size - self.last, 0), size) if self.last and size else None
        if self.first >= size:
            return None
        return self.first, size if self.last is None else min(self.last + 1, size)


def _position(digits: str) -> int:
    return int(digits) if len(digits) <= _DIGITS else 10**_DIGITS


def parse(value: str) -> list[Spec] | None:
    """The range-specs of a `bytes=` Range header; None for a header this server does not
    use (another unit, or not well-formed: RFC 9110 §14.2 lets it be ignored, and the whole
    blob is the answer)."""
    unit, eq, rest = value.partition("=")
    if not eq or unit.strip().lower() != "bytes":
        return None
    specs = []
    for item in rest.split(","):
        item = item.strip(" \t")
        if not item:  # an empty list element (RFC 9110 §5.6.1)
            continue
        m = _SPEC.fullmatch(item)
        if m is None or m[1] == m[2] == "":
            return None
        first = _position(m[1]) if m[1] else None
        last = _position(m[2]) if m[2] else None
        if first is not None and last is not None and last < first:
            return None
        specs.append(Spec(first, last))
    return specs or None


def plan(specs: list[Spec], size: int) -> list[Span]:
    """The parts of the answer to `specs` in a blob of `size` bytes, in the blob's order:
    the satisfiable ones, merged where they overlap or lie within GAP, and one covering span
    past MAX_PARTS. Empty when none is satisfiable (416)."""
    merged: list[Span] = []
    for start, end in sorted(s for spec in specs if (s := spec.span(size)) is not None):
        if merged and start <= merged[-1][1] + GAP:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    if len(merged) > MAX_PARTS:
        return [(merged[0][0], max(end for _, end in merged))]
    return merged


@dataclass(frozen=True, slots=True)
class Multipart:
    """The framing of a `multipart/byteranges` answer (RFC 9110 §14.6): each part's head
    before its bytes, the closing delimiter after the last, and the length of it all (known
    before a byte is sent, so the answer has a Content-Length)."""

    spans: list[Span]
    size: int
    part_type: str
    boundary: str

    @property
    def content_type(self) -> str:
        return f"multipart/byteranges; boundary={self.boundary}"

    def head(self, i: int) -> bytes:
        """What comes before part `i`'s bytes (the delimiter ends the previous part's)."""
        start, end = self.spans[i]
        head = (
            f"--{self.boundary}\r\n"
            f"Content-Type: {self.part_type}\r\n"
            f"Content-Range: bytes {start}-{end - 1}/{self.size}\r\n\r\n"
        ).encode("ascii")
        return head if i == 0 else b"\r\n" + head

    @property
    def tail(self) -> bytes:
        return f"\r\n--{self.boundary}--\r\n".encode("ascii")

    @property
    def length(self) -> int:
        heads = sum(len(self.head(i)) for i in range(len(self.spans)))
        return heads + sum(end - start for start, end in self.spans) + len(self.tail)
