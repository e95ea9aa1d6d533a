"""/metrics counts what happened, and the Grafana dashboard only asks for metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import aiohttp
from conftest import MakeMirror
from upstream_sim import UpstreamSim

DASHBOARD = Path(__file__).resolve().parent.parent / "grafana" / "mirror-dashboard.json"
#: One webhook (nothing listens there; it is sent nothing but upstream changes): the series
#: per webhook exist for the webhooks configured, and the dashboard queries them too.
WEBHOOK = (
    '[[events.webhooks]]\nurl = "http://127.0.0.1:9/"\nname = "hook"\nevents = ["upstream.*"]\n'
)


def _value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_count_hits_misses_and_dashboard_queries_exist(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """A miss then a hit of one blob move the request counter by one each and the bytes
    counter by the blob size per source; every metric the dashboard queries is exported."""
    digest = sim.add_blob(b"m" * 300_000)
    mirror = await make_mirror(sim.url, WEBHOOK)
    for _ in range(2):
        async with client.get(f"{mirror.url}/v2/test/x/blobs/{digest}") as resp:
            assert len(await resp.read()) == 300_000
        await mirror.settled()
    async with client.get(f"{mirror.url}/metrics") as resp:
        text = await resp.text()
    assert (
        _value(text, "mirror_http_requests_total", route="blob", outcome="miss", status="200") == 1
    )
    assert (
        _value(text, "mirror_http_requests_total", route="blob", outcome="hit", status="200") == 1
    )
    assert _value(text, "mirror_blob_bytes_served_total", source="upstream") == 300_000
    assert _value(text, "mirror_blob_bytes_served_total", source="warm") == 300_000
    exported = set(re.findall(r"^(mirror_[a-z_]+)", text, re.M))
    queries = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    used = {m for q in queries for m in re.findall(r"mirror_[a-z_]+", q)}
    assert used and used <= exported, used - exported


def _dashboard_metrics() -> set[str]:
    queries = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    return {m for q in queries for m in re.findall(r"mirror_[a-z_]+", q)}


async def test_a_fresh_mirror_exports_every_metric_the_dashboard_queries(
    sim: UpstreamSim, make_mirror: MakeMirror, client: aiohttp.ClientSession
) -> None:
    """Before any request: every series the dashboard asks for is there (at 0, or NaN for
    what no upstream has said yet), so no panel starts as "no data"; bytes served and fill
    durations are exported for every source they can have, events for every kind and, per
    configured webhook, every series."""
    mirror = await make_mirror(sim.url, WEBHOOK)
    async with client.get(f"{mirror.url}/metrics") as resp:
        text = await resp.text()
    exported = set(re.findall(r"^(mirror_[a-z_]+)", text, re.M))
    assert _dashboard_metrics() <= exported, _dashboard_metrics() - exported
    for source in ("hot", "warm", "cold", "upstream", "range", "pass-through"):
        assert f'mirror_blob_bytes_served_total{{source="{source}"}} 0.0' in text
    for source in ("upstream", "cold"):
        for result in ("ok", "failed"):
            assert (
                f'mirror_fill_duration_seconds_count{{result="{result}",source="{source}"}} 0.0'
                in text
            )
    for kind in ("pull", "blob.cached", "admin"):
        assert f'mirror_events_emitted_total{{kind="{kind}"}} 0.0' in text
    for reason in ("queue_full", "rejected", "unwritable"):
        assert f'mirror_events_dropped_total{{endpoint="hook",reason="{reason}"}} 0.0' in text
    assert 'mirror_events_queue_depth{endpoint="hook"} 0.0' in text
