"""The command line: inspect held locks on Redis, on Postgres and in a lock directory;
force-release."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

import keylock
import keylock._inspect
from keylock import KeyedLock, LeaseLost, LockTimeout
from keylock._inspect import (
    force_release_postgres,
    inspect_directory,
    inspect_postgres,
    inspect_redis,
)
from keylock.backends import FileBackend, PostgresBackend, RedisBackend
from keylock.cli import main, printable

from .._pg_server import PgServer
from .._poll import polled
from .._redis_server import Server, running_server

ROOT = Path(__file__).resolve().parents[2]


def test_inspect_lists_three_held_redis_locks_with_tokens_and_ttls(
    redis_server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    redis_server.flush()
    locks = KeyedLock(RedisBackend.from_url(redis_server.url, ttl=30), namespace="app")
    leases = [locks.acquire_sync(f"job:{i}") for i in range(3)]
    held = {lock.key: lock for lock in inspect_redis(redis_server.url)}
    assert set(held) == {"app:job:0", "app:job:1", "app:job:2"}
    for lease in leases:
        found = held[f"app:{lease.key}"]
        assert found.token == lease.token
        assert found.owner == lease.owner.hex()
        assert found.ttl is not None
        assert 20 < found.ttl <= 30
    assert main(["inspect", "--redis-url", redis_server.url]) == 0
    out = capsys.readouterr().out
    assert "3 held" in out
    assert str(leases[0].token) in out
    for lease in leases:
        lease.release_sync()
    assert list(inspect_redis(redis_server.url)) == []
    locks.close_sync()


def test_force_release_frees_a_redis_lock(
    redis_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_server.flush()
    locks = KeyedLock(RedisBackend.from_url(redis_server.url))
    lease = locks.acquire_sync("stuck")
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["release", "stuck", "--force", "--redis-url", redis_server.url]) == 1
    probe = KeyedLock(RedisBackend.from_url(redis_server.url))
    with pytest.raises(LockTimeout):
        probe.acquire_sync("stuck", timeout=0)
    probe.close_sync()
    assert main(["release", "stuck", "--force", "--yes", "--redis-url", redis_server.url]) == 0
    other = KeyedLock(RedisBackend.from_url(redis_server.url))
    other.acquire_sync("stuck", timeout=0).release_sync()
    with pytest.raises(LeaseLost):  # the broken holder learns it on release
        lease.release_sync()
    other.close_sync()
    locks.close_sync()


def test_inspect_a_lock_directory(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    directory = str(tmp_path)
    locks = KeyedLock(FileBackend(directory))
    lease = locks.acquire_sync("held", ttl=60)
    with locks.sync("free"):
        pass
    held = list(inspect_directory(directory))
    assert [h.token for h in held] == [lease.token]
    assert held[0].holder_pid is not None
    assert main(["inspect", "--dir", directory]) == 0
    assert "1 held" in capsys.readouterr().out
    lease.release_sync()


def _write_once(directory: str, key: str) -> None:
    from keylock.backends.base import RW_LIMIT

    writer = KeyedLock(FileBackend(directory).permits(RW_LIMIT, RW_LIMIT))
    writer.acquire_sync(key, timeout=60).release_sync()


def test_inspect_lists_the_holders_of_file_permits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A lock directory's semaphores and RW locks: one row per key with permits held (how
    many of what limit, the newest holder, how many wait), and a line per holder: its slots
    (or writer, or readers), token, owner and pid. Keys nobody holds are not listed. (Before,
    inspect --dir listed lock files only: no permit key at all.)"""
    from keylock.backends.base import RW_LIMIT

    backend = FileBackend(tmp_path)
    sem = KeyedLock(backend.permits(4, 2), namespace="ns")
    pair = sem.acquire_sync("api", timeout=0)
    single = KeyedLock(backend.permits(4)).acquire_sync("api", timeout=0)
    read = KeyedLock(backend.permits(RW_LIMIT))
    readers = [read.acquire_sync("doc", timeout=0) for _ in range(2)]
    writer = KeyedLock(backend.permits(RW_LIMIT, RW_LIMIT))
    write = writer.acquire_sync("doc2", timeout=0)
    waiting = multiprocessing.get_context("fork").Process(
        target=_write_once, args=(str(tmp_path), "doc")
    )
    waiting.start()
    KeyedLock(backend.permits(1)).acquire_sync("free", timeout=0).release_sync()
    try:
        deadline = time.monotonic() + 30
        while next(h for h in inspect_directory(str(tmp_path)) if h.key == "doc").waiting < 1:
            assert time.monotonic() < deadline, "the writer never waited in line"
            time.sleep(0.005)
        held = {h.key: h for h in inspect_directory(str(tmp_path))}
        assert set(held) == {"ns:api", "api", "doc", "doc2"}
        assert held["ns:api"].permits == (2, 4)
        assert held["ns:api"].holders == (
            ("slots 0, 1", pair.token, os.getpid(), pair.owner.hex()),
        )
        assert held["api"].permits == (1, 4)
        assert held["api"].token == single.token
        assert held["doc"].permits == (2, RW_LIMIT)
        assert held["doc"].waiting == 1
        assert held["doc"].token == readers[-1].token
        assert held["doc"].holders[0][0] == "2 readers (newest)"
        assert held["doc2"].holders == (("writer", write.token, os.getpid(), write.owner.hex()),)
        assert main(["inspect", "--dir", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert "2 permits of limit 4; newest: owner" in out
        assert f"slots 0, 1: owner {pair.owner.hex()} (pid {os.getpid()})" in out
        assert "4 held" in out
    finally:
        for lease in (pair, single, *readers, write):
            lease.release_sync()
        waiting.join(30)
    assert waiting.exitcode == 0
    assert list(inspect_directory(str(tmp_path))) == []


# ------------------------------------------------------------- mistakes: one line, no traceback


def _keylock(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m keylock ARGS`` as from cron: no terminal, nothing on stdin."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "keylock", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
        timeout=60,
        check=False,
    )


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("keylock: ")
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (["inspect", "--redis-url", "redis://127.0.0.1:1/0"], 1, "cannot reach"),
        (["inspect", "--redis-url", "redis://127.0.0.1:63x79/0"], 2, "63x79"),
        (["inspect", "--redis-url", "localhost:6379"], 2, "needs a scheme: redis://"),
        (["inspect", "--dir", "/nonexistent/locks"], 2, "does not exist"),
        (["release", "--force", "job:7", "--redis-url", "redis://127.0.0.1:1/0"], 1, "reach"),
        (["bench", "--from-json", "/nonexistent/missing.json"], 2, "no such file"),
        (["bench", "--redis-url", "redis://127.0.0.1:1/0"], 1, "cannot reach"),
        (["inspect"], 2, "--redis-url --dir is required"),
    ],
)
def test_an_ordinary_mistake_is_one_line_and_an_exit_code(
    argv: list[str], code: int, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Row 39, issue 16 finding 7: each of these printed a Python traceback (exit 1, or 2 from
    argparse with a usage block)."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert says in _one_line(err)
    assert "keylock bench on" not in err  # a dead --redis-url is found before the run starts


def test_wrong_or_missing_password_says_so_and_never_prints_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 16 finding 7: a wrong or missing password printed a traceback."""
    with running_server() as server:
        redis.Redis.from_url(server.url).config_set("requirepass", "s3cret-pw")
        wrong = server.url.replace("redis://", "redis://:w0rng-pw@")
        assert main(["inspect", "--redis-url", wrong]) == 1
        line = _one_line(capsys.readouterr().err)
        assert "refused the user name or password" in line
        assert "w0rng-pw" not in line
        assert ":***@" in line
        assert main(["inspect", "--redis-url", server.url]) == 1
        assert "needs a password: put it in the URL" in _one_line(capsys.readouterr().err)
        right = server.url.replace("redis://", "redis://:s3cret-pw@")
        assert main(["inspect", "--redis-url", right]) == 0
        out, err = capsys.readouterr()
        assert "0 held" in out
        assert "s3cret" not in out + err


def test_release_without_a_terminal_refuses_and_names_yes(redis_server: Server) -> None:
    """Row 39, issue 16 finding 7: without a terminal (cron, CI, ssh -T) the prompt raised
    EOFError with a traceback; the lock must stay held."""
    redis_server.flush()
    locks = KeyedLock(RedisBackend.from_url(redis_server.url))
    lease = locks.acquire_sync("job:7")
    done = _keylock("release", "--force", "job:7", "--redis-url", redis_server.url)
    assert done.returncode == 2
    assert "pass --yes" in _one_line(done.stderr)
    assert not lease.lost
    assert [h.key for h in inspect_redis(redis_server.url)] == ["job:7"]
    lease.release_sync()
    locks.close_sync()


def test_version_and_help_text(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16 finding 7: no --version, no help for release --force, and the module's reST
    docstring (double backticks) was the --help description."""
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"keylock {keylock.__version__}"
    for argv in (["--help"], ["bench", "--help"], ["inspect", "--help"], ["release", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "``" not in out, argv
    with pytest.raises(SystemExit):
        main(["release", "--help"])
    options = capsys.readouterr().out.split("options:", 1)[1]
    force = options.split("\n  --force", 1)[1].split("\n  --redis-url", 1)[0]
    assert "only that holder" in " ".join(force.split())


# ------------------------------------------------------------------- output: escaped, owners


def test_printable_escapes_every_control_character() -> None:
    assert printable("job:7") == "job:7"
    assert printable("a\x1b[2Jb\r\n\t\x07\x00\u202e") == "a\\x1b[2Jb\\r\\n\\t\\x07\\x00\\u202e"
    assert printable("back\\slash") == "back\\\\slash"  # so an escape maps back to one key
    assert printable("ключ:é") == "ключ:é"


def test_inspect_escapes_keys_that_carry_terminal_sequences(
    redis_server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Row 23: a key's ESC sequence (here: clear the screen) reached the operator's terminal."""
    redis_server.flush()
    evil = "export:\x1b[2J\x1b]0;owned\x07\rreport.csv"
    locks = KeyedLock(RedisBackend.from_url(redis_server.url))
    lease = locks.acquire_sync(evil)
    assert main(["inspect", "--redis-url", redis_server.url]) == 0
    out = capsys.readouterr().out
    assert "export:\\x1b[2J\\x1b]0;owned\\x07\\rreport.csv" in out
    assert "\x1b" not in out
    assert "\r" not in out
    assert "\x07" not in out
    assert main(["release", "--force", "--yes", evil, "--redis-url", redis_server.url]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "\\x1b[2J" in out
    with pytest.raises(LeaseLost):
        lease.release_sync()
    locks.close_sync()


def test_release_force_shows_the_holder_and_releases_only_that_owner(
    redis_server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Row 24 (CLI side): the prompt named no holder and the delete compared nothing."""
    redis_server.flush()
    locks = KeyedLock(RedisBackend.from_url(redis_server.url), namespace="app")
    lease = locks.acquire_sync("job:7")
    calls: list[dict[str, object]] = []
    real = keylock._inspect.force_release_redis

    def spy(url: str, key: str, **options: Any) -> bool:
        calls.append({"key": key, **options})
        return real(url, key, **options)

    monkeypatch.setattr(keylock._inspect, "force_release_redis", spy)
    monkeypatch.setattr("builtins.input", lambda prompt: "y")  # not the owner: refused
    assert main(["release", "app:job:7", "--force", "--redis-url", redis_server.url]) == 1
    assert "does not match" in capsys.readouterr().out
    monkeypatch.setattr("builtins.input", lambda prompt: lease.owner.hex()[:8])
    assert main(["release", "app:job:7", "--force", "--redis-url", redis_server.url]) == 0
    out = capsys.readouterr().out
    shown = out.splitlines()[0]
    assert f"token {lease.token}" in shown
    assert f"owner {lease.owner.hex()}" in shown
    # the key as stored: namespace NUL key
    assert calls == [{"key": "app\x00job:7", "prefix": "keylock", "owner": lease.owner}]
    assert out.splitlines()[-1] == "released"
    with pytest.raises(LeaseLost):
        lease.release_sync()
    assert main(["release", "app:job:7", "--force", "--redis-url", redis_server.url]) == 1
    assert "'app:job:7' is not held" in capsys.readouterr().out
    locks.close_sync()


def test_inspect_shows_owner_hex_and_pid(
    redis_server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 16 finding 7: the holder column showed a pid or an owner, never both."""
    redis_server.flush()
    on_redis = KeyedLock(RedisBackend.from_url(redis_server.url))
    lease = on_redis.acquire_sync("job:1")
    assert main(["inspect", "--redis-url", redis_server.url]) == 0
    assert f"owner {lease.owner.hex()}" in capsys.readouterr().out
    lease.release_sync()
    on_redis.close_sync()
    on_disk = KeyedLock(FileBackend(str(tmp_path)))
    held = on_disk.acquire_sync("job:2", ttl=60)
    assert main(["inspect", "--dir", str(tmp_path)]) == 0
    assert f"owner {held.owner.hex()} (pid {os.getpid()})" in capsys.readouterr().out
    held.release_sync()


# ----------------------------------------------------------------------------- Postgres


def test_inspect_lists_three_held_postgres_locks_with_tokens_and_ttls(
    postgres_server: PgServer, capsys: pytest.CaptureFixture[str]
) -> None:
    postgres_server.flush()
    url = postgres_server.url
    locks = KeyedLock(PostgresBackend.from_url(url, ttl=30), namespace="app")
    leases = [locks.acquire_sync(f"job:{i}") for i in range(3)]
    with locks.sync("free"):
        pass
    held = {lock.key: lock for lock in inspect_postgres(url)}
    assert set(held) == {"app:job:0", "app:job:1", "app:job:2"}  # not the released one
    for lease in leases:
        found = held[f"app:{lease.key}"]
        assert found.stored == f"app\x00{lease.key}"
        assert found.token == lease.token
        assert found.owner == lease.owner.hex()
        assert found.ttl is not None
        assert 20 < found.ttl <= 30
    assert main(["inspect", "--postgres-url", url]) == 0
    out = capsys.readouterr().out
    assert "3 held" in out
    assert str(leases[0].token) in out
    assert f"owner {leases[0].owner.hex()}" in out
    for lease in leases:
        lease.release_sync()
    assert list(inspect_postgres(url)) == []
    assert list(inspect_postgres(url, table="nothing_here")) == []  # no table yet: none held
    locks.close_sync()


def test_force_release_frees_a_postgres_lock_and_wakes_the_next_waiter_at_once(
    postgres_server: PgServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The holder shown is the one broken, and the waiter in line (poll=30 s, so only the
    NOTIFY can wake it in time) gets the key at once with a higher token; the broken holder
    learns it on release."""
    postgres_server.flush()
    url = postgres_server.url
    holder = KeyedLock(PostgresBackend.from_url(url), namespace="app")
    waiter = KeyedLock(PostgresBackend.from_url(url, poll=30.0), namespace="app")
    lease = holder.acquire_sync("stuck")
    granted: list[int] = []

    def wait() -> None:
        got = waiter.acquire_sync("stuck", timeout=30)
        granted.append(got.token)
        got.release_sync()

    thread = threading.Thread(target=wait)
    thread.start()
    assert polled(lambda: [h.waiting for h in inspect_postgres(url)] == [1])
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["release", "app:stuck", "--force", "--postgres-url", url]) == 1
    shown = capsys.readouterr().out.splitlines()[0]
    assert f"token {lease.token}" in shown
    assert f"owner {lease.owner.hex()}" in shown
    assert [h.token for h in inspect_postgres(url)] == [lease.token]  # "n": still held
    # another owner's force-release compares and changes nothing
    assert not force_release_postgres(url, "app\x00stuck", owner=b"someone else")
    started = time.monotonic()
    assert main(["release", "app:stuck", "--force", "--yes", "--postgres-url", url]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "released"
    thread.join(30)
    assert granted
    assert granted[0] > lease.token
    assert time.monotonic() - started < 5.0  # woken by the NOTIFY, not its 30 s poll
    with pytest.raises(LeaseLost):
        lease.release_sync()
    assert main(["release", "app:stuck", "--force", "--postgres-url", url]) == 1
    assert "'app:stuck' is not held" in capsys.readouterr().out
    holder.close_sync()
    waiter.close_sync()


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (["inspect", "--postgres-url", "postgresql://kl:s3cret-pw@127.0.0.1:1/app"], 1, "reach"),
        (["inspect", "--postgres-url", "localhost:5432"], 2, "needs a scheme: postgresql://"),
        (["inspect", "--postgres-url", "postgresql://u:s3cret-pw@h/db?bogus=1"], 2, "bogus"),
        (["inspect", "--postgres-url", "postgresql://h/db", "--table", "x;drop"], 2, "--table"),
        (
            ["release", "--force", "--yes", "job:7", "--postgres-url", "host=127.0.0.1 port=1"],
            1,
            "cannot reach the Postgres server at 127.0.0.1:1/",
        ),
    ],
)
def test_a_postgres_mistake_is_one_line_without_the_password(
    argv: list[str], code: int, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == code
    err = capsys.readouterr().err
    line = _one_line(err)
    assert says in line
    assert "s3cret" not in err


def test_postgres_errors_in_a_subprocess_have_no_traceback(postgres_server: PgServer) -> None:
    done = _keylock("inspect", "--postgres-url", "postgresql://kl:s3cret-pw@127.0.0.1:1/app")
    assert done.returncode == 1
    line = _one_line(done.stderr)
    assert "cannot reach the Postgres server at postgresql://kl:***@127.0.0.1:1/app" in line
    assert "s3cret" not in done.stdout + done.stderr
    done = _keylock("release", "--force", "job:7", "--postgres-url", postgres_server.url)
    assert done.returncode == 1  # nothing held: nothing asked
    assert "'job:7' is not held" in done.stdout


def test_force_release_spares_a_lock_that_changed_hands_since_it_was_inspected(
    redis_server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Row 24 (adv_26): the operator inspects a stuck holder; its lease expires and a healthy
    worker takes the key; the operator confirms the release with "y" and broke the healthy
    worker's lease. Confirming now takes the shown owner's hex digits, and --owner pins the
    owner seen in inspect: either way a lock that changed hands is left alone."""
    redis_server.flush()
    stuck_locks = KeyedLock(RedisBackend.from_url(redis_server.url, ttl=0.3, auto_renew=False))
    stuck = stuck_locks.acquire_sync("job:7")
    healthy_locks = KeyedLock(RedisBackend.from_url(redis_server.url))
    healthy = healthy_locks.acquire_sync("job:7", timeout=10)  # after the stuck one expired
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert main(["release", "job:7", "--force", "--redis-url", redis_server.url]) == 1
    named = ["--owner", stuck.owner.hex()]
    assert (
        main(["release", "job:7", "--force", "--yes", *named, "--redis-url", redis_server.url]) == 1
    )
    assert f"held by owner {healthy.owner.hex()} now" in capsys.readouterr().out
    assert not healthy.lost
    healthy.release_sync()  # still its own: no LeaseLost
    assert (
        main(["release", "job:7", "--force", "--owner", "xyz", "--redis-url", redis_server.url])
        == 2
    )
    stuck_locks.close_sync()
    healthy_locks.close_sync()
