"""Hand-offs: one pub/sub connection per backend, in a daemon thread, gives a released key
to the waiter it was handed to."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, NamedTuple

from ._flow import Handed

if TYPE_CHECKING:
    from collections.abc import Callable

    import redis.client

    from ..base import Waiter
    from ._clients import SyncClient
    from ._flow import AcquireFlow, ServerClock

__all__ = ["HandOff", "Listener", "Waiting", "parse_hand_off"]

logger = logging.getLogger("keylock")

OWNER_BYTES = 16  # owner ids are 128 bits


class HandOff(NamedTuple):
    """A release script handed *key* to the waiter *head* (see hand_off in _scripts)."""

    key: str
    head: bytes
    token: int
    granted_us: bytes  # the server's clock at the grant, µs
    claim: float  # seconds the key is the head's before it must be extended


def parse_hand_off(data: object) -> HandOff | None:
    """The hand-off in a message ``"<token> <granted µs> <claim ms> <head><key>"``, or None
    for anything else. The key comes last and is taken whole: it may contain NUL."""
    if isinstance(data, str):  # a client with decode_responses=True
        data = data.encode("utf-8", "surrogateescape")
    if not isinstance(data, bytes):
        return None
    fields = data.split(b" ", 3)
    if len(fields) != 4 or not (fields[0].isdigit() and fields[2].isdigit()):
        return None
    token, granted_us, claim_ms, rest = fields
    if len(rest) <= OWNER_BYTES:
        return None
    key = rest[OWNER_BYTES:].decode("utf-8", "surrogatepass")
    return HandOff(key, rest[:OWNER_BYTES], int(token), granted_us, int(claim_ms) / 1000)


class Listener:
    """Subscribes *client* to *channel* and passes each hand-off to *deliver* (on this thread:
    *deliver* must return at once); reconnects after an error, waiters meanwhile fall back to
    their safety-net poll."""

    def __init__(
        self, client: SyncClient, channel: str, deliver: Callable[[HandOff], None]
    ) -> None:
        self._client = client
        self._channel = channel
        self._deliver = deliver
        self.subscribed = threading.Event()
        self._stop = threading.Event()
        self._pubsub: redis.client.PubSub | None = None
        self._thread = threading.Thread(
            target=self._run, name="keylock-redis-listener", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            self._pubsub = pubsub
            try:
                pubsub.subscribe(self._channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is None:
                        if not self.subscribed.is_set() and pubsub.subscribed:
                            self.subscribed.set()
                        continue
                    self.subscribed.set()
                    hand_off = parse_hand_off(message.get("data"))
                    if hand_off is not None:
                        self._deliver(hand_off)
            except Exception as exc:
                self.subscribed.clear()
                if self._stop.is_set():
                    return
                logger.warning("keylock: Redis listener lost its connection (%s); retrying", exc)
                self._stop.wait(0.5)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()

    def stop(self) -> None:
        self._stop.set()
        # disconnecting wakes the thread from its blocking read (redis-py types it as None)
        disconnect = getattr(getattr(self._pubsub, "connection", None), "disconnect", None)
        if disconnect is not None:
            with contextlib.suppress(Exception):
                disconnect()
        if self._thread is not threading.current_thread():
            self._thread.join(2)


class Waiting:
    """This backend's callers queued on Redis, by key and owner, and the listener that hands
    them keys: a hand-off sets the waiter's flow's grant (dated by the server's clock) and
    wakes it. One listener (one pub/sub connection) per backend, started by the first wait."""

    def __init__(self, client: Callable[[], SyncClient], channel: str, clock: ServerClock) -> None:
        self._client = client
        self.channel = channel
        self._clock = clock
        self._mutex = threading.Lock()
        # guarded by _mutex: key -> owner -> its acquire, until it stops waiting
        self.waiters: dict[str, dict[bytes, tuple[AcquireFlow, Waiter]]] = {}
        self.listener: Listener | None = None

    def watch(self, flow: AcquireFlow, waiter: Waiter) -> Listener:
        """Have *waiter* woken when its key is handed to it; returns the listener."""
        with self._mutex:
            self.waiters.setdefault(flow.key, {})[flow.owner] = (flow, waiter)
            if self.listener is None:
                ref = weakref.ref(self)

                def deliver(hand_off: HandOff) -> None:
                    waiting = ref()
                    if waiting is not None:
                        waiting.deliver(hand_off)

                self.listener = Listener(self._client(), self.channel, deliver)
            return self.listener

    def unwatch(self, key: str, owner: bytes) -> None:
        with self._mutex:
            waiters = self.waiters.get(key)
            if waiters is not None:
                waiters.pop(owner, None)
                if not waiters:
                    del self.waiters[key]

    def count(self, key: str) -> int:
        with self._mutex:
            return len(self.waiters.get(key, ()))

    def subscribed(self) -> bool:
        listener = self.listener
        return listener is not None and listener.subscribed.is_set()

    def deliver(self, hand_off: HandOff) -> None:
        """On the listener thread: give the key to the waiter it was handed to."""
        with self._mutex:
            found = self.waiters.get(hand_off.key, {}).get(hand_off.head)
        if found is None:
            return
        flow, waiter = found
        now = time.time()
        expires_at = self._clock.handed_expiry(hand_off.granted_us, hand_off.claim, now)
        flow.handed = Handed(hand_off.token, expires_at, time.monotonic() + expires_at - now)
        waiter.wake()

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.stop()
