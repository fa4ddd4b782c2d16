"""A history of grants, releases and fenced writes, and the checker that judges it.

Workers record each grant right after ``acquire`` returns (or after their first fenced write,
which makes the fence know the new token before the grant counts) and each release right before
``release`` is called, so a recorded interval always lies inside the true holding interval:
the checker never blames a correct lock, and two recorded intervals that overlap prove two live
holders. ``expires_at`` is the holder's own belief (the lease's ``expires_at`` after its last
renewal), so an overlap with a lease its holder still believed live is a phantom grant.
Times are ``time.monotonic()`` (one host).

Permits: a ``History(limit=n)`` judges semaphores and RW locks: grants carry a ``weight``
(1, or ``limit`` for an RW writer) and an overlap is more than ``limit`` weight of live leases
at a grant (more than ``limit`` holders; a writer beside anyone).

Waits are recorded too (asked, ended, timeout, outcome): a wait that ended later than its
timeout plus a slack is a hang.
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
import time
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keylock import Lease


@dataclass
class Grant:
    key: str
    token: int
    holder: str
    granted_at: float
    expires_at: float | None  # monotonic; None = no TTL
    _: KW_ONLY
    released_at: float | None = None  # None: never released (crashed, or lease lost)
    asked_at: float | None = None  # when its acquire started (for the hand-off delay)
    voided_at: float | None = None  # the server forgot it then (restart without persistence)
    weight: int = 1  # what it takes of its key's limit (an RW writer: all of it)

    @property
    def ended_at(self) -> float:
        """When the lease stopped counting: released, expired, or voided (inf: never)."""
        return min(
            math.inf if t is None else t
            for t in (self.released_at, self.expires_at, self.voided_at)
        )


@dataclass
class Wait:
    key: str
    holder: str
    asked_at: float
    ended_at: float
    timeout: float | None
    outcome: str  # "granted", "timeout", "error", "cancelled"


@dataclass
class Write:
    resource: str
    token: int
    holder: str
    at: float
    accepted: bool


@dataclass
class Verdict:
    grants: int = 0
    overlaps: list[str] = field(default_factory=list)
    token_regressions: list[str] = field(default_factory=list)
    stale_writes_accepted: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)  # waits that outlived timeout + slack
    waits: dict[str, int] = field(default_factory=dict)  # outcome -> count
    max_handoff: float | None = None  # longest gap from a lease's end to a waiter's grant
    max_overrun: float | None = None  # longest wait past its own timeout (can be negative)

    @property
    def ok(self) -> bool:
        return not (
            self.overlaps or self.token_regressions or self.stale_writes_accepted or self.hangs
        )

    @property
    def timed_out(self) -> int:
        return self.waits.get("timeout", 0)


class History:
    """Thread-safe event log shared by every worker of one trial."""

    def __init__(self, *, limit: int = 1) -> None:
        self._mutex = threading.Lock()
        self.limit = limit  # weight of live leases a key allows (1: a lock)
        self.grants: list[Grant] = []
        self.writes: list[Write] = []
        self.waits: list[Wait] = []

    def granted(self, grant: Grant) -> Grant:
        with self._mutex:
            self.grants.append(grant)
        return grant

    def wrote(self, write: Write) -> None:
        with self._mutex:
            self.writes.append(write)

    def waited(self, wait: Wait) -> None:
        with self._mutex:
            self.waits.append(wait)

    def check(self, *, slack: float = 1.0) -> Verdict:
        """Per key: no two live leases overlap (for permits: live leases never weigh more than
        ``limit``) — an overlap is excused only when the earlier
        lease had ended on the server — expired as its holder knew, or voided by a server that
        lost its data — and its holder's later writes were all rejected; tokens strictly
        increase in grant order; every accepted write carries the highest token granted so far;
        no wait outlived its timeout by more than *slack* seconds.
        """
        verdict = Verdict(grants=len(self.grants))
        by_key: dict[str, list[Grant]] = {}
        for grant in self.grants:
            by_key.setdefault(grant.key, []).append(grant)
        for key, grants in by_key.items():
            in_order = sorted(grants, key=lambda g: g.granted_at)
            if self.limit != 1 or any(g.weight != 1 for g in in_order):
                verdict.overlaps.extend(self._over_limit(key, in_order))
                verdict.token_regressions.extend(self._permit_tokens(key, in_order))
                in_order_pairs: list[Grant] = []  # (judged by weight above)
            else:
                in_order_pairs = in_order
                for earlier, later in itertools.pairwise(in_order):
                    if later.token <= earlier.token:
                        verdict.token_regressions.append(
                            f"{key}: token {later.token} granted after {earlier.token}"
                        )
            for i, a in enumerate(in_order_pairs):
                end_a = a.released_at if a.released_at is not None else float("inf")
                for b in in_order_pairs[i + 1 :]:
                    if b.granted_at >= end_a:
                        break
                    if self._excused(a, b):
                        continue  # expired and fenced off: a takeover, not an overlap
                    verdict.overlaps.append(
                        f"{key}: {a.holder} (token {a.token}) and {b.holder} (token {b.token}) "
                        f"both held it at {b.granted_at:.6f}"
                    )
            for a, b in itertools.pairwise(in_order):
                end = a.ended_at
                if b.asked_at is not None and b.asked_at < end < math.inf:
                    gap = max(b.granted_at - end, 0.0)
                    verdict.max_handoff = max(verdict.max_handoff or 0.0, gap)
        by_resource: dict[str, list[Write]] = {}
        for write in self.writes:
            by_resource.setdefault(write.resource, []).append(write)
        for resource, writes in by_resource.items():
            granted = sorted((g.granted_at, g.token) for g in by_key.get(resource, ()))
            times = [at for at, _ in granted]
            newest = list(itertools.accumulate((t for _, t in granted), max))  # so far
            for write in writes:
                n = bisect.bisect_right(times, write.at)  # grants recorded by then
                if write.accepted and n and write.token < newest[n - 1]:
                    verdict.stale_writes_accepted.append(
                        f"{resource}: write with token {write.token} accepted after token "
                        f"{newest[n - 1]} was granted"
                    )
        for wait in self.waits:
            verdict.waits[wait.outcome] = verdict.waits.get(wait.outcome, 0) + 1
            if wait.timeout is None or wait.outcome == "cancelled":
                continue
            overrun = wait.ended_at - wait.asked_at - wait.timeout
            verdict.max_overrun = max(verdict.max_overrun or -math.inf, overrun)
            if overrun > slack:
                verdict.hangs.append(
                    f"{wait.key}: {wait.holder} waited {wait.ended_at - wait.asked_at:.3f}s "
                    f"with timeout={wait.timeout} ({wait.outcome})"
                )
        return verdict

    def _excused(self, a: Grant, b: Grant) -> bool:
        """*a* still looked live when *b* was granted, but it had ended on the server (expired
        as its holder knew, or voided) and every write its holder made after was rejected."""
        server_end = min(math.inf if t is None else t for t in (a.expires_at, a.voided_at))
        if server_end > b.granted_at:
            return False
        late = [
            w
            for w in self.writes
            if w.holder == a.holder and w.token == a.token and w.at >= b.granted_at
        ]
        return all(not w.accepted for w in late)

    def _permit_tokens(self, key: str, in_order: list[Grant]) -> list[str]:
        """Permits: tokens are never reused, and an exclusive lease (a writer, or any lease of
        a limit-1 key) has a token above every lease recorded before it and below every lease
        recorded after its release. (Holders of one key at once record their grants in any
        order, so the recorded order of shared leases says nothing about their tokens.)"""
        found = []
        seen: dict[int, str] = {}
        for g in in_order:
            if g.token in seen:
                found.append(f"{key}: token {g.token} granted to {seen[g.token]} and {g.holder}")
            seen[g.token] = g.holder
        for i, w in enumerate(in_order):
            if w.weight != self.limit:
                continue
            end = math.inf if w.released_at is None else w.released_at
            for g in in_order[:i]:
                if g.token >= w.token:
                    found.append(f"{key}: {w.holder}'s token {w.token} after {g.token}")
            for g in in_order[i + 1 :]:
                if g.granted_at > end and g.token <= w.token:
                    found.append(f"{key}: token {g.token} granted after {w.holder}'s {w.token}")
        return found

    def _over_limit(self, key: str, in_order: list[Grant]) -> list[str]:
        """Permits: at each grant, the weight of the leases still live (not excused) plus its
        own must fit in ``limit``; else one finding naming the holders and who was a writer."""
        found = []
        limit = self.limit
        for i, b in enumerate(in_order):
            live = [
                a
                for a in in_order[:i]
                if b.granted_at < (math.inf if a.released_at is None else a.released_at)
                and not self._excused(a, b)
            ]
            weight = sum(a.weight for a in live) + b.weight
            if weight <= limit:
                continue
            writers = [g.holder for g in (*live, b) if g.weight == limit and limit > 1]
            what = f"writer {', '.join(writers)} beside others" if writers else "over the limit"
            found.append(
                f"{key}: {len(live) + 1} leases of weight {weight} > limit {limit} at "
                f"{b.granted_at:.6f} ({what}): "
                + ", ".join(f"{g.holder} (token {g.token})" for g in (*live, b))
            )
        return found


def believed_expiry(lease: Lease) -> float | None:
    """The lease's expiry as its holder believes it now, on the monotonic clock."""
    expires_at = lease.expires_at
    if expires_at is None:
        return None
    return time.monotonic() + (expires_at - time.time())


class FencedStore:
    """The protected resource: accepts a write only with a token >= the highest seen."""

    def __init__(self, history: History) -> None:
        self._mutex = threading.Lock()
        self._history = history
        self.highest: dict[str, int] = {}
        self.values: dict[str, object] = {}

    def write(self, resource: str, token: int, holder: str, value: object, at: float) -> bool:
        with self._mutex:
            accepted = token >= self.highest.get(resource, 0)
            if accepted:
                self.highest[resource] = token
                self.values[resource] = value
            self._history.wrote(Write(resource, token, holder, at, accepted))
            return accepted


class RedisFencedStore:
    """The protected resource on Redis, behind :mod:`keylock.fencing`'s fenced set: a write
    with a token below the highest one that wrote raises StaleToken; each write is recorded."""

    def __init__(self, history: History, url: str) -> None:
        import redis
        import redis.asyncio

        self._history = history
        self._sync = redis.Redis.from_url(url)
        self._url = url
        self._async: dict[int, redis.asyncio.Redis] = {}  # per event loop

    def write_sync(self, resource: str, token: int, holder: str, value: str) -> bool:
        from keylock import StaleToken
        from keylock.fencing import fenced_set_sync

        at = time.monotonic()
        try:
            fenced_set_sync(self._sync, resource, token, value)
        except StaleToken:
            self._history.wrote(Write(resource, token, holder, at, False))
            return False
        self._history.wrote(Write(resource, token, holder, at, True))
        return True

    async def write(self, resource: str, token: int, holder: str, value: str) -> bool:
        import asyncio

        import redis.asyncio

        from keylock import StaleToken
        from keylock.fencing import fenced_set

        loop = id(asyncio.get_running_loop())
        client = self._async.get(loop)
        if client is None:
            client = self._async[loop] = redis.asyncio.Redis.from_url(self._url)
        at = time.monotonic()
        try:
            await fenced_set(client, resource, token, value)
        except StaleToken:
            self._history.wrote(Write(resource, token, holder, at, False))
            return False
        self._history.wrote(Write(resource, token, holder, at, True))
        return True

    async def aclose(self) -> None:
        for client in self._async.values():
            await client.aclose()
        self._async.clear()
        self._sync.close()
