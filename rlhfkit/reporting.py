"""The HTML of `rlhfkit report` (and of `redistribute --html`): what a run directory shows,
rendered with the jinja2 templates in rlhfkit/templates.

Curves are inline SVG (rlhfkit.plots); every logged rollout is a token heat map, one row per
reward source with the annotators' spans underlined, filterable by step and sortable by
reward with a few lines of inline script. Nothing is fetched when the file is opened.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.errors import RlhfkitError
from rlhfkit.plots import Panel, Series, colour_scale, draw, ppo_panels, reward_colour, svg_text
from rlhfkit.runs import read_metric_series
from rlhfkit.schema import load_records, read_json_file

RUN_CONFIG = "run_config.json"
REDISTRIBUTE_CONFIG = "*.run_config.json"  # redistribute writes FILE.run_config.json beside FILE.jsonl
# The markdown tables stages write: evaluate's and critique-revise's results (with their
# intervals), evaluate --audit-rm's step windows.
RESULT_FILES = ("results.md", "audit.md")


@dataclass
class Token:
    text: str
    colour: str
    value: float
    span: str = ""  # the annotator span covering it: "aspect: label", else ""


@dataclass
class Rollout:
    id: str
    step: int
    prompt: str
    response: str
    reward: float  # the sum of `token_rewards` (PPO's reward, or the redistributed score)
    rows: list[tuple[str, list[Token]]]  # (source, its tokens) per reward source
    spans: list[dict] = field(default_factory=list)


@dataclass
class RunView:
    name: str
    stage: str
    path: str
    config: str  # the resolved config, as indented JSON
    command: str
    versions: str
    curves: str = ""  # inline SVG
    rollouts: list[Rollout] = field(default_factory=list)
    scales: dict[str, float] = field(default_factory=dict)  # full colour per source
    steps: list[int] = field(default_factory=list)
    tables: str = ""  # results.md as HTML
    held_out: dict = field(default_factory=dict)
    calibration: str = ""  # inline SVG: a segment RM's reliability plot
    revisions: list[dict] = field(default_factory=list)


def find_runs(paths: list[str]) -> list[Path]:
    """Each path that is a run (it has a run_config.json, or redistribute's FILE.run_config.json),
    else the runs directly inside it, ordered by when they started."""
    found: list[Path] = []
    for given in map(Path, paths):
        if not given.is_dir():
            raise RlhfkitError(f"{given}: no such run directory")
        if _is_run(given):
            found.append(given)
            continue
        inside = sorted((d for d in given.iterdir() if d.is_dir() and _is_run(d)), key=_started_at)
        if not inside:
            raise RlhfkitError(f"{given}: not a run directory (no {RUN_CONFIG}) and no run directories in it")
        found += inside
    return found


def _is_run(path: Path) -> bool:
    return (path / RUN_CONFIG).is_file() or any(path.glob(REDISTRIBUTE_CONFIG))


def _run_config(path: Path) -> dict:
    files = [path / RUN_CONFIG] if (path / RUN_CONFIG).is_file() else sorted(path.glob(REDISTRIBUTE_CONFIG))
    config = read_json_file(files[0])  # one line for a damaged file (not UTF-8, not JSON, too deep)
    if not isinstance(config, dict):
        raise RlhfkitError(f"{files[0]}: not a JSON object (a run's config is one)")
    return config


def _started_at(path: Path) -> float:
    """When the run started: its run_config.json's time of writing (every stage writes it
    first; redistribute's has no started_at field)."""
    files = [path / RUN_CONFIG] if (path / RUN_CONFIG).is_file() else sorted(path.glob(REDISTRIBUTE_CONFIG))
    return files[0].stat().st_mtime


def run_view(path: Path, max_rollouts: int) -> RunView:
    """Everything the report shows of one run directory."""
    config = _run_config(path)
    stage = str(config.get("stage", ""))
    view = RunView(
        name=path.name, stage=stage, path=str(path),
        config=json.dumps(config.get("config", {}), indent=2, ensure_ascii=False),
        command=" ".join(config.get("command", [])),
        versions=", ".join(f"{k} {v}" for k, v in config.get("versions", {}).items()),
    )
    if (path / "metrics.jsonl").is_file():
        view.curves = run_curves(path, stage)
    rollouts = path / "rollouts.jsonl"
    if not rollouts.is_file() and stage == "redistribute":
        rollouts = Path(config.get("config", {}).get("out", ""))
        rollouts = rollouts if rollouts.is_file() else next(iter(sorted(path.glob("*.jsonl"))), Path())
    if rollouts.is_file():
        view.rollouts, view.scales = read_rollouts(rollouts, max_rollouts)
        view.steps = sorted({r.step for r in view.rollouts})
    view.tables = "".join(markdown_html((path / name).read_text(encoding="utf-8"))
                          for name in RESULT_FILES if (path / name).is_file())
    rm_metrics = path / "rm_metrics.json"
    if rm_metrics.is_file():
        metrics = read_json_file(rm_metrics)
        held_out = metrics.get("held_out") if isinstance(metrics, dict) else None
        view.held_out = dict(held_out) if isinstance(held_out, dict) else {}
        bins = view.held_out.pop("calibration", None)
        if bins:
            view.calibration = calibration_plot(bins, path.name)
    if (path / "revisions.jsonl").is_file():
        view.revisions = revision_diffs(path / "revisions.jsonl")
    return view


def calibration_plot(bins: list[dict], name: str) -> str:
    """A segment RM's reliability plot (metrics.calibration_bins) as inline SVG: the held-out
    error rate against the mean predicted P(error) per bin; the diagonal is perfect calibration."""
    predicted = [b["mean_error_probability"] for b in bins]
    panel = Panel("calibration on held-out segments", "mean predicted P(error) in the bin", "observed error rate", [
        Series("perfectly calibrated", [0.0, 1.0], [0.0, 1.0]),
        Series("reward model (" + ", ".join(str(b["segments"]) for b in bins) + " segments per bin)", predicted,
               [b["error_rate"] for b in bins]),
    ], ylim=(-0.04, 1.04))
    return svg_text(draw(f"train-rm: {name}", [panel]))


def run_curves(path: Path, stage: str) -> str:
    """The run's curves as inline SVG: PPO's rewards, KL, length, entropy and losses; a
    fine-tuning run's losses (held-out evaluations as points)."""
    series = read_metric_series(path)
    if stage == "ppo":
        panels = ppo_panels(series)
    else:
        lines = [Series(key, *zip(*series[key]), markers_only=key.startswith("eval"))
                 for key in ("loss", "eval_loss") if series.get(key)]
        panels = [Panel("loss", "optimizer step", "loss", lines)] if lines else []
    if not panels:
        return ""
    return svg_text(draw(f"{stage}: {path.name}", panels, columns=min(3, len(panels)), width=4.6, height=3.2))


def comparison_curves(paths: list[Path]) -> str:
    """reward/total and KL of every PPO run in one figure (when there are several)."""
    runs = [(p.name, read_metric_series(p)) for p in paths if _run_config(p).get("stage") == "ppo" and (p / "metrics.jsonl").is_file()]
    if len(runs) < 2:
        return ""
    panels = [Panel(title, "PPO step", ylabel, [Series(name, *zip(*series[key])) for name, series in runs if series.get(key)])
              for key, title, ylabel in (("reward/total", "reward/total", "reward per response"), ("kl", "KL(policy || reference)", "KL per response"))]
    return svg_text(draw(f"ppo runs: {', '.join(name for name, _ in runs)}", panels, width=5.5, height=3.4))


def read_rollouts(path: Path, limit: int) -> tuple[list[Rollout], dict[str, float]]:
    """The logged rollouts (the newest `limit`, 0 = all) with a heat-map row per reward source:
    `meta.source_token_rewards` (ppo) when logged, and the rewards PPO learned from."""
    records = [r for r in load_records(path) if getattr(r, "token_rewards", None) is not None]
    if limit:
        records = records[-limit:]
    rows_of = []
    for record in records:
        rows = dict((record.meta or {}).get("source_token_rewards") or {})
        # ppo: each source's row, then the rewards PPO learned from; redistribute: the RM's row.
        rows["total" if rows else Path(str((record.meta or {}).get("reward_model", "reward"))).name] = record.token_rewards
        rows_of.append(rows)
    scales = {name: colour_scale([v for rows in rows_of for v in rows.get(name, [])])
              for name in dict.fromkeys(name for rows in rows_of for name in rows)}
    rollouts = []
    for number, (record, rows) in enumerate(zip(records, rows_of)):
        spans = (record.meta or {}).get("annotator_spans") or []
        offsets = _token_offsets(record.tokens or [])
        rollouts.append(Rollout(
            id=record.id, step=int((record.meta or {}).get("step", 0)), prompt=record.prompt, response=record.response,
            reward=round(sum(record.token_rewards), 6), spans=spans,
            rows=[(name, [Token(tok, reward_colour(v, scales[name]), v, _covering(spans, start, end))
                          for tok, v, (start, end) in zip(record.tokens or [], values, offsets)])
                  for name, values in rows.items()],
        ))
    return rollouts, scales


def _token_offsets(tokens: list[str]) -> list[tuple[int, int]]:
    """Character ranges of consecutive tokens in the response they spell."""
    offsets, at = [], 0
    for token in tokens:
        offsets.append((at, at + len(token)))
        at += len(token)
    return offsets


def _covering(spans: list[dict], start: int, end: int) -> str:
    labels = [f"{s.get('aspect', '')}: {s.get('label', '')}" for s in spans if s["start"] < end and start < s["end"]]
    return "; ".join(labels)


def revision_diffs(path: Path) -> list[dict]:
    """Each input's rounds, every revision as a word diff against the response it revised."""
    items = []
    for record in load_records(path):
        previous = (record.meta or {}).get("original_response", "")
        rounds = []
        for item in (record.meta or {}).get("rounds", []):
            revised = item.get("response", "")
            rounds.append({**item, "diff": word_diff(previous, revised)})
            previous = revised
        items.append({"id": record.id, "prompt": record.prompt, "original": (record.meta or {}).get("original_response", ""), "rounds": rounds})
    return items


def word_diff(before: str, after: str) -> list[tuple[str, str]]:
    """(kind, text) pieces: kind is "same", "del" or "ins"."""
    a, b = before.split(" "), after.split(" ")
    pieces: list[tuple[str, str]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag == "equal":
            pieces.append(("same", " ".join(a[i1:i2])))
            continue
        if i2 > i1:
            pieces.append(("del", " ".join(a[i1:i2])))
        if j2 > j1:
            pieces.append(("ins", " ".join(b[j1:j2])))
    return pieces


def markdown_html(text: str) -> str:
    """A stage's results.md (tables, intervals, notes) as HTML; raw HTML in it is escaped."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def render_report(views: list[RunView], title: str, comparison: str) -> str:
    import jinja2

    from rlhfkit import __version__

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("rlhfkit", "templates"), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    return environment.get_template("report.html.j2").render(
        title=title, runs=views, comparison=comparison, version=__version__,
    )


def rollouts_html(jsonl: Path, title: str, config: dict) -> str:
    """The HTML page of one file of scored records (redistribute --html): the report's heat
    maps, colour scale, annotator spans and sorting, for that file alone."""
    rollouts, scales = read_rollouts(jsonl, 0)
    view = RunView(name=jsonl.name, stage="redistribute", path=str(jsonl), config=json.dumps(config, indent=2, ensure_ascii=False),
                   command="", versions="", rollouts=rollouts, scales=scales, steps=sorted({r.step for r in rollouts}))
    return render_report([view], title, "")
