"""What a `[cluster] redis_url` names, read once at start: one Redis, the master a Redis
Sentinel service names, or a Redis Cluster; and the URL fit for logs.

    redis://[[user]:password@]host[:port][/db]           one Redis (rediss:// over TLS)
    unix://[[user]:password@]/path/to/socket[?db=N]      one Redis on a local socket
    redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/<service_name>[/<db>]
                                                         the master Sentinel names for the
                                                         service (rediss+sentinel:// over TLS)
    redis+cluster://[[user]:password@]host[:port][,host[:port]…]
                                                         a Redis Cluster, from these startup
                                                         nodes (rediss+cluster:// over TLS)

The user and password are the data nodes' (the master's and its replicas', or the cluster
nodes'). Sentinels are asked without credentials unless the query gives `sentinel_username`
and `sentinel_password`: Sentinels most often run without `requirepass` even where the data
nodes have one, and a Sentinel without one refuses an AUTH. A port left out is Redis's
default, 26379 for a Sentinel and 6379 for anything else. The query's other options are
redis-py's, as its `from_url` takes them (`ssl_ca_certs=…`, `socket_keepalive=yes`, …), for
the data nodes; under TLS the Sentinels take the `ssl_*` ones too.

Only the split of the host list and the service name is this module's: the credentials, the
database and the query options are read by redis-py's own URL parsing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit

from redis.asyncio.connection import SSLConnection
from redis.asyncio.connection import parse_url as parse_redis_url

Topology = Literal["instance", "sentinel", "cluster"]

#: The schemes of one Redis (handed to redis-py whole), and of each topology with its TLS form.
INSTANCE = ("redis", "rediss", "unix")
TOPOLOGIES: Mapping[str, tuple[Topology, bool]] = {
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
DEFAULT_PORT: Mapping[Topology, int] = {"instance": 6379, "sentinel": 26379, "cluster": 6379}
#: The query options that are the Sentinels' credentials, not redis-py's connection options.
SENTINEL_AUTH = {"sentinel_username": "username", "sentinel_password": "password"}


@dataclass(frozen=True)
class RedisTarget:
    """A parsed `redis_url`. `url` is the URL as given (one Redis is opened from it whole);
    `nodes` the Sentinels or the cluster's startup nodes; `options` the data nodes' connection
    options (credentials, db, TLS, the query's); `sentinel` the Sentinels' own ones."""

    topology: Topology
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    sentinel: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:  # credentials stay out of reprs
        return f"RedisTarget({self.topology}, {redis_shown(self.url)!r})"


def redis_target(url: str) -> RedisTarget:
    """The target `url` names; ValueError saying what is wrong with it (never its password)."""
    parts = urlsplit(url)
    if parts.scheme in INSTANCE:
        parse_redis_url(url)  # what redis-py's from_url will refuse, refused at start
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("names no host")
        return RedisTarget("instance", url)
    if parts.scheme not in TOPOLOGIES:
        schemes = ", ".join(f"{s}://" for s in (*INSTANCE, *TOPOLOGIES))
        raise ValueError(f"a URL of scheme {schemes}; got one of scheme {parts.scheme!r}")
    topology, tls = TOPOLOGIES[parts.scheme]
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes = tuple(_node(one, DEFAULT_PORT[topology]) for one in hosts.split(",") if one)
    if not nodes:
        raise ValueError(f"names no host: {parts.scheme}://host:port[,host:port…]")
    query = parse_qsl(parts.query, keep_blank_values=True)
    sentinel = {SENTINEL_AUTH[k]: v for k, v in query if k in SENTINEL_AUTH}
    rest = urlencode([(k, v) for k, v in query if k not in SENTINEL_AUTH])
    service, db = "", ""
    path = [p for p in parts.path.split("/") if p]
    if topology == "sentinel":
        if not path or len(path) > 2:
            raise ValueError(
                f"names no Sentinel service: {parts.scheme}://host:port[,host:port…]"
                "/<service_name>[/<db>]"
            )
        service, db = unquote(path[0]), path[1] if len(path) == 2 else ""
        if db and not db.isdigit():
            raise ValueError(f"the database after the service name is a number, got {db!r}")
    elif path:
        raise ValueError(
            f"a Redis Cluster has only database 0: {parts.scheme}://host:port[,host:port…]"
        )
    elif sentinel:
        raise ValueError("sentinel_username and sentinel_password are for a Sentinel's URL")
    # one node's URL, for redis-py to read the credentials, database and options from
    host = "node"  # whichever: the nodes are the list's
    one = SplitResult(
        "rediss" if tls else "redis", f"{userinfo}@{host}" if userinfo else host, f"/{db}", rest, ""
    )
    options: dict[str, Any] = dict(parse_redis_url(one.geturl()))
    options.pop("host", None)
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True  # how Sentinel's pool and RedisCluster are told of TLS
    if topology == "cluster" and options.get("db"):
        raise ValueError("a Redis Cluster has only database 0")
    return RedisTarget(topology, url, nodes, service, options, sentinel)


def _node(address: str, default_port: int) -> tuple[str, int]:
    """One `host[:port]` of a host list (`[v6]:port` too), read as a URL's authority is."""
    parts = urlsplit(f"//{address}")
    port = parts.port  # ValueError: out of range, or no number
    if not parts.hostname or parts.username is not None:
        raise ValueError(f"names no host in {address!r}")
    return parts.hostname, port if port is not None else default_port


def redis_shown(url: str) -> str:
    """A Redis URL fit for logs: its user and password left out, and any password the query
    carries (`password=`, `sentinel_password=`)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    userinfo = parts.username is not None or parts.password is not None
    if not userinfo and not any(k.endswith("password") for k, _ in query):
        return url
    if userinfo:
        parts = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2])
    masked = [(k, "***" if k.endswith("password") else v) for k, v in query]
    return parts._replace(query=urlencode(masked, safe="*/")).geturl()
