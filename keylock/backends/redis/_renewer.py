"""How the shared renewer (:mod:`keylock.backends._renewer`) renews Redis leases: every
EXTEND of a batch in one pipelined round trip (and every PERMIT_EXTEND in another), each
followed by WAIT on the same connection when ``replicas=N`` is asked for."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._flow import extend_call, ttl_ms
from ._permit_scripts import PERMIT_EXTEND
from ._replicas import unreplicated
from ._scripts import EXTEND
from ._wire import map_errors

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._renewer import Renewal
    from ._connections import Connections
    from ._keys import Layout
    from ._replicas import Replication
    from ._scripts import Script
    from ._wire import Arg

    Batch = list[tuple[str, bytes, float]]  # (key, owner, ttl) per lease

__all__ = ["extend_all", "renew_all"]


def extend_all(connections: Connections, layout: Layout, replication: Replication) -> Renewal:
    """A :data:`Renewal` through *connections*: every EXTEND of a batch in one pipelined
    round trip; True if still ours (and extended), False if not, or that call's error. With
    replicas asked for, one WAIT ends the batch: if too few replicas acknowledged it, every
    extended lease gets BackendUnavailable (the renewer tries again while it is still valid,
    and reports it lost past its last replicated expiry)."""

    def calls(batch: list[tuple[str, bytes, float]]) -> list[tuple[list[str], list[Arg]]]:
        return [extend_call(layout, key, owner, ttl) for key, owner, ttl in batch]

    return _replicated(connections, replication, EXTEND, calls)


def _permit_calls(layout: Layout) -> Callable[[Batch], list[tuple[list[str], list[Arg]]]]:
    def calls(batch: Batch) -> list[tuple[list[str], list[Arg]]]:
        return [(layout.permit_extend(key), [owner, ttl_ms(ttl, key)]) for key, owner, ttl in batch]

    return calls


def _replicated(
    connections: Connections,
    replication: Replication,
    script: Script,
    calls: Callable[[Batch], list[tuple[list[str], list[Arg]]]],
) -> Renewal:
    """A batch of *script*'s calls (extends: 1 extended, else not ours) in one pipelined round
    trip, ended by WAIT when replicas are asked for (see :func:`extend_all`)."""

    def renew(batch: Batch) -> list[object]:
        # a renewal that takes a third of the shortest TTL has failed (the renewer tries again
        # soon): a call stuck on a dead or failing-over server must not outlast the leases
        bound = min(ttl for _, _, ttl in batch) / 3
        wait = replication.wait(bound)
        with map_errors(batch[0][0], connections.where):
            replies = connections.wire().call_many(script, calls(batch), wait, bound)
        short = None
        if wait is not None:
            short = replication.short(replies.pop())
        results: list[object] = []
        for (key, _, _), reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception):
                results.append(reply)
            elif reply == 1 and short is not None:
                results.append(unreplicated(key, connections.where, replication, short, "extend"))
            else:
                results.append(reply == 1)
        return results

    return renew


def renew_all(
    connections: Connections,
    layout: Layout,
    permit_owners: set[bytes],
    replication: Replication,
) -> Renewal:
    """The renewal of a backend's one renewer: the leases of owners in *permit_owners* with
    PERMIT_EXTEND, the others with EXTEND, each kind in one pipelined round trip (each ended
    by WAIT when replicas are asked for). A permit found lost leaves *permit_owners* (it is
    never renewed again)."""
    locks = extend_all(connections, layout, replication)
    permits = _replicated(connections, replication, PERMIT_EXTEND, _permit_calls(layout))

    def renew(batch: Batch) -> list[object]:
        mine = [n for n, (_, owner, _) in enumerate(batch) if owner in permit_owners]
        if not mine:
            return locks(batch)
        results: list[object] = [None] * len(batch)
        others = [n for n in range(len(batch)) if n not in set(mine)]
        if others:
            for n, result in zip(others, locks([batch[n] for n in others]), strict=True):
                results[n] = result
        for n, result in zip(mine, permits([batch[n] for n in mine]), strict=True):
            results[n] = result
            if result is False:
                permit_owners.discard(batch[n][1])
        return results

    return renew
