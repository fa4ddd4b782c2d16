"""The messages a new user meets first name the key as written (``namespace:key``) and the fix."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
import redis

import keylock
from keylock import BackendUnavailable, KeyedLock, KeyedSemaphore, LockTimeout
from keylock.backends import RedisBackend
from keylock.cli import main

from .._redis_server import running_server


def test_a_try_that_finds_the_key_held_does_not_say_raise_the_timeout() -> None:
    """A job claim with ``timeout=0`` that finds the job taken is told to skip or retry, not to
    raise a timeout it chose on purpose. Fails on the old code: "was not granted within 0.0s
    ... raise the timeout, or use timeout=None"."""
    locks = KeyedLock(namespace="jobs")
    sem = KeyedSemaphore(limit=1)

    async def main() -> tuple[str, str, str]:
        async with locks("job:7"), sem("vendor:1"):

            async def other() -> tuple[str, str]:
                with pytest.raises(LockTimeout) as tried:
                    await locks.acquire("job:7", timeout=0)
                with pytest.raises(LockTimeout) as full:
                    await sem.acquire("vendor:1", timeout=0)
                return str(tried.value), str(full.value)

            tried, full = await asyncio.create_task(other())
            with pytest.raises(LockTimeout) as waited:
                await asyncio.to_thread(locks.acquire_sync, "job:7", timeout=0.01)
            return tried, full, str(waited.value)

    tried, full, waited = asyncio.run(main())
    assert tried.startswith("lock 'jobs:job:7' was not granted: another holder has it, and ")
    assert "timeout=0 tries once without waiting; skip it or retry later" in tried
    assert "raise the timeout" not in tried
    assert "timeout=0 tries once without waiting" in full
    assert "'vendor:1'" in full
    assert "within 0.01s" in waited
    assert "raise the timeout" in waited


def test_a_released_lease_names_its_namespaced_key_and_the_fix() -> None:
    """Releasing or extending a lease twice names ``namespace:key``, as every other error
    does, and says what to do. Fails on the old code: the key without its namespace and no
    fix ("lease N on 'job:7' was already released")."""
    locks = KeyedLock(namespace="billing")
    with locks.sync("job:7", ttl=5.0) as lease:
        pass
    with pytest.raises(RuntimeError) as again:
        lease.release_sync()
    assert f"lease {lease.token} on 'billing:job:7' was already released" in str(again.value)
    assert "acquire the key again" in str(again.value)
    with pytest.raises(RuntimeError) as extend:
        lease.extend_sync(5.0)
    assert "on 'billing:job:7' was released: cannot extend" in str(extend.value)
    assert "acquire the key again" in str(extend.value)


def test_the_lost_lease_warning_names_the_key_as_errors_do(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The WARNING logged for a lost lease names ``namespace:key``, like the LeaseLost that
    the same loss raises, so a log line can be matched with the error. Fails on the old code:
    the log said 'job:7' and the error 'billing:job:7'."""
    locks = KeyedLock(namespace="billing")
    lease = locks.acquire_sync("job:7", ttl=0.01)
    newer = locks.acquire_sync("job:7", timeout=5.0)  # granted once the first lease lapsed
    with (
        caplog.at_level(logging.WARNING, logger="keylock"),
        pytest.raises(keylock.LeaseLost) as lost,
    ):
        lease.release_sync()
    newer.release_sync()
    assert "'billing:job:7'" in str(lost.value)
    expected = f"keylock: lease {lease.token} on 'billing:job:7' was lost"
    deadline = time.monotonic() + 10.0  # the takeover may tell on keylock's callback thread
    while expected not in caplog.messages and time.monotonic() < deadline:
        time.sleep(0.01)
    assert expected in caplog.messages


def test_a_missing_or_wrong_redis_password_says_where_to_put_it() -> None:
    """A server that wants a password gets BackendUnavailable saying so and how to pass it,
    never the password given. Fails on the old code: without a password, the RESP3 server's
    "HELLO must be called with the client already authenticated, otherwise the HELLO <proto>
    AUTH <user> <pass> option can be used..." and no hint."""
    with running_server() as server:
        redis.Redis.from_url(server.url).config_set("requirepass", "s3cret-pw")
        messages = []
        for url in (server.url, server.url.replace("redis://", "redis://:w0rng-pw@")):
            locks = KeyedLock(RedisBackend.from_url(url))
            try:
                with pytest.raises(BackendUnavailable) as failed:
                    locks.acquire_sync("job:7", timeout=1.0)
            finally:
                locks.close_sync()
            messages.append(str(failed.value))
    for message in messages:
        assert "'job:7'" in message
        assert "put the right password in the URL, redis://:PASSWORD@HOST:PORT/DB" in message
        assert "HELLO" not in message
        assert "w0rng" not in message
    assert "the server requires a password and none was given" in messages[0]
    assert "invalid username-password pair" in messages[1]


def test_release_of_a_lock_directory_says_why_it_cannot(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``keylock release --force KEY --dir DIR`` (the way ``inspect`` was called) says that a
    file lock is freed only by its process ending. Fails on the old code: "one of the
    arguments --redis-url --postgres-url is required", as if --dir did not exist."""
    assert main(["release", "--force", "myapp:job:7", "--dir", str(tmp_path), "--yes"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("keylock: release --force does not apply to a lock directory")
    assert "inspect --dir shows its pid" in err


def test_release_of_a_key_without_its_namespace_points_at_the_stored_form(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A key typed without its namespace is "not held"; the message says how keys are stored
    and where to see them, and the lock stays held. Fails on the old code: only "'job:7' is
    not held"."""
    with running_server() as server:
        locks = KeyedLock(RedisBackend.from_url(server.url), namespace="myapp")
        lease = locks.acquire_sync("job:7")
        try:
            assert main(["release", "--force", "job:7", "--redis-url", server.url, "--yes"]) == 1
            out = capsys.readouterr().out
            assert "'job:7' is not held (a namespaced key is stored as namespace:key;" in out
            assert "keylock inspect lists the held keys" in out
            assert not lease.lost
        finally:
            lease.release_sync()
            locks.close_sync()


def test_inspect_and_release_help_show_defaults_and_examples(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--help`` of inspect and release gives the defaults of --prefix and --table and an
    example per store. Fails on the old code: "RedisBackend prefix", no default, no
    example."""
    for command in ("inspect", "release"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "prefix= (default: keylock)" in out
        assert "table= (default: keylock_leases)" in out
        assert f"examples:\n  keylock {command} " in out
        if command == "release":
            assert "--dir" not in out  # accepted only to say why it does not apply


def test_the_top_level_help_lists_each_command_once(capsys: pytest.CaptureFixture[str]) -> None:
    """``keylock --help`` lists bench, inspect and release once, under "commands", and says
    how to see a command's options. Fails on the old code: a description listed them, then
    "positional arguments" listed them again in other words."""
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    firsts = [line.split()[0] for line in out.splitlines() if line.strip()]
    for command in ("bench", "inspect", "release"):
        assert firsts.count(command) == 1, out
    assert "\ncommands:\n" in out
    assert "keylock COMMAND --help" in out


def test_a_backend_class_passed_for_a_backend_says_make_one() -> None:
    """``KeyedLock(MemoryBackend)`` (the class, a forgotten ``()``) says to make an instance,
    with the call for that class. Fails on the old code: "... not ABCMeta"."""
    from keylock.backends import FileBackend, MemoryBackend

    for cls, example in (
        (MemoryBackend, "KeyedLock(MemoryBackend())"),
        (FileBackend, "KeyedLock(FileBackend(directory))"),
        (RedisBackend, "KeyedLock(RedisBackend.from_url(url))"),
    ):
        with pytest.raises(TypeError) as wrong:
            KeyedLock(cls)  # type: ignore[arg-type]
        assert f"not the class {cls.__name__}: make one, e.g. {example}" in str(wrong.value)


def test_a_lease_passed_as_a_fencing_token_says_pass_lease_token() -> None:
    """``fenced_update(db, "jobs", 1, lease, ...)`` (the lease, not its token) says "pass
    lease.token", without naming keylock's internal block class. Fails on the old code:
    "must be an int (lease.token), not SyncHold <Lease ...>: pass the lease's token
    unchanged (a float or a string cannot be compared exactly)"."""
    import sqlite3

    from keylock.fencing import fenced_update

    db = sqlite3.connect(":memory:")
    locks = KeyedLock()
    with locks.sync("job:1") as lease:
        for given in (lease, locks.acquire_sync("job:2")):
            with pytest.raises(TypeError) as wrong:
                fenced_update(db, "jobs", 1, given, {"status": "DONE"})  # type: ignore[arg-type]
            message = str(wrong.value)
            assert message.startswith("fencing token for 'jobs:1' must be an int, not the lease")
            assert message.endswith(": pass lease.token")
            assert "Hold" not in message
    db.close()


def test_release_of_a_redis_permit_shows_its_holder_and_breaks_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``keylock release --force`` of a semaphore permit on Redis shows the holder, then breaks
    that permit (as on Postgres): "released", nothing on stderr, and the holder's release
    raises LeaseLost. Fails on the old code: it refused ("... is not supported on Redis")."""
    with running_server() as server:
        sem = KeyedSemaphore(RedisBackend.from_url(server.url), limit=3, namespace="myapp")
        permit = sem.acquire_sync("vendor:1")
        try:
            argv = ["release", "--force", "myapp:vendor:1", "--redis-url", server.url]
            assert main([*argv, "--owner", permit.owner.hex(), "--yes"]) == 0
            out, err = capsys.readouterr()
            assert out.startswith("'myapp:vendor:1' is held: token")
            assert out.endswith("\nreleased\n")
            assert err == ""
            with pytest.raises(keylock.LeaseLost):
                permit.release_sync()
        finally:
            sem.close_sync()
