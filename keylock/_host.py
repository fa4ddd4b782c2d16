"""What a lease needs from the lock that granted it, and where its callbacks run.

A lease never reads its ``KeyedLock``'s privates: it talks to this small host. User code
reached from a backend's background thread (``on_lost``, observer hooks) is delivered off that
thread: on the holder's event loop for async holders, else on one small worker thread, so a
slow or raising callback never delays the renewal of any other lease.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._clock import SYSTEM_CLOCK, Clock
from .backends.memory import MemoryBackend
from .observe import BlockHooks

if TYPE_CHECKING:
    import asyncio

    from .backends.base import Backend
    from .backends.memory import FreeRelease, _Entry
    from .lease import Lease
    from .observe import Observer

__all__ = ["LeaseHost", "LostCallback", "deliver", "report"]

logger = logging.getLogger("keylock")

#: Called with the lease when keylock learns the lease was lost (expired or taken over).
LostCallback = Callable[["Lease"], object]


class LeaseHost:
    """The settings a ``KeyedLock`` shares with every lease it grants (read-only)."""

    __slots__ = (
        "backend",
        "cancel_on_lost",
        "claim",
        "clock",
        "default_ttl",
        "free_release",
        "hooks",
        "inline",
        "mint",
        "needs_owner",
        "observer",
        "on_lost",
        "plain",
        "prefix",
        "release",
        "step",
    )

    claim: Callable[[str, _Entry], _Entry] | None
    mint: Callable[[], int]  # (read only when claim is set)
    free_release: FreeRelease | None

    def __init__(
        self,
        backend: Backend,
        *,
        namespace: str,
        observer: Observer | None,
        on_lost: LostCallback | None,
        cancel_on_lost: bool,
    ) -> None:
        self.backend = backend
        self.observer = observer
        #: the observer's acquire/release/timeout hooks, resolved once (None: it has none)
        self.hooks = BlockHooks.of(observer)
        self.on_lost = on_lost
        self.cancel_on_lost = cancel_on_lost
        #: True when the backend's step and release may run straight on an event loop
        self.inline = inline = backend.nonblocking_step
        #: the backend's step when it may run inline, else None (bound once, as release)
        self.step = backend._try_acquire if inline else None
        self.needs_owner = backend.needs_owner
        self.default_ttl = backend.default_ttl
        #: the step again, for the commonest case only (an in-process backend, no namespace,
        #: no owner ids, no default TTL: a plain ``locks(key)`` then needs nothing else)
        plain = inline and not backend.needs_owner and not namespace
        self.plain = backend._try_acquire if plain and backend.default_ttl is None else None
        #: for that same case on a MemoryBackend, its lock-free claim of a free key and the
        #: token counter (see ``MemoryBackend.free_claim``): the hold claims a free key without
        #: calling the step at all
        self.claim, self.mint = None, _no_claim
        if self.plain is not None and isinstance(backend, MemoryBackend) and backend.free_claim:
            self.claim, self.mint = backend.free_claim
        #: what keys are prefixed with: NUL never occurs in a key or a namespace, so
        #: "namespace NUL key" is unambiguous
        self.prefix = f"{namespace}\x00" if namespace else ""
        #: the backend's blocking release, bound once (the uncontended exit calls it)
        self.release = backend.release_sync
        #: a MemoryBackend's release done in a sync block's exit (see its ``free_release``)
        self.free_release = backend.free_release if isinstance(backend, MemoryBackend) else None
        self.clock: Clock = getattr(backend, "clock", SYSTEM_CLOCK)


def _no_claim() -> int:
    raise AssertionError("keylock: a token minted without a claim")  # (never: see claim)


def report(what: str, hook: Callable[[], object]) -> None:
    """Run a user hook; an exception is logged, never propagated (metrics and callbacks must
    not break locking, nor leak a grant)."""
    try:
        hook()
    except Exception:
        logger.exception("keylock: %s raised", what)


_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_mutex = threading.Lock()


def deliver(call: Callable[[], object], loop: asyncio.AbstractEventLoop | None) -> None:
    """Run *call* soon, on *loop* if it is open, else on keylock's callback thread. Returns at
    once; never raises."""
    global _executor
    if loop is not None:
        try:
            loop.call_soon_threadsafe(call)
            return
        except RuntimeError:  # the holder's loop is closed: its callback still runs, elsewhere
            pass
    with _executor_mutex:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="keylock-callbacks"
            )
        executor = _executor
    try:
        executor.submit(call)
    except RuntimeError:  # interpreter shutting down: run it here rather than drop it
        call()


def _after_fork_in_child() -> None:
    global _executor, _executor_mutex
    _executor = None  # its thread is the parent's
    _executor_mutex = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
