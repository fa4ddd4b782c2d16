"""The workers' event channel (tests/chaos/_events.py): an event is in the pipe when its send
returns, so events of several processes are read in the order they happened."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import signal
from pathlib import Path

from ._events import Events

ctx = multiprocessing.get_context("forkserver")


def _send_and_die(events: Events) -> None:
    events.send(("release", "p0#1", 1.0, None))
    os.kill(os.getpid(), signal.SIGKILL)  # before any other thread of ours runs again


def test_an_event_sent_is_read_even_if_its_sender_dies_at_once() -> None:
    """The property the history needs: once send returns, the event is readable. Fails with
    ``multiprocessing.Queue`` (0 of 5 delivered when tried): its put leaves the event to a
    feeder thread, so a grant sent after a release of another process could be read first,
    and a run that stopped reading there judged the released holder still live (the
    intermittent overlap of test_holders_sigstopped_past_their_ttl[file])."""
    for _ in range(5):
        events = Events(ctx)
        proc = ctx.Process(target=_send_and_die, args=(events,))
        proc.start()
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        assert events.get(timeout=5) == ("release", "p0#1", 1.0, None)


def _take_turns(path: str, events: Events, name: str, turns: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    for i in range(turns):
        fcntl.flock(fd, fcntl.LOCK_EX)
        events.send(("grant", name, i))
        events.send(("release", name, i))
        fcntl.flock(fd, fcntl.LOCK_UN)


def test_events_of_processes_taking_turns_are_read_in_their_order(tmp_path: Path) -> None:
    """Three processes take turns on a flock, each sending grant then release inside its
    turn: no grant is read before the release of the turn before it (with
    ``multiprocessing.Queue``, 29 of 9,000 were, on a machine at load 11)."""
    events = Events(ctx)
    turns = 1000
    procs = [
        ctx.Process(target=_take_turns, args=(str(tmp_path / "l"), events, f"p{k}", turns))
        for k in range(3)
    ]
    for proc in procs:
        proc.start()
    holding = None
    early = 0
    for _ in range(3 * turns * 2):
        kind, name, i = events.get(timeout=30)
        if kind == "grant":
            early += holding is not None
            holding = (name, i)
        elif holding == (name, i):
            holding = None
    for proc in procs:
        proc.join(30)
    assert early == 0
