"""What every run leaves in its output directory: resolved config, metrics, and progress.

`RunDir(out, stage, cfg)` claims the directory for one run (refusing one that holds another
run or an input, and locking it; see the class) and, at the run's first write, writes
`run_config.json` (every option as resolved, plus the versions of rlhfkit, torch and
transformers, so a result can be reproduced); `log_metrics` appends one JSON line per step
to `metrics.jsonl`.

Under several processes (rlhfkit launch) every process makes a RunDir, but only rank 0
writes to it: the others' `log_metrics` return the row without writing it, so a stage
logs unconditionally and metrics.jsonl has each line once.

The file is `run_config.json`, not `config.json`, because stages that save a model save it
into their output directory, where Hugging Face's `from_pretrained` reads `config.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from rlhfkit.console import console
from rlhfkit.errors import RlhfkitError, output_error
from rlhfkit.io import append_lines, config_to_dict, write_json, write_text
from rlhfkit.schema import read_json_file, read_json_lines
from rlhfkit.tracking import open_trackers

RUN_CONFIG = "run_config.json"
OVERWRITE_HELP = (
    "Replace an earlier run in --out: everything in it is deleted first (without it such an --out is refused; "
    "a non-empty --out that holds no rlhfkit run is refused even with it)."
)


def package_versions() -> dict[str, Optional[str]]:
    versions = {"python": platform.python_version()}
    for name in ("rlhfkit", "torch", "transformers", "datasets", "tokenizers", "peft", "deepspeed"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch so CPU runs repeat exactly."""
    random.seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    import torch

    torch.manual_seed(seed)


LOCK_FILE = ".rlhfkit.lock"
# Held by this process: resolved --out -> open lock file. flock locks belong to an open file,
# so a second RunDir on the same directory in this process (a test, a recipe) shares it.
_HELD_LOCKS: dict[Path, Any] = {}
_OPENED: list[RunDir] = []


def abandon_unstarted_runs() -> None:
    """When a stage ends: release its --out locks, and remove an --out a run created but
    never wrote to (it failed first)."""
    while _OPENED:
        _OPENED.pop().abandon()


def _input_paths(cfg: Any, outputs: Sequence[str] = ("out",)) -> list[Path]:
    """Existing files and directories a config reads: every option value that names one
    (`NAME=PATH`, `hf:PATH@LABEL` and lists of them included), its `outputs` excepted."""
    found = []
    for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(cfg) else ():
        if f.name in outputs:
            continue
        value = getattr(cfg, f.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(item, (str, os.PathLike)):
                continue
            text = str(item)
            for candidate in {text, text.partition("=")[2]}:
                candidate = candidate.removeprefix("hf:").partition("@")[0]
                if candidate and os.path.exists(candidate):
                    found.append(Path(candidate).resolve())
    return found


def check_out_path(out: Path, cfg: Any, option: str = "--out") -> None:
    """--out must be creatable as a directory and must not be, or hold, an input."""
    if out.exists() and not out.is_dir():
        raise RlhfkitError(f"{option} {out}: exists and is not a directory")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise RlhfkitError(f"{option} {out}: {parent} is not a directory")
            break
    resolved = out.resolve()
    for path in _input_paths(cfg):
        if path == resolved or resolved in path.parents:
            what = "is" if path == resolved else "holds"
            raise RlhfkitError(f"{option} {out} {what} an input of this run ({path}); choose another {option}")


def check_out_file(path: str, cfg: Any, option: str, suffix: str, outputs: Sequence[str]) -> None:
    """A file a stage writes (redistribute's --out and --html): named `*suffix`, not a
    directory, and neither one of the run's inputs nor inside an input directory (a reward
    model's rlhfkit_rm.json); `outputs` are the config's output options."""
    if not path.endswith(suffix):
        raise RlhfkitError(f"{option} must be a {suffix} file, got '{path}'")
    if Path(path).is_dir():
        raise RlhfkitError(f"{option} {path}: is a directory; give the {suffix} file to write")
    resolved = Path(path).resolve()
    for parent in resolved.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RlhfkitError(f"{option} {path}: {parent} is not a directory")
            break
    for source in _input_paths(cfg, outputs):
        if source == resolved or source in resolved.parents:
            what = "is" if source == resolved else "lies in"
            raise RlhfkitError(f"{option} {path} {what} an input of this run ({source}); choose another {option}")


def _contents(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE) if path.is_dir() else []


def _run_stage_of(path: Path) -> Optional[str]:
    try:
        found = read_json_file(path / RUN_CONFIG)
    except RlhfkitError:
        return None
    return found.get("stage") if isinstance(found, dict) else None


class RunDir:
    """An output directory with `run_config.json` and `metrics.jsonl`, owned by one run.

    Before anything is written: --out is refused when it is a file, an input of the run, or
    a non-empty directory that is not this stage's run being resumed (`--overwrite` empties
    it instead); then an exclusive lock (flock on `.rlhfkit.lock`, holding the PID) keeps a
    second run out while this one lives. `run_config.json` is written, and a fresh run's old
    metrics dropped, only at the run's first write (`begin`, called by `log_metrics`,
    `write_json` and `truncate_metrics`), so a run refused later (a resume whose checkpoint
    belongs to other data) leaves the directory as it found it.
    """

    def __init__(self, path: str | os.PathLike, stage: str, cfg: Any, *, resume: bool = False):
        self.path = Path(path)
        self.stage = stage
        self.cfg = cfg
        self.resume = resume
        self.metrics_path = self.path / "metrics.jsonl"
        self.begun = False
        from rlhfkit.distributed import is_main_process  # imports torch: only when a run starts

        self.writes = is_main_process()
        self.created = False
        overwrite = bool(getattr(cfg, "overwrite", False))
        check_out_path(self.path, cfg)
        contents = _contents(self.path)
        found = _run_stage_of(self.path) if contents else None
        shown = ", ".join(contents[:4]) + (", ..." if len(contents) > 4 else "")
        if contents and overwrite and found is None:
            # --overwrite deletes everything in --out: only ever an earlier run's outputs.
            raise RlhfkitError(
                f"--out {self.path} holds files that are not an rlhfkit run ({shown}; no {RUN_CONFIG}), and "
                "--overwrite empties only a run's directory; choose another --out or remove them yourself"
            )
        if contents and not overwrite and not (resume and found == stage):
            held = f"an earlier {found} run" if found else shown
            hint = "--overwrite to replace it, or another --out" if found else "another --out"
            if found == stage and hasattr(cfg, "resume"):
                hint = "--resume to continue that run, " + hint
            raise RlhfkitError(f"--out {self.path} is not empty (it holds {held}); give {hint}")
        self.trackers = None
        if not self.writes:
            return
        try:
            self.created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise output_error(err, self.path) from None
        self._lock()
        if contents and overwrite:
            for name in contents:
                target = self.path / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            console.print(f"{stage}: --overwrite: emptied {self.path}")

    def _lock(self) -> None:
        key = self.path.resolve()
        if key in _HELD_LOCKS:
            return
        lock_path = self.path / LOCK_FILE
        while True:
            try:
                handle = open(lock_path, "a+", encoding="utf-8")  # noqa: SIM115 (held open: the lock lives as long as the run)
            except OSError as err:
                raise output_error(err, self.path) from None
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise RlhfkitError(
                    f"--out {self.path} is in use by another rlhfkit run (pid {holder}); wait for it to finish "
                    "or choose another --out"
                ) from None
            # The holder removes the file when it is done: a lock on a removed file is no lock.
            try:
                if os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _HELD_LOCKS[key] = handle
        _OPENED.append(self)

    def abandon(self) -> None:
        """A run that failed before its first write: release the lock and remove the
        directory if this run created it (it holds nothing but the lock file)."""
        self.close()
        if self.created and not self.begun:
            with contextlib.suppress(OSError):
                self.path.rmdir()

    def close(self) -> None:
        """Flush and close the trackers and release the lock (released anyway when the process ends)."""
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None
        handle = _HELD_LOCKS.pop(self.path.resolve(), None)
        if handle is not None:
            # Removed while still locked, so no other run can lock the file being removed.
            with contextlib.suppress(OSError):
                (self.path / LOCK_FILE).unlink()
            handle.close()

    def begin(self) -> None:
        """The run's first write: its resolved config (and, for a fresh run, no old metrics)."""
        if self.begun or not self.writes:
            return
        config = config_to_dict(self.cfg)
        # --report-to: the trackers get every row written below (rank 0 only, like the file).
        # Started first, so a tracker that fails to start leaves the directory as it was
        # (a resumed run's run_config.json still describes that run).
        self.trackers = open_trackers(getattr(self.cfg, "report_to", None), self.path, self.stage, config)
        self.begun = True
        if not self.resume and self.metrics_path.exists():
            self.metrics_path.unlink()
        write_json(
            self.path / RUN_CONFIG,
            {
                "stage": self.stage,
                "config": config,
                "versions": package_versions(),
                "command": sys.argv,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )

    def log_metrics(self, step: Optional[int] = None, **metrics: Any) -> dict:
        """Append one line to metrics.jsonl (non-finite numbers are written as strings)."""
        row: dict[str, Any] = {} if step is None else {"step": step}
        for key, value in metrics.items():
            if hasattr(value, "item"):
                value = value.item()
            if isinstance(value, float) and not math.isfinite(value):
                value = str(value)
            row[key] = value
        if not self.writes:
            return row
        self.begin()
        append_lines(self.metrics_path, [json.dumps(row, ensure_ascii=False)])
        if self.trackers is not None:
            self.trackers.log(row)
        return row

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: Optional[int] = None) -> None:
        """A table for the trackers (e.g. ppo's sample rollouts); the stage writes its own file."""
        if self.trackers is not None:
            self.trackers.table(name, columns, rows, step)

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, drop metric lines logged after the checkpoint being resumed from."""
        if not self.writes:
            return
        self.begin()
        if not self.metrics_path.exists():
            return
        kept = []
        for _, row in read_json_lines(self.metrics_path):
            step = row.get("step") if isinstance(row, dict) else None
            if not isinstance(step, (int, float)) or step <= after_step:
                kept.append(json.dumps(row, ensure_ascii=False))
        write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def write_json(self, name: str, obj: Any) -> Path:
        target = self.path / name
        if self.writes:
            self.begin()
            write_json(target, obj)
        return target


# How every log names a reward (metrics.jsonl, trackers, the progress line, evaluate, compare):
# reward/raw/SOURCE is the reward model's own score (its units; per response, summed over the
# positions it rewards), reward/normalized/SOURCE the value after --normalize-rewards (only
# with it), reward/weighted/SOURCE the weight x that value which enters the total, and
# reward/total the sum of the weighted values (plus ppo's --truncation-penalty where it applies).
RAW_REWARD_PREFIX = "reward/raw/"
NORMALIZED_REWARD_PREFIX = "reward/normalized/"
WEIGHTED_REWARD_PREFIX = "reward/weighted/"
TOTAL_REWARD_KEY = "reward/total"


def raw_reward_key(source: str) -> str:
    return RAW_REWARD_PREFIX + source


def normalized_reward_key(source: str) -> str:
    return NORMALIZED_REWARD_PREFIX + source


def weighted_reward_key(source: str) -> str:
    return WEIGHTED_REWARD_PREFIX + source


# Metrics a progress bar or line shows when a stage passes them, in this order: name, format
# (after reward/total, each source's raw score: its normalised and weighted values are not
# in the reward model's units).
PROGRESS_FIELDS = (
    ("loss", "loss {:.4f}"),
    (TOTAL_REWARD_KEY, "reward {:+.4f}"),
    ("kl", "KL {:.4f}"),
    ("tokens_per_second", "{:,.0f} tokens/s"),
    ("samples_per_second", "{:,.1f} samples/s"),
)
PROGRESS_LINES = 10
"""Without a terminal, a progress line every total/PROGRESS_LINES steps (and at the end)."""


def progress_status(metrics: Optional[dict]) -> str:
    """The metrics a progress bar/line shows, e.g. 'reward +0.1234 · KL 0.0123 · 512 tokens/s'."""
    parts = []
    for key, template in PROGRESS_FIELDS:
        value = (metrics or {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            parts.append(template.format(value))
        if key == TOTAL_REWARD_KEY:
            parts += [f"{name.removeprefix(RAW_REWARD_PREFIX)} {value:+.4f} (raw)" for name, value in (metrics or {}).items()
                      if name.startswith(RAW_REWARD_PREFIX) and isinstance(value, (int, float)) and math.isfinite(value)]
    return " · ".join(parts)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@contextmanager
def progress_bar(description: str, total: Optional[int]) -> Iterator[Any]:
    """Progress of a loop; yields `advance(n=1, metrics=None)`.

    In a terminal: a rich bar that shows the latest `metrics` (loss, or reward and KL).
    Otherwise (a log file, CI, `tee`): one line every ~total/10 steps and at the last, with
    step/total, the metrics, and the ETA; nothing for a loop of unknown length. Nothing on
    processes other than rank 0.
    """
    interactive = console.is_terminal and not console.quiet
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not interactive,
    )
    every = max(1, math.ceil(total / PROGRESS_LINES)) if total else 0
    started = time.perf_counter()
    state = {"done": 0, "first": None}
    with progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int = 1, metrics: Optional[dict] = None) -> None:
            status = progress_status(metrics)
            progress.update(task, advance=n, **({"status": status} if metrics else {}))
            before, state["done"] = state["done"], state["done"] + n
            if state["first"] is None:
                # A first call without metrics skips ahead (the steps a resumed loop had done).
                state["first"] = state["done"] if metrics is None else before
                if metrics is None:
                    return
            if interactive or console.quiet or not every or n == 0:
                return
            done = state["done"]
            if done // every == before // every and done != total:
                return
            elapsed = time.perf_counter() - started
            ran = done - state["first"]
            eta = f"ETA {_duration(elapsed / ran * (total - done))}" if ran > 0 else ""
            fields = [f"{description}: step {done}/{total}", status, eta]
            console.print(" · ".join(f for f in fields if f), markup=False, highlight=False, soft_wrap=True)

        yield advance


def read_metric_series(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """A run's numeric metrics by step, {metric: [(step, value), ...]} in the order logged;
    a line of metrics.jsonl that is not JSON is an error with file:line."""
    series: dict[str, list[tuple[int, float]]] = {}
    for _, row in read_json_lines(Path(run_dir) / "metrics.jsonl"):
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            continue
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                series.setdefault(key, []).append((row["step"], float(value)))
    return series


def run_stage_name(run_dir: str | os.PathLike) -> str:
    """The stage that wrote `run_dir` (its run_config.json), or "" when unknown."""
    config_file = Path(run_dir) / "run_config.json"
    try:
        return str(json.loads(config_file.read_text(encoding="utf-8")).get("stage", ""))
    except (OSError, ValueError, AttributeError, RecursionError):  # ValueError: not UTF-8, not JSON
        return ""
