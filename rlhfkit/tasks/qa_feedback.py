"""The QA-Feedback task (Fine-Grained RLHF long-form QA, Wu et al. 2023): what belongs to
this data set rather than to the method.

- `PRESETS`: what `train-rm --aspect factuality|relevance|completeness|preference` means (the
  default task's presets, rlhfkit.tasks), with the reference's label rules (`QA_MIN_SPAN`);
- the recipe data steps on QA files: `qa_answer_records` (policy inputs and gold answers),
  `shorten_prompts` (QA prompts cut for tiny CPU runs), `rm_held_out_table` (reward models
  scored on the held-out records, `make table-qa-rm`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhfkit.console import console
from rlhfkit.errors import RlhfkitError
from rlhfkit.io import write_json, write_text
from rlhfkit.metrics import BOOTSTRAP_DRAWS
from rlhfkit.recipes import recipe_function
from rlhfkit.rewards.presets import AspectPreset

# The training defaults of the presets (lengths, lr, epochs, class weight) were tuned on the
# shipped sample with the tiny offline backbone (`rlhfkit init-model`), a randomly initialised
# model that needs a high learning rate: a pretrained backbone wants --lr 1e-5 to 5e-5, and a
# larger --max-length / --max-prompt-length so that the passages a factuality judgement needs
# are in view. The fixed prompt budget puts every response at the same position, which a
# model with learned absolute positions (GPT-2) needs to tell where in the response a segment
# lies (later sub-sentences of the sample are more often irrelevant); the preference presets
# keep only the prompt's tail, as the tiny model learns nothing from the passages and pairs
# cost two forward passes. As the prompt budget is fixed, --max-length only bounds the
# response (generous, so that PPO's longer samples still fit).
#
# The reference's QA-Feedback label rules (create_rel_fact_rm_files.py, --min_span_len 5): relevance
# spans under 5 words are dropped for both segment RMs; the factuality RM leaves out sentences
# that have a relevance error and no factuality error.
QA_MIN_SPAN = {"min_span_words": 5, "min_span_aspects": ("relevance",)}

PRESETS = {
    # QA-Feedback labels Wrong-Grounding and Unverifiable. With the reference's rule (sentences
    # with only a relevance error left out) 212 of the sample's 630 labelled sentences are
    # errors, so the error class weighs 418 / 212 ~ 2 (inverse class frequency; at weight 1 the
    # tiny backbone never predicts one, at 3 it predicts nothing else).
    "factuality": AspectPreset(
        "segment", "sentence", error_class_weight=2.0, max_length=640, max_prompt_length=128, lr=1e-3,
        ignore_with_aspects=("relevance",), **QA_MIN_SPAN,
    ),
    # QA-Feedback labels Irrelevant, Redundant and Incoherent (about half the sub-sentences).
    "relevance": AspectPreset("segment", "subsentence", max_length=640, max_prompt_length=128, lr=1e-3, **QA_MIN_SPAN),
    "completeness": AspectPreset(
        "preference", max_length=512, max_prompt_length=16, lr=1e-3, epochs=1, holistic_fallback=True
    ),
    "preference": AspectPreset("preference", max_length=512, max_prompt_length=16, lr=1e-3, epochs=1, holistic_fallback=True),
}


# --- recipe data steps ------------------------------------------------------------------------

QA_PAGE_SEPARATOR = " | wikipage: "


def shorten_qa_prompt(prompt: str, passages: int = 1, max_words: int | None = None) -> str:
    """A QA policy input ("question: Q context: wikipage: T text: ... | wikipage: ...") cut to
    its first `passages` pages, each page's text to `max_words` words; other text unchanged."""
    if " context: wikipage: " not in prompt:
        return prompt
    pages = prompt.split(QA_PAGE_SEPARATOR)[:passages]
    if max_words is not None:
        cut = []
        for page in pages:
            head, sep, text = page.partition(" text: ")
            words = text.split()
            cut.append(head + sep + " ".join(words[:max_words]) if sep and len(words) > max_words else page)
        pages = cut
    return QA_PAGE_SEPARATOR.join(pages)


@recipe_function(reads=["inputs"], makes=["out"])
def shorten_prompts(inputs: str, out: str, passages: int = 1, max_words: int | None = None) -> dict:
    """Copy every JSONL record file of the directory `inputs` to `out` with QA prompts cut to
    the question and the first `passages` passages (each at most `max_words` words).

    For tiny CPU runs only: the shipped QA prompts are 500-1,400 tokens. Every record type's
    prompt is cut by the same rule, so the policy, the reward models and the evaluation keep
    seeing identical prompts. Paper-scale recipes never use this step.
    """
    from rlhfkit.schema import load_records, write_records

    source = Path(inputs)
    files = sorted(source.glob("*.jsonl"))
    if not files:
        raise RlhfkitError(f"{inputs}: no .jsonl record files to shorten")
    report: dict[str, Any] = {"passages": passages, "max_words": max_words, "files": {}}
    for path in files:
        records = load_records(path)
        shortened = [
            dataclasses.replace(r, prompt=shorten_qa_prompt(r.prompt, passages, max_words)) if hasattr(r, "prompt") else r
            for r in records
        ]
        write_records(Path(out) / path.name, shortened)
        before = [len(r.prompt.split()) for r in records if hasattr(r, "prompt")]
        after = [len(r.prompt.split()) for r in shortened if hasattr(r, "prompt")]
        report["files"][path.name] = {
            "records": len(records),
            "mean_prompt_words_before": round(statistics.fmean(before), 1) if before else None,
            "mean_prompt_words_after": round(statistics.fmean(after), 1) if after else None,
        }
    write_json(Path(out) / "shorten_report.json", report)
    console.print(f"shorten-prompts: {len(files)} file(s) from {inputs} -> {out} (first {passages} passage(s), max {max_words} words)")
    return report


@recipe_function(reads=["inputs"], makes=["out"])
def qa_answer_records(inputs: list[str], out: str, limit: int | None = None) -> dict:
    """QA-Feedback data files without feedback (train_1k.json, dev.json, test.json) as
    `demonstrations.jsonl` (one per gold answer: the SFT data) and `prompts.jsonl` (with the
    gold answers as references, for ROUGE-L).

    The prompt is the record's `text` (the released policy input) or, without one, built
    from `question` + `passages` ([title, sentence, ...] lists) exactly as the qa-feedback
    importer builds it. Gold answers: `answer` (a list, or a JSON-encoded list) or `gold`.
    """
    from rlhfkit.importers import read_rows, source_names
    from rlhfkit.importers.qa_feedback import policy_input
    from rlhfkit.schema import Demonstration, PromptRecord, write_records

    prompts, demonstrations = [], []
    for spec, name in zip(inputs, source_names(inputs)):
        for row in read_rows(spec, name, "train"):
            if row.error:
                raise RlhfkitError(f"{row.where}: {row.error}")
            data = row.data if isinstance(row.data, dict) else {}
            if isinstance(data.get("text"), str):
                prompt = data["text"]
            elif isinstance(data.get("question"), str) and isinstance(data.get("passages"), list):
                prompt = policy_input(data["question"], data["passages"])
            else:
                raise RlhfkitError(f"{row.where}: expected a QA record with 'text', or 'question' and 'passages'")
            answers = data.get("answer", data.get("gold"))
            if isinstance(answers, str) and answers.lstrip().startswith("["):
                answers = json.loads(answers)
            answers = [answers] if isinstance(answers, str) else answers
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise RlhfkitError(f"{row.where}: 'answer' (or 'gold') must be a string or a list of strings")
            prompts.append(PromptRecord(id=row.key, prompt=prompt, references=answers))
            demonstrations += [Demonstration(id=f"{row.key}:{i}", prompt=prompt, response=a) for i, a in enumerate(answers)]
            if limit is not None and len(prompts) >= limit:
                break
        if limit is not None and len(prompts) >= limit:
            break
    write_records(Path(out) / "prompts.jsonl", prompts)
    write_records(Path(out) / "demonstrations.jsonl", demonstrations)
    console.print(f"qa-answers: {len(prompts)} prompts, {len(demonstrations)} demonstrations -> {out}")
    return {"prompts": len(prompts), "demonstrations": len(demonstrations)}


# --- the held-out reward-model table (recipes/qa_feedback/rm_heldout.yaml) ---


def _run_file(directory: Path, name: str) -> dict:
    path = directory / name
    if not path.is_file():
        raise RlhfkitError(f"rm_held_out_table: {path}: no such file (did the step that writes it run?)")
    return json.loads(path.read_text(encoding="utf-8"))


def _interval_text(interval: list[float] | None, signed: bool = False) -> str:
    if interval is None:
        return "none (fewer than 2 prompts)"
    lo, hi = interval
    return f"[{lo:+.3f}, {hi:+.3f}]" if signed else f"[{lo:.3f}, {hi:.3f}]"


@recipe_function(reads=["evaluations"], writes=["out"])
def rm_held_out_table(out: str, title: str, evaluations: list[str], labels: list[str] | None = None) -> dict:
    """The table of reward models scored on held-out data: `evaluations` are `train-rm
    --eval-only` output directories, one row each, named by `labels` (default: each RM's
    aspect; give labels when two RMs share an aspect). Per row: the held-out metric beside its trivial
    baseline with the 95% bootstrap interval over prompts that train-rm computed, and its
    verdict `beats_baseline_clearly` (segment RMs: the interval of accuracy minus the
    majority baseline lies above 0; preference RMs: the pairwise accuracy's lies above 0.5);
    for segment RMs also the error AUC and its interval (above 0.5: errors ranked above
    chance), and each RM's training settings and time (its own run_config.json and
    rm_metrics.json). Writes `out` (markdown) and the same figures as JSON beside it.
    """
    if labels is not None and (len(labels) != len(evaluations) or len(set(labels)) != len(labels)):
        raise RlhfkitError(f"rm_held_out_table: labels must name each of the {len(evaluations)} evaluations once, got {labels}")
    from rlhfkit.models import model_dir  # torch: imported when the table is made

    rows: dict[str, dict[str, Any]] = {}
    for number, evaluation in enumerate(map(Path, evaluations)):
        scored = _run_file(evaluation, "rm_metrics.json")
        if not scored.get("eval_only"):
            raise RlhfkitError(f"rm_held_out_table: {evaluation}: not a `train-rm --eval-only` run")
        trained_dir = Path(scored["reward_model"])
        trained = _run_file(trained_dir, "rm_metrics.json")
        options = _run_file(trained_dir, "run_config.json")["config"]
        spec = _run_file(model_dir(trained_dir), "rlhfkit_rm.json")
        held = scored["held_out"]
        settings = {
            "backbone": spec["backbone"],
            "lr": options["lr"],
            "epochs": options["epochs"],
            "max_steps": options["max_steps"],
            "batch_size": options["batch_size"],
            "max_length": spec["max_length"],
            "max_prompt_length": spec["max_prompt_length"],
            **({"error_class_weight": spec["error_class_weight"]} if scored["kind"] == "segment" else {}),
        }
        row: dict[str, Any] = {"kind": scored["kind"], "evaluation": str(evaluation), "reward_model": str(trained_dir),
                               "settings": settings, "train_records": trained["train_records"],
                               "train_seconds": trained["train_seconds"], "held_out_records": held["records"],
                               "bootstrap_prompts": held.get("bootstrap_prompts"),
                               "beats_baseline_clearly": scored["beats_baseline_clearly"]}
        if "majority_baseline_accuracy" in held:
            row.update(metric="segment accuracy", value=held["accuracy"], baseline=held["majority_baseline_accuracy"],
                       interval_of="accuracy - majority baseline", interval=held["accuracy_minus_baseline_ci95"],
                       segments=held["segments"], error_segments=held["error_segments"],
                       predicted_errors=held["predicted_errors"], error_auc=held["error_auc"],
                       error_auc_ci95=held["error_auc_ci95"])
        elif "pairwise_accuracy" in held:
            row.update(metric="pairwise accuracy", value=held["pairwise_accuracy"], baseline=held["pairwise_baseline_accuracy"],
                       interval_of="pairwise accuracy", interval=held["pairwise_accuracy_ci95"], pairs=held["pairs"])
        else:
            raise RlhfkitError(f"rm_held_out_table: {evaluation}: no segment or pairwise metrics (a regression RM, or no record fitted)")
        label = labels[number] if labels is not None else scored["aspect"]
        if label in rows:
            raise RlhfkitError(f"rm_held_out_table: two evaluations of {label}; name the rows with labels")
        rows[label] = row

    lines = [f"# {title}", "", f"| {'reward model' if labels else 'aspect'} | held-out metric | RM | baseline | 95% interval | clearly better | error AUC (95% interval) | held-out data | trained |",
             "|---|---|---|---|---|---|---|---|---|"]
    for aspect, row in rows.items():
        segment_rm = row["kind"] == "segment"
        baseline = f"majority {row['baseline']:.3f}" if segment_rm else f"{row['baseline']:.1f} (chance)"
        interval = (f"acc - baseline {_interval_text(row['interval'], signed=True)}" if segment_rm
                    else _interval_text(row["interval"]))
        auc = (f"{row['error_auc']:.3f} {_interval_text(row['error_auc_ci95'])}"
               + (": above chance" if row["error_auc_ci95"] and row["error_auc_ci95"][0] > 0.5 else "")) if segment_rm else "–"
        data = (f"{row['segments']} segments ({row['error_segments']} errors, {row['predicted_errors']} flagged)" if segment_rm
                else f"{row['pairs']} decided pairs") + f", {row['bootstrap_prompts']} prompts"
        s = row["settings"]
        length = f"{'max-steps ' + str(s['max_steps']) if s['max_steps'] else str(s['epochs']) + ' epoch(s)'}"
        trained = (f"{s['backbone']}, lr {s['lr']:g}, {length}, max-length {s['max_length']} (prompt {s['max_prompt_length']})"
                   + (f", error weight {s['error_class_weight']:g}" if segment_rm else "")
                   + f"; {row['train_records']} training records, {row['train_seconds'] / 60:.1f} min")
        verdict = "yes" if row["beats_baseline_clearly"] else "no"
        lines.append(f"| {aspect} | {row['metric']} | {row['value']:.3f} | {baseline} | {interval} | {verdict} | {auc} | {data} | {trained} |")
    lines += ["", (f"Intervals: 95% bootstrap over held-out prompts (train-rm --eval-only, {BOOTSTRAP_DRAWS:,} draws). "
                   "'clearly better': train-rm's beats_baseline_clearly, the interval's lower end above the baseline "
                   "(0 for accuracy minus baseline).")]
    report = "\n".join(lines) + "\n"
    write_text(out, report)
    write_json(Path(out).with_suffix(".json"), {"title": title, "aspects": rows})
    console.print(report, markup=False, highlight=False, soft_wrap=True)
    return rows


# --- the pretrained-policy table (recipes/qa_feedback/smol_tiny.yaml, smol_paper.yaml) ---


@recipe_function(reads=["feedback"], makes=["out"])
def split_feedback_file(feedback: str, out: str, names: list[str]) -> dict:
    """Split a QA-Feedback JSON list into len(`names`) disjoint files `out`/NAME.json: record i
    goes to names[i % len(names)] (every other record for two names), so each part spans the
    file's whole range. The pretrained-policy plan trains its reward RMs on one part and the
    independent judge's RMs on the other."""
    if len(names) < 2 or len(set(names)) != len(names):
        raise RlhfkitError(f"split_feedback_file: names must be 2 or more distinct names, got {names}")
    try:
        records = json.loads(Path(feedback).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RlhfkitError(f"{feedback}: not a readable JSON file ({err})") from None
    if not isinstance(records, list) or len(records) < len(names):
        raise RlhfkitError(f"{feedback}: expected a JSON list of at least {len(names)} records")
    counts = {}
    for k, name in enumerate(names):
        part = records[k :: len(names)]
        write_text(Path(out) / f"{name}.json", json.dumps(part, indent=1, ensure_ascii=False) + "\n")
        counts[name] = len(part)
    console.print(f"split-feedback: {feedback} -> {out}: " + ", ".join(f"{n} {c}" for n, c in counts.items()))
    return counts


# Each figure of the pretrained-policy table: (key, column label, lower is better). Error
# rates pool the flagged segments over all responses (evaluate's error_rate); scores are means
# per response. "reward" figures come from the RMs PPO optimised, "judge" ones from RMs trained
# on disjoint records, which PPO never saw.
SMOL_FIGURES = (
    ("reward/relevance_errors", "rel. errors (reward RM)", True),
    ("reward/factuality_errors", "fact. errors (reward RM)", True),
    ("reward/completeness", "comp. score (reward RM)", False),
    ("reward/preference", "preference score (reward RM)", False),
    ("judge/relevance_errors", "rel. errors (judge)", True),
    ("judge/factuality_errors", "fact. errors (judge)", True),
    ("judge/completeness", "comp. score (judge)", False),
    ("rouge_l", "ROUGE-L", False),
    ("length", "length (words)", False),
)
ROUGE_SLACK = 0.01
"""Goal (a): fine-grained's ROUGE-L may be at most this much below SFT's."""

Figure = tuple[float, "list[float] | None"]


def _figure_text(figure: Figure) -> str:
    value, interval = figure
    return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def clearly_better(a: Figure, b: Figure, lower_is_better: bool) -> bool:
    """a beats b with 95% intervals that do not overlap (False without intervals)."""
    if a[1] is None or b[1] is None:
        return False
    return a[1][1] < b[1][0] if lower_is_better else a[1][0] > b[1][1]


def overlap(a: Figure, b: Figure) -> bool:
    """The two 95% intervals share a point (True without intervals: nothing tells them apart)."""
    if a[1] is None or b[1] is None:
        return True
    return a[1][0] <= b[1][1] and b[1][0] <= a[1][1]


def smol_figures(records: list, references: dict[str, list[str]], reward: dict[str, str], judge: dict[str, str],
                 seed: int = 42) -> dict[str, Figure]:
    """One system's figures (SMOL_FIGURES keys) from its evaluate `generation` records (one per
    prompt; meta.rewards and meta.error_flags by RM name), each with its 95% bootstrap interval
    over prompts (rlhfkit.metrics.prompt_interval, seeded by `seed`). `reward` and `judge` map
    relevance / factuality / completeness (and, for `reward`, preference) to evaluate's RM names."""
    from rlhfkit.metrics import prompt_interval, ratio_statistic, rouge_l_scores, whitespace_tokens

    prompts = [r.meta["prompt_id"] for r in records]
    ones = [1.0] * len(records)
    figures: dict[str, Figure] = {}

    def ratio(key: str, numerators: list[float], denominators: list[float]) -> None:
        units, statistic = ratio_statistic(prompts, numerators, denominators)
        value = sum(numerators) / sum(denominators) if sum(denominators) else float("nan")
        figures[key] = (value, prompt_interval(statistic, units, seed))

    for side, names in (("reward", reward), ("judge", judge)):
        for aspect in ("relevance", "factuality"):
            flags = [r.meta["error_flags"][names[aspect]] for r in records]
            ratio(f"{side}/{aspect}_errors", [float(f) for f, _ in flags], [float(n) for _, n in flags])
        ratio(f"{side}/completeness", [r.meta["rewards"][names["completeness"]] for r in records], ones)
    ratio("reward/preference", [r.meta["rewards"][reward["preference"]] for r in records], ones)
    ratio("rouge_l", rouge_l_scores([r.response for r in records], [references[p] for p in prompts]), ones)
    ratio("length", [float(len(whitespace_tokens(r.response))) for r in records], ones)
    return figures


def smol_goals(figures: dict[str, dict[str, Figure]], sft: str, fine_grained: str, holistic: str,
               r3hf: str | Sequence[str]) -> dict[str, dict]:
    """The issue's three goals on one decoding's figures ({system: smol_figures}), each
    {"met": bool, "by_reward_rms": bool, "evidence": str}. The verdict is the independent
    judge's; "by_reward_rms" is the same test on the RMs PPO optimised (a goal met there but
    not by the judge is the signature of reward hacking).

    (a) fine-grained's relevance and factuality error rates below SFT's with 95% intervals
        that do not overlap, and its ROUGE-L at most ROUGE_SLACK below SFT's;
    (b) the same two error rates below holistic's, intervals not overlapping, at a comparable
        preference score (the reward preference RM's intervals overlap);
    (c) R3HF clearly better than holistic (intervals not overlapping) on at least one of the
        judge's figures (relevance errors, factuality errors, completeness) and clearly worse
        on none. `r3hf` may name several R3HF arms (per token, per sentence): each gets its
        own verdict, keyed "c" for a single arm and "c: NAME" for several.
    """
    fg, base, hol = figures[fine_grained], figures[sft], figures[holistic]
    r3hf_arms = [r3hf] if isinstance(r3hf, str) else list(r3hf)
    errors = ("relevance_errors", "factuality_errors")

    def compare(a: dict, b: dict, side: str, keys=errors) -> list[tuple[str, bool]]:
        return [(f"{side}/{k}", clearly_better(a[f"{side}/{k}"], b[f"{side}/{k}"], k.endswith("errors"))) for k in keys]

    def pairs(a: dict, an: str, b: dict, bn: str, keys: list[str]) -> str:
        return "; ".join(f"{k}: {an} {_figure_text(a[k])} vs {bn} {_figure_text(b[k])}" for k in keys)

    rouge_ok = fg["rouge_l"][0] >= base["rouge_l"][0] - ROUGE_SLACK
    goals = {}
    a = {side: all(ok for _, ok in compare(fg, base, side)) and rouge_ok for side in ("judge", "reward")}
    goals["a"] = {"met": a["judge"], "by_reward_rms": a["reward"], "evidence": pairs(
        fg, fine_grained, base, sft, [f"{s}/{k}" for s in ("judge", "reward") for k in errors] + ["rouge_l"])
        + f" (ROUGE-L within {ROUGE_SLACK}: {'yes' if rouge_ok else 'no'})"}
    comparable = overlap(fg["reward/preference"], hol["reward/preference"])
    b = {side: all(ok for _, ok in compare(fg, hol, side)) and comparable for side in ("judge", "reward")}
    goals["b"] = {"met": b["judge"], "by_reward_rms": b["reward"], "evidence": pairs(
        fg, fine_grained, hol, holistic, [f"{s}/{k}" for s in ("judge", "reward") for k in errors] + ["reward/preference"])
        + f" (preference scores comparable, intervals overlapping: {'yes' if comparable else 'no'})"}
    for name in r3hf_arms:
        red, c = figures[name], {}
        for side, keys in (("judge", (*errors, "completeness")), ("reward", (*errors, "completeness", "preference"))):
            better = [ok for _, ok in compare(red, hol, side, keys)]
            worse = [ok for _, ok in compare(hol, red, side, keys)]
            c[side] = any(better) and not any(worse)
        goals["c" if len(r3hf_arms) == 1 else f"c: {name}"] = {"met": c["judge"], "by_reward_rms": c["reward"], "evidence": pairs(
            red, name, hol, holistic, ["judge/relevance_errors", "judge/factuality_errors", "judge/completeness", "reward/preference"])}
    return goals


def _question(prompt: str) -> str:
    head = prompt.partition(" context:")[0]
    return head.removeprefix("question:").strip()


def _ppo_course(run: Path) -> str:
    """First and last logged step of a PPO run's reward/total, and its last KL."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return f"{run}: no metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if "reward/total" in r]
    if not rows:
        return f"{run}: no training step logged"
    return (f"{len(rows)} steps, reward/total {rows[0]['reward/total']:+.3f} (step 1) -> {rows[-1]['reward/total']:+.3f} "
            f"(step {len(rows)}), KL {rows[-1].get('kl', float('nan')):.4f}")


@recipe_function(reads=["evaluations", "prompts", "ppo_runs", "sections", "timings"], writes=["out"])
def smol_table(out: str, title: str, evaluations: dict[str, str], prompts: str, systems: dict[str, str],
               reward: dict[str, str], judge: dict[str, str], ppo_runs: dict[str, str], sections: Sequence[str] = (),
               timings: str | None = None, notes: str = "", examples: int = 5, seed: int = 42) -> dict:
    """The pretrained-policy QA table (results/qa_smol.md and .json beside it).

    `evaluations`: decoding name -> an `evaluate` output directory whose generations.jsonl has
    every system's answer to `prompts` scored by the reward RMs and the judge's RMs; `systems`:
    the roles sft, fine_grained, holistic, r3hf -> evaluate's system names (r3hf may be a list
    of R3HF arms; other systems are rows too); `reward` / `judge`: aspect -> evaluate's RM names; `ppo_runs`: arm -> ppo output
    directory (the audit: each arm's PPO course beside its reward-RM and judge changes);
    `sections`: markdown files appended (the RMs' held-out quality); `timings`: the recipe's
    recipe_run.json (its steps so far, with their times). Per decoding: every figure with its
    95% bootstrap interval over prompts, the three goals met or not (the first decoding's
    verdicts are the goals'; smol_goals), and `examples` held-out questions with every
    system's answer.
    """
    from rlhfkit.schema import load_records

    named = []
    for role, value in systems.items():
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise RlhfkitError(f"smol_table: systems.{role} must be a system name or a list of them, not {value!r}")
        named += names
    references = {r.id: r.references for r in load_records(prompts, "prompt")}
    lines = [f"# {title}", ""] + ([notes.strip(), ""] if notes else [])
    result: dict[str, Any] = {"title": title, "decodings": {}}
    answers: dict[str, dict[str, str]] = {}
    for decoding, directory in evaluations.items():
        records = load_records(Path(directory) / "generations.jsonl", "generation")
        by_system: dict[str, list] = {}
        for record in records:
            by_system.setdefault(record.model, []).append(record)
        missing = sorted(set(named) - set(by_system))
        if missing:
            raise RlhfkitError(f"smol_table: {directory}: no answers of system(s) {', '.join(missing)}; has {', '.join(by_system)}")
        figures = {name: smol_figures(rows, references, reward, judge, seed) for name, rows in by_system.items()}
        goals = smol_goals(figures, **systems)
        result["decodings"][decoding] = {"figures": figures, "goals": goals, "prompts": len(next(iter(by_system.values())))}
        if not answers:
            answers = {name: {r.meta["prompt_id"]: r.response for r in rows} for name, rows in by_system.items()}
            first_prompts = [r.meta["prompt_id"] for r in next(iter(by_system.values()))][:examples]
            prompt_text = {r.meta["prompt_id"]: r.prompt for r in records}
        lines += [f"## {decoding} ({result['decodings'][decoding]['prompts']} held-out prompts)", "",
                  "| system | " + " | ".join(label for _, label, _ in SMOL_FIGURES) + " |",
                  "|---" + "|---:" * len(SMOL_FIGURES) + "|"]
        lines += [f"| {name} | " + " | ".join(_figure_text(f[key]) for key, _, _ in SMOL_FIGURES) + " |" for name, f in figures.items()]
        lines += ["", "| goal | verdict (independent judge) | same test on the reward RMs | numbers |", "|---|---|---|---|"]
        lines += [f"| ({g}) | **{'met' if v['met'] else 'not met'}** | {'met' if v['by_reward_rms'] else 'not met'} | {v['evidence']} |"
                  for g, v in goals.items()]
        lines.append("")
    lines += ["## Audit: what each PPO arm optimised and what moved", "",
              "| arm | PPO course | vs SFT, reward RMs (rel. / fact. errors, comp.) | vs SFT, judge (rel. / fact. errors, comp.) |",
              "|---|---|---|---|"]
    first = next(iter(result["decodings"].values()))["figures"]
    sft = first[systems["sft"]]
    for arm, run in ppo_runs.items():
        if arm not in first:
            raise RlhfkitError(f"smol_table: ppo_runs names {arm}, which no evaluation has as a system")
        moved = {side: " / ".join(f"{first[arm][f'{side}/{k}'][0] - sft[f'{side}/{k}'][0]:+.3f}"
                                  for k in ("relevance_errors", "factuality_errors", "completeness")) for side in ("reward", "judge")}
        lines.append(f"| {arm} | {_ppo_course(Path(run))} | {moved['reward']} | {moved['judge']} |")
    lines += ["", f"## {len(first_prompts)} held-out questions, every system's answer ({next(iter(evaluations))})", ""]
    for prompt_id in first_prompts:
        lines += [f"**Q: {_question(prompt_text[prompt_id])}**", "", f"- gold: {references[prompt_id][0]}"]
        lines += [f"- {name}: {answers[name].get(prompt_id, '').strip() or '(empty)'}" for name in answers]
        lines.append("")
    for section in sections:
        lines += [_run_file_text(Path(section)), ""]
    if timings:
        record = _run_file(Path(timings).parent, Path(timings).name)
        lines += ["## Time, step by step", "", "| step | seconds |", "|---|---:|"]
        lines += [f"| {s['step']}{' (an earlier run of the plan; reused)' if s.get('earlier_run') else ''} | {s['seconds']:.0f} |"
                  for s in record["steps"]]
        lines += [f"| all steps above | {record['seconds']:.0f} ({record['seconds'] / 60:.1f} min) |", ""]
        result["timings"] = record
    report = "\n".join(lines).rstrip() + "\n"
    write_text(out, report)
    write_json(Path(out).with_suffix(".json"), result)
    console.print(report, markup=False, highlight=False, soft_wrap=True)
    return result


def _run_file_text(path: Path) -> str:
    if not path.is_file():
        raise RlhfkitError(f"smol_table: {path}: no such file (did the step that writes it run?)")
    return re.sub(r"^(#+) ", r"#\1 ", path.read_text(encoding="utf-8").strip(), flags=re.MULTILINE)
