"""Redis clients for a backend: made from a URL, derived sync <-> async, named for messages.

The renewer and the listener are threads: they need a sync client. Async callers need an
async one per event loop. Whichever the user did not give is made with the other's options
(address, auth, TLS, timeouts); a Cluster client begets a Cluster client.
"""

from __future__ import annotations

import functools
import inspect
from typing import cast

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import RedisClusterException, RedisError

from ...errors import BackendUnavailable
from . import _sentinel
from ._wire import redact

__all__ = [
    "AsyncClient",
    "SyncClient",
    "address",
    "async_from",
    "check_clients",
    "from_url",
    "raw",
    "raw_async",
    "sync_from",
]

SyncClient = redis.Redis | redis.cluster.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster


def check_clients(client: object, async_client: object) -> None:
    """TypeError unless *client* is a sync redis-py client (or None) and *async_client* an
    async one (or None), and at least one is given."""
    if client is None and async_client is None:
        raise TypeError("RedisBackend needs a client: use RedisBackend.from_url(url)")
    if client is not None and not isinstance(client, SyncClient):
        hint = (
            "use RedisBackend.from_url(url) for a URL"
            if isinstance(client, str)
            else "pass redis.Redis or redis.cluster.RedisCluster (async ones as async_client=)"
        )
        raise TypeError(
            f"RedisBackend client must be a sync redis-py client, not {client!r}: {hint}"
        )
    if async_client is not None and not isinstance(async_client, AsyncClient):
        raise TypeError(
            f"RedisBackend async_client must be a redis.asyncio client, not {async_client!r}: "
            "pass redis.asyncio.Redis or redis.asyncio.cluster.RedisCluster"
        )


@functools.cache
def _accepted(cluster: bool) -> frozenset[str]:
    """Every option a client made by from_url passes on to something that takes it."""
    owners: list[type] = [redis.Redis, redis.ConnectionPool]
    for cls in (redis.Connection, redis.SSLConnection, redis.UnixDomainSocketConnection):
        owners.extend(cls.__mro__)
    if cluster:
        owners.append(redis.cluster.RedisCluster)
    names: set[str] = set()
    for owner in owners:
        init = owner.__dict__.get("__init__")
        if init is not None:
            names.update(inspect.signature(init).parameters)
    return frozenset(names - {"self", "args", "kwargs"})


def from_url(url: str, *, cluster: bool, options: dict[str, object]) -> SyncClient:
    """A sync client for *url* (``redis+sentinel://``: the primary the Sentinels name);
    TypeError for an option no client takes (found now, not at the first command);
    ValueError for a bad URL, BackendUnavailable for an unreachable Cluster."""
    if not isinstance(url, str):
        raise TypeError(f"RedisBackend.from_url needs a URL string, not {url!r}")
    sentinel = _sentinel.is_sentinel_url(url)
    if sentinel and cluster:
        raise ValueError("RedisBackend.from_url: a redis+sentinel:// URL is not a Cluster")
    unknown = sorted(
        set(options) - _accepted(cluster) - ({"sentinel_kwargs"} if sentinel else set())
    )
    if unknown:
        raise TypeError(
            f"RedisBackend.from_url: unknown Redis client option(s) {', '.join(unknown)}: "
            "pass options of redis.Redis (or of redis.cluster.RedisCluster with cluster=True)"
        )
    shown = redact(url)
    try:
        if sentinel:
            return cast(
                "SyncClient", _sentinel.make_client(url, shown, options, asynchronous=False)
            )
        if cluster:
            return redis.cluster.RedisCluster.from_url(url, **options)
        return redis.Redis.from_url(url, **options)
    except ValueError as exc:  # the URL's text may hold a password: not chained
        if str(exc).startswith(_sentinel.BAD_URL):  # (its own: redacted, with the form)
            raise ValueError(str(exc)) from None
        raise ValueError(f"bad Redis URL {shown!r}: {redact(str(exc))}") from None
    except (RedisError, RedisClusterException) as exc:  # a Cluster client looks for its nodes
        raise BackendUnavailable(
            f"Redis Cluster at {shown!r} is unreachable: {redact(str(exc))}"
        ) from None


def options_for(cls: type, kwargs: dict[str, object]) -> dict[str, object]:
    """The connection options of another client that *cls* accepts (pools add private ones)."""
    accepted = inspect.signature(cls).parameters
    return {name: value for name, value in kwargs.items() if name in accepted}


def sync_from(source: AsyncClient) -> SyncClient:
    """A sync client with the options of the async client *source*."""
    if _is_fake(source):
        return cast("SyncClient", _fake_twin(source, asynchronous=False))
    if _sentinel.is_sentinel(source):
        return _sentinel.sync_twin(source)
    if isinstance(source, redis.asyncio.cluster.RedisCluster):
        kwargs = source.get_nodes()[0].connection_kwargs  # the client finds the rest
        options = options_for(redis.cluster.RedisCluster, kwargs)
        return redis.cluster.RedisCluster(**options)  # type: ignore[arg-type]
    kwargs = source.connection_pool.connection_kwargs
    return redis.Redis(**options_for(redis.Redis, kwargs))  # type: ignore[arg-type]


def async_from(
    source: SyncClient, url: str | None, client_options: dict[str, object]
) -> AsyncClient:
    """An async client (for the running event loop) with the options of *source*, or made
    from *url* as the sync one was."""
    if _is_fake(source):
        return cast("AsyncClient", _fake_twin(source, asynchronous=True))
    if url is not None and _sentinel.is_sentinel_url(url):
        made = _sentinel.make_client(url, redact(url), client_options, asynchronous=True)
        return cast("AsyncClient", made)
    if _sentinel.is_sentinel(source):
        return _sentinel.async_twin(source)
    cluster = isinstance(source, redis.cluster.RedisCluster)
    if url is not None:
        kind = redis.asyncio.cluster.RedisCluster if cluster else redis.asyncio.Redis
        return kind.from_url(url, **client_options)  # type: ignore[arg-type]
    if isinstance(source, redis.cluster.RedisCluster):
        node = source.get_default_node() or source.get_nodes()[0]  # type: ignore[no-untyped-call]
        kwargs = node.redis_connection.connection_pool.connection_kwargs
        options = options_for(redis.asyncio.cluster.RedisCluster, kwargs)
        return redis.asyncio.cluster.RedisCluster(**options)  # type: ignore[arg-type]
    options = options_for(redis.asyncio.Redis, source.connection_pool.connection_kwargs)
    return redis.asyncio.Redis(**options)  # type: ignore[arg-type]


# What makes a fakeredis client's server: two clients with the same values share one
_FAKE_OPTIONS = ("server", "version", "server_type", "lua_modules", "host", "port", "db")


def _is_fake(client: object) -> bool:
    """Whether *client* is a fakeredis client (its connections reach an in-process server)."""
    connection_class = getattr(getattr(client, "connection_pool", None), "connection_class", None)
    return str(getattr(connection_class, "__module__", "")).partition(".")[0] == "fakeredis"


def _fake_twin(source: SyncClient | AsyncClient, *, asynchronous: bool) -> object:
    """A fakeredis client of the other kind on the fake server of *source* (a redis-py
    client made from its options would look for a real server)."""
    import fakeredis

    kwargs = source.connection_pool.connection_kwargs  # type: ignore[union-attr]
    options = {name: kwargs[name] for name in _FAKE_OPTIONS if name in kwargs}
    kind = fakeredis.FakeAsyncRedis if asynchronous else fakeredis.FakeRedis
    return kind(**options)


def _decodes(client: object) -> bool:
    get_encoder = getattr(client, "get_encoder", None)
    return bool(getattr(get_encoder(), "decode_responses", False)) if get_encoder else False


def raw(client: SyncClient) -> SyncClient:
    """*client*, or a twin of it that leaves replies as bytes when it decodes them: owner ids,
    hand-off messages and stored outcomes are bytes that need not be UTF-8."""
    return cast("SyncClient", _raw(client))


def raw_async(client: AsyncClient) -> AsyncClient:
    """The same for an async client."""
    return cast("AsyncClient", _raw(client))


def _raw(client: SyncClient | AsyncClient) -> object:
    if not _decodes(client):
        return client
    if _sentinel.is_sentinel(client):
        if isinstance(client, redis.asyncio.Redis):
            return _sentinel.async_twin(client, decode_responses=False)
        return _sentinel.sync_twin(client, decode_responses=False)
    if isinstance(client, redis.cluster.RedisCluster):
        node = client.get_default_node() or client.get_nodes()[0]  # type: ignore[no-untyped-call]
        kwargs = node.redis_connection.connection_pool.connection_kwargs
        options = options_for(redis.cluster.RedisCluster, kwargs)
        return redis.cluster.RedisCluster(**{**options, "decode_responses": False})  # type: ignore[arg-type]
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        kwargs = client.get_nodes()[0].connection_kwargs
        options = options_for(redis.asyncio.cluster.RedisCluster, kwargs)
        return redis.asyncio.cluster.RedisCluster(**{**options, "decode_responses": False})  # type: ignore[arg-type]
    pool = client.connection_pool
    twin: dict[str, object] = {"connection_class": pool.connection_class}
    for option in ("max_connections", "timeout"):  # (timeout: a blocking pool's wait)
        if option in pool.__dict__:
            twin[option] = pool.__dict__[option]
    twin.update(pool.connection_kwargs)
    twin["decode_responses"] = False
    if isinstance(client, redis.Redis):
        return redis.Redis(connection_pool=type(client.connection_pool)(**twin))  # type: ignore[arg-type]
    return redis.asyncio.Redis(connection_pool=type(client.connection_pool)(**twin))  # type: ignore[arg-type]


def address(client: object) -> str:
    """Where *client* connects, for messages: host:port or the socket path, never a secret."""
    if isinstance(client, redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster):
        nodes = client.get_nodes()
        return "cluster " + ",".join(f"{node.host}:{node.port}" for node in nodes[:3])
    if _is_fake(client):
        return "fakeredis"
    if _sentinel.is_sentinel(client):
        return _sentinel.where(client)
    try:
        kwargs = client.connection_pool.connection_kwargs  # type: ignore[attr-defined]
    except AttributeError:
        return "redis"
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
