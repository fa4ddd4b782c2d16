"""keylock: per-key locks, leases with fencing tokens, and request coalescing.

In one process (the default), across processes on one host (``FileBackend``), and across hosts
(``RedisBackend``). See ``KeyedLock``, ``KeyedSemaphore``, ``KeyedRWLock``, ``SingleFlight``
and ``stale_guard``.
"""

from __future__ import annotations

import contextlib

from ._validate import MAX_KEY_LENGTH as MAX_KEY_LENGTH
from .backends.base import KeyStatistics as KeyStatistics
from .errors import BackendUnavailable as BackendUnavailable
from .errors import InvalidKey as InvalidKey
from .errors import KeylockError as KeylockError
from .errors import LeaseLost as LeaseLost
from .errors import LimitMismatch as LimitMismatch
from .errors import LockTimeout as LockTimeout
from .errors import StaleToken as StaleToken
from .errors import Superseded as Superseded
from .guard import SUPERSEDED as SUPERSEDED
from .guard import stale_guard as stale_guard
from .lease import Lease as Lease
from .observe import COUNTERS as COUNTERS
from .observe import Counters as Counters
from .observe import Observer as Observer
from .observe import PrefixStats as PrefixStats
from .observe import stats as stats
from .permits import KeyedRWLock as KeyedRWLock
from .permits import KeyedSemaphore as KeyedSemaphore
from .registry import KeyedLock as KeyedLock
from .singleflight import SingleFlight as SingleFlight

__version__ = "0.1.0"

__all__ = [
    "COUNTERS",
    "MAX_KEY_LENGTH",
    "SUPERSEDED",
    "BackendUnavailable",
    "Counters",
    "InvalidKey",
    "KeyStatistics",
    "KeyedLock",
    "KeyedRWLock",
    "KeyedSemaphore",
    "KeylockError",
    "Lease",
    "LeaseLost",
    "LimitMismatch",
    "LockTimeout",
    "Observer",
    "PrefixStats",
    "SingleFlight",
    "StaleToken",
    "Superseded",
    "stale_guard",
    "stats",
]

# Present the public classes as keylock.X in reprs, tracebacks and docs.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or callable(_obj):
        with contextlib.suppress(AttributeError, TypeError):
            _obj.__module__ = __name__
del _name, _obj
