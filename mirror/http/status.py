"""Health, readiness and the status page, on the main port.

GET /healthz        200 while the process serves (liveness)
GET /readyz         200 when the store takes writes; 503 otherwise. Upstreams are reported
                    but do not make the mirror unready: a mirror with a cache serves it when
                    upstreams are down (cached-only mode)
GET <status_path>   server-rendered HTML, no scripts, readable on a phone: hit ratio, bytes
                    saved, upstream pulls avoided, tiers, upstreams, what is cached
"""

from __future__ import annotations

import html
import math
import os
import time
from collections.abc import Iterable

from aiohttp import web

from mirror.admin import Admin, Image, human
from mirror.config import Config
from mirror.metrics import Metrics
from mirror.store.tiers import Tiers

#: Rows of the cached-images table (the page stays small for a large cache).
CATALOG_ROWS = 200


def install(
    app: web.Application, config: Config, tiers: Tiers, admin: Admin, metrics: Metrics
) -> None:
    started = time.time()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        problem = await tiers.blobs.run(_store_problem, str(tiers.blobs.layout.tmp))
        upstreams = {u.name: _upstream_state(metrics, u.name) for u in config.upstreams}
        body = {
            "status": "ready" if problem is None else "unready",
            "store": problem or "writable",
            "upstreams": upstreams,
        }
        return web.json_response(body, status=200 if problem is None else 503)

    async def status(_: web.Request) -> web.Response:
        images = await admin.catalog(CATALOG_ROWS)
        usage = await tiers.refresh_usage()
        page = _page(
            config, metrics, usage, tiers.hot.used, len(tiers.hot), images, time.time() - started
        )
        return web.Response(text=page, content_type="text/html")

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get(config.status_path, status)


def _store_problem(tmp: str) -> str | None:
    """Blocking: write, sync and remove a probe file where fills write theirs."""
    path = os.path.join(tmp, f".ready-{os.getpid()}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(path)
    except OSError as e:
        return f"store not writable: {e.strerror}"
    return None


def _upstream_state(metrics: Metrics, name: str) -> str:
    if not metrics.total("mirror_upstream_requests_total", upstream=name):
        return "not contacted yet"
    return "ok" if metrics.total("mirror_upstream_up", upstream=name) == 1 else "failing"


def _pulls_left(m: Metrics, name: str) -> str:
    left = m.total("mirror_upstream_ratelimit_remaining", upstream=name)
    return "-" if math.isnan(left) else f"{left:.0f}"


def _table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _page(
    config: Config,
    m: Metrics,
    usage: dict[str, tuple[int, int]],
    hot_bytes: int,
    hot_items: int,
    images: list[Image],
    uptime: float,
) -> str:
    answered = {
        o: m.total("mirror_http_requests_total", outcome=o)
        for o in ("hit", "coalesced", "revalidated", "stale", "miss")
    }
    total = sum(answered.values())
    cached = answered["hit"] + answered["revalidated"] + answered["stale"]
    ratio = f"{100 * cached / total:.1f} %" if total else "no requests yet"
    saved = sum(
        m.total("mirror_blob_bytes_served_total", source=s) for s in ("hot", "warm", "cold")
    )
    fetched = m.total("mirror_upstream_bytes_total")
    summary = _table(
        ["measure", "value"],
        [
            ["hit ratio (manifests and blobs)", ratio],
            ["requests answered from the cache", f"{cached:.0f} of {total:.0f}"],
            ["bytes served from the cache (not pulled again)", human(saved)],
            ["bytes pulled from upstreams", human(fetched)],
            [
                "upstream pulls avoided",
                f"{answered['hit'] + answered['coalesced'] + answered['stale']:.0f}",
            ],
            ["uptime", f"{uptime / 3600:.1f} h"],
        ],
    )
    budget = config.warm.max_bytes
    tiers = _table(
        ["tier", "bytes", "objects", "budget"],
        [
            ["hot (memory)", human(hot_bytes), hot_items, human(config.hot.max_bytes)],
            [
                "warm (disk)",
                human(usage.get("warm", (0, 0))[0]),
                usage.get("warm", (0, 0))[1],
                human(budget) if budget else "free space",
            ],
            [
                "cold",
                human(usage.get("cold", (0, 0))[0]),
                usage.get("cold", (0, 0))[1],
                (human(config.cold.max_bytes) if config.cold.max_bytes else "none")
                if config.cold.url
                else "not configured",
            ],
        ],
    )
    upstreams = _table(
        ["upstream", "address", "state", "pull limit left"],
        [
            [u.name, u.url, _upstream_state(m, u.name), _pulls_left(m, u.name)]
            for u in config.upstreams
        ],
    )
    cached_rows = _table(
        ["repository", "tag", "size", "last pulled", "tier"],
        [
            [
                f"{i.upstream}/{i.repository}",
                i.tag,
                human(i.size),
                time.strftime("%Y-%m-%d %H:%M", time.localtime(i.last_pulled)),
                ", ".join(i.tiers) or "-",
            ]
            for i in images
        ],
    )
    return f"""<!doctype html>
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
<h2>Cached images</h2>{cached_rows}
</body></html>
"""
