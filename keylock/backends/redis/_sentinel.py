"""Redis Sentinel: clients that follow the primary through a failover.

Every connection a Sentinel-managed client opens asks the Sentinels where the primary is
(redis-py's SentinelConnectionPool); a connection to a primary that died fails, and the wire's
retry, the listener's reconnect and the renewer's next round then reach the new one. A
demoted primary answers writes with READONLY, which redis-py turns into a connection error
for the same reconnection.

URL: ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]`` (port
26379 by default; ``rediss+sentinel://`` for TLS to the data servers). The password is the
data servers'; Sentinels that need one of their own take ``sentinel_kwargs={"password": ...}``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, NamedTuple, cast
from urllib.parse import unquote

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "BAD_URL",
    "SentinelURL",
    "aclose",
    "async_twin",
    "close",
    "for_sentinel",
    "is_sentinel",
    "is_sentinel_url",
    "make_client",
    "own_twin",
    "parse_url",
    "sync_twin",
    "where",
]

SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_PORT = 26379


# Asking the Sentinels where the primary is must not cost redis-py's default retries and
# socket timeouts per Sentinel that is down: one quick try each, the next Sentinel answers.
def _quick(asynchronous: bool) -> dict[str, object]:
    retry = (redis.asyncio.retry.Retry if asynchronous else Retry)(NoBackoff(), 0)
    return {"socket_timeout": 0.5, "socket_connect_timeout": 0.5, "retry": retry}


# A connection to the primary is tried once (the wire retries a call once, on a connection
# that asks the Sentinels again; the listener and the renewer try again on their own): redis-py's
# default of 10 tries with backoff kept a renewal past its lease's expiry during a failover.
def _once(asynchronous: bool) -> dict[str, object]:
    return {"retry": (redis.asyncio.retry.Retry if asynchronous else Retry)(NoBackoff(), 0)}


_HOST = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]+))(?::(?P<port>\d+))?$")


class SentinelURL(NamedTuple):
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None
    tls: bool


BAD_URL = "bad Redis Sentinel URL"  # how parse_url's errors start


def is_sentinel_url(url: object) -> bool:
    return isinstance(url, str) and url.partition("://")[0].lower() in SCHEMES


def parse_url(url: str, shown: str) -> SentinelURL:
    """*url* parsed; ValueError naming what is wrong, quoting only *shown* (it is redacted)."""

    def bad(why: str) -> ValueError:
        return ValueError(
            f"{BAD_URL} {shown!r}: {why}; expected redis+sentinel:// (or "
            "rediss+sentinel://) then [[user]:password@]host[:port][,host[:port]...]"
            "/service_name[/db]"
        )

    scheme, _, rest = url.partition("://")
    location, _, path = rest.partition("/")
    location = location.partition("?")[0]
    credentials, _, hosts = location.rpartition("@")
    username = password = None
    if credentials:
        user, colon, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels: list[tuple[str, int]] = []
    for part in hosts.split(","):
        match = _HOST.match(part.strip())
        if match is None:
            raise bad(f"{part.strip() or 'an empty address'!r} is not host[:port]")
        port = int(match["port"] or DEFAULT_PORT)
        if not 0 < port < 65536:
            raise bad(f"port {port} is out of range")
        sentinels.append((match["v6"] or match["host"], port))
    names = [unquote(name) for name in path.partition("?")[0].removesuffix("/").split("/")]
    if not names[0]:
        raise bad("the service name (the Sentinels' name of the primary) is missing")
    if len(names) > 2 or (len(names) == 2 and not names[1].isdigit()):
        raise bad(f"the database must be a number after the service name, not {path!r}")
    db = int(names[1]) if len(names) == 2 else 0
    return SentinelURL(sentinels, names[0], db, username, password, scheme.lower() == SCHEMES[1])


def _client_options(
    parsed: SentinelURL, options: dict[str, object], *, asynchronous: bool
) -> dict[str, object]:
    given: dict[str, object] = {"db": parsed.db, "ssl": parsed.tls, **_once(asynchronous)}
    if parsed.username is not None:
        given["username"] = parsed.username
    if parsed.password is not None:
        given["password"] = parsed.password
    return {**given, **options}


def make_client(url: str, shown: str, options: dict[str, object], *, asynchronous: bool) -> object:
    """A client (sync, or async for the running loop) of the primary that *url* names."""
    parsed = parse_url(url, shown)
    options = dict(options)
    given = cast("dict[str, object]", options.pop("sentinel_kwargs", None) or {})
    sentinel_options = {**_quick(asynchronous), **given}
    kind = redis.asyncio.sentinel.Sentinel if asynchronous else redis.sentinel.Sentinel
    manager = kind(parsed.sentinels, sentinel_kwargs=sentinel_options)
    chosen = _client_options(parsed, options, asynchronous=asynchronous)
    return manager.master_for(parsed.service, **chosen)  # type: ignore[arg-type]


def for_sentinel(sentinel: object, service: object) -> redis.Redis:
    """A client of *service*'s primary from a redis-py Sentinel or a list of (host, port)
    addresses; TypeError for anything else."""
    if not isinstance(service, str) or not service:
        raise TypeError(
            f"RedisBackend sentinel= needs service= (the Sentinels' name of the primary, "
            f"such as 'mymaster'), not {service!r}"
        )
    if not isinstance(sentinel, redis.sentinel.Sentinel):
        addresses = _addresses(sentinel)
        sentinel = redis.sentinel.Sentinel(addresses, sentinel_kwargs=_quick(False))  # type: ignore[no-untyped-call]
    return cast("redis.Redis", sentinel.master_for(service, **_once(False)))  # type: ignore[no-untyped-call]


def _addresses(given: object) -> list[tuple[str, int]]:
    if isinstance(given, list | tuple) and given:
        addresses = [tuple(item) for item in given if isinstance(item, list | tuple)]
        if len(addresses) == len(given) and all(
            len(a) == 2 and isinstance(a[0], str) and isinstance(a[1], int) for a in addresses
        ):
            return cast("list[tuple[str, int]]", addresses)
    raise TypeError(
        f"RedisBackend sentinel= must be a redis.sentinel.Sentinel or a list of (host, port) "
        f"Sentinel addresses, not {given!r}"
    )


def is_sentinel(client: object) -> bool:
    """Whether *client* reaches its server through Sentinels."""
    pool = getattr(client, "connection_pool", None)
    return isinstance(
        pool, redis.sentinel.SentinelConnectionPool | redis.asyncio.sentinel.SentinelConnectionPool
    )


def _manager_addresses(manager: object) -> list[tuple[str, int]]:
    sentinels = cast("Sequence[redis.Redis]", getattr(manager, "sentinels", []))
    return [
        (
            str(s.connection_pool.connection_kwargs.get("host", "localhost")),
            int(s.connection_pool.connection_kwargs.get("port", DEFAULT_PORT)),
        )
        for s in sentinels
    ]


def _pool(client: object) -> object:
    return getattr(client, "connection_pool", None)


def where(client: object) -> str:
    """For messages: the service and its Sentinels' addresses (never a secret)."""
    pool = cast("redis.sentinel.SentinelConnectionPool", _pool(client))
    hosts = ",".join(f"{host}:{port}" for host, port in _manager_addresses(pool.sentinel_manager))
    return f"Sentinel service {pool.service_name!r} ({hosts})"


def close(client: object) -> None:
    """Close the connections to the Sentinels of a sync *client* (its own pool is closed by
    its close())."""
    manager = getattr(_pool(client), "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        sentinel.close()


async def aclose(client: object) -> None:
    """The same for an async *client*."""
    manager = getattr(_pool(client), "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()


def _twin(client: object, *, asynchronous: bool, **changes: object) -> object:
    """A client of the same service through the same Sentinels with the same options (plus
    *changes*), sync or async, on a pool of its own and Sentinel connections of its own."""
    pool = cast("redis.sentinel.SentinelConnectionPool", _pool(client))
    manager = pool.sentinel_manager
    options = {
        k: v for k, v in pool.connection_kwargs.items() if k not in ("connection_pool", "retry")
    }
    options["ssl"] = issubclass(
        pool.connection_class, redis.SSLConnection | redis.asyncio.SSLConnection
    )
    options.update(_once(asynchronous))
    options.update(changes)
    # a manager of its own: closing the twin closes its own Sentinel connections
    kind = redis.asyncio.sentinel.Sentinel if asynchronous else redis.sentinel.Sentinel
    sentinel_options = dict(getattr(manager, "sentinel_kwargs", {}))
    if "retry" in sentinel_options:  # (sync and async clients take different Retry kinds)
        sentinel_options["retry"] = _quick(asynchronous)["retry"]
    manager = kind(
        _manager_addresses(manager),
        sentinel_kwargs=sentinel_options,
        min_other_sentinels=getattr(manager, "min_other_sentinels", 0),
    )
    return manager.master_for(pool.service_name, **options)


def sync_twin(client: object, **changes: object) -> redis.Redis:
    return cast("redis.Redis", _twin(client, asynchronous=False, **changes))


def async_twin(client: object, **changes: object) -> redis.asyncio.Redis:
    return cast("redis.asyncio.Redis", _twin(client, asynchronous=True, **changes))


def own_twin(client: redis.Redis) -> tuple[redis.Redis, redis.ConnectionPool]:
    """A client on a pool of its own (the listener's: stop() closes that pool)."""
    twin = sync_twin(client)
    return twin, twin.connection_pool
