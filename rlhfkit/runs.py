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
        if not self.writes:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if not resume and self.metrics_path.exists():
            self.metrics_path.unlink()
        write_json(
            self.path / RUN_CONFIG,
            {
                "stage": stage,
                "config": config_to_dict(cfg),
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
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        return row

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


@contextmanager
def progress_bar(description: str, total: Optional[int]) -> Iterator[Any]:
    """A rich progress bar; yields `advance(n=1)`. Quiet when stderr is not a terminal."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal or console.quiet,
    )
    with progress:
        task = progress.add_task(description, total=total)

        def advance(n: int = 1, **fields: Any) -> None:
            progress.update(task, advance=n, **fields)

        yield advance
