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
import statistics
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
def rm_held_out_table(out: str, title: str, evaluations: list[str]) -> dict:
    """The table of reward models scored on held-out data: `evaluations` are `train-rm
    --eval-only` output directories. Per aspect: the held-out metric beside its trivial
    baseline with the 95% bootstrap interval over prompts that train-rm computed, and its
    verdict `beats_baseline_clearly` (segment RMs: the interval of accuracy minus the
    majority baseline lies above 0; preference RMs: the pairwise accuracy's lies above 0.5);
    for segment RMs also the error AUC and its interval (above 0.5: errors ranked above
    chance), and each RM's training settings and time (its own run_config.json and
    rm_metrics.json). Writes `out` (markdown) and the same figures as JSON beside it.
    """
    from rlhfkit.models import model_dir  # torch: imported when the table is made

    rows: dict[str, dict[str, Any]] = {}
    for evaluation in map(Path, evaluations):
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
        rows[scored["aspect"]] = row

    lines = [f"# {title}", "", "| aspect | held-out metric | RM | baseline | 95% interval | clearly better | error AUC (95% interval) | held-out data | trained |",
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
