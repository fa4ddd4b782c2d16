"""The in-process tier of a tiered backend (see :mod:`._tiered`): one FIFO queue for the callers
of this process, and the map of the leases this process holds at the arbiter."""

from __future__ import annotations

import threading

from ._permits import MemoryPermits, permit_view
from .memory import MemoryBackend

__all__ = ["Held", "PermitTier", "Tier"]


class Held:
    """A lease this process holds at the arbiter, and its turn in the in-process queue."""

    __slots__ = ("local_token", "owner", "token")

    def __init__(self, token: int, owner: bytes, local_token: int) -> None:
        self.token = token  # the arbiter's fencing token: what the lease shows
        self.owner = owner
        self.local_token = local_token  # the in-process turn's token, to release it


class Tier:
    """The in-process front of an arbiter: one FIFO queue and one map of held keys."""

    def __init__(self) -> None:
        self.local: MemoryBackend | MemoryPermits = MemoryBackend()
        self.mutex = threading.Lock()  # guards held
        # key -> lease held at the arbiter by this process; in a PermitTier, (key, token)
        self.held: dict[str | tuple[str, int], Held] = {}
        self._permit_tiers: dict[tuple[int, int], PermitTier] = {}  # guarded by mutex

    def permits(self, limit: int, weight: int) -> PermitTier:
        """The tier of this tier's permit views of shape ``(limit, weight)`` (cached): its
        in-process line is the memory permit table of that shape (one table for every shape,
        so an RW reader and writer of this process exclude each other here too)."""
        found = self._permit_tiers.get((limit, weight))  # (a dict read is atomic)
        if found is not None:
            return found
        local = self.local
        assert isinstance(local, MemoryBackend)
        view = permit_view(local, limit, weight, local.clock)  # (validates the shape)
        with self.mutex:
            shared = next(iter(self._permit_tiers.values()), None)
            found = self._permit_tiers.get((limit, weight))
            if found is None:
                found = PermitTier(view, shared)
                self._permit_tiers[(limit, weight)] = found
            return found


class PermitTier(Tier):
    """A tier of permits: its ``held`` is keyed by ``(key, arbiter token)``, so this process
    may hold several permits of one key; every shape of one parent tier shares it."""

    def __init__(self, local: MemoryPermits, shared: PermitTier | None) -> None:
        self.local = local
        self.mutex = threading.Lock() if shared is None else shared.mutex
        self.held = {} if shared is None else shared.held
        self._permit_tiers = {}

    def permits(self, limit: int, weight: int) -> PermitTier:
        raise TypeError("a permit tier has no permit tiers: ask its parent tier")
