"""Operator actions on a Redis lock store (``keylock release --force``): breaking one lock,
or one permit of a semaphore or an RW lock, only the one that was shown."""

from __future__ import annotations

from typing import cast

from ._clients import SyncClient, address
from ._keys import Layout
from ._permit_admin import PERMIT_FORCE
from ._permit_scripts import PERMIT_STATS
from ._scripts import FORCE_RELEASE
from ._wire import SyncWire, map_errors

__all__ = ["force_release"]


def force_release(
    client: SyncClient, key: str, *, owner: bytes | str | None = None, prefix: str = "keylock"
) -> bool:
    """Free *key* (as stored: ``namespace NUL key``) only if *owner* (bytes, or hex as
    ``keylock inspect`` shows it) still holds it, and hand it to the next waiter at once (woken
    on its own process's channel, as at any release). *owner* may hold the key's lock or one of
    its permits (a semaphore's or an RW lock's: owner ids are never shared, so only that permit
    is freed, and the waiters that now fit are granted). With ``owner=None``, the lock's holder
    seen now, or else the newest permit's. True if a live lease was broken; False when the key
    is free, expired, or another owner holds it (nothing changed). The holder is not told until
    its next renewal or release (``lease.lost``, LeaseLost): its writes must be fenced."""
    layout = Layout(prefix)
    keys = layout.lock(key)
    with map_errors(key, address(client)):
        wire = SyncWire(client)
        if owner is None:
            current = client.get(keys[0])
            if current is None:
                return _force_permit(wire, layout, key, None)
            owner = current.encode() if isinstance(current, str) else bytes(current)
            return bool(wire.call(FORCE_RELEASE, keys, [owner, key]))
        if isinstance(owner, str):
            owner = bytes.fromhex(owner)
        if wire.call(FORCE_RELEASE, keys, [owner, key]):
            return True
        return _force_permit(wire, layout, key, owner)


def _force_permit(wire: SyncWire, layout: Layout, key: str, owner: bytes | None) -> bool:
    """Break the live permit *owner* holds on permit key *key* (None: the newest one, seen
    now) as if it had lapsed: the waiters that now fit are granted at once, and the next grant
    took over; its holder's own release then reports it lost."""
    keys = layout.permit(key, b"")[:4]
    if owner is None:
        live, _, newest, *_ = cast("list[object]", wire.call(PERMIT_STATS, keys, []))
        if not live or not isinstance(newest, bytes | str):
            return False
        owner = newest.encode() if isinstance(newest, str) else newest
    return bool(wire.call(PERMIT_FORCE, keys, [owner, key]))
