"""FileBackend's lock directory and lock files (keylock.backends._filepaths): who may own the
directory, symlinks anywhere in the path, planted hard links and odd files, 128-bit names,
keys with NUL, the group-shared mode across two OS users, and the record that carries the key.

Each test for a defect row says how the code before _filepaths failed it."""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from keylock import BackendUnavailable, KeyedLock, LockTimeout
from keylock._inspect import inspect_directory
from keylock.backends import FileBackend
from keylock.backends._filepaths import file_name
from keylock.backends._filerecord import read_record, read_token, write_record
from keylock.cli import main

OTHER_UID = 65534  # nobody
SECOND_UID = 65533
SHARED_GID = 65534  # nogroup
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changes owners and switches uids")


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path | str) -> int:
    return os.stat(path, follow_symlinks=False).st_mode & 0o7777


# --------------------------------------------------------------- row 20: who owns the directory


@needs_root
def test_a_directory_owned_by_another_user_is_refused_unless_trusted(tmp_path: Path) -> None:
    """Row 20 (adv_17): a lock directory pre-created by another user was accepted, and its owner
    could unlink held lock files (two holders) and rewrite tokens (10^40). Old code: accepted."""
    directory = tmp_path / "locks"
    directory.mkdir(mode=0o700)
    os.chown(directory, OTHER_UID, OTHER_UID)
    with pytest.raises(BackendUnavailable, match=r"owned by uid 65534, not this user.*trust_dir"):
        FileBackend(directory)
    locks = KeyedLock(FileBackend(directory, trust_directory=True))  # the explicit opt-in
    with locks.sync("k"):
        pass


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o720, 0o702])
def test_a_directory_writable_by_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    """Row 20: a 0o777 directory let anyone unlink lock files. Old code: accepted."""
    directory = tmp_path / "locks"
    directory.mkdir()
    directory.chmod(mode)
    with pytest.raises(BackendUnavailable, match="writable by its group or others"):
        FileBackend(directory)
    FileBackend(directory, trust_directory=True).close_sync()


def test_a_read_only_shared_directory_of_ours_is_accepted(tmp_path: Path) -> None:
    directory = tmp_path / "locks"
    directory.mkdir()
    directory.chmod(0o755)  # what mkdir gives with the usual umask: nobody else can write
    with KeyedLock(FileBackend(directory)).sync("k"):
        pass


def test_an_ancestor_writable_by_others_needs_the_sticky_bit(tmp_path: Path) -> None:
    """Row 20: whoever can rename entries of a parent can swap the lock directory under a
    running holder (the next process makes a fresh one: two holders). A sticky parent, like
    /tmp and /run/lock, protects our entry. Old code: accepted the non-sticky parent."""
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)
    with pytest.raises(BackendUnavailable, match=r"writable by others .* not sticky"):
        FileBackend(parent / "locks")
    parent.chmod(0o1777)
    FileBackend(parent / "locks").close_sync()
    assert _mode(parent / "locks") == 0o700


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_created_directories_and_files_are_private_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    with _umask(umask):
        locks = KeyedLock(FileBackend(tmp_path / "a" / "locks"))
        with locks.sync("k"):
            pass
    assert _mode(tmp_path / "a") == 0o700
    assert _mode(tmp_path / "a" / "locks") == 0o700
    assert _mode(tmp_path / "a" / "locks" / file_name("k")) == 0o600


def test_a_directory_path_that_is_a_file_says_so(tmp_path: Path) -> None:
    """Issue 16 finding 9: it said "File exists; create it…". Old code: that message."""
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(BackendUnavailable, match="is a file, not a directory"):
        FileBackend(path)
    with pytest.raises(BackendUnavailable, match="is a file, not a directory"):
        FileBackend(path / "locks")


# ------------------------------------------------------------------- row 25: planted objects


def test_a_symlink_in_a_middle_component_is_refused(tmp_path: Path) -> None:
    """Row 25 (adv_36): only the last component was checked, so locks landed wherever a link in
    the middle pointed. Old code: accepted, files in the link's target."""
    (tmp_path / "real").mkdir()
    (tmp_path / "mid").symlink_to(tmp_path / "real")
    with pytest.raises(BackendUnavailable, match=r"mid' is a symlink"):
        FileBackend(tmp_path / "mid" / "locks")
    assert os.listdir(tmp_path / "real") == []


def test_a_hard_link_at_a_lock_path_is_refused_and_left_unwritten(tmp_path: Path) -> None:
    """Row 25 (adv_36): the target of a planted hard link had its first 128 bytes overwritten
    by the lock record. Old code: acquired, target overwritten."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET " * 20)
    directory = tmp_path / "locks"
    locks = KeyedLock(FileBackend(directory))
    os.link(secret, directory / file_name("linked"))
    with pytest.raises(BackendUnavailable, match=r"'linked'.*2 hard links") as info:
        locks.acquire_sync("linked", timeout=0)
    assert info.value.key == "linked"
    assert file_name("linked") in str(info.value)
    assert secret.read_text() == "TOP SECRET " * 20
    assert locks.statistics("linked").held is False
    assert locks.backend.prune() == 0  # type: ignore[attr-defined]  # not ours to remove
    assert secret.exists()


def _plant_fifo(path: Path) -> None:
    os.mkfifo(path)


def _plant_socket(path: Path) -> None:
    # bound at a short path, then moved: *path* may pass the 107 bytes a socket address allows
    # (a pytest-xdist worker's tmp_path is longer)
    short = Path(tempfile.mkdtemp(prefix="kl-")) / "s"  # (on the file system of tmp_path)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(short))
    short.rename(path)
    short.parent.rmdir()


def _plant_directory(path: Path) -> None:
    path.mkdir()


@pytest.mark.parametrize(
    ("plant", "what"),
    [(_plant_fifo, "FIFO"), (_plant_socket, "not a regular file"), (_plant_directory, "direc")],
)
def test_a_non_regular_file_at_a_lock_path_is_backend_unavailable(
    tmp_path: Path, plant: Callable[[Path], None], what: str
) -> None:
    """Row 25 (adv_36): a FIFO gave a raw OSError (Illegal seek). Old code: OSError."""
    locks = KeyedLock(FileBackend(tmp_path))
    plant(tmp_path / file_name("odd"))
    with pytest.raises(BackendUnavailable, match=what) as info:
        locks.acquire_sync("odd", timeout=0)
    assert info.value.key == "odd"
    assert file_name("odd") in str(info.value)
    assert locks.statistics("odd").held is False  # a probe never blocks on the FIFO either
    with locks.sync("other"):
        pass


# -------------------------------------------------------------- row 27, row 38: names, inputs


def test_the_pair_that_shared_a_64_bit_name_gets_two_files(tmp_path: Path) -> None:
    """Row 27 (adv_39): a birthday search found two keys with one 64-bit name hash, so they
    excluded each other. Names now carry 128 bits. Old code: one name, LockTimeout."""
    k1, k2 = "*%]%$=;&&,)]^!^!", "&$!)@!@,(+,@%$$)"
    assert file_name(k1) != file_name(k2)
    assert len(file_name(k1).split(".")[-2]) == 32
    locks = KeyedLock(FileBackend(tmp_path))
    holder = locks.acquire_sync(k1)
    locks.acquire_sync(k2, timeout=0).release_sync()  # a flock on one file would refuse it
    holder.release_sync()
    assert len(os.listdir(tmp_path)) == 2


def test_an_empty_directory_is_a_value_error() -> None:
    """Row 38 (adv_31): FileBackend('') silently used the current directory. Old code: used it."""
    with pytest.raises(ValueError, match="empty"):
        FileBackend("")


@pytest.mark.parametrize("directory", [None, 3, b"/tmp/locks", ["/tmp"]])
def test_a_directory_of_the_wrong_type_is_a_type_error(directory: object) -> None:
    """Row 38: FileBackend(None) gave a raw TypeError from os.fspath; bytes were accepted."""
    with pytest.raises(TypeError, match="FileBackend directory must be"):
        FileBackend(directory)  # type: ignore[arg-type]


def test_bad_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'private' or 'group'"):
        FileBackend(tmp_path, mode="world")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="trust_directory"):
        FileBackend(tmp_path, trust_directory="yes")  # type: ignore[arg-type]


def test_full_keys_with_nul_get_safe_distinct_names_and_the_record_keeps_them(
    tmp_path: Path,
) -> None:
    """The registry's full key is ``namespace + "\\0" + key``: such keys must map to distinct,
    contained names, and inspect must show them (as ``namespace:key``)."""
    keys = ["ns\x00k", "ns_k", "ns\x00k\x00", "\x00", "n\x00s:k", "ns:k"]
    names = {file_name(key) for key in keys}
    assert len(names) == len(keys)
    assert not any("\x00" in name or "/" in name for name in names)
    backend = FileBackend(tmp_path)
    owner = b"\x02" * 16
    grants = {key: backend.acquire_sync(key, owner, timeout=0, ttl=None) for key in keys}
    assert sorted(os.listdir(tmp_path)) == sorted(names)
    other = FileBackend(tmp_path)
    other._shared = type(other._shared)()  # as another process sees the directory
    # shown as people write them: namespace:key
    assert sorted(lock.key for lock in inspect_directory(str(tmp_path))) == sorted(
        key.replace("\x00", ":") for key in keys
    )
    for key, grant in grants.items():
        assert other.statistics(key).token == grant[0]
        backend.release_sync(key, owner, grant[0])


# --------------------------------------------------------- issue 16 finding 7: the key stored


def test_inspect_shows_keys_not_file_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 16 finding 7: ``inspect --dir`` listed mangled file names. Old code: file names."""
    locks = KeyedLock(FileBackend(tmp_path), namespace="app")
    lease = locks.acquire_sync("invoice/7 é", ttl=60)
    held = list(inspect_directory(str(tmp_path)))
    assert [lock.key for lock in held] == ["app:invoice/7 é"]
    assert held[0].token == lease.token
    assert held[0].owner == lease.owner.hex()
    assert held[0].holder_pid == os.getpid()
    assert held[0].ttl is not None
    assert 50 < held[0].ttl <= 60
    assert main(["inspect", "--dir", str(tmp_path)]) == 0
    assert "app:invoice/7 é" in capsys.readouterr().out
    lease.release_sync()


@pytest.mark.parametrize(
    "key", ["k", "ns\x00k", "line\nbreak", "\udcff", "😀" * 1024, 'q"uote\\', "\x00" * 3]
)
def test_the_record_round_trips_any_key_and_keeps_the_token_first(tmp_path: Path, key: str) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        write_record(fd, 1234567, 42, 99.5, b"\xab" * 16, key)
        write_record(fd, 1234568, 43, None, b"\xcd" * 16, key)
        record = read_record(fd)
        assert (record.token, record.pid, record.expires_at) == (1234568, 43, None)
        assert (record.owner, record.key) == (b"\xcd" * 16, key)
        assert read_token(fd) == 1234568
        old_reader = os.pread(fd, 128, 0).split()  # what keylock before the key area read
        assert [int(old_reader[0]), old_reader[3].decode()] == [1234568, "cd" * 16]
    finally:
        os.close(fd)


def test_a_record_without_a_key_or_malformed_reads_as_none(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"17 5 - abcd\n".ljust(128))  # written by keylock before the key area
    fd = os.open(path, os.O_RDONLY)
    try:
        record = read_record(fd)
        assert (record.token, record.pid, record.owner, record.key) == (17, 5, b"\xab\xcd", None)
        os.close(fd)
        path.write_bytes(b"x y z zz\n".ljust(128) + b"[1]\n")
        fd = os.open(path, os.O_RDONLY)
        assert read_record(fd) == type(record)(None, None, None, None, None)
        assert read_token(fd) is None
    finally:
        os.close(fd)


# ------------------------------------------------ issue 16 finding 10: sharing across OS users


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_group_mode_creates_shared_modes_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """Issue 16 finding 10: only 0o700/0o600 existed, so a second OS user got EACCES."""
    with _umask(umask):
        locks = KeyedLock(FileBackend(tmp_path / "locks", mode="group"))
        with locks.sync("k"):
            pass
    assert _mode(tmp_path / "locks") == 0o2770
    assert _mode(tmp_path / "locks" / file_name("k")) == 0o660


def test_group_mode_still_refuses_symlinks_and_others_writable(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep")
    locks = KeyedLock(FileBackend(tmp_path / "locks", mode="group"))
    (tmp_path / "locks" / file_name("k")).symlink_to(target)
    with pytest.raises(BackendUnavailable, match="symlink"):
        locks.acquire_sync("k", timeout=0)
    assert target.read_text() == "keep"
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o2777)
    with pytest.raises(BackendUnavailable, match="writable by others"):
        FileBackend(tmp_path / "open", mode="group")


def _as_user(
    uid: int, body: Callable[[], object], *, go: tuple[int, int] | None = None
) -> tuple[int, int]:
    """Fork a child that switches to *uid* (group SHARED_GID) and runs *body*; if *go* is a
    pipe, the child waits for a byte (or EOF) on it before exiting. Returns (pid, read end of
    the pipe carrying the JSON of what body returned, or the error's class name)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        code = 0
        try:
            os.close(read)
            if go is not None:
                os.close(go[1])  # so that the parent's end closing is an EOF here
            os.setgroups([SHARED_GID])
            os.setgid(SHARED_GID)
            os.setuid(uid)
            try:
                result = body()
            except Exception as exc:
                result = f"{type(exc).__name__}: {exc}"
            os.write(write, json.dumps(result).encode() + b"\n")
            if go is not None:
                os.read(go[0], 1)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    return pid, read


def _result(pid: int, read: int) -> object:
    with os.fdopen(read, "rb") as pipe:
        line = pipe.readline()
    os.waitpid(pid, 0)
    return json.loads(line)


@needs_root
def test_group_mode_shares_a_directory_between_two_uids() -> None:
    """Issue 16 finding 10, with two real OS users of one group: the second uses the first's
    directory and files, and they exclude each other; the private default refuses the second.
    Old code: no mode= (TypeError); in private mode the second user got EACCES."""
    with tempfile.TemporaryDirectory() as base:  # stands in for /run/lock: root's, sticky
        os.chmod(base, 0o1777)
        _share_between_two_users(os.path.join(base, "locks"))


def _share_between_two_users(directory: str) -> None:

    def hold() -> object:
        locks = KeyedLock(FileBackend(directory, mode="group"))
        lease = locks.acquire_sync("job")
        return [lease.token, os.geteuid()]

    def try_now() -> object:
        locks = KeyedLock(FileBackend(directory, mode="group"))
        try:
            lease = locks.acquire_sync("job", timeout=0)
        except LockTimeout:
            return "busy"
        lease.release_sync()
        return lease.token

    def private() -> object:
        return KeyedLock(FileBackend(directory)).acquire_sync("job", timeout=0).token

    go = os.pipe()
    holder, holder_out = _as_user(OTHER_UID, hold, go=go)
    os.close(go[0])
    try:
        with os.fdopen(holder_out, "rb") as pipe:
            first = json.loads(pipe.readline())
        assert isinstance(first, list), first
        first_token, first_uid = first
        assert first_uid == OTHER_UID
        assert os.stat(directory).st_uid == OTHER_UID
        assert _mode(directory) == 0o2770
        assert _mode(os.path.join(directory, file_name("job"))) == 0o660
        assert _result(*_as_user(SECOND_UID, try_now)) == "busy"  # excluded across users
    finally:
        os.close(go[1])  # the holder exits: the OS frees its lock
        os.waitpid(holder, 0)
    second = _result(*_as_user(SECOND_UID, try_now))
    assert isinstance(second, int), second
    assert second > first_token
    refused = _result(*_as_user(SECOND_UID, private))
    assert isinstance(refused, str)
    assert refused.startswith("BackendUnavailable: lock directory"), refused


@needs_root
def test_group_mode_refuses_a_directory_of_a_foreign_group(tmp_path: Path) -> None:
    directory = tmp_path / "locks"
    directory.mkdir()
    os.chmod(directory, 0o2770)
    os.chown(directory, OTHER_UID, OTHER_UID)
    with pytest.raises(
        BackendUnavailable,
        match=r"owned by uid 65534, group 65534, not this user .* nor one of its groups",
    ):
        FileBackend(directory, mode="group")
    FileBackend(directory, mode="group", trust_directory=True).close_sync()
