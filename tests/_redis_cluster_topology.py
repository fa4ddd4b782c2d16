"""A real Redis Cluster with replicas (3 primaries, 3 replicas) on loopback, and its faults.

Built with cluster commands alone (ADDSLOTSRANGE, MEET, REPLICATE) from the server binary of
``tests/_redis_server.py``. A small ``cluster-node-timeout`` keeps a failover after a kill
near a second; ``CLUSTER FAILOVER`` (graceful: the replica catches up first, no write lost)
takes a fraction of that. Every wait is a bounded poll that names what it waited for.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis
from redis.crc import key_slot

from ._redis_server import Server, free_ports

__all__ = ["NODE_TIMEOUT_MS", "ReplicatedCluster", "Shard", "running_replicated_cluster"]

NODE_TIMEOUT_MS = 500  # how long a silent node takes to be flagged failing
_BOUNDS = (0, 5461, 10923, 16384)  # three slot ranges, one per shard


def _poll(what: str, ready: Callable[[], bool], within: float = 20.0) -> None:
    """Until *ready()* (connection errors count as not yet), at most *within* seconds."""
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(redis.RedisError, OSError):
            if ready():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the test Redis Cluster: {what} did not happen in {within} s")
        time.sleep(0.02)


@dataclass
class Shard:
    """One slot range, its primary and its replica, as the cluster last said."""

    first_slot: int
    primary: Server
    replica: Server


class ReplicatedCluster:
    """Six cluster nodes: three primaries sharing the slots, each with one replica."""

    def __init__(self, *, node_timeout_ms: int = NODE_TIMEOUT_MS) -> None:
        ports = free_ports(12)
        self.host = "127.0.0.1"
        self.nodes = [
            Server(
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{n}.conf",
                "--cluster-port",
                str(bus_port),
                "--cluster-node-timeout",
                str(node_timeout_ms),
                # a replica may take over however long it was cut off: a test kills at will
                "--cluster-replica-validity-factor",
                "0",
                # a replica (new, or a killed primary back) syncs at once, not 5 s later
                "--repl-diskless-sync-delay",
                "0",
                port=port,
            )
            for n, (port, bus_port) in enumerate(zip(ports[:6], ports[6:], strict=True))
        ]
        self._ids: dict[int, str] = {}  # port -> node id
        self.down: set[int] = set()  # ports of nodes killed and not yet back
        self.paused: set[int] = set()  # ports of nodes stopped (SIGSTOP) and not yet resumed
        self.failovers = 0

    # ------------------------------------------------------------------------------ set-up

    @property
    def url(self) -> str:
        """A URL of a node that is up (a Cluster client finds the others)."""
        return f"redis://{self.host}:{self._up().port}/0"

    def _up(self) -> Server:
        return next(n for n in self.nodes if n.port not in self.down | self.paused)

    def client(self, node: Server) -> redis.Redis:
        return redis.Redis(self.host, node.port, socket_timeout=2, decode_responses=True)

    def _call(self, node: Server, *command: object) -> object:
        with contextlib.closing(self.client(node)) as client:
            return client.execute_command(*command)  # type: ignore[no-untyped-call]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            self._ids[node.port] = str(self._call(node, "CLUSTER MYID"))
        first = self.nodes[0]
        for n, node in enumerate(self.nodes[:3]):
            self._call(node, "CLUSTER ADDSLOTSRANGE", _BOUNDS[n], _BOUNDS[n + 1] - 1)
        for node in self.nodes[1:]:
            bus_port = int(node._options[node._options.index("--cluster-port") + 1])
            self._call(first, "CLUSTER MEET", self.host, node.port, bus_port)
        _poll("every node meeting the others", lambda: self._all_known(6), within=30)
        for primary, replica in zip(self.nodes[:3], self.nodes[3:], strict=True):
            self._call(replica, "CLUSTER REPLICATE", self._ids[primary.port])
        self.wait_healthy()

    def _all_known(self, count: int) -> bool:
        for node in self.nodes:
            nodes = self._nodes(node)
            if len(nodes) != count or any("handshake" in str(n["flags"]) for n in nodes.values()):
                return False
        return True

    def _nodes(self, node: Server) -> dict[str, dict[str, object]]:
        """CLUSTER NODES as *node* sees them, by address (redis-py parses the reply)."""
        nodes = self._call(node, "CLUSTER NODES")
        assert isinstance(nodes, dict)
        return nodes

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
            shutil.rmtree(node._dir, ignore_errors=True)

    def flush(self) -> None:
        for shard in self.shards():
            with contextlib.closing(self.client(shard.primary)) as client:
                client.flushall()
        for shard in self.shards():  # the replicas follow before a test reads them
            self._synced(shard)

    # ------------------------------------------------------------------------ what it is

    def _node(self, port: int) -> Server:
        return next(node for node in self.nodes if node.port == port)

    def shards(self) -> list[Shard]:
        """Each slot range with its primary and replica, as a node that is up sees them."""
        up = self._up()
        primaries: dict[str, tuple[int, Server]] = {}
        replicas: dict[str, Server] = {}
        for address, seen in self._nodes(up).items():
            node = self._node(int(address.rsplit(":", 1)[1]))
            flags, slots = str(seen["flags"]), seen["slots"]
            if "master" in flags and isinstance(slots, list) and slots:
                primaries[str(seen["node_id"])] = int(slots[0][0]), node
            elif "slave" in flags:
                replicas[str(seen["master_id"])] = node
        shards = [
            Shard(first, primary, replicas[node_id])
            for node_id, (first, primary) in primaries.items()
            if node_id in replicas
        ]
        return sorted(shards, key=lambda shard: shard.first_slot)

    def lock_keys_on(self, shard: Shard, count: int, prefix: str = "keylock") -> list[str]:
        """*count* lock keys whose Redis keys (``prefix:{key}``) live on *shard*."""
        last = next((s.first_slot for s in self.shards() if s.first_slot > shard.first_slot), 16384)
        found = []
        for n in itertools.count():
            if shard.first_slot <= key_slot(f"{prefix}:{{k{n}}}".encode()) < last:
                found.append(f"k{n}")
                if len(found) == count:
                    return found
        raise AssertionError("unreachable")  # pragma: no cover

    def shard_of(self, key: str) -> Shard:
        """The shard whose slot range holds the Redis key *key*."""
        slot = key_slot(key.encode())
        return next(s for s in reversed(self.shards()) if s.first_slot <= slot)

    def _role(self, node: Server) -> str:
        return str(self._call(node, "ROLE")[0])  # type: ignore[index]

    def _synced(self, shard: Shard) -> bool:
        """Whether the replica's link is up as both ends see it (the primary counts it for
        WAIT only once its first sync is over: ``state=online``)."""
        info = self._call(shard.replica, "INFO", "replication")
        primary = self._call(shard.primary, "INFO", "replication")
        assert isinstance(info, dict)
        assert isinstance(primary, dict)
        seen = primary.get("slave0")
        return (
            info.get("master_link_status") == "up"
            and isinstance(seen, dict)
            and seen.get("state") == "online"
            and int(seen.get("port", 0)) == shard.replica.port
        )

    # ----------------------------------------------------------------------------- waits

    def wait_healthy(self, within: float = 30.0) -> None:
        """Until every node is up, agrees the cluster is ``ok``, and every shard has a
        replica in sync with its primary."""
        self.wait_ok(within)
        _poll(
            "three shards, each with a replica in sync",
            lambda: len(shards := self.shards()) == 3 and all(map(self._synced, shards)),
            within,
        )

    def wait_ok(self, within: float = 30.0) -> None:
        """Until every node that is up says ``cluster_state:ok``."""

        def ok() -> bool:
            for node in self.nodes:
                if node.port in self.down:
                    continue
                info = self._call(node, "CLUSTER INFO")
                if not isinstance(info, dict) or info.get("cluster_state") != "ok":
                    return False
            return True

        _poll("cluster_state ok on every node up", ok, within)

    def _wait_promoted(self, node: Server, within: float) -> None:
        """Until *node* is a primary and every node up sees it as one."""

        def promoted() -> bool:
            if self._role(node) != "master":
                return False
            wanted = self._ids[node.port]
            for other in self.nodes:
                if other.port in self.down:
                    continue
                seen = self._nodes(other)
                if not any(
                    n["node_id"] == wanted and "master" in str(n["flags"]) for n in seen.values()
                ):
                    return False
            return True

        _poll(f"promotion of the replica on port {node.port}", promoted, within)

    # ----------------------------------------------------------------------------- faults

    def failover(self, shard: Shard, *, within: float = 20.0) -> Server:
        """``CLUSTER FAILOVER`` on *shard*'s replica (graceful: it catches up with the
        primary first, so no acknowledged write is lost); returns the new primary once every
        node sees it and the cluster is ok."""
        self._call(shard.replica, "CLUSTER FAILOVER")
        self._wait_promoted(shard.replica, within)
        self.wait_ok(within)
        self.failovers += 1
        return shard.replica

    def kill_primary(self, shard: Shard, *, within: float = 20.0) -> Server:
        """SIGKILL *shard*'s primary (writes not yet copied to its replica are lost); returns
        the replica once it was elected in its place and the cluster is ok again. The dead
        node stays down until :meth:`revive`."""
        shard.primary.stop()
        self.down.add(shard.primary.port)
        self._wait_promoted(shard.replica, within)
        self.wait_ok(within)
        self.failovers += 1
        return shard.replica

    def pause(self, node: Server) -> None:
        """SIGSTOP *node*: it holds what it has, answers nothing, and copies nothing."""
        assert node._proc is not None
        os.kill(node._proc.pid, signal.SIGSTOP)
        self.paused.add(node.port)

    def resume(self, node: Server) -> None:
        assert node._proc is not None
        os.kill(node._proc.pid, signal.SIGCONT)
        self.paused.discard(node.port)

    def kill_primary_while_replica_lags(
        self, shard: Shard, lagging: Callable[[], None], *, within: float = 20.0
    ) -> Server:
        """The unsafe failover: *shard*'s replica is paused and cut off from its primary
        while *lagging()* runs (what the primary accepts then is not copied: a pause alone
        would not do, the copy would wait in the replica's socket), the primary is killed, the
        replica resumes and is elected with none of it. Returns the new primary once the
        cluster is ok."""
        self.pause(shard.replica)
        try:
            self._call(shard.primary, "CLIENT", "KILL", "TYPE", "replica")
            lagging()
            shard.primary.stop()
            self.down.add(shard.primary.port)
        finally:
            self.resume(shard.replica)
        self._wait_promoted(shard.replica, within)
        self.wait_ok(within)
        self.failovers += 1
        return shard.replica

    def revive(self, within: float = 30.0) -> None:
        """Start every killed node again (empty: it rejoins from its nodes.conf as a replica
        of the node that took its place) and wait until every shard has a synced replica."""
        for port in sorted(self.down):
            self._node(port).start()
        self.down.clear()
        self.wait_healthy(within)


@contextlib.contextmanager
def running_replicated_cluster(**options: int) -> Iterator[ReplicatedCluster]:
    cluster = ReplicatedCluster(**options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
