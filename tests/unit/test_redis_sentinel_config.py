"""Sentinel configuration: ``redis+sentinel://`` URLs and ``sentinel=`` in the constructor,
parsed and checked without any server (nothing is sent until the first call)."""

from __future__ import annotations

import pytest
import redis
import redis.sentinel

from keylock.backends import RedisBackend
from keylock.backends.redis._sentinel import SentinelURL, parse_url

SECRET = "S3cr3tPassw0rd"


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        (
            "redis+sentinel://10.0.0.1/mymaster",
            SentinelURL([("10.0.0.1", 26379)], "mymaster", 0, None, None, False),
        ),
        (
            "redis+sentinel://:pw@a:1,b:2,c/svc/3",
            SentinelURL([("a", 1), ("b", 2), ("c", 26379)], "svc", 3, None, "pw", False),
        ),
        (
            "rediss+sentinel://me:p%40ss@[::1]:5000/svc",
            SentinelURL([("::1", 5000)], "svc", 0, "me", "p@ss", True),
        ),
        (
            "REDIS+SENTINEL://h:1/svc/",
            SentinelURL([("h", 1)], "svc", 0, None, None, False),
        ),
    ],
)
def test_a_sentinel_url_is_parsed(url: str, parsed: SentinelURL) -> None:
    """Hosts (default port 26379, IPv6 in brackets), service, db, credentials, TLS."""
    assert parse_url(url, url) == parsed


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("redis+sentinel://h:1", "service name"),
        ("redis+sentinel://h:1/", "service name"),
        ("redis+sentinel://h:1//", "service name"),
        ("redis+sentinel://h:1/svc/x", "database"),
        ("redis+sentinel://h:1/svc/0/1", "database"),
        ("redis+sentinel://h:99999/svc", "out of range"),
        ("redis+sentinel://h:1,,h:2/svc", "host"),
        ("redis+sentinel://h:x/svc", "host"),
        (f"redis+sentinel://:{SECRET}@h:x/svc", "host"),
    ],
)
def test_a_bad_sentinel_url_is_a_value_error_without_the_password(url: str, match: str) -> None:
    """from_url refuses a bad URL at once, saying what is wrong and the expected form; the
    password never appears. The expected form reads whole: the redaction of credentials
    turned it into 'redis+sentinel://***@]host:port...' before (this assertion failed),
    and the URL is named once (not prefixed with "bad Redis URL ...: ")."""
    with pytest.raises(ValueError, match=match) as caught:
        RedisBackend.from_url(url)
    assert SECRET not in str(caught.value)
    assert "redis+sentinel://" in str(caught.value)
    assert "[[user]:password@]host[:port][,host[:port]...]/service_name[/db]" in str(caught.value)
    assert str(caught.value).startswith("bad Redis Sentinel URL '")
    assert str(caught.value).count("bad Redis") == 1


def test_from_url_makes_a_client_that_asks_the_sentinels() -> None:
    """The client's pool is redis-py's Sentinel pool for the service, with the URL's db and
    password, Sentinel options from sentinel_kwargs, and quick Sentinel timeouts by default;
    the backend's repr names the service and Sentinels, never the password."""
    backend = RedisBackend.from_url(
        f"redis+sentinel://:{SECRET}@127.0.0.1:1,127.0.0.1:2/svc/2",
        sentinel_kwargs={"socket_timeout": 0.25},
        socket_timeout=3,
    )
    client = backend._sync()
    pool = client.connection_pool
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool)
    assert pool.service_name == "svc"
    assert pool.connection_kwargs["db"] == 2
    assert pool.connection_kwargs["password"] == SECRET
    assert pool.connection_kwargs["socket_timeout"] == 3
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [1, 2]
    assert sentinels[0].connection_pool.connection_kwargs["socket_timeout"] == 0.25
    shown = repr(backend)
    assert "'svc'" in shown
    assert "127.0.0.1:1" in shown
    assert SECRET not in shown
    backend.close_sync()


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"sentinel_kwarg": {}}, TypeError, "sentinel_kwarg"),
        ({"cluster": True}, ValueError, "not a Cluster"),
    ],
)
def test_sentinel_url_options_are_checked(
    options: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        RedisBackend.from_url("redis+sentinel://h:1/svc", **options)  # type: ignore[arg-type]


def test_the_constructor_takes_a_sentinel_or_its_addresses() -> None:
    """sentinel= is a redis-py Sentinel or a list of (host, port), with service=; the backend
    then talks to the primary the Sentinels name."""
    for sentinel in ([("127.0.0.1", 1)], redis.sentinel.Sentinel([("127.0.0.1", 1)])):
        backend = RedisBackend(sentinel=sentinel, service="svc")
        pool = backend._sync().connection_pool
        assert isinstance(pool, redis.sentinel.SentinelConnectionPool)
        assert pool.service_name == "svc"
        assert "Sentinel service 'svc'" in repr(backend)
        backend.close_sync()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"sentinel": [("h", 1)]}, "service="),
        ({"sentinel": [("h", 1)], "service": ""}, "service="),
        ({"sentinel": "h:1", "service": "s"}, "list of \\(host, port\\)"),
        ({"sentinel": [("h", "1")], "service": "s"}, "list of \\(host, port\\)"),
        ({"sentinel": [], "service": "s"}, "list of \\(host, port\\)"),
        ({"sentinel": [("h", 1)], "service": "s", "client": redis.Redis()}, "not both"),
    ],
)
def test_a_bad_sentinel_argument_is_a_type_error(options: dict[str, object], match: str) -> None:
    with pytest.raises(TypeError, match=match):
        RedisBackend(**options)  # type: ignore[arg-type]


def test_bad_replicas_on_a_cluster_is_refused_before_connecting() -> None:
    """A bad replicas= is a TypeError at once, without reaching for the nodes (the URL
    points nowhere; a Cluster client connects to every node when made)."""
    with pytest.raises(TypeError, match="replicas must be an int"):
        RedisBackend.from_url("redis://127.0.0.1:1/0", cluster=True, replicas="1")  # type: ignore[arg-type]
