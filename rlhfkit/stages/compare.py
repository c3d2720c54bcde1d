"""`rlhfkit compare`: several runs side by side (e.g. fine-grained vs holistic PPO).

Reads each run directory's `metrics.jsonl` (and `run_config.json` for the stage's name) and
writes either a PNG of the metric's curves over the steps, one line per run, or a markdown
table of the figures people quote: the first and last logged value and the change between.
Rows without a step, and values written as strings (non-finite numbers), are left out.

Rewards go by rlhfkit.runs' names (reward/raw/NAME, reward/normalized/NAME,
reward/weighted/NAME, reward/total). A PPO run from before those names logged only the
weighted value, as reward/NAME (eval/reward_NAME, eval/reward_total): it is read as
reward/weighted/NAME (eval/reward/weighted/NAME, eval/reward/total), and compare says so; such
a run has no raw score.
"""

from __future__ import annotations

from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path

from rlhfkit.config import REQUIRED, opt
from rlhfkit.console import console
from rlhfkit.errors import RlhfkitError
from rlhfkit.io import write_text
from rlhfkit.plots import Panel, Series, draw, save_png
from rlhfkit.runs import (
    RAW_REWARD_PREFIX,
    TOTAL_REWARD_KEY,
    read_metric_series,
    run_stage_name,
    weighted_reward_key,
)

OUT_KINDS = (".png", ".md")
# What a run is compared on when --metric is not given: the first every run has.
DEFAULT_METRICS = (TOTAL_REWARD_KEY, "loss", "eval_loss")
REWARD_NAME_KINDS = ("raw", "normalized", "weighted")


@dataclass
class CompareConfig:
    runs: list[str] = opt(REQUIRED, "Run directories (outputs of sft, train-rm, ppo, ...), each with a metrics.jsonl.", argument=True, panel="Data")
    out: str = opt(REQUIRED, "Output file: FILE.png (curves) or FILE.md (a table of first/last values); an existing file is replaced only if compare wrote it.", panel="Output")
    metric: list[str] = opt([], "Metric(s) to compare, repeatable (default: reward/total, else loss, else eval_loss).", panel="Output")
    labels: list[str] = opt([], "Names of the runs in the same order, repeatable (default: the directories' names).", panel="Output")

    def validate(self) -> None:
        if Path(self.out).suffix.lower() not in OUT_KINDS:
            raise RlhfkitError(f"--out must end in {' or '.join(OUT_KINDS)}, got '{self.out}'")
        if self.labels and len(self.labels) != len(self.runs):
            raise RlhfkitError(f"--labels gives {len(self.labels)} name(s) for {len(self.runs)} run(s)")
        for run in self.runs:
            if not (Path(run) / "metrics.jsonl").is_file():
                raise RlhfkitError(f"{run}: no metrics.jsonl (not an rlhfkit run directory)")


@dataclass
class RunCurves:
    label: str
    stage: str
    # metric -> [(step, value)] in the order logged
    series: dict[str, list[tuple[int, float]]]
    # the run logged the rewards under their names before reward/raw|normalized|weighted
    old_reward_names: bool = False


def current_reward_key(key: str) -> str:
    """An old PPO log's reward key by today's name: reward/NAME and eval/reward_NAME held the
    weighted value; reward/total and eval/reward_total the total. Other keys as they are."""
    if key == "eval/reward_total":
        return f"eval/{TOTAL_REWARD_KEY}"
    if key.startswith("eval/reward_"):
        return "eval/" + weighted_reward_key(key.removeprefix("eval/reward_"))
    prefix, _, name = key.partition("/")
    if prefix == "reward" and key != TOTAL_REWARD_KEY and name.partition("/")[0] not in REWARD_NAME_KINDS:
        return weighted_reward_key(name)
    return key


def read_run(path: Path, label: str) -> RunCurves:
    """A run's numeric metrics by step; a line that is not JSON is an error with file:line."""
    series = read_metric_series(path)
    old_names = not any(key.startswith(RAW_REWARD_PREFIX) for key in series) and any(current_reward_key(key) != key for key in series)
    if old_names:
        series = {current_reward_key(key): values for key, values in series.items()}
    return RunCurves(label, run_stage_name(path), series, old_names)


def choose_metrics(runs: list[RunCurves], wanted: list[str]) -> list[str]:
    """--metric as given (every run must have it), else the first default every run has."""
    if not wanted:
        for metric in DEFAULT_METRICS:
            if all(metric in run.series for run in runs):
                return [metric]
        raise RlhfkitError(
            f"the runs have none of {', '.join(DEFAULT_METRICS)} in common; name one with --metric "
            f"(metrics of {runs[0].label}: {', '.join(sorted(runs[0].series)) or 'none'})"
        )
    for metric in wanted:
        for run in runs:
            if metric not in run.series:
                close = get_close_matches(metric, list(run.series), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise RlhfkitError(
                    f"{run.label}: no {metric!r} in metrics.jsonl; {hint}metrics there: {', '.join(sorted(run.series)) or 'none'}"
                )
    return list(wanted)


def render_table(runs: list[RunCurves], metrics: list[str]) -> str:
    """One markdown table per metric: first and last logged value, their change, the last step."""
    lines = [f"{TABLE_TITLE}{', '.join(metrics)}", ""]
    for metric in metrics:
        lines += [
            f"## {metric}",
            "",
            "| run | stage | last step | first | last | change |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for run in runs:
            values = run.series[metric]
            (_, first), (last_step, last) = values[0], values[-1]
            lines.append(f"| {run.label} | {run.stage or '-'} | {last_step} | {first:.4f} | {last:.4f} | {last - first:+.4f} |")
        lines.append("")
    return "\n".join(lines)


# What compare writes first in each kind of --out: an existing file that does not start so
# was not written by compare, and is not overwritten (an evaluate run's results.md, say).
TABLE_TITLE = "# Run comparison: "
PNG_MARKER = "rlhfkit compare"


def check_replaceable(out: Path) -> None:
    """--out may be new, or an earlier compare output; anything else is refused."""
    if not out.exists():
        return
    if not out.is_file():
        raise RlhfkitError(f"--out {out}: exists and is not a file")
    with open(out, "rb") as handle:
        head = handle.read(4096)
    ours = head.startswith(TABLE_TITLE.encode()) if out.suffix.lower() == ".md" else PNG_MARKER.encode() in head
    if not ours:
        raise RlhfkitError(f"--out {out}: exists and was not written by rlhfkit compare; remove it or choose another --out")


def plot_curves(path: Path, runs: list[RunCurves], metrics: list[str]) -> None:
    """One panel per metric, one line per run."""
    panels = [Panel(metric, "step", metric, [Series(run.label, *zip(*run.series[metric])) for run in runs])
              for metric in metrics]
    save_png(draw(f"compare: {', '.join(run.label for run in runs)}", panels), path, metadata={"Software": PNG_MARKER})


def run_compare(cfg: CompareConfig) -> Path:
    """Compare runs side by side: curves (--out FILE.png) or first/last figures (--out FILE.md).

    `rlhfkit compare runs/ppo-fine-grained runs/ppo-holistic --metric reward/total --out cmp.md`
    """
    labels = cfg.labels or [Path(run).name or str(run) for run in cfg.runs]
    if len(set(labels)) < len(labels):
        labels = [str(run) for run in cfg.runs]  # same directory names under different parents
    runs = [read_run(Path(run), label) for run, label in zip(cfg.runs, labels)]
    for run in runs:
        if run.old_reward_names:
            console.print(
                f"compare: {run.label} logged rewards under the old names: reward/NAME (the weighted value) is read as "
                "reward/weighted/NAME; the run has no raw score (reward/raw/NAME)"
            )
    metrics = choose_metrics(runs, cfg.metric)
    out = Path(cfg.out)
    check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".md":
        text = render_table(runs, metrics)
        write_text(out, text)
        console.print(text, markup=False, highlight=False, soft_wrap=True)
    else:
        plot_curves(out, runs, metrics)
    console.print(f"compare: {len(runs)} run(s) on {', '.join(metrics)} -> {out}")
    return out
