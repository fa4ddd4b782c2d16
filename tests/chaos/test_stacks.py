"""Generated decorator stacks and backend-level parameters (rows 2 and 3 of the repro README).

Every stack of ``@locked`` and ``@stale_guard`` over every kind of callable either runs each
body under its locks (the history checker sees no two bodies inside one key at once) or, when
the stack cannot be classified and hands back a coroutine from a sync wrapper, is refused with
TypeError before the body runs. Every backend-level TTL and poll either works or is a
TypeError/ValueError at construction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import itertools
import math
import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from keylock import KeyedLock, LeaseLost, LockTimeout, stale_guard
from keylock.backends import MemoryBackend

from ..conftest import MakeBackend
from ._history import Grant, History, Verdict
from ._report import Report, scaled

Fn = Callable[..., Any]  # type: ignore[explicit-any]
KEY = "stacked"
BACKENDS = ["memory", "file", "redis"]


class Body:
    """The innermost code: records its run as a grant of the history (entry to exit), with
    a token in entry order, so two bodies inside one key at once are an overlap."""

    def __init__(self, history: History) -> None:
        self.history = history
        self.tokens = itertools.count(1)
        self.runs = 0

    def enter(self, holder: str) -> Grant:
        self.runs += 1
        return self.history.granted(Grant(KEY, next(self.tokens), holder, time.monotonic(), None))

    def make(self, kind: str) -> tuple[Fn, bool]:
        """A callable of *kind*, and whether it is async (its call returns a coroutine)."""

        async def abody(holder: str) -> str:
            grant = self.enter(holder)
            await asyncio.sleep(0.001)
            grant.released_at = time.monotonic()
            return holder

        def sbody(holder: str) -> str:
            grant = self.enter(holder)
            time.sleep(0.001)
            grant.released_at = time.monotonic()
            return holder

        class ACall:
            async def __call__(self, holder: str) -> str:
                return await abody(holder)

        if kind == "async def":
            return abody, True
        if kind == "def":
            return sbody, False
        if kind == "async __call__":
            return ACall(), True
        if kind == "partial(async)":
            return functools.partial(abody), True
        return functools.partial(sbody), False  # "partial(def)"


def plain_wraps(fn: Fn) -> Fn:
    """A plain decorator made with functools.wraps: returns fn's coroutine when fn is async."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        return fn(*args, **kwargs)

    return wrapper


def plain_bare(fn: Fn) -> Fn:
    """A plain decorator without wraps: nothing says its call returns a coroutine."""

    def wrapper(*args: object, **kwargs: object) -> object:
        return fn(*args, **kwargs)

    return wrapper


def naive_locked(locks: KeyedLock, key: str) -> Callable[[Fn], Fn]:
    """The planted variant: picks the wrapper with ``inspect.iscoroutinefunction`` alone and
    never looks at what the call returned (what ``@locked`` did before row 2)."""

    def decorate(fn: Fn) -> Fn:
        if inspect.iscoroutinefunction(fn):

            async def alocked(*args: object) -> object:
                async with locks(key):
                    return await fn(*args)

            return alocked

        def slocked(*args: object) -> object:
            with locks.sync(key):
                return fn(*args)

        return slocked

    return decorate


LAYERS = ("locked", "stale_guard", "partial", "plain_wraps", "plain_bare")


def build(
    rng: random.Random, locks: KeyedLock, body: Body, *, naive: bool = False
) -> tuple[Fn, bool, list[str]]:
    """A random stack over a random body: the callable, whether calls must be refused (a sync
    wrapper would get a coroutine back), and the stack's description (innermost first).

    Each lock layer takes its own key (nested layers on one key would deadlock by design);
    the checker looks at the body's key, which the innermost lock layer guards."""
    kind = rng.choice(["async def", "def", "async __call__", "partial(async)", "partial(def)"])
    fn, is_async = body.make(kind)
    described = [kind]
    returns_coro, visible, refused = is_async, True, False
    lock_layers = 0
    for _ in range(rng.randint(1, 4)):
        layer = rng.choice(LAYERS) if lock_layers else rng.choice(LAYERS[:2])
        if layer in ("locked", "stale_guard"):
            key = f"{KEY}:{lock_layers}" if lock_layers else KEY
            if naive and layer == "locked":
                fn = naive_locked(locks, key)(fn)
            elif layer == "locked":
                fn = locks.locked(key=key)(fn)
            else:
                fn = stale_guard(locks, key=lambda holder, _k=key: _k)(fn)
            lock_layers += 1
            if returns_coro and not visible:
                refused = True  # a sync wrapper gets a coroutine back: it must refuse it
            returns_coro = returns_coro and visible
            visible = True
        elif layer == "partial":
            fn = functools.partial(fn)
        elif layer == "plain_wraps":
            fn = plain_wraps(fn)
        else:
            fn = plain_bare(fn)
            visible = False
        described.append(layer)
    return fn, refused, described


async def call_all(fn: Fn, callers: int) -> tuple[int, int]:
    """*callers* concurrent calls, each made in a thread (a sync stack blocks it) and awaited
    on the loop when the call returned an awaitable; returns (finished, refused)."""
    finished = refused = 0

    async def one(n: int) -> None:
        nonlocal finished, refused
        try:
            result = await asyncio.to_thread(fn, f"c{n}")
            if inspect.isawaitable(result):
                await result
        except TypeError:
            refused += 1
            return
        finished += 1

    await asyncio.gather(*(one(n) for n in range(callers)))
    return finished, refused


async def _stacks(make: MakeBackend, seed: int, trials: int, *, naive: bool) -> tuple[Verdict, int]:
    """*trials* random stacks, 4 concurrent calls each: the checker's verdict over the bodies'
    runs, and how many stacks were refused (every call a TypeError, no body run)."""
    rng = random.Random(seed)
    history = History()
    body = Body(history)
    refusals = 0
    for _ in range(trials):
        locks = KeyedLock(make(), namespace=f"stack{rng.randrange(10**9)}")
        fn, must_refuse, described = build(rng, locks, body, naive=naive)
        runs = body.runs
        with warnings_as_errors():
            _, refused = await call_all(fn, callers=4)
        if must_refuse and not naive:
            assert (refused, body.runs) == (4, runs), described  # refused, never run unlocked
            refusals += 1
        elif not naive:
            assert refused == 0, described
    return history.check(), refusals


class warnings_as_errors:
    """No "coroutine was never awaited": a refused coroutine is closed, not dropped."""

    def __enter__(self) -> None:
        import warnings

        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.simplefilter("error", RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._catcher.__exit__(*exc)  # type: ignore[arg-type]


@pytest.mark.parametrize("make_backend", BACKENDS, indirect=True)
async def test_random_decorator_stacks_exclude_or_refuse(
    make_backend: MakeBackend, request: pytest.FixtureRequest, chaos_report: Report
) -> None:
    """Random stacks (1-4 layers of @locked, @stale_guard, partial, plain decorators with and
    without wraps) over async def, def, ``async def __call__`` objects and partials: bodies
    never overlap; a sync wrapper handed a coroutine raises TypeError and the body never runs.
    The planted naive ``@locked`` (iscoroutinefunction only) is caught: see the next test."""
    trials = scaled(40 if request.node.callspec.params["make_backend"] == "memory" else 15)
    verdict, refusals = await _stacks(make_backend, seed=2, trials=trials, naive=False)
    chaos_report.record(
        "Random decorator stacks",
        request.node.callspec.params["make_backend"],
        verdict,
        trials=trials,
        notes=f"4 calls per stack; {refusals} stacks returning a coroutine from a sync wrapper "
        "refused with TypeError, body never run",
    )
    assert verdict.ok, verdict


async def test_decorator_stack_generator_catches_a_naive_locked(chaos_report: Report) -> None:
    """The generator's own check: with a ``@locked`` that classifies by
    ``inspect.iscoroutinefunction`` alone, ``async def __call__`` objects and plain-decorated
    coroutines run outside the lock, and the checker reports overlaps."""
    verdict, _ = await _stacks(MemoryBackend, seed=2, trials=40, naive=True)
    chaos_report.record(
        "Random decorator stacks",
        "memory, planted naive @locked",
        verdict,
        trials=40,
        notes="must show overlaps: the generator catches it",
    )
    assert verdict.overlaps


# ------------------------------------------------------------------ backend-level parameters

NUMBERS: list[object] = [
    None, 0, -1, -0.0, 1e-4, 0.001, 0.05, 0.3, 2, 30.0, math.nan, math.inf, -math.inf,
    True, False, "1", b"1", [1], 1e10, 10**30,
]  # fmt: skip


def _ttl_ok(ttl: object, *, required: bool) -> bool:
    if ttl is None:
        return not required
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        return False
    # the per-call rule; Redis also bounds it so that its ms (and the fence slack) stay exact
    return 0.001 <= ttl < (2**52 / 1000 if required else math.inf)


def _poll_ok(poll: object) -> bool:
    if isinstance(poll, bool) or not isinstance(poll, int | float):
        return False
    return 0 < poll <= 86_400


def _exercise(locks: KeyedLock, other: KeyedLock, history: History, key: str) -> None:
    """Hold the key, have a second client try it from another thread (must time out: from
    this thread it would be a re-entry), release, and let the second client take it: two
    grants, no overlap."""
    for n, client in enumerate((locks, other)):
        with client.sync(key, timeout=5) as lease:
            grant = history.granted(Grant(key, lease.token, f"c{n}", time.monotonic(), None))
            second = other if n == 0 else locks
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                attempt = pool.submit(second.acquire_sync, key, timeout=0.05)
                with pytest.raises(LockTimeout):
                    attempt.result()
            grant.released_at = time.monotonic()


Factory = Callable[[object, object, int], tuple[Callable[[], Any], bool]]  # type: ignore[explicit-any]


def _parameter_trials(
    factory_of: Factory, trials: int, seed: int
) -> tuple[Verdict, int, list[str]]:
    """*trials* random (ttl, poll) pairs: *factory_of* gives the constructor and whether the
    pair is valid. Returns the checker's verdict over the locking done with the valid ones,
    how many were refused, and what went wrong (accepted when invalid, or refused when valid,
    or an error other than TypeError/ValueError)."""
    rng = random.Random(seed)
    history = History()
    refused = 0
    wrong: list[str] = []
    for n in range(trials):
        ttl, poll = rng.choice(NUMBERS + VALID), rng.choice(NUMBERS + VALID)
        factory, ok = factory_of(ttl, poll, n)
        try:
            one = factory()
        except (TypeError, ValueError) as exc:
            refused += 1
            if ok:
                wrong.append(f"ttl={ttl!r} poll={poll!r} refused: {exc}")
            continue
        if not ok:
            wrong.append(f"ttl={ttl!r} poll={poll!r} accepted at construction")
            one.close_sync()
            continue
        two = one if isinstance(one, MemoryBackend) else factory()  # a second client
        try:
            if ttl is None or ttl >= 0.3:  # shorter ones may lapse inside the exercise
                _exercise(KeyedLock(one), KeyedLock(two), history, f"k{n}")
            else:
                lease = KeyedLock(one).acquire_sync(f"k{n}", timeout=5)
                if not lease.lost:
                    with contextlib.suppress(LeaseLost):  # it may lapse during the call
                        lease.release_sync()
        finally:
            one.close_sync()
            two.close_sync()
    return history.check(), refused, wrong


VALID: list[object] = [0.5, 1.0, 5.0]  # drawn more often: Redis needs two valid numbers


@pytest.mark.parametrize("make_backend", BACKENDS, indirect=True)
def test_random_backend_parameters_work_or_fail_at_construction(
    make_backend: MakeBackend, request: pytest.FixtureRequest, chaos_report: Report, tmp_path: Any
) -> None:
    """Random backend-level ttl (and poll on Redis), valid and not: valid ones lock (two
    clients exclude each other), invalid ones are TypeError/ValueError at construction, by the
    per-call rules (ttl in [0.001, inf), not bool; Redis needs a ttl and 0 < poll <= 1 day).
    The planted naive MemoryBackend that keeps its ttl unchecked is caught: see below."""
    name = request.node.callspec.params["make_backend"]

    def factory_of(ttl: object, poll: object, n: int) -> tuple[Callable[[], Any], bool]:  # type: ignore[explicit-any]
        from keylock.backends import FileBackend, RedisBackend

        if name == "memory":
            return functools.partial(MemoryBackend, ttl=ttl), _ttl_ok(ttl, required=False)
        if name == "file":
            directory = tmp_path / f"p{n}"
            return functools.partial(FileBackend, directory, ttl=ttl), _ttl_ok(ttl, required=False)
        url = request.getfixturevalue("redis_server").url
        made = functools.partial(RedisBackend.from_url, url, ttl=ttl, poll=poll)
        return made, _ttl_ok(ttl, required=True) and _poll_ok(poll)

    trials = scaled(40)
    verdict, refused, wrong = _parameter_trials(factory_of, trials, seed=3)
    chaos_report.record(
        "Random backend-level parameters",
        name,
        verdict,
        trials=trials,
        notes=f"{refused} refused at construction (TypeError/ValueError), the rest locked; "
        f"{len(wrong)} wrong outcomes",
    )
    assert not wrong, wrong
    assert verdict.ok, verdict


def test_backend_parameter_generator_catches_an_unchecked_ttl(chaos_report: Report) -> None:
    """The planted variant of row 3: a MemoryBackend that keeps its ttl as given (0, -1, NaN
    accepted) is reported by the generator as accepting invalid parameters."""

    class Unchecked(MemoryBackend):
        def __init__(self, *, ttl: object = None) -> None:
            super().__init__()
            self.default_ttl = ttl  # type: ignore[assignment]

    def factory_of(ttl: object, poll: object, n: int) -> tuple[Callable[[], Any], bool]:  # type: ignore[explicit-any]
        return functools.partial(Unchecked, ttl=ttl), _ttl_ok(ttl, required=False)

    verdict, refused, wrong = _parameter_trials(factory_of, 40, seed=3)
    chaos_report.record(
        "Random backend-level parameters",
        "memory, planted unchecked ttl",
        verdict,
        trials=40,
        notes=f"{len(wrong)} invalid ttls accepted: the generator catches it",
    )
    assert wrong
    assert refused == 0
