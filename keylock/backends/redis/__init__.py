"""Leases across hosts on Redis (or Redis Cluster): :class:`RedisBackend`.

One module per job: ``_scripts`` (the Lua), ``_keys`` (the key layout), ``_wire`` (round trips
and the one error boundary), ``_clients`` (client derivation), ``_connections`` (a backend's
clients and wires), ``_flow`` (the acquire protocol's decisions, without I/O), ``_listener``
and ``_renewer`` (the two background threads), and ``backend`` (the backend, whose drivers
only call the wire and wait).
"""

from __future__ import annotations

from ._admin import force_release as force_release
from .backend import RedisBackend as RedisBackend

__all__ = ["RedisBackend", "force_release"]
