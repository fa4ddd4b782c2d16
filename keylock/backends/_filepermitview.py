"""FileBackend's permit views (``FileBackend.permits(limit, weight)``): semaphores and RW
locks between processes on one host, over the arbiter of :mod:`~keylock.backends._filepermits`.

In front, the memory permit table of the view's shape (FIFO across weights between tasks,
threads and event loops of this process, TTLs); behind it, one claim per caller at the permit
files. A lease's TTL is this process's, as for FileBackend locks: an expired permit's room
goes to the next caller here (``took_over``), its file permit is let go unreleased (the next
holder in any process is told it took over), and its holder's release raises LeaseLost.
"""

from __future__ import annotations

from math import inf
from typing import TYPE_CHECKING, cast

from ._filepermits import Claim, Granted, Permit, check_file_shape
from ._filescan import probe_permits
from ._filewait import LEAVE, TRY, FileFlow
from ._permits import MemoryPermits, check_shape, limit_mismatch
from ._tiered import Held
from ._tieredpermits import TieredPermits, tiered_view
from .base import Grant, KeyStatistics, register_permits
from .file import _RELEASING, FileBackend

if TYPE_CHECKING:
    from ._tiered import Flow
    from ._waiters import Waiter
    from .base import Deadline

__all__ = ["FilePermits", "file_permits"]


class _PermitHeld(Held):
    """A permit this process holds at the permit files, and its in-process turn."""

    __slots__ = ("claim", "deadline", "permit", "timed")

    def __init__(
        self, token: int, owner: bytes, local_token: int, claim: Claim, permit: Permit
    ) -> None:
        super().__init__(token, owner, local_token)
        self.claim = claim  # (its key's files; releases the permit)
        self.permit = permit
        self.timed = False  # its in-process turn has a deadline (it may lapse before release)
        self.deadline: float | None = None  # when that turn lapses (the table's monotonic)

    def lapsed(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


class _PermitFlow(FileFlow):
    """A FileFlow whose trips step one :class:`Claim`."""

    claim: Claim
    permit: Permit | None = None


class FilePermits(TieredPermits, FileBackend):
    """Permits of one shape ``(limit, weight)`` on a FileBackend's directory (see the module
    and :mod:`~keylock.backends._filepermits`); made by :meth:`FileBackend.permits`."""

    _parent: FileBackend

    def _claim(self, key: str, owner: bytes, wake: Waiter | None) -> Claim:
        parent = self._parent
        return Claim(
            parent._files,
            parent._shared,
            key,
            *self.shape,
            owner,
            (lambda: True) if wake is None else wake.wake,
            limit_mismatch,
        )

    def _local(self) -> MemoryPermits:
        local = self._tier.local
        assert isinstance(local, MemoryPermits)
        return local

    def _hold(self, key: str, owner: bytes, local: Grant, claim: Claim, reply: Granted) -> Grant:
        """Record the permit *reply* of *claim* as held; its grant (dates: the local turn's)."""
        token, took_over, permit = reply
        claim.granted = None
        held = _PermitHeld(token, owner, local[0], claim, permit)
        held.timed, held.deadline = local[2] is not None, local[2]
        tier = self._tier
        with tier.mutex:
            tier.held[(key, token)] = held
        return Grant(token, local[1], local[2], took_over or local[3])

    def _drop_lapsed(self, key: str) -> None:
        """Let go, unreleased, the file permits of *key* whose turn here lapsed: their room
        is the next caller's, here or in another process (their release raises LeaseLost)."""
        tier = self._tier
        now = self._local().clock.monotonic()
        with tier.mutex:
            lapsed = [
                slot
                for slot, held in tier.held.items()
                if slot[0] == key and isinstance(held, _PermitHeld) and held.lapsed(now)
            ]
            dropped = [tier.held.pop(slot) for slot in lapsed]
        for held in dropped:
            assert isinstance(held, _PermitHeld)
            held.claim.release(held.permit, released=False)

    # --------------------------------------------------------------- the arbiter's part

    def _try_now(self, key: str, owner: bytes, ttl: float | None, local: Grant) -> Grant | None:
        if local[3]:
            self._drop_lapsed(key)
        claim = self._claim(key, owner, None)
        try:
            reply = claim.step(block_=False, try_only=True)
        except BaseException:
            claim.leave()
            raise
        if not isinstance(reply, tuple):
            claim.leave()
            return None
        return self._hold(key, owner, local, claim, cast("Granted", reply))

    def _flow(
        self,
        key: str,
        owner: bytes,
        ttl: float | None,
        deadline: Deadline,
        waiter: Waiter,
        local: Grant,
    ) -> Flow:
        if local[3]:
            self._drop_lapsed(key)
        flow = _PermitFlow(key, owner, ttl, deadline, waiter, local)
        claim = flow.claim = self._claim(key, owner, waiter)
        # a caller whose event loop closed never comes back: its turn here goes to the next
        claim.on_orphaned = lambda: self._tier.local._discard_sync(key, owner, local)
        return flow

    def _make_trip(self, flow: Flow, trip: object, *, inline: bool) -> object:
        assert isinstance(flow, _PermitFlow)
        if trip == LEAVE:
            flow.claim.leave()
            return None
        wait = trip == TRY
        reply = flow.claim.step(block_=wait, inline=inline and wait and flow.deadline.at == inf)
        if not isinstance(reply, tuple):
            return reply  # None (busy: look again) or BLOCKED
        flow.permit = reply[2]
        return Grant(reply[0], flow.local[1], flow.local[2], reply[1] or flow.local[3])

    def _adopt(self, flow: Flow) -> Grant:
        """The permit is ours: record it, and start its TTL only now (see _local_ttl)."""
        assert isinstance(flow, _PermitFlow)
        grant = flow.grant
        assert grant is not None
        assert flow.permit is not None
        local = Grant(flow.local[0], flow.local[1], flow.local[2], grant[3])
        self._hold(flow.key, flow.owner, local, flow.claim, (grant[0], grant[3], flow.permit))
        if flow.ttl is None:
            return grant
        held = self._tier.held[(flow.key, grant[0])]
        assert isinstance(held, _PermitHeld)
        held.timed = True
        dated = self._extend_local(flow.key, held, flow.ttl)
        held.deadline = dated[2]
        return Grant(dated[0], dated[1], dated[2], grant[3])

    def extend_sync(self, key: str, owner: bytes, token: int, ttl: float) -> Grant:
        held = self._take_held(key, owner, token, pop=False)
        assert isinstance(held, _PermitHeld)
        grant = self._extend_local(key, held, ttl)
        held.timed, held.deadline = True, grant[2]
        return grant

    def _end_sync(self, key: str, held: Held) -> bool:
        assert isinstance(held, _PermitHeld)
        live = True
        if held.timed:  # kept live until its release is recorded (see FileBackend)
            try:
                self._local().extend_sync(key, held.owner, held.local_token, _RELEASING)
            except Exception:
                live = False
        held.claim.release(held.permit, released=live)
        return True

    def _arbiter_statistics(self, key: str, local: KeyStatistics) -> KeyStatistics:
        """From the permit files: any permit held (by any process), the newest grant's token
        and owner, how many exclusive slots are held; a claim at the gate waits."""
        found = probe_permits(self._parent._files, key, self.shape.limit)
        waiting = local.waiting + found.at_gate
        if not found.held:
            return KeyStatistics(key, False, None, found.owner, waiting)
        return KeyStatistics(key, True, found.token, found.owner, waiting, found.holders)

    def prune(self, *, idle_for: float = 0.0) -> int:
        return self._parent.prune(idle_for=idle_for)


def file_permits(parent: FileBackend, limit: int, weight: int) -> FilePermits:
    """Semaphores and RW locks between processes: *parent*'s view of shape ``(limit,
    weight)`` (cached per shape), each permit an OS lock on a slot file, so a dead holder's
    permit is free at once. Limits up to 64, or ``RW_LIMIT``."""
    check_file_shape(*check_shape(limit, weight, "FileBackend"))
    return tiered_view(parent, FilePermits, limit, weight)


register_permits(FileBackend, file_permits)
