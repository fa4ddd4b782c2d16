"""The decisions of one Redis acquire, without I/O: the clock is passed in.

:class:`AcquireFlow` says what the next ACQUIRE sends and how long it may take, turns its
reply into granted / queued-until-T / give-up, adopts a key handed over at a release only
while its claim window is still open, says what to do on an error, and what LEAVE to send
when the caller gives up. :class:`RedisFlow` is the tiered core's view of it (see
``.._tiered``): the protocol plus the wake-up wiring and the wall-clock dates of trips. The
async and sync drivers only call and wait, so every protocol decision is testable without a
server.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, NamedTuple, cast

import redis.exceptions

from ...errors import BackendUnavailable, KeylockError, LeaseLost, LockTimeout
from .._tiered import Flow, Step
from ..base import Deadline, Grant, described
from ._scripts import ACQUIRE, FENCE_SLACK_MS, LEAVE, TAKEOVER_MARK_MS, Script

if TYPE_CHECKING:
    from .._waiters import Waiter
    from ._keys import Layout
    from ._listener import Listener
    from ._wire import Arg
    from .backend import RedisBackend

__all__ = [
    "AcquireFlow",
    "Handed",
    "RedisFlow",
    "ServerClock",
    "Trip",
    "check_seconds",
    "extend_call",
    "lost",
    "ttl_ms",
]

# How long one round trip of an acquire may take at the least: a trip sent just before the
# caller's deadline still gets a fair chance.
MIN_TRIP = 0.05
# How long Redis may leave an acquire without any answer before its silence means an outage:
# less may be a cold connection (TLS, Cluster discovery, the script's first load) on a busy
# host, and a deadline that short cannot tell a taken key from a server that is down.
SILENT = 1.0
# A lease time Redis and Lua both count exactly: PX takes integers, and Lua numbers are doubles.
MAX_TTL_MS = 2**52


def ttl_ms(ttl: float, key: str) -> int:
    """*ttl* seconds in whole ms (at least 1); ValueError past what Redis can store."""
    ms = max(int(ttl * 1000), 1)
    if ms > MAX_TTL_MS:
        raise ValueError(
            f"ttl for {key!r} is {ttl!r} s, more than Redis can count ({MAX_TTL_MS // 1000} s): "
            "use a shorter TTL and let auto-renew keep the lease"
        )
    return ms


def check_seconds(name: str, value: object, limit: float) -> float:
    """*value* as a finite number of seconds in (0, limit], else TypeError/ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"RedisBackend {name} must be a number of seconds, not {value!r}")
    if not 0 < value <= limit:  # NaN and inf fail too
        raise ValueError(
            f"RedisBackend {name} is {value!r}: it must be a finite number of seconds above 0 "
            f"and at most {limit:g}"
        )
    return float(value)


def extend_call(layout: Layout, key: str, owner: bytes, ttl: float) -> tuple[list[str], list[Arg]]:
    """EXTEND's keys and arguments: *owner*'s lease on *key* for *ttl* more seconds."""
    ms = ttl_ms(ttl, key)
    return layout.extend(key), [owner, ms, ms + FENCE_SLACK_MS, ms + TAKEOVER_MARK_MS]


def lost(key: str, token: int) -> LeaseLost:
    return LeaseLost(
        f"lease {token} on {key!r} was lost (its TTL ran out, a renewal failed, or it was "
        "taken over): the critical section was not protected; reconcile before acting",
        key=key,
    )


class Trip(NamedTuple):
    """One script call to send (ACQUIRE, or LEAVE when giving up): its keys, its arguments,
    and how long to wait for the reply."""

    script: Script
    keys: list[str]
    args: list[Arg]
    bound: float | None


class Handed(NamedTuple):
    """A key handed to a waiter at a release: its token, wall-clock expiry, and the
    time.monotonic() at which its claim window closes."""

    token: int
    expires_at: float
    deadline: float


class ServerClock:
    """The server's clock read against ours, from queueing replies: hand-offs are dated by
    the server's time of the grant, not by when the message arrived."""

    __slots__ = ("reading",)

    def __init__(self) -> None:
        # (server clock - ours in s, its uncertainty: half a round trip), in ONE attribute: the
        # listener thread dates hand-offs while a caller's thread takes a new reading, and an
        # offset from one reading with the error of another could date a lease past its end
        self.reading = (0.0, math.inf)

    @property
    def offset(self) -> float:
        return self.reading[0]

    @property
    def error(self) -> float:
        return self.reading[1]

    def read(self, server_us: int, sent_at: float, received: float) -> None:
        self.reading = (server_us / 1e6 - (sent_at + received) / 2, (received - sent_at) / 2)

    def handed_expiry(self, granted_us: bytes, length: float, now: float) -> float:
        """When a lease granted at server time *granted_us* for *length* s lapses, on our
        wall clock (*now*), never later than it really does (the message may be late).
        Without a reading of the server's clock to within 1 s, *now*: the waiter then asks
        the server (an ACQUIRE, which answers the time really left) rather than guess."""
        offset, error = self.reading
        if granted_us.isdigit() and error < 1.0:
            return int(granted_us) / 1e6 - offset + length - error - 0.001
        return now


class AcquireFlow:
    """One acquire's protocol state: arguments, deadline, and what each reply means.

    The listener thread may set :attr:`handed` (a hand-off to this caller); everything else
    runs on the caller's thread or loop.
    """

    __slots__ = (
        "answered",
        "args",
        "confirm",
        "deadline",
        "grant",
        "handed",
        "in_flight",
        "key",
        "keys",
        "owner",
        "poll",
        "retry_at",
        "started",
        "stay_ms",
        "timeout",
        "tried",
        "ttl",
        "waits",
    )

    script: Script = ACQUIRE  # what each trip runs (a permit's protocol runs its own)

    def __init__(
        self,
        layout: Layout,
        key: str,
        owner: bytes,
        *,
        ttl: float,
        timeout: float | None,
        now: float,
        channel: str,
        stay_ms: int,
        poll: float,
        renewed: bool,
        confirm: bool = False,
    ) -> None:
        self.key = key
        # a hand-off is adopted only once the server confirms it (replicas=N: the ACQUIRE
        # that confirms it also waits for the replicas)
        self.confirm = confirm
        self.owner = owner
        self.ttl = ttl
        self.timeout = timeout
        self.poll = poll
        self.stay_ms = stay_ms
        self.keys = layout.acquire(key, owner)  # InvalidKey before anything is taken
        ms = ttl_ms(ttl, key)
        # with auto-renew the renewer extends a handed-over lease within a third of its claim
        # window; without it, nobody would, so the lease is handed over for its whole TTL
        claim = min(ms, stay_ms) if renewed else ms
        self.waits = timeout != 0
        self.args: list[Arg] = [owner, ms, "1" if self.waits else "0", stay_ms, channel, claim]
        self.started = now
        self.deadline = None if timeout is None else now + timeout
        self.grant: Grant | None = None
        self.handed: Handed | None = None
        self.retry_at = math.inf  # time.monotonic() of the next try if no wake-up comes
        self.in_flight = False  # an ACQUIRE was sent and its reply has not come back
        self.tried = False
        self.answered = False  # Redis replied to a trip of this acquire

    def next_trip(self, now: float) -> Trip | None:
        """The next ACQUIRE, or None when a hand-off was adopted (:attr:`grant`); LockTimeout
        when the caller is past its deadline (no trip after it)."""
        handed = self.handed
        if handed is not None:
            self.handed = None
            left = handed.deadline - now
            # a claim window with room to spare: the renewer extends it in time. A window
            # overslept (a blocked loop) may have lapsed and gone to another client: ask the
            # server, whose ACQUIRE grants it again only if it is still ours
            if left > self._claim_margin() and not self.confirm:
                self.grant = Grant(handed.token, handed.expires_at, handed.deadline)
                return None
        if self.tried and self.deadline is not None and now >= self.deadline:
            raise self.expired(now)
        self.tried = self.in_flight = True
        return Trip(self.script, self.keys, self.args, self.bound(now))

    def expired(self, now: float) -> KeylockError:
        """The LockTimeout of this acquire, worded for what it asked for (a lock here)."""
        return Deadline(self.key, self.timeout, now).expired()

    def described(self) -> str:
        """The key as what it is, for messages (a lock here)."""
        return described(self.key, None)

    def _claim_margin(self) -> float:
        """The least claim window left at which a hand-off is adopted without asking: half of
        the window it was handed for."""
        return int(cast("int", self.args[5])) / 2000

    def bound(self, now: float) -> float | None:
        """How long this trip may take: until the deadline, at least MIN_TRIP; a try with
        timeout=0 is bounded by the socket timeout alone."""
        if self.deadline is None or self.timeout == 0:
            return None
        return max(self.deadline - now, MIN_TRIP)

    def on_reply(
        self,
        reply: object,
        sent_at: float,
        received: float,
        now: float,
        clock: ServerClock,
        subscribed: bool,
    ) -> bool:
        """Read an ACQUIRE reply (sent at wall time *sent_at*): True when granted
        (:attr:`grant`); else the time of the next try is set (:attr:`retry_at`), or
        LockTimeout for a caller that does not wait."""
        self.in_flight = False
        self.answered = True
        granted, value, *rest = cast("list[int | bytes]", reply)
        if int(granted):
            # expiry as seen from here: counted from before the request, so never late
            left = int(rest[0]) / 1000
            took_over = len(rest) > 1 and int(rest[1]) == 1
            deadline = now - (received - sent_at) + left
            if deadline > now:
                self.grant = Grant(int(value), sent_at + left, deadline, took_over)
                return True
            # the reply came after the lease it grants ran out (a trip stalled longer than
            # the TTL): never return it; ask again, which renews it if it is still ours
            if not self.waits:
                raise self.expired(now)
            self.retry_at = now
            return False
        if rest:  # queued: the reply carries the server's clock, to date hand-offs by
            clock.read(int(rest[0]), sent_at, received)
        if not self.waits:
            raise self.expired(now)
        pttl = int(value)
        wake = self.poll if pttl < 0 else min(pttl / 1000 + 0.001, self.poll)
        if not subscribed:
            wake = min(wake, 0.01)  # a release message could be missed: look again soon
        self.retry_at = now + wake
        return False

    def wait_time(self, now: float) -> float:
        """Seconds to wait before the next try (a wake-up may come sooner); LockTimeout at the
        deadline."""
        deadline = self.deadline
        if deadline is not None and now >= deadline:
            raise self.expired(now)
        until = self.retry_at if deadline is None else min(self.retry_at, deadline)
        return max(until - now, 0.0)

    def failed(self, exc: BackendUnavailable, now: float, where: str) -> KeylockError:
        """What a failed trip raises. One that ran into the caller's deadline is LockTimeout if
        Redis answered an earlier trip of this acquire (the key is taken); if it answered none
        for SILENT seconds, BackendUnavailable naming *where* (a server that accepts
        connections and never replies is an outage, not contention); sooner, a LockTimeout
        that says Redis had not answered yet. Any other error as it is."""
        if (
            self.deadline is None
            or not isinstance(exc.__cause__, TimeoutError | redis.exceptions.TimeoutError)
            or now < self.deadline - 0.002
        ):
            return exc
        if self.answered:
            return self.expired(now)
        if now - self.started < SILENT:
            return LockTimeout(
                f"{self.described()} was not granted within {self.timeout}s: Redis at {where} "
                "had not answered yet (too soon to tell a held key from a slow server); raise the "
                "timeout",
                key=self.key,
            )
        return BackendUnavailable(
            f"Redis at {where} did not answer within {now - self.started:.1f}s for "
            f"{self.described()} (overloaded, paused, not a Redis server, or a network dropping "
            "packets): no lease was granted, and whether the key is held is unknown; check the "
            "server and the network",
            key=self.key,
        )

    def leave_args(self) -> list[Arg] | None:
        """LEAVE's arguments for a caller giving up, or None when it needs none (it never
        queued and has no call in flight). With a call in flight, LEAVE marks the
        acquisition gone for a while, so that ACQUIRE, landing late, grants nothing."""
        if not (self.waits or self.in_flight):
            return None
        mark_ms = int(cast("int", self.args[1])) + self.stay_ms if self.in_flight else 0
        return [self.owner, self.key, mark_ms]


class RedisFlow(Flow):
    """The tiered core's view of an :class:`AcquireFlow`: the protocol's decisions, plus the
    wake-up wiring (the listener must be subscribed before the first queueing trip)."""

    def __init__(
        self,
        backend: RedisBackend,
        key: str,
        owner: bytes,
        ttl: float | None,
        deadline: Deadline,
        waiter: Waiter,
        local: Grant,
    ) -> None:
        ttl = backend._ttl if ttl is None else ttl
        super().__init__(key, owner, ttl, deadline, waiter, local)
        now = time.monotonic()
        self.protocol = protocol = backend._protocol(key, owner, deadline.timeout, ttl, now)
        if deadline.timeout is not None:
            # the caller's own deadline: the time it waited for its turn in this process (the
            # in-process line in front of Redis) counts against the same timeout
            protocol.deadline = deadline.at
        self._waiting = backend._waiting
        self._clock = backend.server_clock
        self._where = backend._where  # for messages
        self._listener: Listener | None = None
        if protocol.waits:
            self._listener = self._waiting.watch(protocol, waiter)
            # a new listener subscribes before we queue (up to 1 s, never past the deadline)
            self._subscribe_until = now + min(1.0, protocol.bound(now) or 1.0)
        self._sent = 0.0  # time.time() of the last trip
        self._asleep = False  # the last step was a wait: the next one is a trip

    def next(self, now: float) -> Step | None:
        protocol = self.protocol
        if self.grant is not None:
            return None
        listener = self._listener
        if (
            listener is not None
            and not listener.subscribed.is_set()
            and now < self._subscribe_until
        ):
            return Step(None, 0.001)
        if self._asleep or not protocol.tried or protocol.handed is not None:
            self._asleep = False
            trip = protocol.next_trip(now)
            if trip is None:  # a hand-off, adopted
                self.grant = protocol.grant
                return None
            self._sent = time.time()
            return Step(trip, None)
        self._asleep = True
        return Step(None, protocol.wait_time(now))

    def on_reply(self, reply: object, now: float) -> None:
        protocol = self.protocol
        subscribed = self._waiting.subscribed()
        if not subscribed:
            self._waiting.hurry()  # this waiter polls fast until hand-offs reach it again
        if protocol.on_reply(reply, self._sent, time.time(), now, self._clock, subscribed):
            self.grant = protocol.grant

    def on_error(self, error: Exception, now: float) -> Exception:
        if isinstance(error, BackendUnavailable):
            failed: KeylockError = self.protocol.failed(error, now, self._where)
            return failed
        return error

    def leaving(self) -> object | None:
        args = self.protocol.leave_args()
        if args is None:
            return None
        return Trip(LEAVE, self.protocol.keys, args, None)

    def close(self) -> None:
        if self._listener is not None:
            self._waiting.unwatch(self.key, self.owner)
