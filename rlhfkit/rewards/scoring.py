"""Scoring labelled records with a reward model: held-out metrics beside their trivial
baselines, with bootstrap intervals over prompts (`evaluate_reward_model`; the statistics are
rlhfkit.metrics'), the few a training log shows (`headline_metrics`), the verdicts beside
them (`held_out_entries`) and the one line that reads them (`held_out_summary`), and the
mean/std a sequence RM's scores are normalised with (`score_statistics`, on the responses
`score_normalization` picks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlhfkit.errors import RlhfkitError
from rlhfkit.metrics import (
    beats_baseline,
    beats_baseline_clearly,
    calibration_bins,
    interval_verdict,
    pairwise_intervals,
    regression_intervals,
    segment_intervals,
    segment_metrics,
)
from rlhfkit.rewards.data import responses_of
from rlhfkit.rewards.reward_model import RewardModel, judged_errors
from rlhfkit.schema import Preference, Record, ScalarScore, load_records
from rlhfkit.segment import SegmentLabelRules

HEADLINE_KEYS = ("accuracy", "error_f1", "error_auc", "pairwise_accuracy", "mse")


def evaluate_reward_model(
    rm: RewardModel, records: Sequence[Record], aspect: str, batch_size: int, seed: int = 0,
    rules: SegmentLabelRules | None = None, training_mean: float | None = None,
) -> dict[str, Any]:
    """Held-out metrics of `rm` on labelled records, each beside its trivial baseline, with
    95% bootstrap intervals over the records' prompts (seeded by `seed`). A regression RM's
    baseline predicts `training_mean` (the training labels' mean: what an RM that learned
    nothing would) for every record; without it (--eval-only), the held-out labels' mean."""
    fitting = [r for r in records if fits(rm, r)]
    metrics: dict[str, Any] = {"records": len(fitting), "records_too_long": len(records) - len(fitting)}
    if not fitting:
        return metrics
    if rm.kind == "segment":
        rules = SegmentLabelRules.from_dict(rm.spec.get("label_rules")) if rules is None else rules
        all_probs: list[float] = []
        actual: list[bool] = []
        prompts: list[str] = []
        scored = rm.error_probabilities([r.prompt for r in fitting], [r.response for r in fitting], batch_size)
        for r, (segments, probs) in zip(fitting, scored):
            # Segments the label rules leave out of training are left out of the metrics too.
            for label, prob in zip(rules.labels(segments, r.spans, r.response, aspect), probs):
                if label is not None:
                    actual.append(label)
                    all_probs.append(prob)
                    prompts.append(r.prompt)
        predicted = judged_errors(all_probs)
        return {
            **metrics,
            **segment_metrics(predicted, actual, all_probs),
            **segment_intervals(prompts, predicted, actual, all_probs, seed),
            "calibration": calibration_bins(all_probs, actual),
        }
    pairs = [r for r in fitting if isinstance(r, Preference)]
    if pairs:
        distinct = responses_of(pairs)
        score_of = dict(zip(distinct, rm.raw_scores([p for p, _ in distinct], [r for _, r in distinct], batch_size)))
        decided_records = [r for r in pairs if not r.tie]
        decided = [(score_of[r.prompt, r.chosen], score_of[r.prompt, r.rejected]) for r in decided_records]
        metrics.update(
            {
                "pairwise_accuracy": sum(c > j for c, j in decided) / len(decided) if decided else float("nan"),
                "pairwise_baseline_accuracy": 0.5,
                "pairs": len(decided),
                "ties": len(pairs) - len(decided),
                "mean_score_margin": sum(c - j for c, j in decided) / len(decided) if decided else float("nan"),
                **pairwise_intervals([r.prompt for r in decided_records], [c > j for c, j in decided], seed),
            }
        )
    scored_records = [r for r in fitting if isinstance(r, ScalarScore)]
    if scored_records:
        predictions = rm.raw_scores([r.prompt for r in scored_records], [r.response for r in scored_records], batch_size)
        targets = [r.score for r in scored_records]
        baseline = sum(targets) / len(targets) if training_mean is None else training_mean
        metrics.update(
            {
                "mse": sum((p - t) ** 2 for p, t in zip(predictions, targets)) / len(targets),
                "mean_baseline_mse": sum((baseline - t) ** 2 for t in targets) / len(targets),
                "mean_baseline": baseline,
                "mean_baseline_of": "held-out labels" if training_mean is None else "training labels",
                "scores": len(targets),
                **regression_intervals([r.prompt for r in scored_records], predictions, targets, baseline, seed),
            }
        )
    return metrics


def headline_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The held-out figures a training log records at each evaluation (those the kind has)."""
    return {k: metrics[k] for k in HEADLINE_KEYS if k in metrics}


def held_out_entries(metrics: dict[str, Any]) -> dict[str, Any]:
    """rm_metrics.json's held-out metrics and whether they beat their baselines (the point
    estimates; clearly: the 95% interval's lower end)."""
    return {"held_out": metrics, "beats_baseline": beats_baseline(metrics), "beats_baseline_clearly": beats_baseline_clearly(metrics)}


def held_out_summary(metrics: dict[str, Any]) -> str:
    """One line reading evaluate_reward_model's metrics: each figure beside its baseline and
    whether the 95% interval says the RM is clearly better."""
    if "majority_baseline_accuracy" in metrics:
        difference = metrics["accuracy_minus_baseline_ci95"]
        auc = metrics["error_auc_ci95"]
        return (
            f"held-out segment accuracy {metrics['accuracy']:.4f} (majority baseline "
            f"{metrics['majority_baseline_accuracy']:.4f}; "
            + (f"difference 95% CI [{difference[0]:+.3f}, {difference[1]:+.3f}]: " if difference else "")
            + f"{interval_verdict(difference, 0.0)}), error F1 {metrics['error_f1']:.4f}, "
            f"error AUC {metrics['error_auc']:.4f}"
            + (f" (95% CI [{auc[0]:.3f}, {auc[1]:.3f}])" if auc else "")
            + f"; intervals over {metrics['bootstrap_prompts']} prompts"
        )
    if "pairwise_accuracy" in metrics:
        interval = metrics["pairwise_accuracy_ci95"]
        return (
            f"held-out pairwise accuracy {metrics['pairwise_accuracy']:.4f} on {metrics['pairs']} pairs "
            f"of {metrics['bootstrap_prompts']} prompts (baseline 0.5; "
            + (f"95% CI [{interval[0]:.3f}, {interval[1]:.3f}]: " if interval else "")
            + f"{interval_verdict(interval, metrics['pairwise_baseline_accuracy'])})"
        )
    if "mse" in metrics:
        interval = metrics["baseline_mse_minus_mse_ci95"]
        return (
            f"held-out MSE {metrics['mse']:.4f} on {metrics['scores']} scores (predicting the {metrics['mean_baseline_of']}' "
            f"mean {metrics['mean_baseline']:.4f}: {metrics['mean_baseline_mse']:.4f}; "
            + (f"its MSE minus the RM's, 95% CI [{interval[0]:+.4f}, {interval[1]:+.4f}]: " if interval else "")
            + f"{interval_verdict(interval, 0.0)}); intervals over {metrics['bootstrap_prompts']} prompts"
        )
    return "no held-out data"


def fits(rm: RewardModel, record: Record) -> bool:
    """Whether every response of the record fits the RM's --max-length (it is scored only then)."""
    responses = [record.chosen, record.rejected] if isinstance(record, Preference) else [record.response]
    return all(rm.encode(record.prompt, response) is not None for response in responses)


def score_statistics(rm: RewardModel, pairs: Sequence[tuple[str, str]], batch_size: int) -> dict[str, float]:
    """Mean and std (population) of the RM's raw scores; a std of 0 is stored as 1."""
    fitting = [(p, r) for p, r in pairs if rm.encode(p, r) is not None]
    if not fitting:
        raise RlhfkitError("no response to normalise the reward model's scores on fits --max-length")
    scores = torch.tensor(rm.raw_scores([p for p, _ in fitting], [r for _, r in fitting], batch_size), dtype=torch.float64)
    std = float(scores.std(unbiased=False)) if len(scores) > 1 else 0.0
    return {"mean": float(scores.mean()), "std": std if std > 1e-8 else 1.0, "responses": len(fitting)}


def score_normalization(rm: RewardModel, train_records: Sequence[Record], normalize_on: str | None, batch_size: int) -> dict[str, Any]:
    """A sequence RM's score mean/std on the responses of the `normalize_on` JSONL (e.g. SFT
    samples, as the paper normalises its completeness RM), else on the training responses."""
    if normalize_on:
        pairs, computed_on = responses_of(load_records(normalize_on)), normalize_on
    else:
        pairs, computed_on = responses_of(train_records), "training responses"
    return {**score_statistics(rm, pairs, batch_size), "computed_on": computed_on}
