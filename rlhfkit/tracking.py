"""Experiment trackers (`--report-to`): TensorBoard, Weights & Biases, Trackio, MLflow.

A run's `RunDir` opens the trackers named by the stage's `report_to` option and feeds them
every row it appends to `metrics.jsonl`, so a tracker shows exactly the scalars of the file
(non-numbers such as flags or non-finite values left as strings are skipped). Each tracker
also gets the resolved config, and `log_table` (ppo's sample rollouts) becomes a text
summary in TensorBoard and a Table in wandb, Trackio and MLflow.

Everything stays on this machine unless the user says otherwise:
- tensorboard: event files in OUT/tensorboard (`tensorboard --logdir OUT/tensorboard`);
- wandb: offline mode in OUT/wandb unless WANDB_MODE is set (`wandb sync OUT/wandb/offline-run-*`);
- trackio: its local database (TRACKIO_DIR, by default in the Hugging Face cache);
- mlflow: a local SQLite store, OUT/mlflow.db (artifacts in OUT/mlartifacts), unless
  MLFLOW_TRACKING_URI is set.

Only the process that writes the run directory (rank 0) opens trackers. The packages are
optional extras: `pip install 'rlhfkit[tensorboard]'` (or wandb, trackio, mlflow, tracking
for all four).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

from rlhfkit.errors import EnvironmentFailure, RlhfkitError

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")
# tracker -> the module it needs (the extra of the same name installs it)
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
PROJECT = "rlhfkit"
REPORT_TO_HELP = (
    "Experiment trackers that get the metrics, the config (and ppo's sample rollouts): none, tensorboard, wandb, "
    "trackio, mlflow; comma-separated or repeated. Offline/local by default (see the README)."
)


def parse_report_to(values: list[str] | str | None) -> list[str]:
    """The trackers named by `--report-to` (comma-separated and/or repeated), checked.

    An unknown name, or a tracker whose package is not installed, is a one-line error."""
    if isinstance(values, str):
        values = [values]
    names: list[str] = []
    for value in values or []:
        for name in str(value).split(","):
            name = name.strip().lower()
            if name and name not in names:
                names.append(name)
    if "none" in names:
        if len(names) > 1:
            raise RlhfkitError(f"--report-to none cannot be combined with {', '.join(n for n in names if n != 'none')}")
        return []
    for name in names:
        if name not in TRACKERS:
            from difflib import get_close_matches

            close = get_close_matches(name, TRACKERS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise RlhfkitError(f"unknown --report-to {name!r}{hint}; valid: none, {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKER_MODULES[name]) is None:
            raise RlhfkitError(
                f"--report-to {name} needs the {TRACKER_MODULES[name]} package: pip install 'rlhfkit[{name}]'"
            )
    return names


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics row (bools count as 0/1), without `step`."""
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, str) or value is None:
            continue
        if isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A markdown table (cells' pipes escaped, newlines as spaces) for text summaries."""

    def cell(value: Any) -> str:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class TensorBoardTracker:
    """Event files in OUT/tensorboard. Scalars are written as float64 tensors (TensorBoard's
    "new style" summaries, which its scalar dashboard reads), so they equal metrics.jsonl's
    numbers exactly instead of being rounded to float32."""

    def __init__(self, out: Path, stage: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, row: dict[str, Any], step: int | None) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, step or 0, new_style=True, double_precision=True)

    def table(self, name: str, columns: list[str], rows: list[list[Any]], step: int | None) -> None:
        self.writer.add_text(name, markdown_table(columns, rows), step or 0)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, out: Path, stage: str, config: dict):
        import wandb

        self.wandb = wandb
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=f"{stage}:{out.name}",
            job_type=stage,
            dir=str(out),
            config=config,
            mode=os.environ.get("WANDB_MODE", "offline"),
            reinit="finish_previous",
        )

    def log(self, row: dict[str, Any], step: int | None) -> None:
        values = scalars(row)
        if values:
            self.run.log(values, step=step)

    def table(self, name: str, columns: list[str], rows: list[list[Any]], step: int | None) -> None:
        self.run.log({name: self.wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    def __init__(self, out: Path, stage: str, config: dict):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=f"{stage}:{out.name}", config=config)

    def log(self, row: dict[str, Any], step: int | None) -> None:
        values = scalars(row)
        if values:
            self.trackio.log(values, step=step)

    def table(self, name: str, columns: list[str], rows: list[list[Any]], step: int | None) -> None:
        import pandas as pd

        self.trackio.log({name: self.trackio.Table(dataframe=pd.DataFrame(rows, columns=columns))}, step=step)

    def close(self) -> None:
        self.trackio.finish()


class MlflowTracker:
    def __init__(self, out: Path, stage: str, config: dict):
        import logging

        import mlflow

        # MLflow logs its database set-up at INFO on every run; keep its warnings.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.mlflow = mlflow
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # A local SQLite store (MLflow 3 retired the ./mlruns file store), artifacts beside it.
            mlflow.set_tracking_uri(f"sqlite:///{(out / 'mlflow.db').resolve()}")
            if mlflow.get_experiment_by_name(name) is None:
                mlflow.create_experiment(name, artifact_location=(out / "mlartifacts").resolve().as_uri())
        mlflow.set_experiment(name)
        self.run = mlflow.start_run(run_name=f"{stage}:{out.name}")
        # MLflow params are flat strings of at most 6,000 characters.
        mlflow.log_params({key: json.dumps(value)[:6000] for key, value in config.items()})
        mlflow.log_dict(config, "config.json")

    def log(self, row: dict[str, Any], step: int | None) -> None:
        # MLflow metric names allow letters, digits, _ - . space and /.
        values = {key.replace(":", "_"): value for key, value in scalars(row).items()}
        if values:
            self.mlflow.log_metrics(values, step=step or 0)

    def table(self, name: str, columns: list[str], rows: list[list[Any]], step: int | None) -> None:
        data = {column: [row[i] for row in rows] for i, column in enumerate(columns)}
        self.mlflow.log_table(data=data, artifact_file=f"{name}/step-{step or 0}.json")

    def close(self) -> None:
        self.mlflow.end_run()


TRACKER_CLASSES = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "trackio": TrackioTracker,
    "mlflow": MlflowTracker,
}


class Trackers:
    """The open trackers of one run; every call goes to each of them."""

    def __init__(self, names: list[str], out: Path, stage: str, config: dict):
        self.trackers = []
        for name in names:
            try:
                self.trackers.append(TRACKER_CLASSES[name](out, stage, config))
            except Exception as err:  # noqa: BLE001 (no key, no server, a bad WANDB_MODE: each its own type)
                self.close()
                reason = " ".join(f"{type(err).__name__}: {err}".split())
                raise EnvironmentFailure(f"--report-to {name}: the tracker did not start: {reason}") from None
        # A run that dies with an error still leaves its logged steps on disk.
        atexit.register(self.close)

    def log(self, row: dict[str, Any]) -> None:
        step = row.get("step")
        for tracker in self.trackers:
            tracker.log(row, step)

    def table(self, name: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None:
        for tracker in self.trackers:
            tracker.table(name, columns, rows, step)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()
        atexit.unregister(self.close)


def open_trackers(report_to: list[str] | str | None, out: Path, stage: str, config: dict) -> Trackers | None:
    names = parse_report_to(report_to)
    return Trackers(names, out, stage, config) if names else None
