"""`rlhfkit report`: one self-contained HTML file for a run, or for several runs side by side.

It reads what the stages wrote (run_config.json, metrics.jsonl, rollouts.jsonl, the
redistribute JSONL, evaluate's and critique-revise's results, rm_metrics.json) and renders
them with rlhfkit.reporting. Nothing is fetched when the file is opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rlhfkit.config import REQUIRED, opt
from rlhfkit.console import console
from rlhfkit.errors import RlhfkitError
from rlhfkit.io import write_text
from rlhfkit.reporting import comparison_curves, find_runs, render_report, run_view


@dataclass
class ReportConfig:
    runs: list[str] = opt(REQUIRED, "Run directories (each with a run_config.json), or a directory of runs (e.g. runs/demo): every run in it, in the order they started.", argument=True, panel="Data")
    out: str = opt(REQUIRED, "The HTML file to write (self-contained: styles, script and plots inline).", panel="Output")
    title: Optional[str] = opt(None, "Title of the report (default: the run directories' names).", panel="Output")
    max_rollouts: int = opt(400, "Most rollouts shown per run (the last N logged); 0 = all.", panel="Output")

    def validate(self) -> None:
        if not self.out.endswith((".html", ".htm")):
            raise RlhfkitError(f"--out must be an .html file, got '{self.out}'")
        if self.max_rollouts < 0:
            raise RlhfkitError(f"--max-rollouts must be >= 0, got {self.max_rollouts}")


def run_report(cfg: ReportConfig) -> Path:
    """One self-contained HTML report of one or more runs: config, curves, rollout heat maps.

    `rlhfkit report runs/demo --out runs/demo/report.html` shows every run of the demo: each
    one's resolved config and command; PPO's reward curves (weighted and raw per source),
    KL, length, entropy and losses; every logged rollout as token heat maps, one row per
    reward source, with the annotators' spans underlined, filterable by step and sortable by
    reward; evaluate's tables with their intervals; the reward models' held-out metrics;
    critique-and-revise rounds with a word diff of each revision. Opens offline.
    """
    paths = find_runs(cfg.runs)
    views = [run_view(path, cfg.max_rollouts) for path in paths]
    title = cfg.title or f"rlhfkit report: {', '.join(Path(run).name or run for run in cfg.runs)}"
    text = render_report(views, title, comparison_curves(paths))
    write_text(cfg.out, text)
    console.print(f"report: {len(views)} run(s), {sum(len(v.rollouts) for v in views)} rollout(s) -> {cfg.out} "
                  f"({len(text.encode()) / 1e6:.1f} MB)", soft_wrap=True, markup=False, highlight=False)
    return Path(cfg.out)
