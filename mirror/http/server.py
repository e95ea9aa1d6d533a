"""The listener and its client connections: what aiohttp's own protocol leaves to us.

- A request aiohttp cannot parse (a header flood past 128 fields, a line or field past
  8 KiB, a bad request line) is answered with the OCI error JSON like any other refusal,
  not aiohttp's text page, and logged as one line rather than a traceback.
- A connection with no request in progress is closed after `timeouts.client_idle`. aiohttp
  sets that deadline when a connection opens and after each answer, and a request head that
  arrives byte by byte does not push it back: it bounds slowloris as well as idle keep-alives.
  (A client that stops reading a body is the sender's business: `timeouts.read`.)
- Requests come in by the app's front door (`FRONT_DOOR`, routes.py): the registry API's
  straight to its dispatch, the rest through aiohttp's router.
- `limits.max_connections_per_client`: a request on a connection past it from one address
  gets 429 with Retry-After and the connection is closed (counted in
  `mirror_client_refusals_total`). It is answered, not dropped at accept, so the client
  reads a reason instead of a reset.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web

from mirror import errors
from mirror.config import Config
from mirror.http.middleware import (
    BASE_HEADERS,
    FRONT_DOOR,
    AccessLogger,
    FrontDoor,
    client_of,
    error_body,
)

log = logging.getLogger("mirror.http")

#: What aiohttp's protocol calls with each request.
_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class ClientCounter:
    """Open connections per client address, against a cap (0: none)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open: Counter[str] = Counter()

    def admit(self, peer: str) -> bool:
        self.open[peer] += 1
        return not self.cap or self.open[peer] <= self.cap

    def release(self, peer: str) -> None:
        self.open[peer] -= 1
        if self.open[peer] <= 0:
            del self.open[peer]


class MirrorConnection(web.RequestHandler):
    """aiohttp's HTTP/1.1 protocol, with our error page, the per-client count and the app's
    front door."""

    __slots__ = ("_clients", "over_cap", "peer")

    def __init__(
        self,
        manager: web.Server,
        clients: ClientCounter,
        front_door: FrontDoor | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        if front_door is not None and self._request_handler is not None:
            # the app's request factory makes every request a web.Request
            self._request_handler = cast(_Handler, front_door(self._request_handler))
        self._clients = clients
        #: The client's address (what `request.remote` says), read once for the connection.
        self.peer: str | None = None
        #: Past the per-client cap: every request on it gets 429 (see the middleware).
        self.over_cap = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer = str(peer[0])
            self.over_cap = not self._clients.admit(self.peer)

    def connection_lost(self, exc: BaseException | None) -> None:
        peer, self.peer = self.peer, None
        if peer is not None:
            self._clients.release(peer)
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request that never reached a handler: error JSON, connection closed."""
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        if status >= 500:
            log.error("error handling a request from %s", client_of(request), exc_info=exc)
            err: errors.MirrorError = errors.MirrorError("internal error")
        else:
            log.warning(
                "refused an unparseable request from %s: %s",
                client_of(request),
                (message or str(exc) or "bad request").splitlines()[0][:200],
            )
            err = errors.InvalidRequest("the request could not be parsed")
        resp = web.Response(
            status=status,
            text=error_body(err),
            content_type="application/json",
            headers=BASE_HEADERS,
        )
        resp.force_close()
        return resp


class MirrorSite(web.BaseSite):
    """A TCP listener whose connections are `MirrorConnection`s (aiohttp's TCPSite always
    builds its own protocol). `port` is the bound one, also when 0 was asked for."""

    def __init__(
        self,
        runner: web.AppRunner,
        config: Config,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        access_log: logging.Logger | None = None,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=1024)
        #: Worker processes each listen on the port with SO_REUSEPORT: the kernel spreads
        #: new connections over them.
        self._reuse_port = reuse_port
        self._app_runner = runner
        self._host, self.port = host, port
        self._tls = ssl_context
        self.clients = ClientCounter(config.limits.max_connections_per_client)
        self._front_door = runner.app.get(FRONT_DOOR)
        self._settings: dict[str, Any] = {
            "keepalive_timeout": config.timeouts.client_idle,
            "access_log_class": AccessLogger,
            "access_log": access_log,
        }
        self._listener: asyncio.AbstractServer | None = None

    @property
    def name(self) -> str:
        return f"{'https' if self._tls else 'http'}://{self._host}:{self.port}"

    def _connection(self) -> MirrorConnection:
        server = self._app_runner.server
        assert server is not None, "runner.setup() first"
        return MirrorConnection(
            server,
            self.clients,
            self._front_door,
            loop=asyncio.get_running_loop(),
            **self._settings,
        )

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            self._connection,
            self._host,
            self.port,
            ssl=self._tls,
            backlog=1024,
            reuse_address=True,
            reuse_port=self._reuse_port or None,
        )
        self.port = int(self._listener.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        await super().stop()
