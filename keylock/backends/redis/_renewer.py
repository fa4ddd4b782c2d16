"""How the shared renewer (:mod:`keylock.backends._renewer`) renews Redis leases: every
EXTEND of a batch in one pipelined round trip."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._flow import extend_call
from ._replicas import unreplicated
from ._scripts import EXTEND
from ._wire import map_errors

if TYPE_CHECKING:
    from .._renewer import Renewal
    from ._connections import Connections
    from ._keys import Layout
    from ._replicas import Replication

__all__ = ["extend_all"]


def extend_all(connections: Connections, layout: Layout, replication: Replication) -> Renewal:
    """A :data:`Renewal` through *connections*: every EXTEND of a batch in one pipelined
    round trip; True if still ours (and extended), False if not, or that call's error. With
    replicas asked for, one WAIT ends the batch: if too few replicas acknowledged it, every
    extended lease gets BackendUnavailable (the renewer tries again while it is still valid,
    and reports it lost past its last replicated expiry)."""

    def renew(batch: list[tuple[str, bytes, float]]) -> list[object]:
        calls = [extend_call(layout, key, owner, ttl) for key, owner, ttl in batch]
        wait = replication.wait(None)
        with map_errors(batch[0][0], connections.where):
            replies = connections.wire().call_many(EXTEND, calls, wait)
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
