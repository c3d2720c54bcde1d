"""Evaluation metrics: ROUGE-L, distinct-n, length, perplexity and pairwise win rates.

All are corpus-level numbers over lists of texts (or scores). Conventions:
- `rouge_l`: ROUGE-L F-measure from the `rouge-score` package (Google's reference
  implementation: lower-cased, non-alphanumerics dropped, Porter stemming by default), the
  best over each prediction's references, averaged over predictions. In [0, 1].
- `distinct_n`: distinct n-grams / all n-grams, pooled over the whole corpus (Li et al. 2016),
  not averaged per text. Tokens are whitespace-separated words unless a `tokenize` callable
  is given (e.g. a tokenizer's `tokenize`). A corpus with no n-gram scores 0.
- `mean_length`: mean number of tokens per text (same tokenisation rule).
- `perplexity`: exp(total negative log-likelihood / total tokens) of the texts under a causal
  LM, each text read on its own (no prompt), starting after the tokenizer's bos token (eos
  when it has none, as GPT-2 does) so that the first word is scored too.
- `win_rate`: the share of paired items where A's score beats B's by more than `tie_margin`
  (win), falls behind by more (loss), or neither (tie), and the published win rate
  (win + tie / 2).

Reward-model metrics (train-rm's rm_metrics.json), below the corpus metrics:
- `roc_auc` (scikit-learn's), `segment_metrics` (accuracy beside the majority baseline, the
  error class's precision/recall/F1);
- `bootstrap_interval`: a seeded percentile-bootstrap interval (scipy.stats.bootstrap) of any
  statistic of resampled independent units (e.g. a prompt with all its records), and the
  RMs' intervals built on it (`segment_intervals`, `pairwise_intervals`,
  `regression_intervals`), and evaluate's `ratio_statistic` / `distinct_n_statistic` of
  resampled prompts (`prompt_interval` turns any of them into a 95% interval);
- the verdicts: `beats_baseline` (point estimates), `beats_baseline_clearly` (the interval).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from rlhfkit.rl.losses import logprobs_from_logits

Tokenize = Callable[[str], list[str]]


def whitespace_tokens(text: str) -> list[str]:
    return text.split()


def rouge_l_scores(predictions: Sequence[str], references_list: Sequence[Sequence[str]], *, use_stemmer: bool = True) -> list[float]:
    """Per prediction, the best ROUGE-L F-measure against that prediction's references."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references_list):
        raise ValueError(f"{len(predictions)} predictions but {len(references_list)} reference lists")
    if not predictions:
        raise ValueError("rouge_l needs at least one prediction")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    scores = []
    for i, (prediction, references) in enumerate(zip(predictions, references_list)):
        if not references:
            raise ValueError(f"prediction {i} has no reference")
        scores.append(scorer.score_multi(list(references), prediction)["rougeL"].fmeasure)
    return scores


def rouge_l(predictions: Sequence[str], references_list: Sequence[Sequence[str]], *, use_stemmer: bool = True) -> float:
    """Mean over predictions of the best ROUGE-L F-measure against that prediction's references."""
    scores = rouge_l_scores(predictions, references_list, use_stemmer=use_stemmer)
    return sum(scores) / len(scores)


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int, tokenize: Tokenize = whitespace_tokens) -> float:
    """Distinct n-grams / total n-grams over the whole corpus (0.0 when there is no n-gram)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    counts: Counter = Counter()
    for text in texts:
        counts.update(ngrams(tokenize(text), n))
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


def mean_length(texts: Sequence[str], tokenize: Tokenize = whitespace_tokens) -> float:
    """Mean tokens per text."""
    if not texts:
        raise ValueError("mean_length needs at least one text")
    return sum(len(tokenize(text)) for text in texts) / len(texts)


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float], tie_margin: float = 0.0) -> dict[str, float]:
    """{win, tie, loss}: shares of items where a - b > margin, |a - b| <= margin, a - b < -margin;
    and `win_rate` = win + tie / 2, the win rate Jin et al. (2023) and pairwise evaluations
    publish (a tie counts half to each side, so two equal systems score 50%)."""
    if len(scores_a) != len(scores_b):
        raise ValueError(f"{len(scores_a)} scores for A but {len(scores_b)} for B")
    if not scores_a:
        raise ValueError("win_rate needs at least one pair of scores")
    if tie_margin < 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    wins = sum(1 for a, b in zip(scores_a, scores_b) if a - b > tie_margin)
    losses = sum(1 for a, b in zip(scores_a, scores_b) if b - a > tie_margin)
    n = len(scores_a)
    ties = n - wins - losses
    return {"win": wins / n, "tie": ties / n, "loss": losses / n, "win_rate": (wins + ties / 2) / n}


def perplexity(model, tokenizer, texts: Sequence[str], *, batch_size: int = 8, max_length: int | None = None) -> float:
    """Corpus perplexity of `texts` under a causal LM (see the module docstring).

    Texts longer than `max_length` tokens (default: the model's positions) are cut on the
    right; NaN when no text has a token to score.
    """
    terms = perplexity_terms(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    total_tokens = sum(tokens for _, tokens in terms)
    return math.exp(sum(nll for nll, _ in terms) / total_tokens) if total_tokens else float("nan")


@torch.no_grad()
def perplexity_terms(model, tokenizer, texts: Sequence[str], *, batch_size: int = 8, max_length: int | None = None) -> list[tuple[float, int]]:
    """Per text, (negative log-likelihood of its scored tokens, their count): perplexity's
    terms, exp(sum of the first / sum of the second) over any subset of texts."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("perplexity needs a causal (decoder-only) language model")
    limit = max_length or getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if start is not None:
            ids = [start] + ids
        rows.append(ids[:limit] if limit else ids)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    terms = [(0.0, 0)] * len(rows)
    for begin in range(0, len(rows), batch_size):
        batch = [i for i in range(begin, min(begin + batch_size, len(rows))) if len(rows[i]) >= 2]
        if not batch:
            continue
        width = max(len(rows[i]) for i in batch)
        input_ids = torch.tensor([rows[i] + [pad] * (width - len(rows[i])) for i in batch], device=device)
        attention_mask = torch.tensor([[1] * len(rows[i]) + [0] * (width - len(rows[i])) for i in batch], device=device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        logprobs = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])
        scored = attention_mask[:, 1:].bool()
        nll = (-torch.where(scored, logprobs, 0.0).sum(dim=1)).tolist()
        for i, row_nll, tokens in zip(batch, nll, scored.sum(dim=1).tolist()):
            terms[i] = (row_nll, int(tokens))
    model.train(was_training)
    return terms


# --- reward-model metrics ---------------------------------------------------------------------

BOOTSTRAP_DRAWS = 1000


def roc_auc(scores: Sequence[float], actual: Sequence[bool]) -> float:
    """P(a random error scores above a random non-error), ties counting 1/2 (roc_auc_score);
    NaN without both an error and a non-error."""
    from sklearn.metrics import roc_auc_score

    errors = sum(map(bool, actual))
    if not errors or errors == len(actual):
        return float("nan")
    return float(roc_auc_score(np.asarray(actual, dtype=bool), np.asarray(scores, dtype=np.float64)))


def calibration_bins(error_probs: Sequence[float], actual: Sequence[bool], bins: int = 10) -> list[dict[str, float]]:
    """A segment RM's reliability table: P(error) in `bins` equal-width bins of [0, 1] (the last
    one closed); per non-empty bin its bounds, the segments in it, their mean P(error) and the
    share that are errors. A calibrated RM has the last two equal in every bin."""
    rows = []
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [(p, a) for p, a in zip(error_probs, actual) if low <= p < high or (b == bins - 1 and p == high)]
        if members:
            rows.append({
                "low": low, "high": high, "segments": len(members),
                "mean_error_probability": sum(p for p, _ in members) / len(members),
                "error_rate": sum(a for _, a in members) / len(members),
            })
    return rows


def segment_metrics(predicted: Sequence[bool], actual: Sequence[bool], error_probs: Sequence[float] | None = None) -> dict[str, float]:
    """Accuracy and the error class's precision/recall/F1, beside the majority-class accuracy.

    The baseline is the better of the two constant predictions on the same segments. With
    the error probabilities, also their ROC AUC (0.5 for an RM that cannot rank errors).
    """
    n = len(actual)
    tp = sum(p and a for p, a in zip(predicted, actual))
    fp = sum(p and not a for p, a in zip(predicted, actual))
    fn = sum(a and not p for p, a in zip(predicted, actual))
    correct = sum(p == a for p, a in zip(predicted, actual))
    errors = sum(actual)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": correct / n if n else float("nan"),
        "error_precision": precision,
        "error_recall": recall,
        "error_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "majority_baseline_accuracy": max(errors, n - errors) / n if n else float("nan"),
        "segments": n,
        "error_segments": errors,
        "predicted_errors": tp + fp,
        **({"error_auc": roc_auc(error_probs, actual)} if error_probs is not None else {}),
    }


Statistic = Callable[[np.ndarray], np.ndarray]
"""(d, k) unit indices, one resample of k units per row -> the d statistics (see bootstrap_interval)."""


def bootstrap_interval(
    statistic: Statistic,
    units: int,
    *,
    seed: int,
    draws: int = BOOTSTRAP_DRAWS,
    level: float = 0.95,
    chunk: int = 100,
) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of `statistic` over `units` independent units.

    scipy.stats.bootstrap resamples the unit indices 0..units-1: each of the `draws`
    resamples draws `units` of them with replacement, seeded by `seed`. `statistic(indices)`
    gets a (d, units) array, one resample per row (`chunk` resamples at a time, to bound
    memory; np.arange(units) is the original data) and returns the d statistics, so one
    statistic serves any unit: a unit is all the items of one prompt. Resamples where the
    statistic is undefined (NaN) are left out; None when none is defined. One unit gives a
    point (every resample is that unit); with few units the interval is too narrow
    (resampling cannot show variation the units do not have).
    """
    if units < 1 or draws < 1:
        raise ValueError(f"bootstrap_interval needs >= 1 unit and draw, got {units} and {draws}")
    if not 0 <= level < 1:
        raise ValueError(f"level must be in [0, 1), got {level}")
    from scipy.stats import DegenerateDataWarning, bootstrap

    if units == 1:  # scipy resamples 2 or more observations; one unit has one resample
        value = float(np.asarray(statistic(np.zeros((1, 1), dtype=np.int64)), dtype=np.float64)[0])
        return None if math.isnan(value) else (value, value)

    def of_indices(indices: np.ndarray, axis: int) -> np.ndarray:
        return np.asarray(statistic(indices), dtype=np.float64)

    options = {"vectorized": True, "confidence_level": level, "method": "percentile"}
    with warnings.catch_warnings():
        # A NaN resample makes scipy's interval NaN (and warn): those are left out below.
        warnings.simplefilter("ignore", DegenerateDataWarning)
        drawn = bootstrap((np.arange(units),), of_indices, n_resamples=draws, batch=chunk, rng=np.random.default_rng(seed), **options)
    values = np.asarray(drawn.bootstrap_distribution)
    defined = values[~np.isnan(values)]
    if not len(defined):
        return None
    if len(defined) < len(values):
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            # scipy's standard error (ddof 1) of one defined resample is 0/0; it is not used.
            warnings.filterwarnings("ignore", "Degrees of freedom", RuntimeWarning)
            drawn = bootstrap((np.arange(units),), of_indices, n_resamples=0, **options,
                              bootstrap_result=dataclasses.replace(drawn, bootstrap_distribution=defined))
    interval = drawn.confidence_interval
    return float(interval.low), float(interval.high)


def _units(prompts: Sequence[str]) -> tuple[np.ndarray, int]:
    """Each item's prompt as an index 0..k-1 (first-seen order), and k."""
    index: dict[str, int] = {}
    return np.array([index.setdefault(p, len(index)) for p in prompts], dtype=np.int64), len(index)


def unit_counts(indices: np.ndarray, units: int) -> np.ndarray:
    """(d, units): how often each unit is in each row of (d, k) resampled unit indices."""
    rows = len(indices)
    flat = (indices + units * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * units).reshape(rows, units).astype(np.float64)


def prompt_interval(statistic: Statistic, units: int, seed: int, draws: int = BOOTSTRAP_DRAWS) -> list[float] | None:
    """The 95% bootstrap interval as [lo, hi]; None with fewer than 2 prompts (no variation to resample)."""
    if units < 2:
        return None
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 on a resample: NaN, left out
        interval = bootstrap_interval(statistic, units, seed=seed, draws=draws)
    return None if interval is None else list(interval)


def ratio_statistic(prompts: Sequence[str], numerators: Sequence[float], denominators: Sequence[float]) -> tuple[int, Statistic]:
    """(prompts k, sum of numerators / sum of denominators over the items of resampled prompts):
    a mean over responses (denominators 1), a rate pooled over segments (errors / segments),
    a win rate (1, 1/2 or 0 per pair); np.arange(k) gives the value on all items."""
    unit, units = _units(prompts)
    numerator_of = np.bincount(unit, weights=np.asarray(numerators, dtype=np.float64), minlength=units)
    denominator_of = np.bincount(unit, weights=np.asarray(denominators, dtype=np.float64), minlength=units)

    def ratio(indices: np.ndarray) -> np.ndarray:
        counts = unit_counts(indices, units)
        return (counts @ numerator_of) / (counts @ denominator_of)

    return units, ratio


def distinct_n_statistic(prompts: Sequence[str], texts: Sequence[str], n: int, tokenize: Tokenize = whitespace_tokens) -> tuple[int, Statistic]:
    """(prompts k, distinct_n of the texts of resampled prompts): a prompt drawn twice adds its
    n-grams to the total twice and to the distinct ones once, as two equal texts would."""
    unit, units = _units(prompts)
    per_unit: list[Counter] = [Counter() for _ in range(units)]
    for u, text in zip(unit, texts):
        per_unit[u].update(ngrams(tokenize(text), n))
    vocabulary = {gram: j for j, gram in enumerate(dict.fromkeys(g for counts in per_unit for g in counts))}
    has_gram = np.zeros((units, len(vocabulary)), dtype=np.float64)
    for u, counts in enumerate(per_unit):
        has_gram[u, [vocabulary[g] for g in counts]] = 1.0
    total_of = np.array([sum(counts.values()) for counts in per_unit], dtype=np.float64)

    def distinct(indices: np.ndarray) -> np.ndarray:
        counts = unit_counts(indices, units)
        total = counts @ total_of
        found = ((counts @ has_gram) > 0).sum(axis=1)
        return np.where(total > 0, found / np.maximum(total, 1), 0.0)

    return units, distinct


def segment_statistics(
    prompts: Sequence[str], predicted: Sequence[bool], actual: Sequence[bool], error_probs: Sequence[float]
) -> tuple[int, Statistic, Statistic]:
    """(prompts k, accuracy minus majority baseline, error AUC) as statistics of resampled
    prompts (`prompts` names each segment's); np.arange(k) gives segment_metrics' values.

    The majority baseline is recomputed on each resample: it is the statistic reported (the
    better constant on the same segments), paired with the RM's accuracy on those segments.
    Keeping the full split's majority class instead would compare, on the resamples where
    that class is the minority (common when errors are near half the segments, as for
    relevance), against a constant worse than the baseline, and so flatter the RM. The AUC
    counts score ties 1/2 as roc_auc does; NaN on a resample without an error or a non-error.
    """
    unit, units = _units(prompts)
    is_error = np.asarray(actual, dtype=bool)
    correct = np.asarray(predicted, dtype=bool) == is_error
    segments_of = np.bincount(unit, minlength=units).astype(np.float64)
    correct_of = np.bincount(unit, weights=correct, minlength=units)
    errors_of = np.bincount(unit, weights=is_error, minlength=units)

    def accuracy_minus_majority(indices: np.ndarray) -> np.ndarray:
        n, right, errors = segments_of[indices].sum(axis=-1), correct_of[indices].sum(axis=-1), errors_of[indices].sum(axis=-1)
        return (right - np.maximum(errors, n - errors)) / n

    # Mann-Whitney with multiplicities, all resamples at once: segments sorted by score, tied
    # scores in one group. Not roc_auc_score with sample weights per resample: that took 4.4 s
    # for the 1,000 resamples of 138 segments (measured on 2 CPU cores), at every
    # evaluation; a resample of each prompt once gives roc_auc's value (tests check).
    scores = np.asarray(error_probs, dtype=np.float64)
    order = np.argsort(scores, kind="stable")
    scores, sorted_unit, sorted_error = scores[order], unit[order], is_error[order]
    group_starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])

    def error_auc(indices: np.ndarray) -> np.ndarray:
        if not len(scores):
            return np.full(len(indices), np.nan)
        w = unit_counts(indices, units)[:, sorted_unit]
        pos = np.add.reduceat(w * sorted_error, group_starts, axis=1)
        neg = np.add.reduceat(w * ~sorted_error, group_starts, axis=1)
        neg_below = np.cumsum(neg, axis=1) - neg
        return (pos * (neg_below + neg / 2)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))

    return units, accuracy_minus_majority, error_auc


def segment_intervals(
    prompts: Sequence[str],
    predicted: Sequence[bool],
    actual: Sequence[bool],
    error_probs: Sequence[float],
    seed: int,
    draws: int = BOOTSTRAP_DRAWS,
) -> dict[str, Any]:
    """95% bootstrap intervals of (accuracy - majority baseline accuracy) and of the error AUC
    (segment_statistics). Whole prompts are resampled, as the segments of one response, and
    the responses to one prompt, are correlated: resampling segments would be too narrow."""
    units, accuracy_minus_majority, error_auc = segment_statistics(prompts, predicted, actual, error_probs)
    return {
        "accuracy_minus_baseline_ci95": prompt_interval(accuracy_minus_majority, units, seed, draws),
        "error_auc_ci95": prompt_interval(error_auc, units, seed, draws),
        "bootstrap_prompts": units,
    }


def pairwise_intervals(prompts: Sequence[str], correct: Sequence[bool], seed: int, draws: int = BOOTSTRAP_DRAWS) -> dict[str, Any]:
    """95% bootstrap interval of the pairwise accuracy over the prompts of the decided pairs.

    `correct[i]`: pair i's chosen response scores strictly above its rejected one (a score
    tie is wrong, labelled ties are not pairs: the pairwise_accuracy convention). Whole
    prompts are resampled, as the pairs of one prompt share responses.
    """
    unit, units = _units(prompts)
    pairs_of = np.bincount(unit, minlength=units).astype(np.float64)
    correct_of = np.bincount(unit, weights=np.asarray(correct, dtype=np.float64), minlength=units)

    def pairwise_accuracy(indices: np.ndarray) -> np.ndarray:
        return correct_of[indices].sum(axis=-1) / pairs_of[indices].sum(axis=-1)

    return {"pairwise_accuracy_ci95": prompt_interval(pairwise_accuracy, units, seed, draws), "bootstrap_prompts": units}


def regression_intervals(
    prompts: Sequence[str], predictions: Sequence[float], targets: Sequence[float], baseline: float, seed: int,
    draws: int = BOOTSTRAP_DRAWS,
) -> dict[str, Any]:
    """95% bootstrap interval over prompts of (MSE of predicting `baseline` for every item -
    the RM's MSE): above 0 where the RM is clearly better than predicting the mean."""
    gains = [(baseline - t) ** 2 - (p - t) ** 2 for p, t in zip(predictions, targets)]
    units, gain = ratio_statistic(prompts, gains, [1.0] * len(gains))
    return {"baseline_mse_minus_mse_ci95": prompt_interval(gain, units, seed, draws), "bootstrap_prompts": units}


def beats_baseline(metrics: dict[str, Any]) -> bool | None:
    """Whether the point estimate is better than the trivial baseline (noise included)."""
    if "majority_baseline_accuracy" in metrics:
        return metrics["accuracy"] > metrics["majority_baseline_accuracy"]
    if "pairwise_accuracy" in metrics:
        return metrics["pairwise_accuracy"] > metrics["pairwise_baseline_accuracy"]
    if "mse" in metrics:
        return metrics["mse"] < metrics["mean_baseline_mse"]
    return None


def beats_baseline_clearly(metrics: dict[str, Any]) -> bool | None:
    """Whether the 95% bootstrap interval lies above the baseline (False without an interval,
    None for metrics that have none: no held-out data)."""
    if "accuracy_minus_baseline_ci95" in metrics:
        interval, baseline = metrics["accuracy_minus_baseline_ci95"], 0.0
    elif "baseline_mse_minus_mse_ci95" in metrics:
        interval, baseline = metrics["baseline_mse_minus_mse_ci95"], 0.0
    elif "pairwise_accuracy_ci95" in metrics:
        interval, baseline = metrics["pairwise_accuracy_ci95"], metrics["pairwise_baseline_accuracy"]
    else:
        return None
    return interval is not None and interval[0] > baseline


def interval_verdict(interval: list[float] | None, baseline: float) -> str:
    """How a 95% interval stands to the baseline, in words (train-rm's summaries)."""
    if interval is None:
        return "no interval: fewer than 2 prompts"
    if interval[0] > baseline:
        return "clearly better"
    return "clearly worse" if interval[1] < baseline else "not clearly better"
