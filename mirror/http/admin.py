"""The admin HTTP API under `[admin] prefix` (default /_mirror), registered only when
`[admin] enabled`; every request needs `Authorization: Bearer <admin.token>`.

    GET    <prefix>/catalog            cached images (as `mirror cache ls --json`)
    GET    <prefix>/usage              bytes per tier and upstream (`mirror cache du`)
    POST   <prefix>/evict              {"dry_run": bool, "older_than": s, "repo": pattern}
    GET    <prefix>/pins               run-time pins
    POST   <prefix>/pins               {"pattern": "<upstream>/<repo>:<tag glob>"}
    DELETE <prefix>/pins               {"pattern": …}
    POST   <prefix>/fsck               {"repair": bool}

Every request, refused ones too, is an `admin` event (the audit log keeps them): the action,
the client's address, the body it sent and how it ended.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from mirror import errors
from mirror.config import AdminConfig
from mirror.events import Events
from mirror.http.middleware import client_of
from mirror.ops.admin import Admin
from mirror.ops.format import as_json


def install(app: web.Application, admin: Admin, config: AdminConfig, events: Events) -> None:
    token = config.token.encode()

    def guarded(
        fn: Callable[[dict[str, Any]], Awaitable[Any]],
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            body: Any = {}
            result = "ok"
            try:
                given = request.headers.get("Authorization", "")
                if not (
                    given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token)
                ):
                    raise errors.Unauthorized(
                        "the admin API needs its bearer token",
                        challenge='Bearer realm="mirror-admin"',
                    )
                if request.can_read_body:
                    try:
                        body = json.loads(await request.read() or b"{}")
                    except ValueError:
                        raise errors.InvalidRequest("request body is not JSON") from None
                return web.json_response(as_json(await fn(body)))
            except errors.MirrorError as e:
                result = e.code
                raise
            except Exception:
                result = "error"
                raise
            finally:
                events.admin(
                    action=f"{request.method} {request.path[len(config.prefix) + 1 :]}",
                    via="api",
                    who={"client": client_of(request)},
                    params=body if isinstance(body, dict) else {"body": body},
                    result=result,
                )

        return handler

    p = config.prefix
    app.router.add_get(f"{p}/catalog", guarded(lambda _: admin.catalog()))
    app.router.add_get(f"{p}/usage", guarded(lambda _: admin.usage()))
    app.router.add_post(
        f"{p}/evict",
        guarded(lambda b: admin.evict(bool(b.get("dry_run")), b.get("older_than"), b.get("repo"))),
    )
    app.router.add_get(f"{p}/pins", guarded(lambda _: admin.pins()))
    app.router.add_post(f"{p}/pins", guarded(lambda b: _pin(admin, b)))
    app.router.add_delete(f"{p}/pins", guarded(lambda b: admin.unpin(str(b.get("pattern", "")))))
    app.router.add_post(f"{p}/fsck", guarded(lambda b: admin.fsck(bool(b.get("repair")))))


async def _pin(admin: Admin, body: dict[str, Any]) -> list[str]:
    await admin.pin(str(body.get("pattern", "")))
    return await admin.pins()
