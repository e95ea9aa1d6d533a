"""Health, readiness and the status page, on the main port.

GET /healthz        200 while the process serves (liveness)
GET /readyz         200 when the store takes writes; 503 otherwise. Upstreams are reported
                    but do not make the mirror unready: a mirror with a cache serves it when
                    upstreams are down (cached-only mode). A replica of a cluster reports
                    "cluster": "joined" or "standalone", ready either way (standalone, it
                    serves on its own)
GET <status_path>   server-rendered HTML, no scripts, readable on a phone: hit ratio, bytes
                    saved, upstream pulls avoided, tiers, upstreams, the images pulled most
                    recently. With `[auth]` on it needs the same credentials as a pull and
                    lists only the repositories they are granted; its table is read at most
                    every RECENT_TTL seconds and costs a bounded number of rows, however
                    large the cache or however often the page is asked for

With worker processes each of them answers for the host: what these pages show of the
metrics is read from every worker's (`Metrics.read`), whichever worker takes the request.
"""

from __future__ import annotations

import asyncio
import html
import math
import time
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

from mirror.config import Config
from mirror.http.access import Access, admits
from mirror.metrics import TIERS, Metrics, Reading
from mirror.ops.admin import Admin, Image
from mirror.ops.format import human

#: Rows of the cached-images table: the images pulled most recently (the page stays small and
#: cheap for a large cache).
CATALOG_ROWS = 200
#: Seconds the table is reused before it is read again.
RECENT_TTL = 5.0


class _Recent:
    """The recently pulled images, read at most once every RECENT_TTL seconds however often
    the page is asked for."""

    def __init__(self, admin: Admin) -> None:
        self._admin = admin
        self._images: list[Image] = []
        self._read = -RECENT_TTL
        self._lock = asyncio.Lock()

    async def images(self) -> list[Image]:
        async with self._lock:
            if time.monotonic() - self._read >= RECENT_TTL:
                self._images = await self._admin.recent(CATALOG_ROWS)
                self._read = time.monotonic()
            return self._images


def install(
    app: web.Application,
    config: Config,
    admin: Admin,
    metrics: Metrics,
    access: Access,
    sample: Callable[[], Awaitable[None]],
    cluster: Callable[[], str | None],
) -> None:
    """`sample`: what brings the gauges no update keeps current (this process's state, the
    tiers' usage) up to date, as a scrape does before it reads them; `cluster`: whether this
    process reaches its cluster (None: no cluster)."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        problem = await admin.unwritable()
        reading = await asyncio.to_thread(metrics.read)
        upstreams = {u.name: _upstream_state(reading, u.name) for u in config.upstreams}
        body: dict[str, object] = {
            "status": "ready" if problem is None else "unready",
            "store": problem or "writable",
            "upstreams": upstreams,
        }
        if (state := cluster()) is not None:
            body["cluster"] = state
        return web.json_response(body, status=200 if problem is None else 503)

    recent = _Recent(admin)

    async def status(request: web.Request) -> web.Response:
        patterns = await access.grants(request)
        images = [i for i in await recent.images() if admits(patterns, i.upstream, i.repository)]
        await sample()
        reading = await asyncio.to_thread(metrics.read)
        page = _page(config, reading, metrics.multiprocess, images)
        return web.Response(text=page, content_type="text/html")

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get(config.status_path, status)


def _upstream_state(reading: Reading, name: str) -> str:
    if not reading.contacted(name):
        return "not contacted yet"
    return "ok" if reading.is_up(name) else "failing"


def _pulls_left(m: Reading, name: str) -> str:
    left = m.pulls_left(name)
    return "-" if math.isnan(left) else f"{left:.0f}"


def _table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mirror status</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1rem; color: #222; background: #fafafa; }}
h1 {{ font-size: 1.4rem; }} h2 {{ font-size: 1.1rem; margin-top: 1.5rem; }}
.scroll {{ overflow-x: auto; }}
table {{ border-collapse: collapse; min-width: 100%; background: #fff; }}
th, td {{ text-align: left; padding: .35rem .6rem; border-bottom: 1px solid #ddd; }}
th {{ white-space: nowrap; }}
th {{ background: #eef2f7; }}
</style></head>
<body>
<h1>mirror</h1>
<h2>Summary</h2>{summary}
<h2>Tiers</h2>{tiers}
<h2>Upstreams</h2>{upstreams}
<h2>Cached images</h2>{cached}
</body></html>
"""


def _page(config: Config, m: Reading, multiprocess: bool, images: list[Image]) -> str:
    """`multiprocess`: each worker has a memory tier of its own, each with the budget."""
    usage = {tier: m.held(tier) for tier in TIERS}
    return _PAGE.format(
        summary=_summary(m, time.time() - m.started()),
        tiers=_tiers(config, usage, multiprocess),
        upstreams=_table(
            ["upstream", "address", "state", "pull limit left"],
            [
                [u.name, u.url, _upstream_state(m, u.name), _pulls_left(m, u.name)]
                for u in config.upstreams
            ],
        ),
        cached=_table(
            ["repository", "tag", "size", "last pulled", "tier"], map(_image_row, images)
        ),
    )


def _summary(m: Reading, uptime: float) -> str:
    answered = {o: m.answered(o) for o in ("hit", "coalesced", "revalidated", "stale", "miss")}
    total = sum(answered.values())
    cached = answered["hit"] + answered["revalidated"] + answered["stale"]
    avoided = answered["hit"] + answered["coalesced"] + answered["stale"]
    ratio = f"{100 * cached / total:.1f} %" if total else "no requests yet"
    saved = sum(m.served_from(s) for s in ("hot", "warm", "cold"))
    return _table(
        ["measure", "value"],
        [
            ["hit ratio (manifests and blobs)", ratio],
            ["requests answered from the cache", f"{cached:.0f} of {total:.0f}"],
            ["bytes served from the cache (not pulled again)", human(saved)],
            ["bytes pulled from upstreams", human(m.received_total())],
            ["upstream pulls avoided", f"{avoided:.0f}"],
            ["uptime", f"{uptime / 3600:.1f} h"],
        ],
    )


def _tiers(config: Config, usage: dict[str, tuple[int, int]], multiprocess: bool) -> str:
    def row(name: str, tier: str, budget: str) -> list[object]:
        nbytes, count = usage.get(tier, (0, 0))
        return [name, human(nbytes), count, budget]

    warm, cold = config.warm.max_bytes, config.cold.max_bytes
    per_worker = " per worker" if multiprocess else ""
    cold_budget = (human(cold) if cold else "none") if config.cold.url else "not configured"
    return _table(
        ["tier", "bytes", "objects", "budget"],
        [
            row("hot (memory)", "hot", human(config.hot.max_bytes) + per_worker),
            row("warm (disk)", "warm", human(warm) if warm else "free space"),
            row("cold", "cold", cold_budget),
        ],
    )


def _image_row(i: Image) -> list[object]:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(i.last_pulled))
    return [f"{i.upstream}/{i.repository}", i.tag, human(i.size), when, ", ".join(i.tiers) or "-"]
