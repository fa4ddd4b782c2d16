"""Permit views of a tiered backend (file, Redis, Postgres): the same two tiers as its locks,
with the memory permit table of the view's shape in front and this process allowed to hold
several permits of one key at the arbiter.

A backend's permit view class is ``class XPermits(TieredPermits, XBackend)`` with its arbiter
methods for permits; :func:`tiered_view` makes (and caches) one per shape. The view keeps no
state of its own: every attribute it does not set is read from its parent (connections,
renewer, clock), so it lives and dies with the parent; its ``close`` does nothing. A method
that rebinds the parent's state must do it on ``self._parent``.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, TypeVar

from ._permits import check_shape
from ._tiered import Flow, Held, PermitTier, TieredBackend
from .base import Backend, Grant, KeyStatistics, Permits

__all__ = ["TieredPermits", "tiered_view"]

V = TypeVar("V", bound="TieredPermits")

if TYPE_CHECKING:
    _Base = TieredBackend
else:
    _Base = object


class TieredPermits(_Base):
    """Mixin of a tiered backend's permit view: ``held`` keyed by ``(key, token)``, the tier
    of its shape, statistics over every permit this process holds, nothing to close."""

    _parent: TieredBackend
    shape: Permits

    def __getattr__(self, name: str) -> object:
        # only called for attributes the view does not have: the parent's live state
        if name.startswith("__") or name in ("_parent", "shape"):
            raise AttributeError(name)
        return getattr(self._parent, name)

    @property
    def _shut(self) -> bool:  # type: ignore[override]
        return self._parent._shut  # (closing the parent closes its views)

    @property
    def _tier(self) -> PermitTier:  # type: ignore[override]
        # read through the parent each time: its tier is replaced in a forked child
        return self._parent._tier.permits(*self.shape)

    def __repr__(self) -> str:
        limit, weight = self.shape
        return f"{self._parent!r}.permits({limit}, {weight})"

    def permits(self, limit: int, weight: int = 1) -> Backend:
        raise TypeError(f"{self!r} is already a permit view: call permits() on its parent")

    def close_sync(self) -> None:
        """Nothing: the parent owns the connections and background work."""

    async def close(self) -> None:
        """Nothing: the parent owns the connections and background work."""

    def _adopt(self, flow: Flow) -> Grant:
        grant = flow.grant
        assert grant is not None
        tier = self._tier
        with tier.mutex:
            tier.held[(flow.key, grant[0])] = Held(grant[0], flow.owner, flow.local[0])
        return grant

    def _find_held(self, key: str, owner: bytes, token: int, *, pop: bool) -> Held | None:
        tier = self._tier
        with tier.mutex:
            held = tier.held.get((key, token))
            if held is None or held.owner != owner:
                return None
            if pop:
                del tier.held[(key, token)]
            return held

    def statistics(self, key: str) -> KeyStatistics:
        """The arbiter's view of *key* (``_arbiter_statistics``, asked whether or not this
        process holds permits of it: a permit key may have holders and waiters elsewhere while
        this process holds some), and at least what this process knows: its permits, and the
        callers waiting in its in-process line."""
        if self._shut:
            raise self._closed_error(key)
        tier = self._tier
        local = tier.local.statistics(key)
        with tier.mutex:
            mine = [held for slot, held in tier.held.items() if slot[0] == key]
        found = self._arbiter_statistics(key, local)
        waiting = max(found.waiting, local.waiting)
        if not mine:
            return KeyStatistics(key, found.held, found.token, found.owner, waiting, found.holders)
        newest = max(mine, key=lambda held: held.token)
        if found.held and found.token is not None and found.token > newest.token:
            token, owner = found.token, found.owner
        else:
            token, owner = newest.token, newest.owner
        return KeyStatistics(key, True, token, owner, waiting, max(found.holders, len(mine)))


_VIEWS_MUTEX = threading.Lock()
# a thread of the parent may have held it at fork time: that thread does not exist in the child
os.register_at_fork(after_in_child=_VIEWS_MUTEX._at_fork_reinit)  # type: ignore[attr-defined]


def tiered_view(parent: TieredBackend, cls: type[V], limit: int, weight: int) -> V:
    """*parent*'s permit view of shape ``(limit, weight)``, of class *cls* (cached per shape
    on the parent)."""
    shape = check_shape(limit, weight, type(parent).__name__)
    with _VIEWS_MUTEX:
        views: dict[Permits, TieredPermits] = parent.__dict__.setdefault("_permit_views", {})
        view = views.get(shape)
        if view is None:
            view = cls.__new__(cls)
            view.__dict__["_parent"] = parent
            view.__dict__["shape"] = shape
            # (a class attribute would hide the parent's through __getattr__: copy it)
            view.__dict__["default_ttl"] = parent.default_ttl
            views[shape] = view
    assert isinstance(view, cls)
    return view
