"""Leases across hosts on Redis: one round trip to acquire, fencing tokens that never go back,
waiters woken by pub/sub, and one background renewer per backend."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, cast

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import RedisError

from ..errors import BackendUnavailable, KeylockError, LeaseLost, LockTimeout
from ._redis_wire import AsyncWire, SyncWire
from .base import Backend, Deadline, Grant, KeyStatistics, LoopWaiter, ThreadWaiter, Waiter
from .memory import MemoryBackend

if TYPE_CHECKING:
    from collections.abc import Coroutine, Iterator, Sequence

    from ..lease import Lease

__all__ = ["RedisBackend"]

logger = logging.getLogger("keylock")

# Every script gets the same four keys of one lock (one hash tag, so one Cluster slot):
# KEYS[1] lock (value: owner id), KEYS[2] fence (last token), KEYS[3] queue (zset owner ->
# arrival µs), KEYS[4] queue members (hash owner -> "<deadline ms> <lease TTL ms> <claim ms>
# <channel>").
# Tokens are max(last + 1, server clock in µs): they rise even when Redis lost the fence key
# (restart without persistence, failover to a lagging replica), because the clock has moved on
# past every token it ever minted (at most one grant per µs of a single-threaded server).
# Waiters queue FIFO across all clients; a release hands the key straight to the live head of
# the queue (no barging, no extra round trip) and publishes "<key>\\0<head><token> <granted
# at, server µs> <claim ms>" on the channel of the head's process only, so one process wakes
# per hand-off, not every process that waits; a waiter that does not come back in time leaves
# the line.
_PRELUDE = """
local clock, now_ms
local function tick()  -- the server clock, read once per script and only when needed
  if not clock then
    local now = redis.call('TIME')
    clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
    now_ms = math.floor(clock / 1000)
  end
end
local function live_head()
  local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  while head do
    tick()
    local entry = redis.call('HGET', KEYS[4], head)
    if entry and tonumber(string.match(entry, '^%d+')) > now_ms then return head, entry end
    redis.call('ZREM', KEYS[3], head)
    redis.call('HDEL', KEYS[4], head)
    head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  end
  return nil, nil
end
local function mint(ttl_ms)
  tick()
  local last = tonumber(redis.call('GET', KEYS[2]) or '0')
  local token = string.format('%.0f', math.max(last + 1, clock))
  redis.call('SET', KEYS[2], token, 'PX', tonumber(ttl_ms) + 120000)
  return token
end
local function hand_off(key)
  local head, entry = live_head()
  if not head then return end  -- nobody in line: waiters queue in their first trip
  -- the head gets the key for its claim window only (its renewer, or its acquire, extends
  -- it to the full TTL): a waiter that died in line holds it that long, not a whole TTL
  local ttl_ms, claim_ms, channel = string.match(entry, '^%d+ (%d+) (%d+) (.*)$')
  redis.call('SET', KEYS[1], head, 'PX', claim_ms)
  local token = mint(ttl_ms)
  redis.call('ZREM', KEYS[3], head)
  redis.call('HDEL', KEYS[4], head)
  local granted = string.format('%.0f', clock) .. ' ' .. claim_ms  -- dates the waiter's lease
  redis.call('PUBLISH', channel, key .. '\\0' .. head .. token .. ' ' .. granted)
end
"""

# KEYS[5] the acquisition's departure mark (see LEAVE); ARGV[1] owner, ARGV[2] lease TTL ms,
# ARGV[3] '1' to queue up if not granted, ARGV[4] how long a queued waiter stays in line without
# coming back (ms), ARGV[5] the waiter's wake-up channel, ARGV[6] how long a lease handed to it
# at a release lasts before it is extended (ms, at most the TTL)
# -> {1, token, TTL ms left} granted (now, or earlier by a hand-off); {0, holder's PTTL ms, or
# -2 when the key is free but promised to the head of the queue, server clock µs when queued};
# {0, -3} the caller has left
ACQUIRE = (
    _PRELUDE
    + """
if redis.call('GET', KEYS[1]) == ARGV[1] then  -- a retried call that was granted already
  return {1, redis.call('GET', KEYS[2]) or '0', redis.call('PTTL', KEYS[1])}
end
if redis.call('EXISTS', KEYS[5]) == 1 then return {0, -3} end  -- arrived after its own LEAVE
local head = live_head()
if (not head or head == ARGV[1])
    and redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if head then
    redis.call('ZREM', KEYS[3], head)
    redis.call('HDEL', KEYS[4], head)
  end
  return {1, mint(ARGV[2]), tonumber(ARGV[2])}
end
if ARGV[3] == '1' then
  tick()
  redis.call('ZADD', KEYS[3], 'NX', clock, ARGV[1])
  local entry = (now_ms + tonumber(ARGV[4])) .. ' ' .. ARGV[2] .. ' ' .. ARGV[6] .. ' ' .. ARGV[5]
  redis.call('HSET', KEYS[4], ARGV[1], entry)
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[4]) * 2)
  redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[4]) * 2)
  return {0, redis.call('PTTL', KEYS[1]), string.format('%.0f', clock)}
end
return {0, redis.call('PTTL', KEYS[1])}
"""
)

# ARGV[1] owner, ARGV[2] key (named in the hand-off message) -> 1 released (and handed on), 0 not
# ours
RELEASE = (
    _PRELUDE
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
hand_off(ARGV[2])
return 1
"""
)

# KEYS[5] the departure mark; ARGV[1] owner, ARGV[2] key, ARGV[3] ms to keep the mark, or 0.
# Leave the line (timeout, cancel); a grant that raced the departure is passed on to the next in
# line. When an ACQUIRE of this owner may still be on its way (the caller gave up mid-call, and
# the reply never came), the mark makes that late ACQUIRE a no-op instead of a phantom grant.
LEAVE = (
    _PRELUDE
    + """
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
if tonumber(ARGV[3]) > 0 then redis.call('SET', KEYS[5], '1', 'PX', ARGV[3]) end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  hand_off(ARGV[2])
end
return 1
"""
)

# KEYS[1] lock key, KEYS[2] fence key; ARGV[1] owner id, ARGV[2] TTL ms, ARGV[3] fence TTL ms
# -> 1 extended, 0 not ours any more
EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return 1
end
return 0
"""

_SCRIPTS = {"acquire": ACQUIRE, "release": RELEASE, "extend": EXTEND, "leave": LEAVE}
_SHA = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in _SCRIPTS.items()}
_TEXT = _SCRIPTS
_Arg = str | bytes | int | float  # what a script accepts as an argument
SyncClient = redis.Redis | redis.cluster.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster
_FENCE_SLACK_MS = 120_000  # the fence key outlives the lock by this much (see ACQUIRE)


def _tag(key: str) -> str:
    """The key's hash tag: every Redis key of one lock lands in one Cluster slot."""
    if "{" in key or "}" in key:  # braces would end the tag early: tag a digest instead
        return hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()
    return key


@contextlib.contextmanager
def _map_errors(key: str, where: str) -> Iterator[None]:
    """Translate redis-py's errors once, at the boundary."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise BackendUnavailable(
            f"Redis at {where} failed for lock {key!r}: {exc}; nothing was granted or "
            "changed by this call; check the server and the URL",
            key=key,
        ) from exc


class _Held:
    """A lease this backend holds on Redis, and its turn in the in-process queue."""

    __slots__ = ("local_token", "owner", "token")

    def __init__(self, token: int, owner: bytes, local_token: int) -> None:
        self.token = token
        self.owner = owner
        self.local_token = local_token


class RedisBackend(Backend):
    """Per-key leases shared by every process and host using one Redis (or Cluster).

    Acquire is one round trip (a script: ``SET NX PX`` plus the fencing token); release and
    extend are compare-owner-then-act scripts, so only the acquisition that took a lease can end
    or extend it, and a lost lease raises :class:`~keylock.LeaseLost`. Waiters are woken by a
    pub/sub message on release (one subscriber connection per backend), at the holder's expiry,
    and by a bounded safety-net poll. Within this process, callers queue FIFO in front of Redis
    (the memory backend), so a hot key costs one waiter per process on Redis.

    Leases always have a TTL (``ttl``, default 30 s). With ``auto_renew`` (the default) one
    background thread per backend renews every held lease at a third of its TTL; when a renewal
    fails or finds the lease gone, ``lease.lost`` turns true, ``on_lost`` runs, and with
    ``cancel_on_lost`` the critical section is cancelled. Connection errors surface as
    :class:`~keylock.BackendUnavailable`, never as a phantom grant.
    """

    nonblocking_step = False
    needs_owner = True

    def __init__(
        self,
        client: SyncClient | None = None,
        *,
        async_client: AsyncClient | None = None,
        ttl: float = 30.0,
        auto_renew: bool = True,
        prefix: str = "keylock",
        poll: float = 1.0,
    ) -> None:
        if client is None and async_client is None:
            raise TypeError("RedisBackend needs a client: use RedisBackend.from_url(url)")
        if not ttl > 0:
            raise ValueError(f"RedisBackend ttl must be a positive number of seconds, not {ttl}")
        self.default_ttl = self._ttl = float(ttl)
        self.auto_renew = auto_renew
        self.prefix = prefix
        self.poll = poll
        self._client = client
        self._async_client = async_client
        self._async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncClient] = (
            weakref.WeakKeyDictionary()
        )
        # how long a queued waiter stays in line without coming back (it does every poll)
        self._stay_ms = int(poll * 3000) + 1000
        self._where = _address(client or async_client)
        self._start_process()
        _BACKENDS.add(self)

    def _start_process(self) -> None:
        """The state that belongs to one process (set again in a forked child, which holds
        none of its parent's leases and must run its own listener and renewer threads)."""
        # this process's own wake-up channel: a hand-off wakes the one process it concerns
        self._channel = f"{self.prefix}:wake:{os.urandom(8).hex()}"
        self._local = MemoryBackend()  # FIFO among this backend's own callers
        self._mutex = threading.Lock()
        self._held: dict[str, _Held] = {}  # guarded by _mutex
        self._waiters: dict[str, set[Waiter]] = {}  # guarded by _mutex: woken on release
        self._listener: _Listener | None = None
        self._wire: SyncWire | None = None
        self._async_wires: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncWire] = (
            weakref.WeakKeyDictionary()
        )
        self._async_clients.clear()  # their sockets are the parent's
        self._renewer: _Renewer | None = None
        self._leaving: set[threading.Thread] = set()  # LEAVE threads of sync give-ups
        # (server clock - ours) in s, and its uncertainty: read from queueing replies
        self._clock: tuple[float, float] = (0.0, float("inf"))

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        ttl: float = 30.0,
        auto_renew: bool = True,
        prefix: str = "keylock",
        poll: float = 1.0,
        cluster: bool = False,
        **client_options: object,
    ) -> RedisBackend:
        """A backend on the server at *url* (``redis://``, ``rediss://``, ``unix://``); with
        ``cluster=True``, on the Redis Cluster that the node at *url* belongs to."""
        try:
            client: SyncClient = (
                redis.cluster.RedisCluster.from_url(url, **client_options)
                if cluster
                else redis.Redis.from_url(url, **client_options)
            )
        except ValueError as exc:
            raise BackendUnavailable(f"bad Redis URL {url!r}: {exc}") from exc
        except RedisError as exc:  # a Cluster client looks for its nodes at once
            raise BackendUnavailable(f"Redis Cluster at {url!r} is unreachable: {exc}") from exc
        backend = cls(client, ttl=ttl, auto_renew=auto_renew, prefix=prefix, poll=poll)
        backend._url = url
        backend._client_options = client_options
        return backend

    _url: str | None = None
    _client_options: dict[str, object] = {}  # noqa: RUF012 - read-only default

    def __repr__(self) -> str:
        return f"RedisBackend({self._where})"

    # ------------------------------------------------------------------------------ clients

    # The renewer and the listener are threads: they need a sync client. Async callers need an
    # async one per event loop. Whichever the user did not give is made with the other's
    # options (address, auth, TLS, timeouts); a Cluster client begets a Cluster client.

    def _sync(self) -> SyncClient:
        if self._client is None:
            source = self._async_client
            if isinstance(source, redis.asyncio.cluster.RedisCluster):
                kwargs = source.get_nodes()[0].connection_kwargs  # the client finds the rest
                options = _options_for(redis.cluster.RedisCluster, kwargs)
                self._client = redis.cluster.RedisCluster(**options)  # type: ignore[arg-type]
            else:
                kwargs = source.connection_pool.connection_kwargs  # type: ignore[union-attr]
                self._client = redis.Redis(**_options_for(redis.Redis, kwargs))  # type: ignore[arg-type]
        return self._client

    def _async(self) -> AsyncClient:
        if self._async_client is not None:
            return self._async_client
        loop = asyncio.get_running_loop()
        client = self._async_clients.get(loop)
        if client is None:  # redis.asyncio connections belong to one event loop
            client = self._async_clients[loop] = self._new_async_client()
        return client

    def _new_async_client(self) -> AsyncClient:
        source = self._sync()
        if self._url is not None:
            cluster = isinstance(source, redis.cluster.RedisCluster)
            kind = redis.asyncio.cluster.RedisCluster if cluster else redis.asyncio.Redis
            return kind.from_url(self._url, **self._client_options)  # type: ignore[arg-type]
        if isinstance(source, redis.cluster.RedisCluster):
            node = source.get_default_node() or source.get_nodes()[0]  # type: ignore[no-untyped-call]
            kwargs = node.redis_connection.connection_pool.connection_kwargs
            options = _options_for(redis.asyncio.cluster.RedisCluster, kwargs)
            return redis.asyncio.cluster.RedisCluster(**options)  # type: ignore[arg-type]
        options = _options_for(redis.asyncio.Redis, source.connection_pool.connection_kwargs)
        return redis.asyncio.Redis(**options)  # type: ignore[arg-type]

    def _keys(self, key: str, owner: bytes | None = None) -> list[str]:
        """lock, fence, queue, queue liveness (and *owner*'s departure mark): one hash tag, so
        one Cluster slot."""
        base = f"{self.prefix}:{{{_tag(key)}}}"
        keys = [base, f"{base}:fence", f"{base}:queue", f"{base}:alive"]
        if owner is not None:
            keys.append(f"{base}:left:{owner.hex()}")
        return keys

    def _run_sync(
        self,
        script: str,
        key: str,
        keys: Sequence[str],
        args: Sequence[_Arg],
        bound: float | None = None,
    ) -> object:
        wire = self._wire
        if wire is None:
            wire = self._wire = SyncWire(self._sync())
        with _map_errors(key, self._where):
            return wire.call(_SHA[script], _TEXT[script], keys, args, bound)

    async def _run_async(
        self,
        script: str,
        key: str,
        keys: Sequence[str],
        args: Sequence[_Arg],
        bound: float | None = None,
    ) -> object:
        loop = asyncio.get_running_loop()
        wire = self._async_wires.get(loop)
        if wire is None:  # redis.asyncio connections belong to one event loop
            wire = self._async_wires[loop] = AsyncWire(self._async())
        task = asyncio.current_task()
        cancels = 0 if task is None else task.cancelling()
        with _map_errors(key, self._where):
            reply = await wire.call(_SHA[script], _TEXT[script], keys, args, bound)
        if task is not None and task.cancelling() > cancels:
            # Python 3.11's wait_for (inside redis-py's send) swallows a cancel that lands as
            # the send completes: honour it, so a cancelled caller never walks off with a lease
            raise asyncio.CancelledError
        return reply

    # --------------------------------------------------------------------- the step, twice

    def _trip(
        self,
        key: str,
        owner: bytes,
        ttl: float,
        waiter: Waiter | None,
        deadline: float | None,
        timeout: float | None,
        tried: bool,
    ) -> tuple[list[str], list[_Arg], float | None]:
        """The next ACQUIRE of an acquire loop: its keys, its arguments and how long it may take;
        LockTimeout instead when the caller was woken at its deadline (no trip past it)."""
        if tried and deadline is not None and time.monotonic() >= deadline:
            raise _timeout(key, timeout)
        keys, args = self._acquire_args(key, owner, ttl, waiter is not None)
        return keys, args, _bound(deadline, timeout)

    def _acquire_args(
        self, key: str, owner: bytes, ttl: float, waiting: bool
    ) -> tuple[list[str], list[_Arg]]:
        ms = max(int(ttl * 1000), 1)
        # with auto-renew the renewer extends a handed-over lease within a third of its claim
        # window; without it, nobody would, so the lease is handed over for its whole TTL
        claim = min(ms, self._stay_ms) if self.auto_renew else ms
        waits = "1" if waiting else "0"
        args: list[_Arg] = [owner, ms, waits, self._stay_ms, self._channel, claim]
        return self._keys(key, owner), args

    def _parse_acquire(
        self,
        key: str,
        owner: bytes,
        local: Grant,
        reply: object,
        sent_at: float,
        waiter: Waiter | None,
    ) -> Grant | None:
        granted, value, *rest = cast("list[int | bytes]", reply)
        if int(granted):
            # expiry as seen from here: counted from before the request, so never late
            return self._adopt(key, owner, local, _dated(int(value), sent_at + int(rest[0]) / 1000))
        if rest:  # queued: the reply carries the server's clock, to date hand-offs by
            received = time.time()
            self._clock = (int(rest[0]) / 1e6 - (sent_at + received) / 2, (received - sent_at) / 2)
        if waiter is not None:
            pttl = int(value)
            wake = self.poll if pttl < 0 else min(pttl / 1000 + 0.001, self.poll)
            listener = self._listener
            if listener is None or not listener.subscribed.is_set():
                wake = min(wake, 0.01)  # a release message could be missed: look again soon
            waiter.retry_at = time.monotonic() + wake
        return None

    def _adopt(self, key: str, owner: bytes, local: Grant, grant: Grant) -> Grant:
        """Record a lease granted on Redis (by our script, or handed to us at a release)."""
        with self._mutex:
            self._held[key] = _Held(grant[0], owner, local[0])
        return grant

    def _try_acquire(
        self, key: str, owner: bytes, ttl: float | None, waiter: Waiter | None
    ) -> Grant | None:
        # the step of the protocol: one try, without queueing (acquire_sync with timeout=0)
        try:
            return self.acquire_sync(key, owner, timeout=0, ttl=ttl)
        except LockTimeout:
            return None

    def _withdraw(self, key: str, waiter: Waiter) -> Grant | None:
        self._unwatch(key, waiter)
        return None

    def _leave_args(
        self, key: str, owner: bytes, ttl: float, in_flight: bool
    ) -> tuple[list[str], list[_Arg]]:
        """LEAVE for a caller that gives up; *in_flight*: an ACQUIRE of its may still arrive."""
        mark_ms = max(int(ttl * 1000), 1) + self._stay_ms if in_flight else 0
        return self._keys(key, owner), [owner, key, mark_ms]

    # ---------------------------------------------------------------------- waiting, twice

    def _watch(self, key: str, waiter: Waiter) -> _Listener:
        """Have *waiter* woken when *key* is handed to it (pub/sub); returns the listener."""
        with self._mutex:
            self._waiters.setdefault(key, set()).add(waiter)
            if self._listener is None:
                self._listener = _Listener(self)
            return self._listener

    def _unwatch(self, key: str, waiter: Waiter) -> None:
        with self._mutex:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[key]

    def _released(self, key: str, head: bytes, grant: bytes) -> None:
        """Called by the listener thread for each hand-off to one of this backend's waiters
        (*grant*: b"<token> <granted at, server µs> <claim ms>"): the grant goes to the waiter
        whose owner id is at the head of the queue."""
        with self._mutex:
            waiters = list(self._waiters.get(key, ()))
        token, granted_us, claim_ms = [*grant.split(b" "), b"", b""][:3]
        for waiter in waiters:
            if waiter.owner == head:
                if token.isdigit() and claim_ms.isdigit() and waiter.grant is None:
                    claim = int(claim_ms) / 1000
                    waiter.grant = _dated(int(token), self._handed_expiry(granted_us, claim))
                waiter.wake()

    def _handed_expiry(self, granted_us: bytes, length: float) -> float:
        """When a lease handed over at server time *granted_us* for *length* seconds lapses, on
        this host's clock, never later than it really does (the message may have been late)."""
        offset, error = self._clock
        if granted_us.isdigit() and error < 1.0:
            # the server's clock read against ours at our last queueing, to within half a trip
            return int(granted_us) / 1e6 - offset + length - error - 0.001
        return time.time() + length - max(0.05, length * 0.01)  # no reading: assume a short delay

    # Two phases, as in FileBackend: this backend's own FIFO queue (the memory backend's
    # driver: timeouts, cancellation), then Redis, where the waiter sleeps until the key is
    # handed to it, the holder's expiry, or the safety-net poll. A caller that may wait joins
    # the Redis queue in its very first round trip, and is watched for a hand-off before that
    # trip, so no hand-off can slip past it. The twins differ only in how they wait.
    # A caller that gives up (timeout, cancel, error) leaves the Redis queue, handing on a key
    # granted to it meanwhile; if it gave up during an ACQUIRE call, whose reply is lost (a
    # cancel cuts redis-py off mid-reply), LEAVE marks the acquisition gone, so that ACQUIRE,
    # should it reach Redis only now, grants nothing.

    async def acquire(
        self, key: str, owner: bytes, *, timeout: float | None, ttl: float | None
    ) -> Grant:
        lease_ttl = self._ttl if ttl is None else ttl
        deadline = None if timeout is None else time.monotonic() + timeout
        local = self._local._try_acquire(key, owner, self._local_ttl(lease_ttl), None) or (
            await self._local.acquire(key, owner, timeout=timeout, ttl=self._local_ttl(lease_ttl))
        )
        waiter = None if timeout == 0 else LoopWaiter(owner, lease_ttl)
        in_flight = False  # an ACQUIRE was sent and its reply has not come back
        tried = False
        try:
            if waiter is not None:
                listener = self._watch(key, waiter)
                # a new listener: let it subscribe before we queue up (up to 1 s, and never
                # past the deadline: meanwhile a waiter looks again every 10 ms anyway)
                until = time.monotonic() + min(1.0, _bound(deadline, timeout) or 1.0)
                # (a threading.Event, set by the listener thread: polled, not awaited)
                while not listener.subscribed.is_set() and time.monotonic() < until:  # noqa: ASYNC110
                    await asyncio.sleep(0.001)
            while True:
                if waiter is not None:
                    waiter.prepare()
                    handed = waiter.grant  # the key was handed to us at a release
                    if handed is not None:
                        return self._adopt(key, owner, local, handed)
                keys, args, bound = self._trip(
                    key, owner, lease_ttl, waiter, deadline, timeout, tried
                )
                tried = in_flight = True
                sent_at = time.time()
                try:
                    reply = await self._run_async("acquire", key, keys, args, bound)
                except BackendUnavailable as exc:
                    raise _late(exc, deadline, key, timeout) from exc.__cause__
                in_flight = False
                grant = self._parse_acquire(key, owner, local, reply, sent_at, waiter)
                if grant is not None:
                    return grant
                if waiter is None:
                    raise _timeout(key, timeout)
                await waiter.wait(_until(waiter, deadline, key, timeout))
        except BaseException:
            self._local._discard_sync(key, owner, local)
            if waiter is not None or in_flight:
                keys, args = self._leave_args(key, owner, lease_ttl, in_flight)
                leave = _in_background(self._run_async("leave", key, keys, args))
                await asyncio.wait({leave}, timeout=_GIVE_UP_WAIT)  # it lands, or goes on alone
            raise
        finally:
            if waiter is not None:
                self._unwatch(key, waiter)

    def acquire_sync(
        self, key: str, owner: bytes, *, timeout: float | None, ttl: float | None
    ) -> Grant:
        lease_ttl = self._ttl if ttl is None else ttl
        deadline = None if timeout is None else time.monotonic() + timeout
        local = self._local._try_acquire(key, owner, self._local_ttl(lease_ttl), None) or (
            self._local.acquire_sync(key, owner, timeout=timeout, ttl=self._local_ttl(lease_ttl))
        )
        waiter = None if timeout == 0 else ThreadWaiter(owner, lease_ttl)
        in_flight = False
        tried = False
        try:
            if waiter is not None:
                self._watch(key, waiter).subscribed.wait(min(1.0, _bound(deadline, timeout) or 1.0))
            while True:
                if waiter is not None:
                    waiter.prepare()
                    handed = waiter.grant
                    if handed is not None:
                        return self._adopt(key, owner, local, handed)
                keys, args, bound = self._trip(
                    key, owner, lease_ttl, waiter, deadline, timeout, tried
                )
                tried = in_flight = True
                sent_at = time.time()
                try:
                    reply = self._run_sync("acquire", key, keys, args, bound)
                except BackendUnavailable as exc:
                    raise _late(exc, deadline, key, timeout) from exc.__cause__
                in_flight = False
                grant = self._parse_acquire(key, owner, local, reply, sent_at, waiter)
                if grant is not None:
                    return grant
                if waiter is None:
                    raise _timeout(key, timeout)
                waiter.wait(_until(waiter, deadline, key, timeout))
        except BaseException:
            self._local._discard_sync(key, owner, local)
            if waiter is not None or in_flight:
                keys, args = self._leave_args(key, owner, lease_ttl, in_flight)
                if in_flight:  # the link may be what failed: leave from a thread of its own,
                    # waited for _GIVE_UP_WAIT at most (as the async twin waits for its task)
                    leave = threading.Thread(
                        target=self._leave_quietly, args=(key, keys, args), daemon=True
                    )
                    self._leaving.add(leave)
                    leave.start()
                    leave.join(_GIVE_UP_WAIT)
                else:
                    self._leave_quietly(key, keys, args, _GIVE_UP_WAIT)
            raise
        finally:
            if waiter is not None:
                self._unwatch(key, waiter)

    def _leave_quietly(
        self, key: str, keys: list[str], args: list[_Arg], bound: float | None = None
    ) -> None:
        """LEAVE for a caller that gave up; a failure only costs the place in line its stay."""
        try:
            self._run_sync("leave", key, keys, args, bound)
        except Exception as exc:  # (also: the backend closed under a LEAVE left to finish)
            logger.debug("keylock: leaving the line for %r failed: %s", key, exc)
        finally:
            self._leaving.discard(threading.current_thread())

    def _local_ttl(self, ttl: float) -> float | None:
        # Without renewal the in-process turn lapses with the Redis lease, so the next caller
        # here can take over an expired lease as a caller elsewhere would.
        return None if self.auto_renew else ttl

    # ------------------------------------------------------------------- release, extend

    def _pop_held(self, key: str, owner: bytes, token: int) -> _Held:
        with self._mutex:
            held = self._held.get(key)
            if held is None or held.token != token or held.owner != owner:
                raise _lost(key, token)
            del self._held[key]
            return held

    def _release_local(self, key: str, held: _Held) -> None:
        with contextlib.suppress(LeaseLost):  # its in-process turn lapsed with it: fine
            self._local.release_sync(key, held.owner, held.local_token)

    def release_sync(self, key: str, owner: bytes, token: int) -> None:
        held = self._pop_held(key, owner, token)
        try:
            released = self._run_sync("release", key, self._keys(key), [owner, key])
        finally:
            self._release_local(key, held)
        if not released:
            raise _lost(key, token)

    async def release(self, key: str, owner: bytes, token: int) -> None:
        held = self._pop_held(key, owner, token)
        try:
            released = await self._run_async("release", key, self._keys(key), [owner, key])
        except asyncio.CancelledError:
            # A release, once started, completes even if its caller is cancelled: the cancel
            # cut redis-py off mid-call, so the script may or may not have run; running it again
            # is harmless (it compares the owner), and skipping it would strand the key.
            _in_background(self._run_async("release", key, self._keys(key), [owner, key]))
            raise
        finally:
            self._release_local(key, held)
        if not released:
            raise _lost(key, token)

    def _extend_args(self, owner: bytes, ttl: float) -> list[_Arg]:
        ms = max(int(ttl * 1000), 1)
        return [owner, ms, ms + _FENCE_SLACK_MS]

    def _check_held(self, key: str, owner: bytes, token: int) -> _Held:
        with self._mutex:
            held = self._held.get(key)
        if held is None or held.token != token or held.owner != owner:
            raise _lost(key, token)
        return held

    def extend_sync(self, key: str, owner: bytes, token: int, ttl: float) -> Grant:
        held = self._check_held(key, owner, token)
        sent_at = time.time()
        mono = time.monotonic()
        if not self._run_sync("extend", key, self._keys(key)[:2], self._extend_args(owner, ttl)):
            raise _lost(key, token)
        if not self.auto_renew:
            self._local.extend_sync(key, owner, held.local_token, ttl)
        return Grant(token, sent_at + ttl, mono + ttl)

    async def extend(self, key: str, owner: bytes, token: int, ttl: float) -> Grant:
        held = self._check_held(key, owner, token)
        sent_at = time.time()
        mono = time.monotonic()
        if not await self._run_async(
            "extend", key, self._keys(key)[:2], self._extend_args(owner, ttl)
        ):
            raise _lost(key, token)
        if not self.auto_renew:
            self._local.extend_sync(key, owner, held.local_token, ttl)
        return Grant(token, sent_at + ttl, mono + ttl)

    async def _discard(self, key: str, owner: bytes, grant: Grant) -> None:
        with contextlib.suppress(LeaseLost):
            await self.release(key, owner, grant[0])

    async def _holder_async(self, key: str) -> int | None:
        """The token of *key*'s live lease, or None when nobody holds it (async)."""
        lock_key, fence_key, _, _ = self._keys(key)
        with _map_errors(key, self._where):
            pipe = self._async().pipeline(transaction=False)
            pipe.get(lock_key)
            pipe.get(fence_key)
            owner, token = await pipe.execute()
        return int(token) if owner is not None and token else None

    def statistics(self, key: str) -> KeyStatistics:
        lock_key, fence_key, _, _ = self._keys(key)
        with _map_errors(key, self._where):
            pipe = self._sync().pipeline(transaction=False)
            pipe.get(lock_key)
            pipe.get(fence_key)
            owner, token = pipe.execute()
        local = self._local.statistics(key)
        with self._mutex:
            watching = len(self._waiters.get(key, ()))
        waiting = local.waiting + watching
        if owner is None:
            return KeyStatistics(key, False, None, None, waiting)
        return KeyStatistics(key, True, int(token) if token else None, bytes(owner), waiting)

    # ------------------------------------------------------------------------- auto-renew

    def _track(self, lease: Lease) -> None:
        if self.auto_renew and lease.ttl:
            with self._mutex:
                if self._renewer is None:
                    self._renewer = _Renewer(self)
            self._renewer.add(lease)

    def _untrack(self, lease: Lease) -> None:
        if self._renewer is not None:
            self._renewer.remove(lease)

    def _renew(self, lease: Lease) -> bool:
        """One renewal from the renewer thread: True if still ours (and extended)."""
        ttl = lease.ttl or self._ttl
        sent_at = time.time()
        mono = time.monotonic()
        renewed = self._run_sync(
            "extend",
            lease._full_key,
            self._keys(lease._full_key)[:2],
            self._extend_args(lease._owner, ttl),
        )
        if renewed:
            lease._on_renewed(Grant(lease.token, sent_at + ttl, mono + ttl))
        return bool(renewed)

    # ----------------------------------------------------------------------------- closing

    def close_sync(self) -> None:
        for leave in list(self._leaving):  # LEAVEs finishing for callers that gave up
            leave.join(1.0)
        if self._renewer is not None:
            self._renewer.stop()
        if self._listener is not None:
            self._listener.stop()
        if self._wire is not None:
            self._wire.close()
        if self._client is not None:
            self._client.close()

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        finishing = [task for task in _background if task.get_loop() is loop]
        if finishing:  # releases finishing for cancelled callers: let them land first
            await asyncio.wait(finishing, timeout=5)
        self.close_sync()
        wire = self._async_wires.pop(loop, None)
        if wire is not None:  # other loops' connections can only be dropped, not closed
            await wire.close()
        for client in list(self._async_clients.values()):
            await client.aclose()
        if self._async_client is not None:
            await self._async_client.aclose()


# Every backend of this process, so a forked child can start each afresh (see _start_process).
_BACKENDS: weakref.WeakSet[RedisBackend] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for backend in list(_BACKENDS):
        backend._start_process()


os.register_at_fork(after_in_child=_after_fork_in_child)

_background: set[asyncio.Future[object]] = set()  # finishing calls, kept alive until done


def _in_background(call: Coroutine[object, object, object]) -> asyncio.Future[object]:
    """Run *call* to its end in a task nobody needs to await (its failure is logged)."""
    task = asyncio.ensure_future(call)
    _background.add(task)
    task.add_done_callback(_forget)
    return task


# A caller that gives up (timeout, cancel, error) waits this long for its LEAVE to land, then
# goes on while the LEAVE finishes alone: on a link that drops everything, giving up must not
# cost another socket timeout. (In sync code, the LEAVE's reply is waited for this long.)
_GIVE_UP_WAIT = 0.25


def _bound(deadline: float | None, timeout: float | None) -> float | None:
    """How long one round trip of an acquire may take: until the caller's deadline, but at
    least _MIN_TRIP (a trip sent just before the deadline still gets a fair chance). A try with
    timeout=0 is one round trip, bounded by the socket timeout alone."""
    if deadline is None or timeout == 0:
        return None
    return max(deadline - time.monotonic(), _MIN_TRIP)


_MIN_TRIP = 0.05


def _late(
    exc: BackendUnavailable, deadline: float | None, key: str, timeout: float | None
) -> KeylockError:
    """A round trip that failed: LockTimeout if it ran into the caller's deadline, else the
    backend's error as it is."""
    if (
        deadline is not None
        and isinstance(exc.__cause__, TimeoutError | redis.exceptions.TimeoutError)
        and time.monotonic() >= deadline - 0.002
    ):
        return _timeout(key, timeout)
    return exc


def _forget(task: asyncio.Future[object]) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.warning("keylock: finishing a cancelled call failed: %s", task.exception())


def _until(waiter: Waiter, deadline: float | None, key: str, timeout: float | None) -> float:
    """Seconds to wait before the next try: the retry time, capped by the deadline."""
    now = time.monotonic()
    if deadline is not None and now >= deadline:
        raise _timeout(key, timeout)
    until = waiter.retry_at if deadline is None else min(waiter.retry_at, deadline)
    return max(until - now, 0.0)


def _options_for(cls: type, kwargs: dict[str, object]) -> dict[str, object]:
    """The connection options of another client that *cls* accepts (pools add private ones)."""
    accepted = inspect.signature(cls).parameters
    return {name: value for name, value in kwargs.items() if name in accepted}


def _lost(key: str, token: int) -> LeaseLost:
    return LeaseLost(
        f"lease {token} on {key!r} was lost (its TTL ran out, a renewal failed, or it was "
        "taken over): the critical section was not protected; reconcile before acting",
        key=key,
    )


def _address(client: object) -> str:
    if isinstance(client, redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster):
        nodes = client.get_nodes()
        return "cluster " + ",".join(f"{node.host}:{node.port}" for node in nodes[:3])
    try:
        kwargs = client.connection_pool.connection_kwargs  # type: ignore[attr-defined]
    except AttributeError:
        return "redis"
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


class _Listener:
    """One pub/sub connection per backend, in a daemon thread: wakes waiters on release."""

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = weakref.ref(backend)
        self._client = backend._sync()
        self._channel = backend._channel
        self.subscribed = threading.Event()
        self._stop = threading.Event()
        self._pubsub: redis.client.PubSub | None = None
        self._thread = threading.Thread(
            target=self._run, name="keylock-redis-listener", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            self._pubsub = pubsub
            try:
                pubsub.subscribe(self._channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is None:
                        if not self.subscribed.is_set() and pubsub.subscribed:
                            self.subscribed.set()
                        continue
                    self.subscribed.set()
                    backend = self._backend()
                    if backend is None:
                        return
                    data = message.get("data")
                    if isinstance(data, bytes):
                        key, _, rest = data.partition(b"\0")  # keys never contain NUL
                        head, grant = rest[:16], rest[16:]  # owner ids are 16 bytes
                        backend._released(key.decode("utf-8", "surrogatepass"), head, grant)
            except Exception as exc:
                self.subscribed.clear()
                if self._stop.is_set():
                    return
                logger.warning("keylock: Redis listener lost its connection (%s); retrying", exc)
                self._stop.wait(0.5)  # waiters fall back to their safety-net poll meanwhile
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()

    def stop(self) -> None:
        self._stop.set()
        # disconnecting wakes the thread from its blocking read (redis-py types it as None)
        disconnect = getattr(getattr(self._pubsub, "connection", None), "disconnect", None)
        if disconnect is not None:
            with contextlib.suppress(Exception):
                disconnect()
        if self._thread is not threading.current_thread():
            self._thread.join(2)


class _Renewer:
    """One daemon thread per backend renewing every tracked lease at a third of its TTL."""

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = weakref.ref(backend)
        self._cond = threading.Condition()
        self._due: dict[Lease, float] = {}  # lease -> monotonic time of its next renewal
        self._wake_at = 0.0  # when the thread will look next (guarded by _cond)
        self._idle = backend._ttl / 3  # the soonest a lease at the default TTL is due
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="keylock-redis-renewer", daemon=True)
        self._thread.start()

    def add(self, lease: Lease) -> None:
        # a third of the way to its expiry: a lease handed over at a release starts with a short
        # claim window (see hand_off), others with their whole TTL
        left = lease.ttl or 1.0
        if lease.expires_at is not None:
            left = min(left, max(lease.expires_at - time.time(), 0.0))
        due = time.monotonic() + left / 3
        with self._cond:
            self._due[lease] = due
            if due < self._wake_at:  # wake the thread only if it would sleep past this one
                self._cond.notify()

    def remove(self, lease: Lease) -> None:
        with self._cond:
            self._due.pop(lease, None)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    now = time.monotonic()
                    ready = [lease for lease, due in self._due.items() if due <= now]
                    if ready:
                        break
                    # idle: look again when a lease taken now at the default TTL would be due,
                    # so taking one never has to wake this thread (a thread switch per acquire)
                    self._wake_at = min(self._due.values(), default=now + self._idle)
                    self._cond.wait(max(self._wake_at - now, 0.001))
                if self._stopped:
                    return
                self._wake_at = 0.0  # busy renewing: new leases are picked up next round
            backend = self._backend()
            if backend is None:
                return
            for lease in ready:
                self._renew_one(backend, lease)

    def _renew_one(self, backend: RedisBackend, lease: Lease) -> None:
        try:
            ok = backend._renew(lease)
        except BackendUnavailable as exc:
            expires_at = lease.expires_at
            if expires_at is not None and time.time() < expires_at:
                with self._cond:  # still valid: try again soon
                    if lease in self._due:
                        self._due[lease] = time.monotonic() + min((lease.ttl or 1.0) / 10, 1.0)
                return
            logger.warning("keylock: renewal of %r failed past its expiry: %s", lease.key, exc)
            ok = False
        with self._cond:
            if lease not in self._due:
                return  # released meanwhile
            if ok:
                self._due[lease] = time.monotonic() + (lease.ttl or 1.0) / 3
                return
            del self._due[lease]
        lease._on_lost()


def _timeout(key: str, timeout: float | None) -> LockTimeout:
    return Deadline(key, timeout, 0.0).expired()


def _dated(token: int, expires_at: float) -> Grant:
    """A grant lapsing at wall-clock *expires_at*, with its monotonic deadline read now."""
    return Grant(token, expires_at, expires_at - time.time() + time.monotonic())
