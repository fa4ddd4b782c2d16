"""The Postgres backend's background work: one LISTENing connection per process that wakes
the waiter a release handed the key to, and how the shared renewer
(:mod:`keylock.backends._renewer`) extends every due lease: one statement per wake-up."""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, cast

from ...errors import BackendUnavailable
from ._sql import stored
from ._wire import listen_connection

if TYPE_CHECKING:
    from .._renewer import Renewal
    from ._waiting import Waiting
    from .backend import PostgresBackend

__all__ = ["Listener", "renew_all"]

logger = logging.getLogger("keylock")

_NOTIFY_WAIT = 0.1  # seconds between checks of the stop flag while listening
_RECONNECT_PAUSE = 0.2  # after a lost listening connection (waiters poll meanwhile)


class Listener:
    """One session connection per backend and process, in a daemon thread: a NOTIFY on this
    process's channel names the owner id (hex) a release handed a key to; its waiter is woken.
    While the connection is down, waiters fall back to their safety-net poll; on reconnect
    every waiter tries once (a hand-off may have been missed)."""

    def __init__(self, waiting: Waiting) -> None:
        self._waiting = weakref.ref(waiting)
        self._conninfo, self._kwargs = waiting.conninfo, waiting.connect_kwargs
        self.channel = waiting.channel
        self.ready = threading.Event()  # LISTEN is in place
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="keylock-postgres-listener", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = listen_connection(self._conninfo, self._kwargs, self.channel)
            except Exception as exc:
                logger.warning("keylock: Postgres listener cannot connect (%s); retrying", exc)
                self._stop.wait(_RECONNECT_PAUSE)
                continue
            try:
                self.ready.set()
                waiting = self._waiting()
                if waiting is None:
                    return
                waiting.wake_all()
                del waiting
                while not self._stop.is_set():
                    for notify in conn.notifies(timeout=_NOTIFY_WAIT):
                        waiting = self._waiting()
                        if waiting is None:
                            return
                        waiting.woken(notify.payload)
                        del waiting
            except Exception as exc:
                if not self._stop.is_set():
                    logger.warning("keylock: Postgres listener lost its connection (%s)", exc)
                    self._stop.wait(_RECONNECT_PAUSE)
            finally:
                self.ready.clear()
                try:
                    conn.close()
                except Exception:
                    pass

    def stop(self) -> None:
        """Stop listening; the thread closes its connection within _NOTIFY_WAIT."""
        self._stop.set()


def renew_all(backend: PostgresBackend) -> Renewal:
    """A :data:`~keylock.backends._renewer.Renewal` for *backend*: every due lease of this
    process in one statement; True for each one still ours (and extended), False if not."""
    ref = weakref.ref(backend)

    def renew(batch: list[tuple[str, bytes, float]]) -> list[object]:
        found = ref()
        if found is None:
            return [BackendUnavailable("the backend was closed")] * len(batch)
        rows = found._run_sync(
            batch[0][0],
            found._permit_renew or found._schema.renew,
            [
                [stored(key) for key, _, _ in batch],
                [owner for _, owner, _ in batch],
                [max(int(ttl * 1000), 1) for _, _, ttl in batch],
            ],
        )
        renewed = {bytes(cast("bytes", row[0])) for row in rows}
        return [owner in renewed for _, owner, _ in batch]

    return renew
