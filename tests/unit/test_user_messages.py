"""The messages a new user meets first name the key as written (``namespace:key``) and the fix."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

import keylock
from keylock import BackendUnavailable, KeyedLock, KeyedRWLock, KeyedSemaphore, LockTimeout
from keylock.backends import PostgresBackend, RedisBackend
from keylock.cli import main

from .._pg_server import PgServer
from .._redis_server import Server, running_server
from ..conftest import BACKENDS


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


@pytest.mark.parametrize("store", ["memory", "file", "redis", "postgres"])
def test_a_full_semaphore_or_rw_lock_says_what_holds_it(
    store: str, request: pytest.FixtureRequest
) -> None:
    """A semaphore that times out says all its permits are held, an RW lock which side
    blocks (readers or a writer), never a lock's "another holder has it"; the holder is
    another client, so on Redis the server's reply is what times out. Fails on the old code:
    "lock 'ns:vendor:1' was not granted: another holder has it" for all of them."""
    factory = BACKENDS[store](request)
    make = next(factory)
    holder, waiter = make(), make()
    said: dict[str, list[str]] = {}
    try:
        held3 = KeyedSemaphore(holder, limit=3, namespace="ns")
        full = [held3.acquire_sync("vendor:1") for _ in range(3)]
        one = KeyedSemaphore(holder, limit=1, namespace="ns").acquire_sync("vendor:2")
        read = KeyedRWLock(holder, namespace="ns").acquire_read_sync("doc:1")
        write = KeyedRWLock(holder, namespace="ns").acquire_write_sync("doc:2")
        sem3 = KeyedSemaphore(waiter, limit=3, namespace="ns")
        sem1 = KeyedSemaphore(waiter, limit=1, namespace="ns")
        rw = KeyedRWLock(waiter, namespace="ns")
        for name, acquire in (
            ("sem3", lambda t: sem3.acquire_sync("vendor:1", timeout=t)),
            ("sem1", lambda t: sem1.acquire_sync("vendor:2", timeout=t)),
            ("write", lambda t: rw.acquire_write_sync("doc:1", timeout=t)),
            ("read", lambda t: rw.acquire_read_sync("doc:2", timeout=t)),
        ):
            for timeout in (0, 0.3):  # (the try first: the wait then meets a warm connection)
                with pytest.raises(LockTimeout) as timed_out:
                    acquire(timeout)
                said.setdefault(name, []).append(str(timed_out.value))
        for lease in (*full, one, read, write):
            lease.release_sync()
    finally:
        for backend in {id(b): b for b in (holder, waiter)}.values():
            backend.close_sync()
        for _ in factory:  # its own teardown
            pass
    tried, waited = said["sem3"]
    assert tried.startswith("a permit was not granted: all 3 permits of semaphore 'ns:vendor:1' ")
    assert "are held, and timeout=0 tries once without waiting" in tried
    assert "to wait for one" in tried
    assert "a permit was not granted within 0.3s: all 3 permits of semaphore" in waited
    assert "'ns:vendor:1' are still held" in waited
    assert "wait until one is free" in waited
    assert "the one permit of semaphore 'ns:vendor:2' is held, and timeout=0" in said["sem1"][0]
    tried, waited = said["write"]
    assert tried.startswith("the write lock was not granted: readers or another writer hold ")
    assert "RW lock 'ns:doc:1'" in tried
    assert "readers or another writer still hold RW lock 'ns:doc:1'" in waited
    tried, waited = said["read"]
    assert tried.startswith("the read lock was not granted: a writer holds RW lock 'ns:doc:2' ")
    assert "a writer still holds RW lock 'ns:doc:2' or waits for it" in waited
    for message in (m for messages in said.values() for m in messages):
        assert "another holder" not in message
        assert not message.startswith("lock ")


def test_a_single_flight_key_error_does_not_call_it_a_lock_key() -> None:
    """A bad key given to SingleFlight (do, do_sync, forget) is named a "single-flight key";
    a lock's key error still says "lock key". Fails on the old code: "lock key 42 has type
    int, not str", although the caller locks nothing."""
    from keylock import InvalidKey, SingleFlight

    flight = SingleFlight()
    errors: list[InvalidKey] = []
    for call in (
        lambda: flight.do_sync(42, int),  # type: ignore[arg-type]
        lambda: flight.do_sync("", int),
        lambda: flight.forget("job\x007"),
        lambda: flight.do_sync("k" * 2000, int),
        lambda: asyncio.run(flight.do(None, asyncio.sleep, 0)),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidKey) as refused:
            call()
        errors.append(refused.value)
    for error in errors:
        assert str(error).startswith("single-flight key "), str(error)
        assert "lock" not in str(error)
    assert "single-flight key 42 has type int, not str" in str(errors[0])
    with pytest.raises(InvalidKey) as lock_error:
        KeyedLock().statistics(42)  # type: ignore[arg-type]
    assert str(lock_error.value).startswith("lock key 42 has type int, not str")


def test_a_key_function_that_does_not_fit_the_call_names_both_functions() -> None:
    """``@locks.locked(key=lambda a, b: ...)`` on a function called with other arguments
    raises a TypeError naming the decorated function, the key function, both parameter
    lists (never a default's value) and how to make them match; a TypeError raised inside
    the key function's own body is left as it is. Fails on the old code: Python's bare
    "<lambda>() missing 1 required positional argument: 'b'"."""
    locks = KeyedLock()

    @locks.locked(key=lambda job_id, shard: f"job:{job_id}:{shard}")
    def work(job_id: int, password: str = "s3cret-pw") -> int:
        return job_id

    @KeyedSemaphore(limit=2).locked(key=lambda job_id: f"job:{job_id}")
    async def run(job_id: int, *, retries: int = 3) -> int:
        return job_id

    def broken_key(job_id: int) -> str:
        return "job:" + job_id  # type: ignore[operator]  # its own TypeError

    @locks.locked(key=broken_key)
    def other(job_id: int) -> int:
        return job_id

    with pytest.raises(TypeError) as misfit:
        work(7)
    message = str(misfit.value)
    assert message.startswith(f"@locked(key=...) of {__name__}.")
    assert "work: the key function " in message
    assert "<lambda>(job_id, shard) cannot take this call's arguments (1 positional " in message
    assert "missing a required argument: 'shard'" in message
    assert "every call of work(job_id, password=...), so give it matching parameters" in message
    assert "end with *args, **kwargs" in message
    assert "s3cret" not in message
    with pytest.raises(TypeError) as keyword:
        asyncio.run(run(7, retries=1))
    said = str(keyword.value)
    assert "<lambda>(job_id) cannot take this call's arguments (1 positional argument and " in said
    assert "keyword retries: got an unexpected keyword argument 'retries')" in said
    assert "every call of run(job_id, *, retries=...)" in said
    with pytest.raises(TypeError) as own:
        other(7)
    assert "can only concatenate str" in str(own.value)
    assert "@locked" not in str(own.value)


def test_inspect_of_a_postgres_table_that_does_not_exist_says_so(
    postgres_server: PgServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """``keylock inspect --table nosuch`` (a misspelt table) says that the table does not
    exist, names it, its schema and the default, and exits 2, as ``--dir`` of a missing
    directory does; ``release --force`` says the same rather than "not held". A table that
    exists and holds nothing is still "0 held". Fails on the old code: "0 held", exit 0."""
    postgres_server.flush()
    url = postgres_server.url
    locks = KeyedLock(PostgresBackend.from_url(url))
    try:
        with locks.sync("job:7"):  # (the default table exists from here on)
            pass
        assert main(["inspect", "--postgres-url", url]) == 0
        assert capsys.readouterr().out.endswith("\n0 held\n")
        for argv in (
            ["inspect", "--postgres-url", url, "--table", "keylock_leasez"],
            ["release", "--force", "job:7", "--postgres-url", url, "--table", "keylock_leasez"],
            ["inspect", "--postgres-url", url, "--table", "elsewhere.keylock_leases"],
        ):
            assert main(argv) == 2
            out, err = capsys.readouterr()
            assert out == ""
            assert err.count("\n") == 1
            table, schema = argv[-1].rpartition(".")[2], argv[-1].rpartition(".")[0] or "public"
            assert err.startswith(
                f"keylock: --table: table {table!r} does not exist in schema {schema!r} of "
                "that database: nothing has used it yet, or the name is misspelt"
            )
            assert "default keylock_leases" in err
    finally:
        locks.close_sync()


def test_release_without_a_terminal_says_so_without_a_prompt(
    redis_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``keylock release --force KEY`` without --yes and with nothing on stdin (cron) prints
    the holder, then only the "no terminal to confirm on" error: no prompt that nobody can
    answer. An answer piped in is still read (without a prompt); on a terminal the prompt is
    shown. Fails on the old code: stdout ended with "Force-release it from this holder? ...
    Type its owner's first 8 hex digits to confirm: " before the error."""
    redis_server.flush()
    locks = KeyedLock(RedisBackend.from_url(redis_server.url), namespace="app")
    lease = locks.acquire_sync("stuck")
    argv = [sys.executable, "-m", "keylock", "release", "--force", "app:stuck"]
    argv += ["--redis-url", redis_server.url]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    try:
        alone = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=60
        )
        assert alone.returncode == 2
        assert alone.stdout.startswith(f"'app:stuck' is held: token {lease.token}, owner ")
        assert alone.stdout.count("\n") == 1
        assert "confirm" not in alone.stdout
        assert alone.stderr.count("\n") == 1
        assert alone.stderr.startswith("keylock: no terminal to confirm on: pass --yes")
        assert not lease.lost
        prompts: list[str] = []

        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        monkeypatch.setattr(sys, "stdin", Terminal())
        monkeypatch.setattr("builtins.input", lambda prompt: prompts.append(prompt) or "n")
        assert main(argv[3:]) == 1  # "n": not the owner, nothing released
        assert prompts[0].startswith("Force-release it from this holder?")
        piped = subprocess.run(
            argv,
            input=lease.owner.hex()[:8] + "\n",
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert (piped.returncode, piped.stderr) == (0, "")
        assert piped.stdout.endswith("\nreleased\n")
        assert "confirm" not in piped.stdout
    finally:
        with contextlib.suppress(keylock.LeaseLost):
            lease.release_sync()
        locks.close_sync()


def test_a_stale_guard_key_function_that_does_not_fit_the_call_names_both() -> None:
    """``stale_guard(locks, key=...)``, the other decorator with a key function, explains a
    misfit the same way, sync and async. Fails on the old code: Python's bare "<lambda>()
    takes 1 positional argument but 2 were given"."""
    locks = KeyedLock()

    @keylock.stale_guard(locks, key=lambda order: f"order:{order}")
    def ship(order: int, carrier: str) -> str:
        return carrier

    @keylock.stale_guard(locks, key=lambda order: f"order:{order}")
    async def bill(order: int, amount: int) -> int:
        return amount

    with pytest.raises(TypeError) as sync_misfit:
        ship(7, "post")
    with pytest.raises(TypeError) as async_misfit:
        asyncio.run(bill(7, 10))
    for misfit, name in ((sync_misfit, "ship(order, carrier)"), (async_misfit, "bill")):
        message = str(misfit.value)
        assert message.startswith("@stale_guard(key=...) of "), message
        assert "<lambda>(order) cannot take this call's arguments (2 positional arguments: " in (
            message
        )
        assert f"every call of {name}" in message
