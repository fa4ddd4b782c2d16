"""Developer sessions: ``nox -s tests lint typecheck docs bench``."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite, Redis tests included (they start their own server)."""
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff>=0.8")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the library."""
    session.install("-e", ".[dev]")
    session.run("mypy", "keylock")


@nox.session
def chaos(session: nox.Session) -> None:
    """The fault and storm tests with the history checker (tests/chaos), at ten times the
    trials of CI (``KEYLOCK_CHAOS_SCALE``, 10 unless set); prints one table per fault."""
    session.install("-e", ".[dev]")
    scale = os.environ.get("KEYLOCK_CHAOS_SCALE", "10")
    session.run(
        "pytest",
        "tests/chaos",
        "-v",
        "--timeout=1800",  # per test: the longest runs ten times its CI form
        *session.posargs,
        env={"KEYLOCK_CHAOS_SCALE": scale},
    )


@nox.session
def bench(session: nox.Session) -> None:
    """The contention benchmarks against the peers (``python -m keylock bench``)."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "keylock", "bench", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (mkdocs.yml, docs/), built with every warning an error; the
    examples in it are run by the tests (tests/test_examples.py). ``nox -s docs -- serve``
    serves it locally instead."""
    session.install("-e", ".[docs]")
    if session.posargs[:1] == ["serve"]:
        session.run("mkdocs", "serve", *session.posargs[1:])
    else:
        session.run("mkdocs", "build", "--strict", *session.posargs)
