"""A TCP proxy on loopback between a client and a server, with network faults switched on and
off while traffic flows: per-direction delay, drop (a black hole), and cut (close every
connection). No external tools: one asyncio loop in a daemon thread.

"up" is client -> server, "down" is server -> client. A delay holds each chunk for that long
after it was read (order is kept, as TCP keeps it); a drop discards every chunk read while it
is on (the sender sees nothing wrong, the receiver nothing at all — a lost request, or a lost
reply); ``cut()`` aborts every open connection on both sides (new ones are still accepted).
Faults apply to chunks read after the change, and to connections old and new. The fault
tests (tests/chaos) use it, and the benchmark's Redis-at-scale workload (:mod:`.scale`), which
puts a 40 ms round trip in front of the server.

    with Proxy(server.port) as proxy:
        client = redis.Redis.from_url(proxy.url)
        proxy.set(down_delay=0.3)   # every reply 300 ms late
        proxy.set(up_drop=True)     # requests vanish
        proxy.cut()                 # every connection reset
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Coroutine

T = TypeVar("T")


@dataclass
class Faults:
    """The faults now in force; read by the pumps for each chunk."""

    delay: dict[str, float] = field(default_factory=lambda: {"up": 0.0, "down": 0.0})
    drop: dict[str, bool] = field(default_factory=lambda: {"up": False, "down": False})


@dataclass
class Counters:
    connections: int = 0
    cuts: int = 0
    forwarded: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    dropped: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})


class Proxy:
    """Forward ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``, faults on demand."""

    def __init__(self, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        self.port = 0
        self.faults = Faults()
        self.counters = Counters()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()  # guarded by running on the proxy's loop only
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    # ---------------------------------------------------------------------------- lifecycle

    def start(self) -> Proxy:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, self.host, 0))
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            self._abort_all()
            await self._server.wait_closed()

        self._call(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------- faults

    def set(
        self,
        *,
        up_delay: float | None = None,
        down_delay: float | None = None,
        up_drop: bool | None = None,
        down_drop: bool | None = None,
    ) -> None:
        """Change the faults in force; arguments left out keep their value."""
        for direction, delay in (("up", up_delay), ("down", down_delay)):
            if delay is not None:
                self.faults.delay[direction] = delay
        for direction, drop in (("up", up_drop), ("down", down_drop)):
            if drop is not None:
                self.faults.drop[direction] = drop

    def heal(self) -> None:
        """No delay, no drop (open connections stay open)."""
        self.set(up_delay=0.0, down_delay=0.0, up_drop=False, down_drop=False)

    def cut(self) -> int:
        """Abort every open connection, both sides; returns how many were cut."""

        async def cut() -> int:
            return self._abort_all()

        return self._call(cut())

    def _abort_all(self) -> int:
        links = list(self._links)
        for link in links:
            link.abort()
        self.counters.cuts += len(links)
        return len(links)

    # ------------------------------------------------------------------------- forwarding

    def _call(self, coro: Coroutine[object, object, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counters.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(self, reader, writer, up_reader, up_writer)
        self._links.add(link)
        try:
            await link.run()
        finally:
            self._links.discard(link)


class _Link:
    """One client connection and its server connection; two pumps, each a reader and a sender
    joined by a queue of (due time, chunk)."""

    def __init__(
        self,
        proxy: Proxy,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        server_reader: asyncio.StreamReader,
        server_writer: asyncio.StreamWriter,
    ) -> None:
        self._proxy = proxy
        self._writers = (client_writer, server_writer)
        self._pumps = (
            ("up", client_reader, server_writer),
            ("down", server_reader, client_writer),
        )
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        senders = []
        for direction, reader, writer in self._pumps:
            queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
            self._tasks.append(asyncio.create_task(self._read(direction, reader, queue)))
            senders.append(asyncio.create_task(self._send(writer, queue)))
        self._tasks += senders
        # one side closing ends the link once what it sent before is delivered: a half-open
        # proxy would hide a closed connection from the other side
        await asyncio.wait(senders, return_when=asyncio.FIRST_COMPLETED)
        self.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _read(
        self,
        direction: str,
        reader: asyncio.StreamReader,
        queue: asyncio.Queue[tuple[float, bytes]],
    ) -> None:
        faults, counters = self._proxy.faults, self._proxy.counters
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                if faults.drop[direction]:
                    counters.dropped[direction] += len(chunk)
                    continue
                counters.forwarded[direction] += len(chunk)
                queue.put_nowait((time.monotonic() + faults.delay[direction], chunk))
        queue.put_nowait((0.0, b""))  # end of stream, after the chunks already in line

    async def _send(
        self, writer: asyncio.StreamWriter, queue: asyncio.Queue[tuple[float, bytes]]
    ) -> None:
        with contextlib.suppress(OSError):
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()

    def abort(self) -> None:
        for task in self._tasks:
            task.cancel()
        for writer in self._writers:
            writer.transport.abort()
