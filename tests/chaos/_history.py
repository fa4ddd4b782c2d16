"""A history of grants, releases and fenced writes, and the checker that judges it.

Workers record each grant right after ``acquire`` returns and each release right before
``release`` is called, so a recorded interval always lies inside the true holding interval:
the checker never blames a correct lock, and two recorded intervals that overlap prove two live
holders. Times are ``time.monotonic()`` (one host).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field


@dataclass
class Grant:
    key: str
    token: int
    holder: str
    granted_at: float
    expires_at: float | None  # monotonic; None = no TTL
    released_at: float | None = None  # None: never released (crashed, or lease lost)


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

    @property
    def ok(self) -> bool:
        return not (self.overlaps or self.token_regressions or self.stale_writes_accepted)


class History:
    """Thread-safe event log shared by every worker of one trial."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self.grants: list[Grant] = []
        self.writes: list[Write] = []
        self._ids = itertools.count()

    def granted(self, grant: Grant) -> Grant:
        with self._mutex:
            self.grants.append(grant)
        return grant

    def wrote(self, write: Write) -> None:
        with self._mutex:
            self.writes.append(write)

    def check(self) -> Verdict:
        """Per key: no two live leases overlap (an overlap is excused only when the earlier
        lease had expired and its holder's later writes were all rejected); tokens strictly
        increase in grant order; every accepted write carries the highest token granted so far.
        """
        verdict = Verdict(grants=len(self.grants))
        by_key: dict[str, list[Grant]] = {}
        for grant in self.grants:
            by_key.setdefault(grant.key, []).append(grant)
        for key, grants in by_key.items():
            in_order = sorted(grants, key=lambda g: g.granted_at)
            for earlier, later in itertools.pairwise(in_order):
                if later.token <= earlier.token:
                    verdict.token_regressions.append(
                        f"{key}: token {later.token} granted after {earlier.token}"
                    )
            for i, a in enumerate(in_order):
                end_a = a.released_at if a.released_at is not None else float("inf")
                for b in in_order[i + 1 :]:
                    if b.granted_at >= end_a:
                        break
                    if a.expires_at is not None and a.expires_at <= b.granted_at:
                        late = [
                            w
                            for w in self.writes
                            if w.holder == a.holder and w.token == a.token and w.at >= b.granted_at
                        ]
                        if all(not w.accepted for w in late):
                            continue  # expired and fenced off: a takeover, not an overlap
                    verdict.overlaps.append(
                        f"{key}: {a.holder} (token {a.token}) and {b.holder} (token {b.token}) "
                        f"both held it at {b.granted_at:.6f}"
                    )
        by_resource: dict[str, list[Write]] = {}
        for write in self.writes:
            by_resource.setdefault(write.resource, []).append(write)
        for resource, writes in by_resource.items():
            granted_tokens = sorted(
                (g.granted_at, g.token) for g in self.grants if g.key == resource
            )
            for write in writes:
                if not write.accepted:
                    continue
                newest = max((t for at, t in granted_tokens if at <= write.at), default=None)
                if newest is not None and write.token < newest:
                    verdict.stale_writes_accepted.append(
                        f"{resource}: write with token {write.token} accepted after token "
                        f"{newest} was granted"
                    )
        return verdict


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
