"""Every error a client can meet, driven against a real `python -m mirror serve` process: the
code on the wire is one from the OCI spec's list (or distribution's UNKNOWN / UNAVAILABLE), the
status is the one the table gives, and the mirror's own, more specific code is kept: in the
detail next to what the detail said, in the message, and in what operators read."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from conftest import WIRE_CODES, MirrorProcess, error_codes, exchange
from images import ACCEPT_ALL, make_image
from upstream_sim import UpstreamSim

from mirror import errors
from mirror.http.middleware import ANSWERS

REPO = "test/wire"
TOKEN = "wire-codes-admin-token"


def _subclasses(cls: type[errors.MirrorError]) -> list[type[errors.MirrorError]]:
    return [cls, *(sub for direct in cls.__subclasses__() for sub in _subclasses(direct))]


def test_every_error_class_has_an_answer_a_client_knows() -> None:
    """A new error class whose code the table lacks would reach clients as 500 UNKNOWN: every
    class's code is in the table, with a wire code from the spec's list."""
    for cls in _subclasses(errors.MirrorError):
        assert cls.code in ANSWERS, f"{cls.__name__} ({cls.code}) has no answer"
        assert ANSWERS[cls.code].code in WIRE_CODES, cls.__name__


def _blob(seed: int) -> bytes:
    return seed.to_bytes(4, "big") * 2500


async def _error(
    client: aiohttp.ClientSession, method: str, url: str, **options: Any
) -> tuple[int, str, str, dict[str, Any]]:
    """Status, wire code, the mirror's own code and the detail of an error answer."""
    async with client.request(method, url, **options) as resp:
        body = await resp.read()
        assert resp.headers["Content-Type"].startswith("application/json"), body[:200]
        wire, own = error_codes(body)
        detail = json.loads(body)["errors"][0].get("detail") or {}
        return resp.status, wire, own, detail


async def test_each_error_on_the_wire(
    sim: UpstreamSim, mirror_process: Callable[..., MirrorProcess], tmp_path: Path
) -> None:
    """Malformed tag, unknown endpoint, unparseable request and admin body, unsatisfiable Range;
    upstream answering 500, lying about a digest, 503, hanging, down; a store that cannot take
    a new file; offline. Each gets its status, a wire code a client knows, and its own code as
    `detail.reason` beside the detail it had; a spec code is passed on as it is."""
    cached = _blob(1)
    cached_digest = sim.add_blob(cached)
    blobs = {name: sim.add_blob(_blob(i)) for i, name in enumerate("abcde", start=2)}
    image, other = make_image(81, [100]), make_image(82, [100])
    sim.add_image(REPO, "1", image)
    sim.manifests[REPO][image.digest] = (other.data, other.media_type)  # upstream lies
    audit = tmp_path / "audit.jsonl"
    env = {
        "MIRROR_RETRIES__ATTEMPTS": "1",
        "MIRROR_TIMEOUTS__READ": "0.5",
        "MIRROR_ADMIN__ENABLED": "true",
        "MIRROR_ADMIN__TOKEN": TOKEN,
        "MIRROR_EVENTS__AUDIT_LOG": str(audit),
    }
    proc = mirror_process(sim.url, env=env).start()
    base = f"{proc.url}/v2/{REPO}"
    missing = "sha256:" + "0" * 64
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{base}/blobs/{cached_digest}") as resp:
            assert resp.status == 200 and await resp.read() == cached

        seen = {
            "tag": await _error(client, "GET", f"{base}/manifests/-bad"),
            "endpoint": await _error(client, "GET", f"{base}/unknown/1"),
            "range": await _error(
                client,
                "GET",
                f"{base}/blobs/{cached_digest}",
                headers={"Range": f"bytes={len(cached)}-"},
            ),
            "admin body": await _error(
                client,
                "POST",
                f"{proc.url}/_mirror/pins",
                headers={"Authorization": f"Bearer {TOKEN}"},
                data=b"{not json",
            ),
            "spec code": await _error(client, "GET", f"{base}/blobs/{missing}"),
        }
        sim.fault(blobs["a"], "status", status=500)
        seen["upstream 500"] = await _error(client, "GET", f"{base}/blobs/{blobs['a']}")
        seen["digest mismatch"] = await _error(
            client, "GET", f"{base}/manifests/{image.digest}", headers={"Accept": ACCEPT_ALL}
        )
        sim.fault(blobs["b"], "status", status=503)
        seen["upstream 503"] = await _error(client, "GET", f"{base}/blobs/{blobs['b']}")
        hang = sim.fault(blobs["c"], "hang")
        seen["upstream silent"] = await _error(client, "GET", f"{base}/blobs/{blobs['c']}")
        hang.gate.set()
        await sim.down()
        seen["upstream down"] = await _error(client, "GET", f"{base}/blobs/{blobs['d']}")
        await sim.up()
        # the store cannot make a fill's file (tmp/ is no directory): not full, not read-only
        tmp = proc.data_dir / "tmp"
        tmp.rename(proc.data_dir / "tmp.away")
        tmp.write_bytes(b"")
        seen["store"] = await _error(client, "GET", f"{base}/blobs/{blobs['e']}")
        status, _, body = await exchange("127.0.0.1", proc.port, b"\x00\x01 nonsense\r\n\r\n")
        wire, own = error_codes(body)
        seen["unparseable"] = (status, wire, own, json.loads(body)["errors"][0]["detail"])
    proc.stop()

    offline = mirror_process(
        sim.url, data_dir=tmp_path / "offline", env={"MIRROR_OFFLINE": "true"}
    ).start()
    async with aiohttp.ClientSession() as client:
        seen["offline"] = await _error(client, "GET", f"{offline.url}/v2/{REPO}/manifests/1")

    before = {
        name: {k: v for k, v in got[3].items() if k != "reason"} for name, got in seen.items()
    }
    assert {name: got[:3] for name, got in seen.items()} == {
        "tag": (400, "MANIFEST_INVALID", "TAG_INVALID"),
        "endpoint": (404, "UNSUPPORTED", "NOT_FOUND"),
        "range": (416, "SIZE_INVALID", "RANGE_INVALID"),
        "admin body": (400, "UNSUPPORTED", "INVALID_REQUEST"),
        "spec code": (404, "BLOB_UNKNOWN", "BLOB_UNKNOWN"),
        "upstream 500": (502, "UNKNOWN", "UPSTREAM_INVALID"),
        "digest mismatch": (502, "UNKNOWN", "UPSTREAM_INVALID"),
        "upstream 503": (503, "UNAVAILABLE", "UPSTREAM_OVERLOADED"),
        "upstream silent": (504, "UNAVAILABLE", "UPSTREAM_TIMEOUT"),
        "upstream down": (502, "UNAVAILABLE", "UPSTREAM_UNAVAILABLE"),
        "store": (503, "UNAVAILABLE", "STORE_UNAVAILABLE"),
        "unparseable": (400, "UNSUPPORTED", "INVALID_REQUEST"),
        "offline": (503, "UNAVAILABLE", "OFFLINE"),
    }
    assert seen["spec code"][3] == {"digest": missing}, "a spec code gets no reason"
    # what the detail said before the reason was added is still there
    assert before["tag"] == {"tag": "-bad"}
    assert before["range"] == {"size": len(cached)}
    assert before["upstream 500"] == {"status": 500}
    assert before["upstream 503"] == {"status": 503}
    assert before["digest mismatch"]["expected"] == image.digest
    assert before["store"]["error"] == os.strerror(errno.ENOTDIR)
    # what operators read keeps the mirror's own code: the audit trail of the admin request
    admin = [json.loads(line)["data"] for line in audit.read_text().splitlines()]
    assert [(e["action"], e["result"]) for e in admin] == [("POST pins", "INVALID_REQUEST")]
