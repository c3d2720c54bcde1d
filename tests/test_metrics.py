"""rlhfkit.metrics against numbers worked out by hand."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlhfkit.metrics import (
    bootstrap_interval,
    calibration_bins,
    distinct_n,
    mean_length,
    pairwise_intervals,
    perplexity,
    roc_auc,
    rouge_l,
    segment_intervals,
    segment_metrics,
    segment_statistics,
    win_rate,
)
from rlhfkit.models import load_policy, load_tokenizer


def test_rouge_l_is_the_best_reference_f_measure_averaged():
    # 1) "the cat sat on the mat" vs "the cat is on the mat": LCS = the cat on the mat = 5
    #    words; P = 5/6, R = 5/6, F = 5/6. Against "a dog": 0. Best: 5/6.
    # 2) "a b c d" vs "a c": LCS = a c = 2; P = 2/4, R = 2/2, F = 2PR/(P+R) = 1/1.5 = 2/3.
    # mean = (5/6 + 4/6) / 2 = 3/4
    score = rouge_l(["the cat sat on the mat", "a b c d"], [["a dog", "the cat is on the mat"], ["a c"]])
    assert score == pytest.approx(0.75)
    assert rouge_l(["the cat sat on the mat"], [["a dog"]]) == 0.0


def test_rouge_l_stems_by_default_and_needs_references():
    # "cats" stems to "cat": a full match with the stemmer, no overlap without it
    assert rouge_l(["cats"], [["cat"]]) == pytest.approx(1.0)
    assert rouge_l(["cats"], [["cat"]], use_stemmer=False) == 0.0
    with pytest.raises(ValueError, match="prediction 1 has no reference"):
        rouge_l(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        rouge_l(["a", "b"], [["a"]])


def test_distinct_n_pools_ngrams_over_the_corpus():
    texts = ["a b a b", "a b c"]
    # unigrams: a b a b | a b c -> 7 in all, distinct {a, b, c} = 3
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    # bigrams: ab ba ab | ab bc -> 5 in all, distinct {ab, ba, bc} = 3
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    # trigrams: aba bab | abc -> 3, all distinct
    assert distinct_n(texts, 3) == 1.0
    # 4-grams: only "a b a b" has one
    assert distinct_n(texts, 4) == 1.0
    # no n-gram at all scores 0 rather than dividing by zero
    assert distinct_n(["", "a"], 2) == 0.0
    # any tokenisation: characters of "aab" -> a a b, distinct 2 of 3
    assert distinct_n(["aab"], 1, tokenize=list) == pytest.approx(2 / 3)


def test_mean_length_counts_whitespace_words():
    # 2 + 1 + 0 words over 3 texts
    assert mean_length(["a  b", "c", ""]) == 1.0
    assert mean_length(["abc"], tokenize=list) == 3.0


def test_win_rate_with_and_without_a_tie_margin():
    a = [1.0, 2.0, 3.0, 4.0]
    b = [0.0, 2.0, 3.05, 5.0]
    # differences a - b: 1, 0, -0.05, -1
    # win rate = win + tie / 2
    assert win_rate(a, b) == pytest.approx({"win": 0.25, "tie": 0.25, "loss": 0.5, "win_rate": 0.375})
    # with margin 0.1, -0.05 becomes a tie
    assert win_rate(a, b, tie_margin=0.1) == pytest.approx({"win": 0.25, "tie": 0.5, "loss": 0.25, "win_rate": 0.5})
    # swapping the sides swaps win and loss
    assert win_rate(b, a) == pytest.approx({"win": 0.5, "tie": 0.25, "loss": 0.25, "win_rate": 0.625})
    with pytest.raises(ValueError, match="4 scores for A but 3"):
        win_rate(a, b[:3])


def test_win_rate_is_the_papers_on_its_own_counts():
    # Jin et al. (2023), ChatGPT after one round: 57 wins, 67 ties, 36 losses of 160;
    # published win rate 56.6% = (57 + 67 / 2) / 160 = 90.5 / 160 = 0.565625 (wins alone: 35.6%).
    counts = win_rate([1.0] * 57 + [0.0] * 67 + [-1.0] * 36, [0.0] * 160)
    assert counts["win_rate"] == pytest.approx(0.565625, abs=1e-12)  # sums of 160 exact halves/units
    assert (counts["win"], counts["tie"], counts["loss"]) == pytest.approx((57 / 160, 67 / 160, 36 / 160))


class UniformLM(torch.nn.Module):
    """Logits all zero: every token has probability 1/V, so perplexity is exactly V."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(is_encoder_decoder=False, max_position_embeddings=2048)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab_size))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    vocab = len(tokenizer)
    assert perplexity(UniformLM(vocab), tokenizer, ["the sky is blue", "a", ""], batch_size=2) == pytest.approx(vocab)
    # nothing to score
    assert math.isnan(perplexity(UniformLM(vocab), tokenizer, [""]))


def test_perplexity_matches_the_models_own_loss_and_ignores_padding(tiny_model_dir):
    model, tokenizer, _ = load_policy(tiny_model_dir, device="cpu")
    texts = ["The sky is blue.", "Bloom is the second studio album by Troye Sivan."]
    nll_sum, n_tokens = 0.0, 0
    for text in texts:
        # each text alone, after the bos (= eos for GPT-2 style) token: HF's mean loss over
        # the len - 1 predicted tokens
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        nll_sum += loss * (ids.shape[1] - 1)
        n_tokens += ids.shape[1] - 1
    expected = math.exp(nll_sum / n_tokens)
    # one batch of two (the shorter one padded) and two batches of one agree
    assert perplexity(model, tokenizer, texts, batch_size=2) == pytest.approx(expected, rel=1e-4)
    assert perplexity(model, tokenizer, texts, batch_size=1) == pytest.approx(expected, rel=1e-4)


def mean_of(values):
    """The bootstrap statistic 'mean of the units' values' (of each row of resampled unit indices)."""
    values = np.asarray(values, dtype=float)
    return lambda indices: values[indices].mean(axis=1)


def test_bootstrap_interval_of_a_statistic_every_resample_shares_is_a_point():
    # Units that all hold 0.7: every resample's mean is 0.7. One unit: every resample is it.
    assert bootstrap_interval(mean_of([0.7] * 5), 5, seed=0) == pytest.approx((0.7, 0.7))
    assert bootstrap_interval(mean_of([3.0]), 1, seed=0) == (3.0, 3.0)


def test_bootstrap_interval_known_answers():
    # Two units 0 and 1: a resample's mean is 0, 1/2 or 1 with probability 1/4, 1/2, 1/4, so
    # the 2.5% and 97.5% quantiles of 1000 draws are 0 and 1, and the median is 1/2.
    assert bootstrap_interval(mean_of([0, 1]), 2, seed=0) == (0.0, 1.0)
    assert bootstrap_interval(mean_of([0, 1]), 2, seed=0, level=0.0) == (0.5, 0.5)
    # 300 ones and 100 zeros: the mean's bootstrap sd is sqrt(0.75 * 0.25 / 400) = 0.02165,
    # so the interval is about 0.75 -+ 1.96 * 0.02165 = [0.7076, 0.7924].
    values = [1] * 300 + [0] * 100
    lo, hi = bootstrap_interval(mean_of(values), 400, seed=0)
    assert (lo, hi) == pytest.approx((0.7076, 0.7924), abs=0.01)
    # Seeded: the same seed repeats the interval, another draws other resamples.
    assert bootstrap_interval(mean_of(values), 400, seed=0) == (lo, hi)
    assert bootstrap_interval(mean_of(values), 400, seed=1) != (lo, hi)


def test_bootstrap_interval_leaves_out_undefined_resamples():
    # The statistic is defined only on resamples that drew unit 0: those have mean 1/2 here.
    def defined_with_unit_0(indices):
        return np.where((indices == 0).any(axis=1), 0.5, np.nan)

    assert bootstrap_interval(defined_with_unit_0, 2, seed=0) == (0.5, 0.5)
    assert bootstrap_interval(lambda indices: np.full(len(indices), np.nan), 2, seed=0) is None

    # Only the very first resample defined: the interval is that one value, without a warning
    # (scipy's standard error of one value is 0/0).
    batches = []

    def first_resample_only(indices):
        values = np.full(len(indices), np.nan)
        if not batches:
            values[0] = 0.25
        batches.append(len(indices))
        return values

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bootstrap_interval(first_resample_only, 3, seed=0) == (0.25, 0.25)
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval(mean_of([0, 1]), 2, seed=0, level=1.0)


# --- reward-model metrics (train-rm's rm_metrics.json) -----------------------------------------


def test_roc_auc_by_hand():
    # Errors score 0.9 and 0.4, non-errors 0.4, 0.2, 0.1: of the 2 x 3 pairs the error wins
    # 5 and ties 1 (0.4 vs 0.4) -> (5 + 0.5) / 6.
    assert roc_auc([0.9, 0.4, 0.4, 0.2, 0.1], [True, True, False, False, False]) == pytest.approx(5.5 / 6)
    assert roc_auc([0.1, 0.2, 0.3], [True, False, False]) == 0.0
    assert math.isnan(roc_auc([0.1, 0.2], [False, False]))


def test_calibration_bins_by_hand():
    # Bins of width 0.1: 0.05 -> [0.0, 0.1); 0.15 and 0.12 -> [0.1, 0.2); 0.95 and 1.0 -> the last
    # bin, closed at 1. Mean P(error) and error rate per bin: 0.05 and 0/1; (0.15 + 0.12) / 2 =
    # 0.135 and 1/2; (0.95 + 1.0) / 2 = 0.975 and 2/2. Empty bins are left out.
    rows = calibration_bins([0.05, 0.15, 0.12, 0.95, 1.0], [False, True, False, True, True])
    assert [(r["low"], r["high"], r["segments"], r["error_rate"]) for r in rows] == [
        (0.0, 0.1, 1, 0.0), (0.1, 0.2, 2, 0.5), (0.9, 1.0, 2, 1.0)]
    assert [r["mean_error_probability"] for r in rows] == pytest.approx([0.05, 0.135, 0.975], abs=1e-15)


def test_segment_metrics_by_hand():
    predicted = [True, False, True, False, False]
    actual = [True, True, False, False, False]
    m = segment_metrics(predicted, actual)
    # correct: 0, 3, 4 -> 3/5; tp 1, fp 1, fn 1 -> precision = recall = F1 = 1/2;
    # majority class (no error) covers 3 of 5.
    assert m["accuracy"] == pytest.approx(0.6)
    assert (m["error_precision"], m["error_recall"], m["error_f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert m["majority_baseline_accuracy"] == pytest.approx(0.6)
    assert (m["segments"], m["error_segments"], m["predicted_errors"]) == (5, 2, 2)


# Two prompts of four segments each (error probability, is an error); predicted: p > 0.5.
# A: the RM is right on all 4 (accuracy 1; 1 error of 4: majority 0.75; difference 0.25)
#    and ranks its error above its 3 non-errors (AUC 1).
# B: it misses the error (accuracy 0.75 = majority 0.75: difference 0), which outscores
#    1 of its 3 non-errors (AUC 1/3).
SEGMENTS_A = [(0.9, True), (0.1, False), (0.2, False), (0.3, False)]
SEGMENTS_B = [(0.2, True), (0.1, False), (0.3, False), (0.4, False)]


def segment_columns(by_prompt: dict[str, list[tuple[float, bool]]]) -> tuple[list, list, list, list]:
    """(prompts, predicted, actual, error_probs), one entry per segment."""
    rows = [(prompt, p, a) for prompt, segments in by_prompt.items() for p, a in segments]
    return [r[0] for r in rows], [r[1] > 0.5 for r in rows], [r[2] for r in rows], [r[1] for r in rows]


def test_segment_statistics_weight_whole_prompts():
    prompts, predicted, actual, probs = segment_columns({"a": SEGMENTS_A, "b": SEGMENTS_B})
    units, difference, auc = segment_statistics(prompts, predicted, actual, probs)
    assert units == 2
    # Each prompt once: the point metrics (the 0.2 error of B ties A's 0.2 non-error: 1/2).
    m = segment_metrics(predicted, actual, probs)
    assert difference(np.array([[0, 1]])) == pytest.approx([m["accuracy"] - m["majority_baseline_accuracy"]])
    assert auc(np.array([[0, 1]])) == pytest.approx([roc_auc(probs, actual)])
    # A twice and B not at all: A's segments counted twice; each prompt alone: its values.
    doubled = segment_columns({"a": SEGMENTS_A, "a2": SEGMENTS_A})
    m = segment_metrics(*doubled[1:])
    assert difference(np.array([[0, 0]])) == pytest.approx([m["accuracy"] - m["majority_baseline_accuracy"]])
    assert auc(np.array([[0, 0], [1, 1]])) == pytest.approx([1.0, 1 / 3])
    assert difference(np.array([[1, 1]])) == pytest.approx([0.0])


def test_segment_intervals_by_hand():
    # Two prompts: a resample is AA, AB or BB (probability 1/4, 1/2, 1/4), so the 95%
    # interval of 1000 draws runs from B's value to A's (whatever the seed draws: each end
    # needs only 25 of the about 250 draws of BB and of AA).
    prompts, predicted, actual, probs = segment_columns({"a": SEGMENTS_A, "b": SEGMENTS_B})
    intervals = segment_intervals(prompts, predicted, actual, probs, seed=0)
    assert intervals["accuracy_minus_baseline_ci95"] == pytest.approx([0.0, 0.25])
    assert intervals["error_auc_ci95"] == pytest.approx([1 / 3, 1.0])
    assert intervals["bootstrap_prompts"] == 2
    # Three prompts alike: every resample gives the same values. Each has errors 0.9 and
    # 0.2, non-errors 0.5 and 0.1: predicted right 3 of 4 against a majority of 2 of 4
    # (difference 0.25); 3 of the 4 error/non-error pairs ranked right (AUC 0.75).
    alike = [(0.9, True), (0.5, False), (0.2, True), (0.1, False)]
    intervals = segment_intervals(*segment_columns({"a": alike, "b": alike, "c": alike}), seed=0)
    assert intervals["accuracy_minus_baseline_ci95"] == pytest.approx([0.25, 0.25])
    assert intervals["error_auc_ci95"] == pytest.approx([0.75, 0.75])
    # One prompt: resampling cannot show the noise, so no interval.
    single = segment_intervals(*segment_columns({"a": SEGMENTS_A}), seed=0)
    assert single == {"accuracy_minus_baseline_ci95": None, "error_auc_ci95": None, "bootstrap_prompts": 1}


def test_pairwise_intervals_by_hand():
    # Prompt a: 2 of 2 pairs right; b: 1 of 2. Alone: 1 and 0.5, the interval's ends.
    assert pairwise_intervals(["a", "a", "b", "b"], [True, True, True, False], seed=0) == {
        "pairwise_accuracy_ci95": pytest.approx([0.5, 1.0]),
        "bootstrap_prompts": 2,
    }
    assert pairwise_intervals(["a", "b"], [True, True], seed=3)["pairwise_accuracy_ci95"] == [1.0, 1.0]
    assert pairwise_intervals(["a", "a"], [True, False], seed=0)["pairwise_accuracy_ci95"] is None


def test_ratio_and_distinct_statistics_of_resampled_prompts():
    from rlhfkit.metrics import distinct_n_statistic, ratio_statistic

    # Items of prompts p, p, q with values 1, 0, 1 (denominators 1): all items 2/3; p drawn
    # twice (1 + 0) x 2 / 4 = 1/2; q drawn twice 1.
    units, ratio = ratio_statistic(["p", "p", "q"], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0])
    assert units == 2
    assert ratio(np.array([[0, 1], [0, 0], [1, 1]])).tolist() == pytest.approx([2 / 3, 1 / 2, 1.0])
    # distinct-1 of "a b" (prompt x) and "a c" (prompt y): all 3 distinct of 4; x twice: 2 of 4.
    units, distinct = distinct_n_statistic(["x", "y"], ["a b", "a c"], 1)
    assert distinct(np.array([[0, 1], [0, 0], [1, 1]])).tolist() == pytest.approx([0.75, 0.5, 0.5])
