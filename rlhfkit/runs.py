"""What every run leaves in its output directory: resolved config, metrics, and progress.

`RunDir(out, stage, cfg)` creates the directory and writes `run_config.json` (every option
as resolved, plus the versions of rlhfkit, torch and transformers, so a result can be
reproduced); `log_metrics` appends one JSON line per step to `metrics.jsonl`.

Under several processes (rlhfkit launch) every process makes a RunDir, but only rank 0
writes to it: the others' `log_metrics` return the row without writing it, so a stage
logs unconditionally and metrics.jsonl has each line once.

The file is `run_config.json`, not `config.json`, because stages that save a model save it
into their output directory, where Hugging Face's `from_pretrained` reads `config.json`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Iterator
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

from rlhfkit.config import config_to_dict
from rlhfkit.console import console
from rlhfkit.io import write_json, write_text
from rlhfkit.tracking import open_trackers

RUN_CONFIG = "run_config.json"


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


class RunDir:
    """An output directory with `run_config.json` and `metrics.jsonl`."""

    def __init__(self, path: str | os.PathLike, stage: str, cfg: Any, *, resume: bool = False):
        self.path = Path(path)
        self.stage = stage
        self.metrics_path = self.path / "metrics.jsonl"
        from rlhfkit.distributed import is_main_process  # imports torch: only when a run starts

        self.writes = is_main_process()
        self.trackers = None
        if not self.writes:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if not resume and self.metrics_path.exists():
            self.metrics_path.unlink()
        config = config_to_dict(cfg)
        write_json(
            self.path / RUN_CONFIG,
            {
                "stage": stage,
                "config": config,
                "versions": package_versions(),
                "command": sys.argv,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        # --report-to: the trackers get every row written below (rank 0 only, like the file).
        self.trackers = open_trackers(getattr(cfg, "report_to", None), self.path, stage, config)

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
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self.trackers is not None:
            self.trackers.log(row)
        return row

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: Optional[int] = None) -> None:
        """A table for the trackers (e.g. ppo's sample rollouts); the stage writes its own file."""
        if self.trackers is not None:
            self.trackers.table(name, columns, rows, step)

    def close(self) -> None:
        """Flush and close the trackers (metrics.jsonl needs nothing)."""
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, drop metric lines logged after the checkpoint being resumed from."""
        if not self.writes or not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("step") is None or row["step"] <= after_step:
                kept.append(line)
        write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def write_json(self, name: str, obj: Any) -> Path:
        target = self.path / name
        if self.writes:
            write_json(target, obj)
        return target


# Metrics a progress bar or line shows when a stage passes them, in this order: name, format.
PROGRESS_FIELDS = (
    ("loss", "loss {:.4f}"),
    ("reward/total", "reward {:+.4f}"),
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
