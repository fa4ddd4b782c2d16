"""Replicated Redis topologies for the tests, started by the tests themselves on loopback.

:class:`SentinelTopology`: one primary, one replica (or more) and three Sentinels
(``valkey-server --sentinel``), all from the same binary as tests/_redis_server.py. The API a
failover test needs: ``start()``/``stop()``, ``kill_primary()``, ``wait_for_promotion()``,
``restore()`` (the killed node back as a replica, known to every Sentinel), ``kill_replica()``,
``pause_replicas()``/``resume_replicas()`` (replication cut: the next writes are lost in a
failover), ``wait_synced()``. Every wait is a bounded poll of a condition, never a sleep.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis

from ._redis_server import Server, free_ports, server_binary

__all__ = ["SentinelNode", "SentinelTopology", "poll", "running_sentinel_topology"]

SERVICE = "keylock"
# every data server: a full sync without waiting for more replicas; DEBUG SLEEP (to stall a
# replica) allowed
_FAST = ("--repl-diskless-sync-delay", "0", "--enable-debug-command", "yes")


def poll(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Until *condition()* is true (errors count as false), at most *timeout* seconds, else
    RuntimeError naming *what*."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.RedisError, OSError):
            if condition():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"test topology: {what} within {timeout} s")
        time.sleep(0.02)


def _client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)


class SentinelNode:
    """One Sentinel process monitoring *service* on the primary at *primary_port*."""

    def __init__(self, port: int, primary_port: int, *, down_after_ms: int, failover_ms: int):
        self.port = port
        self._dir = tempfile.mkdtemp(prefix="keylock-sentinel-")
        self.config = Path(self._dir) / "sentinel.conf"
        self.log = Path(self._dir) / "sentinel.log"  # (a failed test can show it)
        self.config.write_text(
            f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {self._dir}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}\n"
            f"sentinel failover-timeout {SERVICE} {failover_ms}\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [server_binary(), str(self.config), "--sentinel", "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        poll(lambda: _client(self.port).ping(), 20, f"Sentinel on port {self.port} started")

    def client(self) -> redis.Redis:
        return _client(self.port)

    def master(self) -> dict[str, object]:
        state: dict[str, object] = self.client().sentinel_master(SERVICE)  # type: ignore[no-untyped-call]
        return state

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            self._proc = None
        shutil.rmtree(self._dir, ignore_errors=True)


class SentinelTopology:
    """A primary, *replicas* replicas and three Sentinels (quorum 2) on loopback; a failover
    takes about ``down_after_ms`` plus an election (Sentinels start theirs up to 1 s apart):
    2-3 s here. (200 ms made Sentinels on a busy 2-core VM find each new primary "down"
    before their links to it were up, and fail over again and again: 500 ms is the default.)
    With ``sentinels=0``, a primary and its replicas alone (no failover)."""

    def __init__(
        self,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        down_after_ms: int = 500,
        failover_ms: int = 1000,
    ) -> None:
        ports = free_ports(1 + replicas + sentinels)
        self.service = SERVICE
        self.servers: dict[int, Server] = {ports[0]: Server(*_FAST, port=ports[0])}
        for port in ports[1 : 1 + replicas]:
            self.servers[port] = Server(*self._replica_of(ports[0]), port=port)
        self.primary_port = ports[0]
        self.sentinels = [
            SentinelNode(port, ports[0], down_after_ms=down_after_ms, failover_ms=failover_ms)
            for port in ports[1 + replicas :]
        ]
        self.down: set[int] = set()  # ports of killed servers
        self._watched = False  # the Sentinels run (and name the primary)

    @staticmethod
    def _replica_of(port: int) -> tuple[str, ...]:
        return ("--replicaof", "127.0.0.1", str(port), *_FAST)

    # ------------------------------------------------------------------------ addresses

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", node.port) for node in self.sentinels]

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL of the service."""
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    @property
    def primary_url(self) -> str:
        return f"redis://127.0.0.1:{self.primary_port}/0"

    @property
    def replica_ports(self) -> list[int]:
        return [port for port in self.servers if port != self.primary_port]

    # ----------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        for server in self.servers.values():
            server.start()
        self.wait_synced()
        for node in self.sentinels:
            node.start()
        self._watched = True
        if self.sentinels:
            self.wait_ready()

    def stop(self) -> None:
        for node in self.sentinels:
            node.stop()
        for server in self.servers.values():
            server.stop()
            shutil.rmtree(server._dir, ignore_errors=True)

    def wait_synced(self, timeout: float = 20) -> None:
        """Until every live replica is online and has the primary's whole stream."""

        def synced() -> bool:
            self._follow()
            live = [port for port in self.replica_ports if port not in self.down]
            info = _client(self.primary_port).info("replication")
            offset = info["master_repl_offset"]
            seen = {
                int(value["port"]): int(value["offset"])
                for name, value in info.items()
                if name.startswith("slave")
                and isinstance(value, dict)
                and value.get("state") == "online"
            }
            if not all(seen.get(port, -1) >= offset for port in live):
                return False
            # ...and each answers a WAIT: a replica "online" whose offset shows 0 has not sent
            # its first acknowledgement yet (on a loaded host, still loading the primary's
            # snapshot) and would leave a test's first replicas=1 grant unacknowledged. A
            # PUBLISH moves the replication offset without touching the keyspace.
            primary = _client(self.primary_port)
            primary.publish("__keylock_topology_sync__", "1")
            return not live or int(primary.execute_command("WAIT", len(live), 100)) >= len(live)

        poll(synced, timeout, "the live replicas in sync with the primary")

    def _follow(self) -> None:
        """Take the primary the Sentinels settled on (a spurious failover may move it)."""
        if self.sentinels and self._watched:
            port = self._agreed()
            if port is not None:
                self.primary_port = port

    def wait_ready(self, timeout: float = 30) -> None:
        """Until every Sentinel sees the primary up, the other two Sentinels, and every live
        replica up: a failover can then elect a leader and promote a replica (Sentinels
        refresh what a replica says of its link every 10 s, every 1 s once the primary is
        down: wait_synced() is what says the replica has the data)."""

        def ready(node: SentinelNode) -> bool:
            self._follow()
            live = {port for port in self.replica_ports if port not in self.down}
            state = node.master()
            if int(state["port"]) != self.primary_port or state["is_sdown"]:  # type: ignore[call-overload]
                return False
            if int(state["num-other-sentinels"]) < 2:  # type: ignore[call-overload]
                return False
            replicas = node.client().sentinel_slaves(self.service)  # type: ignore[no-untyped-call]
            up = {
                int(r["port"])
                for r in replicas
                if not (r["is_sdown"] or r["is_odown"] or r["is_disconnected"])
            }
            return live <= up

        for node in self.sentinels:
            poll(lambda node=node: ready(node), timeout, f"Sentinel {node.port} ready")

    # -------------------------------------------------------------------------- faults

    def kill_primary(self) -> int:
        """Kill the primary (SIGKILL: no goodbye to anyone); its port."""
        port = self.primary_port
        self.servers[port].stop()
        self.down.add(port)
        return port

    def kill_replica(self, port: int | None = None) -> int:
        port = self.replica_ports[0] if port is None else port
        self.servers[port].stop()
        self.down.add(port)
        return port

    def pause_replicas(self) -> None:
        """Freeze every live replica (SIGSTOP) and cut its link from the primary: writes
        from now on reach no replica, so a failover loses them (resume_replicas() first)."""
        for port in self.replica_ports:
            if port not in self.down:
                proc = self.servers[port]._proc
                assert proc is not None
                os.kill(proc.pid, signal.SIGSTOP)
        self.primary().client_kill_filter(_type="replica")  # type: ignore[no-untyped-call]
        poll(
            lambda: self.primary().info("replication")["connected_slaves"] == 0,
            5,
            "the replicas cut off from the primary",
        )

    def resume_replicas(self) -> None:
        for port in self.replica_ports:
            proc = self.servers[port]._proc
            if proc is not None and port not in self.down:
                os.kill(proc.pid, signal.SIGCONT)

    def wait_for_promotion(self, old: int, timeout: float = 20) -> int:
        """Until every Sentinel names one primary other than *old*, with no failover under
        way, and it answers as a master; its port. (Under load a Sentinel may find the new
        primary slow to answer and fail over again: this waits for the last one.)"""

        def promoted() -> bool:
            port = self._agreed()
            if port is None or port == old:
                return False
            self.primary_port = port
            return True

        poll(promoted, timeout, f"a replica promoted after the primary on {old} went down")
        return self.primary_port

    def _agreed(self) -> int | None:
        """The primary every Sentinel names, settled (no failover under way, not down, and
        it says it is a master), else None."""
        states = [node.master() for node in self.sentinels]
        ports = {int(state["port"]) for state in states}  # type: ignore[call-overload]
        if len(ports) != 1 or any(state["flags"] != "master" for state in states):
            return None
        (port,) = ports
        if _client(port).info("replication")["role"] != "master":
            return None
        return port

    def restore(self, port: int) -> None:
        """Bring the killed server on *port* back, empty, as a replica of the current primary,
        and wait until it is in sync and every Sentinel counts it."""
        server = self.servers[port]
        server.stop()
        self.servers[port] = Server(*self._replica_of(self.primary_port), port=port)
        self.servers[port]._dir = server._dir
        self.servers[port].start()
        self.down.discard(port)
        self.wait_synced()
        if self.sentinels:
            self.wait_ready()

    def primary(self) -> redis.Redis:
        return _client(self.primary_port)

    def replica(self, n: int = 0) -> redis.Redis:
        return _client(self.replica_ports[n])


@contextlib.contextmanager
def running_sentinel_topology(**options: int) -> Iterator[SentinelTopology]:
    topology = SentinelTopology(**options)
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()
