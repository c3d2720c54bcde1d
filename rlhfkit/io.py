"""Atomic file writes: a crash never leaves a half-written artifact.

Everything rlhfkit writes goes to a temporary file in the destination's directory and is
renamed into place only once it is complete (rename is atomic on POSIX filesystems).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file owner-only; artifacts get the usual umask-based mode.
    os.chmod(tmp_name, 0o666 & ~_umask())
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def match_umask(directory: str | os.PathLike) -> None:
    """Give every file under `directory` the usual umask-based mode: safetensors writes its
    weights owner-only (0600), while every other artifact is 0644 under a 022 umask."""
    mode = 0o666 & ~_umask()
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically, with a trailing newline."""
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False, sort_keys=False)
        handle.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text)


# The repository checkout this package runs from (the Makefile installs it editable), where
# data/ holds the shipped QA-Feedback sample and the synthetic knowledge base.
REPO_ROOT = Path(__file__).resolve().parent.parent


def shipped_path(path: str | os.PathLike) -> Path:
    """`path` as given when it exists; otherwise, for a relative path, the same path under the
    repository root, so the shipped-data defaults work from any working directory."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    in_repo = REPO_ROOT / given
    return in_repo if in_repo.exists() else given
