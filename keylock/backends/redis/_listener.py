"""Hand-offs: one pub/sub connection per backend, in a daemon thread, gives a released key
to the waiter it was handed to."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, NamedTuple, cast

import redis
import redis.client
import redis.cluster

from ._flow import Handed
from ._sentinel import close as close_sentinels
from ._sentinel import is_sentinel, own_twin
from ._wire import describe

if TYPE_CHECKING:
    from collections.abc import Callable

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


# After a lost connection the listener tries again after _FIRST_RETRY s, doubling the wait
# after each failed try up to _MAX_RETRY: an idle backend in a long outage costs one try every
# few seconds, not two a second (a waiter that needs the listener cuts the wait short).
_FIRST_RETRY = 0.25
_MAX_RETRY = 8.0


def _own_client(client: SyncClient) -> tuple[SyncClient, redis.ConnectionPool | None]:
    """A client for the listener's one connection, on a pool of its own when *client* has an
    ordinary pool or a Sentinel one: stop() closes that pool, and so reaches the connection
    even while it is being set up (a pool hands out a connection only once its handshake is
    done). Any other client (Cluster) is used as it is."""
    pool = getattr(client, "connection_pool", None)
    if is_sentinel(client):  # (every connection it opens finds the primary of the day)
        return own_twin(cast("redis.Redis", client))
    if type(pool) is not redis.ConnectionPool:
        return client, None
    own = redis.ConnectionPool(connection_class=pool.connection_class, **pool.connection_kwargs)
    return redis.Redis(connection_pool=own), own


class Listener:
    """Subscribes *client* to *channel* and passes each hand-off to *deliver* (on this thread:
    *deliver* must return at once); reconnects after an error, backing off, and logs an outage
    once (WARNING) and its end once (INFO). Waiters meanwhile fall back to their safety-net
    poll."""

    def __init__(
        self, client: SyncClient, channel: str, deliver: Callable[[HandOff], None], where: str
    ) -> None:
        self._client, self._pool = _own_client(client)
        self._channel = channel
        self._deliver = deliver
        self._where = where  # for messages: never a secret
        self.subscribed = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()  # ends a wait between tries: stop() or hurry()
        self._pubsub: redis.client.PubSub | None = None
        self._thread = threading.Thread(
            target=self._run, name="keylock-redis-listener", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        delay = _FIRST_RETRY
        lost_at: float | None = None  # time.monotonic() the outage began (None: no outage)
        tries = 0
        while not self._stop.is_set():
            pubsub = self._subscriber(tries)
            tries += 1
            self._pubsub = pubsub
            try:
                pubsub.subscribe(self._channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if not self.subscribed.is_set() and (message is not None or pubsub.subscribed):
                        self.subscribed.set()
                        if lost_at is not None:
                            logger.info(
                                "keylock: Redis listener reconnected to %s after %.1fs",
                                self._where,
                                time.monotonic() - lost_at,
                            )
                        lost_at, delay = None, _FIRST_RETRY
                    hand_off = None if message is None else parse_hand_off(message.get("data"))
                    if hand_off is not None:
                        self._deliver(hand_off)
            except Exception as exc:
                self.subscribed.clear()
                if self._stop.is_set():
                    return
                if lost_at is None:
                    lost_at = time.monotonic()
                    logger.warning(
                        "keylock: Redis listener lost its connection to %s (%s); waiters fall "
                        "back to polling until it is back",
                        self._where,
                        describe(exc),
                    )
                else:
                    logger.debug("keylock: Redis listener still cannot connect: %s", describe(exc))
                self._wake.clear()
                self._wake.wait(delay)
                delay = min(delay * 2, _MAX_RETRY)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()

    def _subscriber(self, tries: int) -> redis.client.PubSub:
        """A pub/sub connection for the next try. On a Cluster, a classic PUBLISH reaches
        every node (replicas too), so any node will do: the first try takes the node of the
        channel's slot, each later one the next node of a freshly read slot map. The node of
        a dead primary stays in the client's map until something refreshes it, and a
        listener that kept going back to it would never hear a hand-off again."""
        client = self._client
        if not isinstance(client, redis.cluster.RedisCluster) or tries == 0:
            pubsub: redis.client.PubSub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            return pubsub
        with contextlib.suppress(Exception):  # (the cluster may be mid-failover: try anyway)
            client.nodes_manager.initialize()
        nodes = client.get_nodes()  # type: ignore[no-untyped-call]
        node = nodes[tries % len(nodes)] if nodes else None
        pubsub = client.pubsub(node=node, ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        return pubsub

    def hurry(self) -> None:
        """Try to reconnect now, if waiting to: a waiter needs hand-offs."""
        if not self.subscribed.is_set():
            self._wake.set()

    def stop(self) -> None:
        """Stop the thread, within a second even if the server never answers."""
        self._stop.set()
        self._wake.set()
        # closing the connection wakes the thread from its blocking read or handshake
        if self._pool is not None:
            with contextlib.suppress(Exception):
                self._pool.disconnect()
                close_sentinels(self._client)
        # (redis-py types PubSub.connection as None)
        disconnect = getattr(getattr(self._pubsub, "connection", None), "disconnect", None)
        if disconnect is not None:
            with contextlib.suppress(Exception):
                disconnect()
        if self._thread is not threading.current_thread():
            self._thread.join(1.0)


class Waiting:
    """This backend's callers queued on Redis, by key and owner, and the listener that hands
    them keys: a hand-off sets the waiter's flow's grant (dated by the server's clock) and
    wakes it. One listener (one pub/sub connection) per backend, started by the first wait."""

    def __init__(
        self, client: Callable[[], SyncClient], channel: str, clock: ServerClock, where: str
    ) -> None:
        self._client = client
        self._where = where
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

                self.listener = Listener(self._client(), self.channel, deliver, self._where)
            else:
                self.listener.hurry()
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

    def hurry(self) -> None:
        """Have a listener that lost its connection try again now (a waiter needs it)."""
        listener = self.listener
        if listener is not None:
            listener.hurry()

    def deliver(self, hand_off: HandOff) -> None:
        """On the listener thread: give the key to the waiter it was handed to."""
        with self._mutex:
            found = self.waiters.get(hand_off.key, {}).get(hand_off.head)
        if found is None:
            return
        flow, waiter = found
        # the monotonic clock first: a stall between the two readings (this thread waiting for
        # the GIL on a loaded host) then dates the claim window's end earlier, never later
        mono = time.monotonic()
        now = time.time()
        expires_at = self._clock.handed_expiry(hand_off.granted_us, hand_off.claim, now)
        flow.handed = Handed(hand_off.token, expires_at, mono + expires_at - now)
        waiter.wake()

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.stop()
