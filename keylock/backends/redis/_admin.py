"""Operator actions on a Redis lock store (``keylock release --force``)."""

from __future__ import annotations

from ._clients import SyncClient, address
from ._keys import Layout
from ._scripts import FORCE_RELEASE
from ._wire import SyncWire, map_errors

__all__ = ["force_release"]


def force_release(
    client: SyncClient, key: str, *, owner: bytes | str | None = None, prefix: str = "keylock"
) -> bool:
    """Delete *key*'s lock only if *owner* (bytes, or hex as ``keylock inspect`` shows it)
    still holds it, and hand the key to the next waiter at once (woken on its own process's
    channel, as at any release). With ``owner=None``, the holder seen now. True if deleted;
    False when the key is free or another owner holds it (nothing changed)."""
    layout = Layout(prefix)
    keys = layout.lock(key)
    with map_errors(key, address(client)):
        if owner is None:
            current = client.get(keys[0])
            if current is None:
                return False
            owner = current.encode() if isinstance(current, str) else bytes(current)
        elif isinstance(owner, str):
            owner = bytes.fromhex(owner)
        return bool(SyncWire(client).call(FORCE_RELEASE, keys, [owner, key]))
