"""The channel worker processes report their events on: read in the order they were sent.

``multiprocessing.Queue.put`` only hands an event to a feeder thread of the sending process,
which writes it to the pipe later: events of two processes can then be read in the wrong
order (a grant before the release that preceded it, which the history checker reads as two
live holders), and an event put just before its process dies is lost. Here ``send`` writes
the event to the pipe before returning, in one write of at most PIPE_BUF bytes (atomic: the
events of several processes never interleave, and no lock is needed, which a SIGKILLed or
SIGSTOPped sender could hold). An event sent before a lock was released is thus read before
any event sent after the lock was taken.
"""

from __future__ import annotations

import os
import pickle
import select
import struct
from multiprocessing.context import BaseContext

__all__ = ["Events"]

_PIPE_BUF = 4096  # POSIX: a write of at most this many bytes to a pipe is atomic


class Events:
    """One pipe shared by the workers (``send``) and read by the parent (``get``)."""

    def __init__(self, ctx: BaseContext) -> None:
        self._reader, self._writer = ctx.Pipe(duplex=False)

    def send(self, event: tuple[object, ...]) -> None:
        """Write *event* to the pipe now (it is readable when this returns)."""
        data = pickle.dumps(event)
        framed = struct.pack("!i", len(data)) + data  # the framing recv_bytes reads
        if len(framed) > _PIPE_BUF:
            raise ValueError(f"event of {len(framed)} bytes: over one atomic pipe write")
        written = os.write(self._writer.fileno(), framed)
        assert written == len(framed)  # (a blocking pipe writes PIPE_BUF bytes whole)

    def get(self, timeout: float) -> tuple[object, ...]:
        """The next event; TimeoutError if none comes within *timeout* seconds."""
        if not select.select([self._reader], [], [], timeout)[0]:
            raise TimeoutError(f"no worker event in {timeout} s")
        event: tuple[object, ...] = pickle.loads(self._reader.recv_bytes())
        return event
