"""Hostile and bad input, generated: every key, timeout and TTL either works or fails with one
clear keylock error, and nothing is left held or written outside the lock directory."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keylock import MAX_KEY_LENGTH, BackendUnavailable, InvalidKey, KeyedLock, LeaseLost
from keylock._inspect import inspect_directory
from keylock._validate import MIN_TTL
from keylock.backends import FileBackend, RedisBackend
from keylock.backends.file import file_name

from .._redis_server import running_server

KEYS = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from(["/", ".", "\x00", "\n", "*", "?", "[", "{", "}", "é"])),
    st.text(min_size=MAX_KEY_LENGTH - 2, max_size=MAX_KEY_LENGTH + 2),
    st.binary(max_size=8),
    st.integers(),
    st.none(),
)


def _valid(key: object) -> bool:
    return isinstance(key, str) and 0 < len(key) <= MAX_KEY_LENGTH and "\x00" not in key


@settings(max_examples=300, deadline=None)
@given(key=KEYS)
def test_any_key_works_or_is_invalid_key_and_nothing_stays_held(key: object) -> None:
    locks = KeyedLock()
    if _valid(key):
        with locks.sync(key) as lease:  # type: ignore[arg-type]
            assert lease.key == key
    else:
        with pytest.raises(InvalidKey) as info, locks.sync(key):  # type: ignore[arg-type]
            pass
        assert info.value.key == key
    assert len(locks.backend) == 0  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.text(min_size=1, max_size=MAX_KEY_LENGTH).filter(lambda k: "\x00" not in k))
def test_any_valid_key_maps_to_one_file_inside_the_directory(key: str) -> None:
    with tempfile.TemporaryDirectory() as root:
        directory = os.path.join(root, "locks")
        locks = KeyedLock(FileBackend(directory))
        with locks.sync(key):
            pass
        assert os.listdir(root) == ["locks"]  # nothing beside the lock directory
        assert os.listdir(directory) == [file_name(key)]
        assert os.path.dirname(os.path.realpath(os.path.join(directory, file_name(key)))) == (
            os.path.realpath(directory)
        )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    keys=st.lists(
        st.text(alphabet=st.sampled_from(["\x00", "a", "_", ".", "/", "é", "\udcff", "\n"])),
        min_size=1,
        max_size=4,
        unique=True,
    ).filter(lambda keys: all(keys))
)
def test_full_keys_with_nul_map_to_distinct_files_that_name_them(keys: list[str]) -> None:
    """The registry's full key is ``namespace + "\\0" + key``: the backend must give any such
    key its own file inside the directory, and inspect must show it (as ``namespace:key``)."""
    with tempfile.TemporaryDirectory() as root:
        directory = os.path.join(root, "locks")
        backend = FileBackend(directory)
        owner = b"\x01" * 16
        grants = [(key, backend.acquire_sync(key, owner, timeout=0, ttl=None)) for key in keys]
        assert sorted(os.listdir(directory)) == sorted(file_name(key) for key in keys)
        assert os.listdir(root) == ["locks"]
        shown = sorted(key.replace("\x00", ":") for key in keys)  # as namespace:key
        assert sorted(lock.key for lock in inspect_directory(directory)) == shown
        for key, grant in grants:
            backend.release_sync(key, owner, grant[0])
        backend.close_sync()


NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-5, max_value=5),
    st.none(),
    st.booleans(),
    st.text(max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(timeout=NUMBERS, ttl=NUMBERS)
def test_any_timeout_and_ttl_work_or_fail_clearly(timeout: object, ttl: object) -> None:
    locks = KeyedLock()
    timeout_ok = timeout is None or (
        isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout >= 0
    )
    ttl_ok = ttl is None or (
        isinstance(ttl, int | float) and not isinstance(ttl, bool) and MIN_TTL <= ttl < math.inf
    )
    if timeout_ok and ttl_ok:
        lease = locks.acquire_sync("k", timeout=timeout, ttl=ttl)  # type: ignore[arg-type]
        try:
            lease.release_sync()
        except LeaseLost:  # a TTL of a few ms may lapse before the release: it must say so
            assert lease.lost
    else:
        with pytest.raises((ValueError, TypeError)) as info:
            locks.acquire_sync("k", timeout=timeout, ttl=ttl)  # type: ignore[arg-type]
        assert "'k'" in str(info.value)  # the message names the key
    assert len(locks.backend) == 0  # type: ignore[arg-type]


def test_wrong_redis_password_is_backend_unavailable() -> None:
    import redis

    with running_server() as server:
        redis.Redis.from_url(server.url).config_set("requirepass", "right")
        url = server.url.replace("redis://", "redis://:wrong@")
        locks = KeyedLock(RedisBackend.from_url(url))
        with pytest.raises(BackendUnavailable) as info:
            locks.acquire_sync("k", timeout=0)
        assert "'k'" in str(info.value)
        assert len(locks.backend._tier.local) == 0  # type: ignore[attr-defined]
        locks.close_sync()
