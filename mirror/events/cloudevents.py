"""CloudEvents 1.0, structured JSON mode: one event is one JSON object carrying the context
attributes (`specversion`, `id`, `source`, `type`, `time`, `datacontenttype`, `subject`) and
`data`; a delivery is a batch, a JSON array of them sent as
`application/cloudevents-batch+json`. And the signature a delivery carries. Pure.

An event is encoded when it is read from the journal to be sent or written (feed.py), from
what its line holds (its id, time, subject and data), so every webhook, every retry and the
audit log get the same text; the emitter, on the loop, encodes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

SPECVERSION = "1.0"
#: `type` is this prefix and the kind (`io.mirror.pull`), reverse-DNS as the spec asks.
TYPE_PREFIX = "io.mirror."
DATA_CONTENT_TYPE = "application/json"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
SIGNATURE_HEADER = "Mirror-Signature"


class Envelope:
    """Encodes the events of one source.

    Ids come with the event (where its journal line is: record.py). Times are UTC, RFC 3339
    with milliseconds; the part up to the second is formatted once per second, since most
    events of a batch share it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._head = f'{{"specversion":"{SPECVERSION}","id":"'
        self._source = _json(source)
        self._second = -1
        self._stamp = ""

    def encode(
        self, kind: str, ident: str, data: dict[str, Any], subject: str | None, now: float
    ) -> str:
        """The event as JSON text. Built from pieces (the constant ones encoded once);
        `kind` is one of the known kinds and `ident` a journal line's id (no
        escaping)."""
        about = "" if subject is None else ',"subject":' + _json(subject)
        return (
            f'{self._head}{ident}","source":{self._source},'
            f'"type":"{TYPE_PREFIX}{kind}","time":"{self._time(now)}",'
            f'"datacontenttype":"{DATA_CONTENT_TYPE}"{about},"data":{_json(data)}}}'
        )

    def _time(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int(now % 1 * 1000):03d}Z"


#: Compact JSON; anything that is no JSON type (a Digest) as its str.
_json = json.JSONEncoder(separators=(",", ":"), default=str).encode


def batch(bodies: list[str]) -> bytes:
    """Encoded events as one batch: a JSON array."""
    return ("[" + ",".join(bodies) + "]").encode()


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The `Mirror-Signature` value: `t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
    The time is signed with the body, so a receiver that refuses old times refuses replays."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"
