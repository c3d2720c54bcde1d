"""Reward-hacking audit: how well each learned reward model judges the policy's *own* samples.

An RM is trained on one distribution of responses and then scores what PPO samples, which
drifts away from it; where the RM is wrong on the new samples, PPO is paid for the error
(reward hacking). The audit replays a PPO run's logged rollouts (`rollouts.jsonl`:
`generation` records with `meta.step`) through each RM and through a programmatic judge
that knows the truth, and reports, step by step, how often the RM agrees with the judge:

- segment RMs (factuality, relevance): **segment accuracy**, the share of the RM's segments
  (at its own granularity) where the RM's verdict (error when P(error) > 0.5, as PPO and
  evaluate use it) equals the judge's (error when one of the judge's error spans of the
  RM's aspect overlaps the segment). Beside it: the true and the RM-flagged error rate and
  the **error recall** (true errors the RM flags), which shows an error kind PPO learned to
  produce because the RM does not see it.
- sequence RMs (preference, completeness, regression): **pairwise accuracy**, over every
  pair of samples of the same prompt in the same step whose judge scores differ: the share
  the RM orders as the judge does (an RM tie counts one half, as in ROC AUC; pairs the
  judge ties are left out, since either order is right). Beside it: the mean RM score
  and the mean judge score per step, whose opposite trends are the hacking signature.

The judge is `py:module:function`, called as `f(prompts, responses)`; per response it
returns a dict `{"spans": [...], "scores": {...}}`: `spans` the error spans (each a
`rlhfkit.schema.Span`, or a dict with `start`, `end`, `aspect`) and `scores` the true score
for each sequence RM's aspect (e.g. {"preference": 0.4, "completeness": 0.6}). A segment RM
reads the spans of its aspect, a sequence RM the score of its aspect.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.errors import RlhfkitError
from rlhfkit.io import write_json, write_text
from rlhfkit.plots import Panel, Series, draw, save_png
from rlhfkit.rewards.reward_model import (
    SEQUENCE_KINDS,
    RewardModel,
    judged_errors,
)
from rlhfkit.rewards.shared_backbone import load_named_reward_models
from rlhfkit.schema import Generation, read_records
from rlhfkit.segment import label_segments

AUDIT_JSON, AUDIT_MARKDOWN, AUDIT_PLOT = "audit.json", "audit.md", "audit.png"


@dataclass(frozen=True)
class JudgedSpan:
    start: int
    end: int
    aspect: str


@dataclass
class Verdict:
    """The judge's truth about one response."""

    spans: list[JudgedSpan]
    scores: dict[str, float]


def load_judge(spec: str) -> Callable:
    """The function of a `py:module:function` judge (imported as `py:` reward sources are)."""
    from rlhfkit.rewards.sources import PythonFunctionSource

    if not spec.startswith("py:") or spec.count(":") < 2:
        raise RlhfkitError(f"--audit-judge {spec}: expected py:module:function")
    return PythonFunctionSource("audit judge", spec[3:]).fn


def _span(item, index: int) -> JudgedSpan:
    try:
        if isinstance(item, dict):
            return JudgedSpan(int(item["start"]), int(item["end"]), str(item["aspect"]))
        return JudgedSpan(int(item.start), int(item.end), str(item.aspect))
    except (KeyError, AttributeError, TypeError, ValueError):
        raise RlhfkitError(f"audit judge: response {index}: a span must have start, end and aspect, got {item!r}") from None


def judge_verdicts(judge: Callable, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
    """Call the judge and check what it returned."""
    results = judge(list(prompts), list(responses))
    if len(results) != len(responses):
        raise RlhfkitError(f"audit judge returned {len(results)} verdicts for {len(responses)} responses")
    verdicts = []
    for i, result in enumerate(results):
        if not isinstance(result, dict):
            raise RlhfkitError(f'audit judge: response {i}: expected a dict {{"spans": [...], "scores": {{...}}}}, got {type(result).__name__}')
        scores = result.get("scores", {})
        if not isinstance(scores, dict) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in scores.values()):
            raise RlhfkitError(f"audit judge: response {i}: 'scores' must map aspect names to numbers, got {scores!r}")
        verdicts.append(Verdict([_span(s, i) for s in result.get("spans", [])], {k: float(v) for k, v in scores.items()}))
    return verdicts


def read_rollouts(path: str | Path) -> dict[int, list[Generation]]:
    """A PPO run's logged rollouts by step (each record needs an integer `meta.step`)."""
    path = Path(path)
    by_step: dict[int, list[Generation]] = {}
    if not path.is_file():
        raise RlhfkitError(f"{path}: no such file")
    lines = [n for n, raw in enumerate(path.read_bytes().splitlines(), start=1) if raw.strip()]
    for lineno, record in zip(lines, read_records(path, "generation")):
        step = record.meta.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise RlhfkitError(f"{path}:{lineno}: a rollout needs an integer meta.step (PPO's rollouts.jsonl has one), got {step!r}")
        by_step.setdefault(step, []).append(record)
    if not by_step:
        raise RlhfkitError(f"{path}: no rollouts (the file is empty)")
    return dict(sorted(by_step.items()))


# --- agreement -------------------------------------------------------------------------------


@dataclass
class SegmentCounts:
    segments: int = 0
    agree: int = 0
    true_errors: int = 0
    rm_errors: int = 0
    caught: int = 0  # true errors the RM flags

    def add(self, rm_says: Sequence[bool], truth: Sequence[bool]) -> None:
        for predicted, actual in zip(rm_says, truth, strict=True):
            self.segments += 1
            self.agree += predicted == actual
            self.true_errors += actual
            self.rm_errors += predicted
            self.caught += predicted and actual

    def metrics(self) -> dict[str, float | int | None]:
        n = self.segments
        return {
            "accuracy": self.agree / n if n else None,
            "segments": n,
            "true_error_rate": self.true_errors / n if n else None,
            "rm_error_rate": self.rm_errors / n if n else None,
            "error_recall": self.caught / self.true_errors if self.true_errors else None,
        }


def pairwise_agreement(groups: Sequence[Sequence[tuple[float, float]]]) -> dict[str, float | int | None]:
    """Over every pair within a group of (RM score, judge score) whose judge scores differ:
    the share the RM orders as the judge does, an RM tie counting one half."""
    pairs, concordant, rm_ties = 0, 0, 0
    for group in groups:
        for (rm_a, truth_a), (rm_b, truth_b) in itertools.combinations(group, 2):
            if truth_a == truth_b:
                continue
            pairs += 1
            if rm_a == rm_b:
                rm_ties += 1
            elif (rm_a > rm_b) == (truth_a > truth_b):
                concordant += 1
    return {"accuracy": (concordant + 0.5 * rm_ties) / pairs if pairs else None, "pairs": pairs,
            "concordant": concordant, "rm_ties": rm_ties}


def audit_step(rm: RewardModel, verdicts: Sequence[Verdict], records: Sequence[Generation], batch_size: int) -> dict:
    """One RM's agreement with the judge on one step's rollouts."""
    prompts, responses = [r.prompt for r in records], [r.response for r in records]
    if rm.kind == "segment":
        counts = SegmentCounts()
        for (segments, probs), verdict in zip(rm.error_probabilities(prompts, responses, batch_size), verdicts):
            counts.add(judged_errors(probs), label_segments(segments, verdict.spans, rm.aspect))
        return counts.metrics()
    rm_scores = [s.values[0] for s in rm.score(prompts, responses, batch_size)]
    truth = [v.scores[rm.aspect] for v in verdicts]
    groups: dict[str, list[tuple[float, float]]] = {}
    for prompt, score, true in zip(prompts, rm_scores, truth):
        groups.setdefault(prompt, []).append((score, true))
    return {**pairwise_agreement(list(groups.values())), "rm_score": statistics.fmean(rm_scores),
            "judge_score": statistics.fmean(truth)}


@dataclass
class RunAudit:
    name: str
    source: str
    steps: list[int]
    by_rm: dict[str, list[dict]] = field(default_factory=dict)  # RM name -> one metrics dict per step


def audit_runs(rms: dict[str, RewardModel], judge: Callable, rollouts: dict[str, tuple[str, dict[int, list[Generation]]]],
               batch_size: int = 8) -> list[RunAudit]:
    """Every RM against the judge on every run's rollouts ({run: (file, read_rollouts(file))}), step by step."""
    audits = []
    for run_name, (source, by_step) in rollouts.items():
        audit = RunAudit(run_name, source, list(by_step))
        verdicts = {step: judge_verdicts(judge, [r.prompt for r in records], [r.response for r in records])
                    for step, records in by_step.items()}
        for rm_name, rm in rms.items():
            if rm.kind in SEQUENCE_KINDS and any(rm.aspect not in v.scores for vs in verdicts.values() for v in vs):
                    raise RlhfkitError(f"--audit-rm {rm_name}: the judge gives no score for the RM's aspect "
                                       f"{rm.aspect!r} (its 'scores' keys must include it)")
            audit.by_rm[rm_name] = [audit_step(rm, verdicts[step], records, batch_size) for step, records in by_step.items()]
        audits.append(audit)
    return audits


# --- the report ------------------------------------------------------------------------------


def step_windows(steps: int, count: int = 4) -> list[tuple[int, int]]:
    """Up to `count` consecutive index windows [a, b) covering `steps` items."""
    size = max(1, -(-steps // count))
    return [(a, min(a + size, steps)) for a in range(0, steps, size)]


def window_mean(rows: Sequence[dict], key: str) -> float | None:
    values = [row[key] for row in rows if row.get(key) is not None]
    return statistics.fmean(values) if values else None


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def render_audit(audits: Sequence[RunAudit], kinds: dict[str, str], judge: str) -> str:
    lines = ["# Reward-model audit on the policy's own samples", "",
             (f"Judge: `{judge}`. Segment RMs: segment accuracy (RM error verdict = judge's), with the true and "
             "RM-flagged error rates and the error recall; sequence RMs: pairwise accuracy over same-prompt pairs "
             "of a step the judge does not tie (RM ties count one half), with the mean RM and judge scores. "
             "Means over step windows; every step is in audit.json."), ""]
    for audit in audits:
        windows = step_windows(len(audit.steps))
        heads = [f"steps {audit.steps[a]}-{audit.steps[b - 1]}" for a, b in windows]
        lines += [f"## {audit.name} (`{audit.source}`)", "",
                  "| RM | measure | " + " | ".join(heads) + " |", "|---|---" + "|---" * len(heads) + "|"]
        for rm_name, rows in audit.by_rm.items():
            keys = (["accuracy", "true_error_rate", "rm_error_rate", "error_recall"] if kinds[rm_name] == "segment"
                    else ["accuracy", "rm_score", "judge_score"])
            for key in keys:
                label = ("segment accuracy" if kinds[rm_name] == "segment" else "pairwise accuracy") if key == "accuracy" else key.replace("_", " ")
                lines.append(f"| {rm_name} | {label} | " + " | ".join(_cell(window_mean(rows[a:b], key)) for a, b in windows) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_audit(path: str | Path, audits: Sequence[RunAudit]) -> None:
    """One panel per run: each RM's accuracy against the judge per PPO step."""
    panels = []
    for audit in audits:
        series = []
        for rm_name, metrics in audit.by_rm.items():
            points = [(step, m["accuracy"]) for step, m in zip(audit.steps, metrics) if m["accuracy"] is not None]
            if points:
                series.append(Series(rm_name, *zip(*points)))
        panels.append(Panel(audit.name, "PPO step", "accuracy vs judge", series, ylim=(-0.02, 1.02), reference_y=0.5))
    save_png(draw("reward-hacking audit: each RM against the judge", panels, columns=min(3, len(panels)), width=4.5, height=3.2), path)


def parse_rollouts(specs: Sequence[str]) -> dict[str, str]:
    """{run name: rollouts file} from `NAME=FILE` or `FILE` items (name: the run directory's name)."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not (sep and name and path):
            name, path = Path(spec).parent.name or spec, spec
        if name in out:
            raise RlhfkitError(f"--rollouts: the run name {name!r} is given twice; name them with NAME=FILE")
        out[name.strip()] = path.strip()
    return out


def check_audit_inputs(judge: str, rollouts: Sequence[str]) -> None:
    """Import the judge and read every rollouts file: bad input fails before anything is written."""
    load_judge(judge)
    for path in parse_rollouts(rollouts).values():
        read_rollouts(path)


def run_audit(out: str | Path, rm_paths: dict[str, str], judge: str, rollouts: Sequence[str], *, device,
              dtype: str = "auto", batch_size: int = 8) -> dict:
    """Load the RMs and the judge, audit every run's rollouts and write the audit files to `out`.
    Inputs are read and checked before any model loads."""
    judge_fn = load_judge(judge)
    runs = {name: (path, read_rollouts(path)) for name, path in parse_rollouts(rollouts).items()}
    rms = load_named_reward_models(rm_paths, device=device, dtype=dtype)
    audits = audit_runs(rms, judge_fn, runs, batch_size)
    return write_audit(out, audits, {name: rm.kind for name, rm in rms.items()}, judge)


def write_audit(out: str | Path, audits: Sequence[RunAudit], kinds: dict[str, str], judge: str) -> dict:
    """audit.json (every step), audit.md (step windows) and audit.png (accuracy per step) in `out`."""
    out = Path(out)
    result = {
        "judge": judge,
        "kinds": kinds,
        "runs": {a.name: {"rollouts": a.source, "steps": a.steps, "rms": a.by_rm} for a in audits},
    }
    write_json(out / AUDIT_JSON, result)
    write_text(out / AUDIT_MARKDOWN, render_audit(audits, kinds, judge))
    plot_audit(out / AUDIT_PLOT, audits)
    return result
