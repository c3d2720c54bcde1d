"""Atomic file writes: a crash never leaves a half-written artifact.

Everything rlhfkit writes goes to a temporary file in the destination's directory and is
renamed into place only once it is complete (rename is atomic on POSIX filesystems).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from rlhfkit.errors import output_error


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
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(err, OSError) and err.filename is None:
            # A failed write or fsync (a full disk) names no file: name the one being written.
            raise output_error(err, path) from None
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


def append_lines(path: str | os.PathLike, lines: list[str]) -> None:
    """Append `lines` (each with its newline added) to a log such as metrics.jsonl; a failed
    write (a full disk) is one line naming the file."""
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.writelines(line + "\n" for line in lines)
    except OSError as err:
        raise output_error(err, path) from None


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


def config_to_dict(cfg: Any) -> dict:
    """A resolved stage config (a dataclass) as plain JSON-able data (paths become strings), as
    run_config.json and the artifacts' "config" keep it."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
