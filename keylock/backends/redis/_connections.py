"""A backend's connections: its sync client and wire (threads), an async client and wire per
event loop, and the calls that must run to their end (a release whose caller was cancelled)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Protocol

import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import RedisError

from . import _sentinel
from ._async_wire import AsyncWire
from ._clients import AsyncClient, SyncClient, address, async_from, raw, raw_async, sync_from
from ._wire import FAILURES, SyncWire, in_background, unavailable

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence

    from ...errors import BackendUnavailable
    from ._scripts import Script
    from ._wire import Arg

    Finish = Callable[[], Coroutine[object, object, object]]  # a call that must run to its end

__all__ = ["GIVE_UP_WAIT", "Connections", "closed_check"]

logger = logging.getLogger("keylock")

ClusterClient = redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster


# A caller that gives up (timeout, cancel, error) waits this long for its LEAVE to land, then
# goes on while the LEAVE finishes alone: on a link that drops everything, giving up must not
# cost another socket timeout.
GIVE_UP_WAIT = 0.25


def _never_closed(key: str) -> None:
    return None


class _Closable(Protocol):
    _shut: bool

    def _closed_error(self, key: str) -> BackendUnavailable: ...


def closed_check(owner: _Closable) -> Callable[[str], BackendUnavailable | None]:
    """*owner*'s closed error of a key once it is closed, else None (held weakly: connections
    must not keep their backend alive, or it would never warn when collected unclosed)."""
    ref = weakref.ref(owner)

    def check(key: str) -> BackendUnavailable | None:
        found = ref()
        return found._closed_error(key) if found is not None and found._shut else None

    return check


class Connections:
    """A backend's clients and wires: the sync ones (threads), and an async client and wire
    per event loop (redis.asyncio connections belong to the loop that made them). Every
    script call goes through :meth:`run_sync` / :meth:`run`, inside the one error boundary."""

    def __init__(
        self,
        client: SyncClient | None,
        async_client: AsyncClient | None,
        url: str | None = None,
        options: dict[str, object] | None = None,
    ) -> None:
        self._given = [given for given in (client, async_client) if given is not None]
        self.client = None if client is None else raw(client)
        self.async_client = None if async_client is None else raw_async(async_client)
        self.url = url
        self.options = options or {}
        self.where = address(client or async_client)  # for messages: never a secret
        self.cluster = isinstance(client or async_client, ClusterClient)
        self._async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncClient]
        self._async_clients = weakref.WeakKeyDictionary()
        self._numbers = itertools.count()
        # the owner's closed error of a key once it is closed, else None: a call the close cut
        # off says what a call after close says (the owner holds the one closed flag)
        self.if_closed: Callable[[str], BackendUnavailable | None] = _never_closed
        self.restart()

    def restart(self) -> None:
        """Forget every connection (in a forked child: their sockets are the parent's)."""
        self._wire: SyncWire | None = None
        self._async_wires: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncWire]
        self._async_wires = weakref.WeakKeyDictionary()
        self._async_clients.clear()
        self._loop_ends: dict[asyncio.AbstractEventLoop, AsyncGenerator[None]] = {}
        self._unfinished: dict[asyncio.AbstractEventLoop, dict[int, Finish]] = {}
        self._leaving: set[threading.Thread] = set()  # LEAVEs of sync callers that gave up
        self._left: set[asyncio.Future[object]] = set()  # ... of async ones, until done
        self._finishing: set[asyncio.Future[object]] = set()  # releases of cancelled callers

    def sync(self) -> SyncClient:
        if self.client is None:
            self.client = sync_from(self.async_client)  # type: ignore[arg-type]
        return self.client

    def async_(self) -> AsyncClient:
        """The async client for the running event loop."""
        if self.async_client is not None:
            return self.async_client
        loop = asyncio.get_running_loop()
        client = self._async_clients.get(loop)
        if client is None:
            options = {**self.options, "decode_responses": False}  # (see raw)
            client = self._async_clients[loop] = async_from(self.sync(), self.url, options)
            self._watch(loop)
        return client

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Have *loop*'s connections closed when it shuts down (asyncio.run closes every
        async generator then, while the loop still runs): a loop that ends must not leave
        its sockets open for the life of the process."""
        if loop in self._loop_ends:
            return
        ending = self._loop_ends[loop] = self._until_loop_ends(loop)
        # asend() registers the generator with the loop's hooks; send() runs it to its yield
        with contextlib.suppress(StopIteration):
            ending.asend(None).send(None)

    async def _until_loop_ends(self, loop: asyncio.AbstractEventLoop) -> AsyncGenerator[None]:
        try:
            yield
        finally:
            await self._close_loop(loop)

    def finish(self, call: Finish) -> None:
        """Run *call()* to its end in the background, even through a cancel: asyncio.run
        cancels every task at shutdown, and then the loop's end runs a cancelled one again
        (so must close(): the call must be safe to run twice)."""
        loop = asyncio.get_running_loop()
        self._watch(loop)
        unfinished = self._unfinished.setdefault(loop, {})
        number = next(self._numbers)
        unfinished[number] = call

        def done(task: asyncio.Future[object]) -> None:
            self._finishing.discard(task)
            if not task.cancelled():
                unfinished.pop(number, None)

        task = in_background(call(), "finishing a cancelled call failed")
        self._finishing.add(task)
        task.add_done_callback(done)

    async def _close_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Finish the calls cancelled on *loop* (the running one), then close its
        connections."""
        unfinished = self._unfinished.pop(loop, {})
        while unfinished:  # a first run that ends meanwhile drops itself: take one at a time
            call = unfinished.pop(next(iter(unfinished)))  # in the order they were cancelled
            try:
                await call()
            except Exception as exc:  # (BackendUnavailable: the server is out of reach)
                logger.warning("keylock: finishing a cancelled call failed: %s", exc)
        self._loop_ends.pop(loop, None)
        wire = self._async_wires.pop(loop, None)
        client = self._async_clients.pop(loop, None)
        try:
            if wire is not None:
                await wire.close()
            if client is not None:
                await client.aclose()
                await _sentinel.aclose(client)
        except (RedisError, OSError) as exc:
            logger.debug("keylock: closing an event loop's Redis connections failed: %s", exc)

    def wire(self) -> SyncWire:
        wire = self._wire
        if wire is None:
            wire = self._wire = SyncWire(self.sync())
        return wire

    def run_sync(
        self,
        script: Script,
        key: str,
        keys: Sequence[str],
        args: Sequence[Arg],
        bound: float | None,
        then: Sequence[Arg] | None = None,
    ) -> object:
        try:  # (the error boundary, inline: map_errors costs a generator per call)
            return self.wire().call(script, keys, args, bound, then)
        except FAILURES as exc:
            raise self.if_closed(key) or unavailable(key, self.where, exc) from exc

    async def run(
        self,
        script: Script,
        key: str,
        keys: Sequence[str],
        args: Sequence[Arg],
        bound: float | None,
        then: Sequence[Arg] | None = None,
    ) -> object:
        loop = asyncio.get_running_loop()
        wire = self._async_wires.get(loop)
        if wire is None:
            wire = self._async_wires[loop] = AsyncWire(self.async_())
            self._watch(loop)
        task = asyncio.current_task(loop)  # (given the loop: no second lookup of it)
        cancels = 0 if task is None else task.cancelling()
        try:  # (the error boundary, inline as in run_sync)
            reply = await wire.call(script, keys, args, bound, then)
        except FAILURES as exc:
            raise self.if_closed(key) or unavailable(key, self.where, exc) from exc
        if task is not None and task.cancelling() > cancels:
            # Python 3.11's wait_for (inside redis-py's send) swallows a cancel that lands as
            # the send completes: honour it, so a cancelled caller never walks off with a lease
            raise asyncio.CancelledError
        return reply

    def leave_sync(
        self, leave: Script, key: str, keys: list[str], args: list[Arg], in_flight: bool
    ) -> None:
        """Run LEAVE for a sync caller that gave up. With a call in flight the link may be
        what failed: it runs in a thread of its own, waited for GIVE_UP_WAIT at most."""
        if not in_flight:
            self._leave_quietly(leave, key, keys, args, GIVE_UP_WAIT)
            return
        thread = threading.Thread(
            target=self._leave_quietly, args=(leave, key, keys, args), daemon=True
        )
        self._leaving.add(thread)
        thread.start()
        thread.join(GIVE_UP_WAIT)

    async def leave(self, leave: Script, key: str, keys: list[str], args: list[Arg]) -> None:
        """Run LEAVE for an async caller that gave up, waited for GIVE_UP_WAIT at most (the
        link may be what failed); then it goes on alone until it lands or close() ends it."""
        call = self.run(leave, key, keys, args, None)
        task = in_background(call, f"leaving the line for {key!r} failed", logging.DEBUG)
        self._left.add(task)
        task.add_done_callback(self._left.discard)
        await asyncio.wait({task}, timeout=GIVE_UP_WAIT)

    def _leave_quietly(
        self, leave: Script, key: str, keys: list[str], args: list[Arg], bound: float | None = None
    ) -> None:
        """A failed LEAVE only costs the place in line its stay."""
        try:
            self.run_sync(leave, key, keys, args, bound)
        except Exception as exc:  # (also: the backend closed under a LEAVE left to finish)
            logger.debug("keylock: leaving the line for %r failed: %s", key, exc)
        finally:
            self._leaving.discard(threading.current_thread())

    async def settle(self) -> None:
        """Let this loop's background calls land before closing: releases of cancelled
        callers (up to 5 s: skipping one would strand its key), and LEAVEs of callers that
        gave up (GIVE_UP_WAIT, then ended: a LEAVE lost only costs a place in line its stay,
        and on a server that never answers it would hold close() for the socket timeout)."""
        loop = asyncio.get_running_loop()
        releases = [task for task in self._finishing if task.get_loop() is loop]
        if releases:
            await asyncio.wait(releases, timeout=5)
        leaves = [task for task in self._left if task.get_loop() is loop]
        if leaves:
            await asyncio.wait(leaves, timeout=GIVE_UP_WAIT)
            for task in leaves:
                task.cancel()

    def close_sync(self) -> None:
        """Close the sync connections, after the LEAVEs of callers that gave up had
        GIVE_UP_WAIT to land (closing ends those that had not)."""
        ends = time.monotonic() + GIVE_UP_WAIT
        for thread in list(self._leaving):
            thread.join(max(ends - time.monotonic(), 0.0))
        wire, self._wire = self._wire, None  # (a call after close gets a new wire)
        if wire is not None:
            wire.close()
        if self.client is not None:
            self.client.close()
            _sentinel.close(self.client)
        for given in self._given:  # a decoding client the user gave, beside its raw twin
            if isinstance(given, SyncClient) and given is not self.client:
                given.close()
                _sentinel.close(given)

    async def close(self) -> None:
        """Close the sync connections and those of the running loop (other loops'
        connections can only be dropped, not closed)."""
        self.close_sync()
        await self._close_loop(asyncio.get_running_loop())
        for client in list(self._async_clients.values()):
            await client.aclose()
            await _sentinel.aclose(client)
        if self.async_client is not None:
            await self.async_client.aclose()
            await _sentinel.aclose(self.async_client)
        for given in self._given:
            if isinstance(given, AsyncClient) and given is not self.async_client:
                await given.aclose()
                await _sentinel.aclose(given)
