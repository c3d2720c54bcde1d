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
  (win), falls behind by more (loss), or neither (tie).
- `bootstrap_interval`: a seeded percentile-bootstrap interval of any statistic that is a
  function of how often each independent unit (e.g. a prompt with all its records) is drawn.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch

from rlhfkit.rl.losses import logprobs_from_logits

Tokenize = Callable[[str], list[str]]


def whitespace_tokens(text: str) -> list[str]:
    return text.split()


def rouge_l(predictions: Sequence[str], references_list: Sequence[Sequence[str]], *, use_stemmer: bool = True) -> float:
    """Mean over predictions of the best ROUGE-L F-measure against that prediction's references."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references_list):
        raise ValueError(f"{len(predictions)} predictions but {len(references_list)} reference lists")
    if not predictions:
        raise ValueError("rouge_l needs at least one prediction")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    total = 0.0
    for i, (prediction, references) in enumerate(zip(predictions, references_list)):
        if not references:
            raise ValueError(f"prediction {i} has no reference")
        total += scorer.score_multi(list(references), prediction)["rougeL"].fmeasure
    return total / len(predictions)


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
    """{win, tie, loss}: shares of items where a - b > margin, |a - b| <= margin, a - b < -margin."""
    if len(scores_a) != len(scores_b):
        raise ValueError(f"{len(scores_a)} scores for A but {len(scores_b)} for B")
    if not scores_a:
        raise ValueError("win_rate needs at least one pair of scores")
    if tie_margin < 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    wins = sum(1 for a, b in zip(scores_a, scores_b) if a - b > tie_margin)
    losses = sum(1 for a, b in zip(scores_a, scores_b) if b - a > tie_margin)
    n = len(scores_a)
    return {"win": wins / n, "tie": (n - wins - losses) / n, "loss": losses / n}


def bootstrap_interval(
    statistic: Callable[[np.ndarray], np.ndarray],
    units: int,
    *,
    seed: int,
    draws: int = 1000,
    level: float = 0.95,
    chunk: int = 100,
) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of `statistic` over `units` independent units.

    Each of the `draws` resamples draws `units` units with replacement, seeded by `seed`.
    `statistic(weights)` gets a (d, units) array of how many times each unit is in each of d
    resamples (a row of ones is the original data) and returns the d statistics, so a
    statistic that is a ratio of weighted sums costs a matrix product (called on `chunk`
    resamples at a time to bound memory). Resamples where the statistic is undefined (NaN)
    are left out; None when none is defined. With few units the interval is too narrow
    (resampling cannot show variation the units do not have: one unit gives a point).
    """
    if units < 1 or draws < 1:
        raise ValueError(f"bootstrap_interval needs >= 1 unit and draw, got {units} and {draws}")
    if not 0 <= level < 1:
        raise ValueError(f"level must be in [0, 1), got {level}")
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(units, np.full(units, 1 / units), size=draws).astype(np.float64)
    values = np.concatenate([np.asarray(statistic(weights[i : i + chunk]), dtype=np.float64) for i in range(0, draws, chunk)])
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], *, batch_size: int = 8, max_length: int | None = None) -> float:
    """Corpus perplexity of `texts` under a causal LM (see the module docstring).

    Texts longer than `max_length` tokens (default: the model's positions) are cut on the
    right; NaN when no text has a token to score.
    """
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
    total_nll = 0.0
    total_tokens = 0
    for begin in range(0, len(rows), batch_size):
        batch = [row for row in rows[begin : begin + batch_size] if len(row) >= 2]
        if not batch:
            continue
        width = max(len(row) for row in batch)
        input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in batch], device=device)
        attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in batch], device=device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        logprobs = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])
        scored = attention_mask[:, 1:].bool()
        total_nll -= torch.where(scored, logprobs, 0.0).sum().item()
        total_tokens += int(scored.sum())
    model.train(was_training)
    return math.exp(total_nll / total_tokens) if total_tokens else float("nan")
