"""Every ```python block in README.md and docs/ runs as a complete program and exits cleanly.

Each block runs in its own interpreter (``python -W error``, so a warning fails it), in a fresh
temporary directory, importing this checkout's keylock; it must exit 0 with nothing on stderr but
keylock's own warning of a lost lease.
Examples check themselves with ``assert``. An HTML comment on the line before a block says how
to run it:

- ``<!-- example: needs redis -->``: ``redis://localhost:6379/0`` in the block becomes the URL
  of the server the suite starts (flushed first);
- ``<!-- example: needs redis-cluster -->``: ``redis://localhost:7000/0`` becomes a node of the
  suite's three-master cluster (flushed first);
- ``<!-- example: needs postgres -->``: ``postgresql://localhost/app`` becomes the URL of the
  PostgreSQL the suite starts (its lock tables emptied first);
- ``<!-- example: fragment -->``: not run, only compiled (top-level ``await`` allowed). For the
  few blocks that cannot stand alone; ``test_fragments_are_few`` lists them and caps their
  number.

Every block runs with ``/run/lock/myapp`` replaced by a directory of its own. A block in a
fence this collector would not see (```py, ```python3, ```pycon) fails
``test_every_python_fence_is_collected``, so no example escapes by its spelling.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

REDIS_PLACEHOLDER = "redis://localhost:6379/0"
CLUSTER_PLACEHOLDER = "redis://localhost:7000/0"
LOCK_DIR_PLACEHOLDER = "/run/lock/myapp"
POSTGRES_PLACEHOLDER = "postgresql://localhost/app"
MAX_FRAGMENTS = 6
TIMEOUT = 90.0  # per example; the slowest (a few processes on Redis) takes a few seconds

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*example:\s*(?P<kind>[a-z-]+(?: [a-z-]+)*)\s*-->\s*$")
_KINDS = {"run", "needs redis", "needs redis-cluster", "needs postgres", "fragment"}
# the one line an example may write to stderr: keylock's warning when a lease is lost (examples
# of lease loss show it; any other output, a warning or a traceback, fails the example)
_EXPECTED_LOG = re.compile(r"keylock: lease \d+ on '[^']*' was lost\Z")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    kind: str  # one of _KINDS
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of one Markdown file, with the marker before each (if any)."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, ticks = match["indent"], match["ticks"]
        info = match["info"].strip()
        language = info.split(maxsplit=1)[0] if info else ""
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not (
            lines[i].startswith(indent) and lines[i].strip().startswith(ticks)
        ):
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1  # the closing fence
        kind = "run"
        previous = start - 1
        while previous >= 0 and not lines[previous].strip():
            previous -= 1
        if previous >= 0 and (marker := _MARKER.match(lines[previous])):
            kind = marker["kind"]
            if kind not in _KINDS:
                raise ValueError(f"{path}:{previous + 1}: unknown example marker {kind!r}")
        found.append(Block(path, start + 1, language, kind, "\n".join(body) + "\n"))
    return found


ALL = [block for path in SOURCES for block in blocks(path)]
PYTHON = [block for block in ALL if block.language == "python"]
RUNNABLE = [block for block in PYTHON if block.kind != "fragment"]
FRAGMENTS = [block for block in PYTHON if block.kind == "fragment"]


def test_the_collector_sees_the_examples() -> None:
    """A guard on the collector itself: the README and the docs have many runnable examples."""
    assert len(RUNNABLE) >= 20, [block.name for block in RUNNABLE]
    assert any(block.path.name == "README.md" for block in RUNNABLE)


def test_every_python_fence_is_collected() -> None:
    """A Python example spelt ```py (or python3, pycon) would be skipped silently: refuse it."""
    hidden = [
        f"{block.name} (```{block.language})"
        for block in ALL
        if block.language != "python" and block.language.lower().startswith(("py", "pycon"))
    ]
    assert not hidden, f"write these fences as ```python: {hidden}"


def test_markers_sit_on_python_blocks() -> None:
    """A marker before a bash block is a typo waiting to happen: markers are for Python."""
    wrong = [block.name for block in ALL if block.kind != "run" and block.language != "python"]
    assert not wrong


def test_fragments_are_few() -> None:
    """Blocks that are not run are the exception, each marked, and they must still compile."""
    names = [block.name for block in FRAGMENTS]
    assert len(FRAGMENTS) <= MAX_FRAGMENTS, f"{len(names)} fragments: {names}"
    for block in FRAGMENTS:
        compile(block.code, block.name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def _run(code: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    script = workdir / "example.py"
    script.write_text(code)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.name for block in RUNNABLE])
def test_example_runs(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The block, run as a program, exits 0 and writes nothing unexpected to stderr."""
    code = block.code
    lock_dir = tmp_path / "locks"
    code = code.replace(LOCK_DIR_PLACEHOLDER, str(lock_dir))
    if block.kind == "needs redis":
        assert REDIS_PLACEHOLDER in code, f"{block.name}: no {REDIS_PLACEHOLDER} to replace"
        server = request.getfixturevalue("redis_server")
        server.flush()
        code = code.replace(REDIS_PLACEHOLDER, server.url)
    elif block.kind == "needs redis-cluster":
        assert CLUSTER_PLACEHOLDER in code, f"{block.name}: no {CLUSTER_PLACEHOLDER} to replace"
        cluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        code = code.replace(CLUSTER_PLACEHOLDER, f"redis://{cluster.host}:{cluster.port}/0")
    elif block.kind == "needs postgres":
        assert POSTGRES_PLACEHOLDER in code, f"{block.name}: no {POSTGRES_PLACEHOLDER} to replace"
        postgres = request.getfixturevalue("postgres_server")
        postgres.flush()
        code = code.replace(POSTGRES_PLACEHOLDER, postgres.url)
    else:
        assert "postgresql://" not in code, (
            f"{block.name} connects to Postgres: mark it <!-- example: needs postgres -->"
        )
        assert "redis://" not in code or "from_url" not in code, (
            f"{block.name} connects to Redis: mark it <!-- example: needs redis -->"
        )
    result = _run(code, tmp_path)
    report = (
        f"{block.name} exited {result.returncode}\n--- stdout\n{result.stdout}"
        f"--- stderr\n{result.stderr}"
    )
    assert result.returncode == 0, report
    unexpected = [line for line in result.stderr.splitlines() if not _EXPECTED_LOG.match(line)]
    assert not unexpected, report
