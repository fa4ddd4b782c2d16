"""A script and a keyless command after it (``WAIT``) on one connection of the Cluster node
that owns the script's slot: what ``replicas=N`` needs on a Cluster.

WAIT counts the writes of its own connection, and a Cluster client routes a keyless command
to any node, so these calls go to the slot's primary directly, in one write. The client's
slot map is refreshed after a redirection (MOVED, ASK), a cluster in failover (CLUSTERDOWN,
TRYAGAIN) or a connection error, and the call is tried again on the node the map then names,
at most ``ATTEMPTS`` times in all (every script is safe to run twice: they compare the owner
first); then the last error is raised, for :func:`~._wire.map_errors` to report.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from redis.asyncio.cluster import PipelineCommand
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from collections.abc import Sequence

    import redis
    import redis.asyncio.cluster
    import redis.cluster

    from ._scripts import Script
    from ._wire import Arg

    Calls = Sequence[tuple[Sequence[str], Sequence[Arg]]]

__all__ = ["ATTEMPTS", "call_many_then", "call_many_then_async"]

ATTEMPTS = 4  # a failover's redirections settle in one or two
_ELSEWHERE = (MovedError, AskError, ClusterDownError, TryAgainError, SlotNotCoveredError)
_LINK = (RedisConnectionError, RedisTimeoutError, OSError)
_SETTLE = 0.05  # between tries after CLUSTERDOWN/TRYAGAIN: the election is under way


def _commands(command: str, body: str, calls: Calls, then: Sequence[Arg]) -> list[tuple[Arg, ...]]:
    out: list[tuple[Arg, ...]] = [(command, body, len(keys), *keys, *args) for keys, args in calls]
    out.append(tuple(then))
    return out


def _redirected(replies: list[object]) -> Exception | None:
    """The first reply saying the slot lives elsewhere (or nowhere, for now), if any."""
    return next((r for r in replies if isinstance(r, _ELSEWHERE)), None)


def call_many_then(
    client: redis.cluster.RedisCluster, script: Script, calls: Calls, then: Sequence[Arg]
) -> list[object]:
    """Each call's reply (or its ResponseError), then *then*'s reply: calls grouped by the
    node of their slot, one write per node. *then*'s reply is the smallest of the nodes'
    (WAIT: the fewest replicas any node had); a node that failed gives its calls its error."""
    replies: list[object] = [None] * len(calls)
    groups: dict[str, list[int]] = {}
    for n, (keys, _) in enumerate(calls):
        node = client.get_node_from_key(keys[0])  # type: ignore[no-untyped-call]
        groups.setdefault(node.name, []).append(n)
    afters: list[object] = []
    for indexes in groups.values():
        try:
            got = _on_its_node(client, script, [calls[n] for n in indexes], then)
        except Exception as exc:  # (redis-py's, or a socket's: map_errors reports them)
            if len(groups) == 1:
                raise
            got = [exc] * len(indexes)
        else:
            afters.append(got.pop())
        for n, reply in zip(indexes, got, strict=True):
            replies[n] = reply
    numbers = [after for after in afters if isinstance(after, int)]
    replies.append(min(numbers) if numbers else 0)
    return replies


def _on_its_node(
    client: redis.cluster.RedisCluster, script: Script, calls: Calls, then: Sequence[Arg]
) -> list[object]:
    for attempt in range(1, ATTEMPTS + 1):
        node = client.get_node_from_key(calls[0][0][0])  # type: ignore[no-untyped-call]
        try:
            replies = _exchange(client.get_redis_connection(node), script, calls, then)
        except _LINK:
            _refresh(client)
            if attempt == ATTEMPTS:
                raise
            continue
        elsewhere = _redirected(replies)
        if elsewhere is None:
            return replies
        _refresh(client)
        if attempt == ATTEMPTS:
            raise elsewhere
        if not isinstance(elsewhere, MovedError | AskError):
            time.sleep(_SETTLE)
    raise AssertionError("unreachable")  # pragma: no cover


def _exchange(node: redis.Redis, script: Script, calls: Calls, then: Sequence[Arg]) -> list[object]:
    replies: list[object] = []
    for command, body in (("EVALSHA", script.sha), ("EVAL", script.text)):
        pipe = node.pipeline(transaction=False)
        for args in _commands(command, body, calls, then):
            pipe.execute_command(*args)  # type: ignore[no-untyped-call]
        replies = list(pipe.execute(raise_on_error=False))
        if not any(isinstance(reply, NoScriptError) for reply in replies):
            break  # (a new or flushed node: the text once, for every call, then WAIT again)
    return replies


def _refresh(client: redis.cluster.RedisCluster) -> None:
    try:
        client.nodes_manager.initialize()
    except Exception:  # (no node answers yet: the next try says so)
        return


async def call_many_then_async(
    client: redis.asyncio.cluster.RedisCluster, script: Script, calls: Calls, then: Sequence[Arg]
) -> list[object]:
    """:func:`call_many_then` for an async Cluster client, for calls on one slot."""
    await client.initialize()  # (a new client reads its slot map at its first command)
    for attempt in range(1, ATTEMPTS + 1):
        node = client.get_node_from_key(calls[0][0][0])
        if node is None:
            raise SlotNotCoveredError(f"no node serves the slot of {calls[0][0][0]!r}")
        try:
            replies = await _exchange_async(node, script, calls, then)
        except _LINK:
            await _refresh_async(client)
            if attempt == ATTEMPTS:
                raise
            continue
        failed = next((r for r in replies if isinstance(r, _LINK)), None)
        elsewhere = failed or _redirected(replies)
        if elsewhere is None:
            return replies
        await _refresh_async(client)
        if attempt == ATTEMPTS:
            raise elsewhere
        if not isinstance(elsewhere, MovedError | AskError):
            await asyncio.sleep(_SETTLE)
    raise AssertionError("unreachable")  # pragma: no cover


async def _exchange_async(
    node: redis.asyncio.cluster.ClusterNode, script: Script, calls: Calls, then: Sequence[Arg]
) -> list[object]:
    replies: list[object] = []
    for command, body in (("EVALSHA", script.sha), ("EVAL", script.text)):
        sent = _commands(command, body, calls, then)
        commands = [PipelineCommand(n, *args) for n, args in enumerate(sent)]
        await node.execute_pipeline(commands)
        replies = [cmd.result for cmd in commands]
        if not any(isinstance(reply, NoScriptError) for reply in replies):
            break
    return replies


async def _refresh_async(client: redis.asyncio.cluster.RedisCluster) -> None:
    try:
        await client.nodes_manager.initialize()
    except Exception:
        return
