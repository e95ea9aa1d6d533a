"""Which upstream a request goes to, and under what repository name.

Closed world: only configured registries are ever dialled. A request picks its upstream by
containerd's `?ns=<host>` (which the OCI spec asks a proxy to echo as `OCI-Namespace`), by a
path prefix naming a configured host (`/v2/ghcr.io/owner/img/...`), or falls to the default.
With both (containerd's `override_path` on a prefixed mirror URL), a prefix that names the
same upstream as `ns` is dropped from the repository.
"""

from __future__ import annotations

from dataclasses import dataclass

from mirror.bounded import Bounded
from mirror.config import Config, UpstreamConfig
from mirror.errors import NameUnknown
from mirror.oci.reference import check_name, looks_like_host

ROUTE_CACHE_MAX = 4096


@dataclass(frozen=True, slots=True)
class Target:
    """A routed request: the upstream, the repository as upstream knows it, and the name the
    client used (for rewriting pagination links)."""

    upstream: UpstreamConfig
    repo: str
    name: str
    namespace: str | None = None


class Router:
    """Maps (name, ns) to a Target; refuses hosts that are not configured."""

    def __init__(self, config: Config) -> None:
        self._by_host: dict[str, UpstreamConfig] = {}
        for up in config.upstreams:
            for host in up.hosts:
                self._by_host[host.lower()] = up
        self._default = config.upstream(config.default_upstream)
        self._cache: Bounded[tuple[str, str | None], Target] = Bounded(ROUTE_CACHE_MAX)

    def route(self, name: str, ns: str | None) -> Target:
        """The Target for a name and optional ns; valid answers are memoised (bounded)."""
        key = (name, ns)
        found = self._cache.get(key)
        if found is None:
            found = self._cache.remember(key, self._route(name, ns))
        return found

    def _route(self, name: str, ns: str | None) -> Target:
        if ns is not None:
            up = self._by_host.get(ns.lower())
            if up is None:
                raise NameUnknown(
                    "registry host not served by this mirror", detail={"ns": ns[:255]}
                )
            return self._target(up, self._strip_own_host(up, name), name, ns)
        first, _, rest = name.partition("/")
        if rest and looks_like_host(first):
            up = self._by_host.get(first.lower())
            if up is None:
                raise NameUnknown(
                    "registry host not served by this mirror", detail={"host": first[:255]}
                )
            return self._target(up, rest, name, None)
        return self._target(self._default, name, name, None)

    def _strip_own_host(self, up: UpstreamConfig, name: str) -> str:
        """containerd with `override_path` sends both a path prefix and `ns`
        (`/v2/ghcr.io/owner/img/...?ns=ghcr.io`): a first component naming the same upstream
        as `ns` is that prefix, not part of the repository."""
        first, _, rest = name.partition("/")
        if rest and self._by_host.get(first.lower()) is up:
            return rest
        return name

    @staticmethod
    def _target(up: UpstreamConfig, repo: str, name: str, ns: str | None) -> Target:
        if up.library_prefix and "/" not in repo:
            repo = f"library/{repo}"
        return Target(up, check_name(repo), name, ns)
