"""How the shared renewer (:mod:`keylock.backends._renewer`) renews Redis leases: every
EXTEND of a batch in one pipelined round trip."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._flow import extend_call
from ._scripts import EXTEND
from ._wire import map_errors

if TYPE_CHECKING:
    from .._renewer import Renewal
    from ._connections import Connections
    from ._keys import Layout

__all__ = ["extend_all"]


def extend_all(connections: Connections, layout: Layout) -> Renewal:
    """A :data:`Renewal` through *connections*: every EXTEND of a batch in one pipelined
    round trip; True if still ours (and extended), False if not, or that call's error."""

    def renew(batch: list[tuple[str, bytes, float]]) -> list[object]:
        calls = [extend_call(layout, key, owner, ttl) for key, owner, ttl in batch]
        with map_errors(batch[0][0], connections.where):
            replies = connections.wire().call_many(EXTEND, calls)
        return [reply if isinstance(reply, Exception) else reply == 1 for reply in replies]

    return renew
