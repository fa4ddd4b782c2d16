"""Replicated leases (``replicas=N``): a grant, an extend or a hand-off counts only once *N*
replicas acknowledged it, so a failover to one of them cannot hand the key to a second holder.

``WAIT N timeout`` goes on the script's own connection in the same write (no extra round trip,
only the replicas' acknowledgement time): WAIT counts the writes of its own connection, so it
must follow the script there. A hand-off is written by the releaser's script; the waiter it
wakes confirms it with an ACQUIRE of its own (a write after the hand-off's) and that WAIT.
"""

from __future__ import annotations

from typing import NamedTuple, cast

from ...errors import BackendUnavailable
from ..base import Permits, described, shape_of
from ._flow import check_seconds

__all__ = [
    "NO_REPLICAS",
    "Replication",
    "check_replication",
    "granted",
    "unreplicated",
]

# How long WAIT may take at most (a grant that took this long has used most of a short TTL).
MAX_REPLICA_TIMEOUT = 60.0


class Replication(NamedTuple):
    """How many replicas must acknowledge a write (0: none), and how long to wait for them."""

    replicas: int
    timeout: float  # seconds

    def wait(self, bound: float | None) -> tuple[str, int, int] | None:
        """The WAIT to send after a script whose reply is awaited at most *bound* seconds
        (None when no replica is asked for): within half the bound, so its own reply is
        back before the read gives up."""
        if not self.replicas:
            return None
        limit = self.timeout if bound is None else min(self.timeout, bound / 2)
        return ("WAIT", self.replicas, max(int(limit * 1000), 1))

    def short(self, reply: object) -> int | None:
        """From ``(script's reply, WAIT's reply)``, how many replicas acknowledged, if fewer
        than asked for; None when enough did."""
        acked = int(cast("int", reply))
        return acked if acked < self.replicas else None


NO_REPLICAS = Replication(0, 1.0)


def check_replication(replicas: object, replica_timeout: object, ttl: float) -> Replication:
    """*replicas* (an int >= 0) and *replica_timeout* (seconds, shorter than *ttl*), else
    TypeError/ValueError saying what to pass."""
    if isinstance(replicas, bool) or not isinstance(replicas, int):
        raise TypeError(
            f"RedisBackend replicas must be an int (how many replicas must acknowledge each "
            f"grant, 0 for none), not {replicas!r}"
        )
    if replicas < 0:
        raise ValueError(
            f"RedisBackend replicas is {replicas}: it must be 0 (no wait) or the number of "
            "replicas that must acknowledge each grant, such as 1"
        )
    timeout = check_seconds("replica_timeout", replica_timeout, MAX_REPLICA_TIMEOUT)
    if replicas and timeout >= ttl:
        raise ValueError(
            f"RedisBackend replica_timeout is {timeout:g} s, not shorter than the ttl of "
            f"{ttl:g} s: a lease could lapse while its grant waits for the replicas; use a "
            "shorter replica_timeout (the default is 1 s) or a longer ttl"
        )
    return Replication(replicas, timeout)


def unreplicated(
    key: str,
    where: str,
    replication: Replication,
    acked: int,
    what: str,
    shape: Permits | None = None,
) -> BackendUnavailable:
    """The error for a *what* ("grant", "extend") of *key* (a lock, or a permit of *shape*)
    that only *acked* replicas acknowledged in time."""
    n, timeout = replication
    if what == "grant":
        outcome = (
            "it was given back (a failover now could hand it to a second holder), and the "
            "caller holds nothing"
        )
    else:
        outcome = (
            "the lease stays held only until its last replicated expiry (lease.expires_at is "
            "unchanged), and is reported lost then unless a later renewal is replicated"
        )
    return BackendUnavailable(
        f"Redis at {where}: the {what} of {described(key, shape)} reached {acked} of the {n} "
        f"replica(s) asked for within replica_timeout={timeout:g} s (or half the time the "
        f"caller had left, if less); {outcome}; check the replicas (INFO replication) or "
        "lower replicas=",
        key=key,
    )


def granted(replication: Replication, key: str, where: str, replies: object, by: object) -> object:
    """An ACQUIRE's reply from ``(reply, WAIT's reply)``, once the replicas acknowledged a
    grant; a grant they did not is BackendUnavailable (the caller then leaves the line, and
    its LEAVE gives the grant back, handing it on), naming the key as the backend or permit
    view *by* knows it."""
    reply, acked = cast("tuple[list[object], object]", replies)
    short = replication.short(acked)
    # (only a grant, {1, ...}: a permit's {-1, limit} refusal granted nothing to give back)
    if short is not None and int(cast("int", reply[0])) == 1:
        raise unreplicated(key, where, replication, short, "grant", shape_of(by))
    return reply
