"""`rlhfkit train-rm`: the losses against hand-computed values (the metrics: test_metrics), the aspect presets,
data selection, the three kinds end to end on tiny models, --eval-only and bad input."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import statistics

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rlhfkit.config import build_config
from rlhfkit.errors import RlhfkitError
from rlhfkit.metrics import beats_baseline_clearly
from rlhfkit.models import MODEL_SUBDIR, load_tokenizer, model_dir
from rlhfkit.rewards.data import (
    ScoreExample,
    data_fingerprint,
    encode_examples,
    encode_preference_groups,
    load_aspect_records,
    make_collate,
    split_by_prompt,
)
from rlhfkit.rewards.losses import bradley_terry_loss, make_loss_fn, segment_loss
from rlhfkit.rewards.presets import AspectPreset, training_defaults
from rlhfkit.rewards.reward_model import (
    SPEC_FILE,
    encode_pair,
    load_reward_model,
    segment_end_positions,
    sequence_scores,
)
from rlhfkit.rewards.scoring import held_out_summary
from rlhfkit.schema import Demonstration, Preference, ScalarScore, Span, SpanFeedback, write_records
from rlhfkit.segment import SegmentLabelRules
from rlhfkit.stages.train_rm import METRICS_FILE, TrainRMConfig

FAST = ["--max-length", "96", "--batch-size", "4", "--max-steps", "3", "--lr", "1e-3"]


def span_records(
    n: int = 12, second=lambda i: f"It was built in {1800 + i}.", factual_error=lambda i: i % 3 == 0, whole_sentence=False
) -> list[SpanFeedback]:
    """Three sentences each: "The tower is ... tall. <second(i)> People like it, and it is made
    of iron." Records with factual_error(i) mark "It was" (or, with whole_sentence, all of
    second(i)) a factuality error; records 0, 3, 6, 9 mark the third sentence irrelevant. By
    default every third record has both errors."""
    records = []
    for i in range(n):
        response = f"The tower is {100 + i} metres tall. {second(i)} People like it, and it is made of iron."
        spans = []
        if factual_error(i):
            start = response.index("It was")
            spans.append(Span(start, start + (len(second(i)) if whole_sentence else 6), "Unverifiable", "factuality"))
        if i % 3 == 0:
            start = response.index("People")
            spans.append(Span(start, len(response) - 1, "Irrelevant", "relevance"))
        records.append(
            SpanFeedback(
                id=f"s{i}",
                prompt=f"question: How tall is tower {i}? context: Tower {i} is {100 + i} metres tall.",
                response=response,
                spans=spans,
                aspects=["relevance", "factuality"],
            )
        )
    return records


def preference_records(n: int = 12) -> list[Preference]:
    return [
        Preference(
            id=f"p{i}",
            prompt=f"question: How tall is tower {i}?",
            chosen=f"Tower {i} is {100 + i} metres tall.",
            rejected=f"Tower {i} is a tower. It is a tower." if i % 2 else "I do not know.",
            aspect="preference",
            tie=i % 4 == 3,
        )
        for i in range(n)
    ]


@pytest.fixture
def span_file(tmp_path):
    path = tmp_path / "span_feedback.jsonl"
    write_records(path, span_records())
    return path


@pytest.fixture
def preference_file(tmp_path):
    path = tmp_path / "preferences.jsonl"
    write_records(path, preference_records())
    return path


# --- losses and metrics by hand -------------------------------------------------------------


def test_bradley_terry_loss_by_hand():
    chosen = torch.tensor([2.0, 2.0, 2.0, 0.5])
    rejected = torch.tensor([0.5, 0.5, 0.5, 2.0])
    margin = torch.tensor([0.0, 1.0, 1.0, 0.0])
    tie = torch.tensor([False, False, True, False])
    loss = bradley_terry_loss(chosen, rejected, margin, tie)
    # d = 1.5: -log sigmoid(1.5) = log(1 + e^-1.5) = 0.201413.
    # margin 1: -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474077.
    # tie (margin ignored): (log(1 + e^-1.5) + log(1 + e^1.5)) / 2 = (0.201413 + 1.701413) / 2 = 0.951413.
    # d = -1.5: log(1 + e^1.5) = 1.701413.
    assert loss.tolist() == pytest.approx([0.201413, 0.474077, 0.951413, 1.701413], abs=1e-6)
    # A tie's loss is smallest when the two scores are equal: log 2.
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0]), torch.zeros(1), torch.tensor([True])).item() == pytest.approx(math.log(2))


def test_segment_loss_by_hand():
    # Two labelled positions and one ignored; error-class weight 3.
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[1, 0, -100]])
    loss, count = segment_loss(logits, labels, error_class_weight=3.0)
    # position 0: label 1, -log(1/2) = 0.693147, weight 3 -> 2.079442
    # position 1: label 0, -log(e^2 / (e^2 + 1)) = log(1 + e^-2) = 0.126928, weight 1
    assert loss.item() == pytest.approx(2.079442 + 0.126928, abs=1e-5)
    assert count.item() == 2


def test_verdict_and_summary_show_the_interval():
    segment = {
        "accuracy": 0.8485, "majority_baseline_accuracy": 0.8447, "error_f1": 0.2, "error_auc": 0.61,
        "accuracy_minus_baseline_ci95": [0.0, 0.012], "error_auc_ci95": [0.52, 0.7], "bootstrap_prompts": 88,
    }
    assert beats_baseline_clearly(segment) is False
    assert "held-out segment accuracy 0.8485 (majority baseline 0.8447; difference 95% CI [+0.000, +0.012]: " \
        "not clearly better), error F1 0.2000, error AUC 0.6100 (95% CI [0.520, 0.700]); intervals over 88 prompts" == held_out_summary(segment)
    clearly = {**segment, "accuracy_minus_baseline_ci95": [0.004, 0.02]}
    assert beats_baseline_clearly(clearly) is True and "clearly better)" in held_out_summary(clearly)
    worse = {**segment, "accuracy_minus_baseline_ci95": [-0.03, -0.001]}
    assert beats_baseline_clearly(worse) is False and "clearly worse)" in held_out_summary(worse)
    none = {**segment, "accuracy_minus_baseline_ci95": None, "error_auc_ci95": None, "bootstrap_prompts": 1}
    assert beats_baseline_clearly(none) is False
    assert "(majority baseline 0.8447; no interval: fewer than 2 prompts)" in held_out_summary(none)
    pairwise = {"pairwise_accuracy": 0.5075, "pairwise_baseline_accuracy": 0.5, "pairs": 400, "pairwise_accuracy_ci95": [0.46, 0.56], "bootstrap_prompts": 100}
    assert beats_baseline_clearly(pairwise) is False
    assert held_out_summary(pairwise) == "held-out pairwise accuracy 0.5075 on 400 pairs of 100 prompts (baseline 0.5; 95% CI [0.460, 0.560]: not clearly better)"
    assert beats_baseline_clearly({**pairwise, "pairwise_accuracy_ci95": [0.51, 0.6]}) is True
    assert beats_baseline_clearly({"mse": 1.0, "mean_baseline_mse": 2.0}) is None


# --- options and data -------------------------------------------------------------------------


def config(**values) -> TrainRMConfig:
    return build_config(TrainRMConfig, **{"data": __file__, "model": "m", "out": "o", **values})


def test_presets_and_overrides():
    fact, rel, comp = (config(aspect=a).settings() for a in ("factuality", "relevance", "completeness"))
    # +-1: the paper's 0.5/0.3 are `ppo --rewards` weights, applied once there.
    assert (fact.kind, fact.granularity, fact.positive_reward, fact.negative_reward) == ("segment", "sentence", 1.0, -1.0)
    assert (rel.kind, rel.granularity, rel.positive_reward, rel.negative_reward) == ("segment", "subsentence", 1.0, -1.0)
    # The reference's label rules (create_rel_fact_rm_files.py, --min_span_len 5).
    assert fact.label_rules == SegmentLabelRules(5, ("relevance",), ("relevance",))
    assert rel.label_rules == SegmentLabelRules(5, ("relevance",), ())
    assert config(aspect="factuality", min_span_words=0, ignore_segments_with=["none"]).settings().label_rules == SegmentLabelRules(0, ("relevance",), ())
    assert (comp.kind, comp.holistic_fallback) == ("preference", True)
    custom = config(aspect="toxicity", kind="segment", positive_reward=1.0, negative_reward=-2.0, error_class_weight=2.5).settings()
    assert (custom.granularity, custom.positive_reward, custom.negative_reward, custom.error_class_weight) == ("sentence", 1.0, -2.0, 2.5)
    assert config(aspect="relevance", kind="regression").settings().granularity == "response"
    with pytest.raises(RlhfkitError, match="'toxicity' has no preset; give --kind"):
        config(aspect="toxicity")
    with pytest.raises(RlhfkitError, match="unknown --kind 'ranking'; valid: segment, preference, regression"):
        config(aspect="x", kind="ranking")
    with pytest.raises(RlhfkitError, match="--granularity for a segment RM must be sentence or subsentence"):
        config(aspect="factuality", granularity="response")
    with pytest.raises(RlhfkitError, match="unknown --ties 'keep'; valid: soft, drop"):
        config(aspect="preference", ties="keep")
    # Segments are read at their completing token unless asked; a mean applies to segment RMs only.
    assert (fact.segment_pooling, rel.segment_pooling) == ("end", "end")
    assert config(aspect="relevance", segment_pooling="mean").settings().segment_pooling == "mean"
    with pytest.raises(RlhfkitError, match=r"--segment-pooling applies to segment RMs only \(completeness is a preference RM\)"):
        config(aspect="completeness", segment_pooling="mean")  # issue 26 item 20: no longer silently ignored
    with pytest.raises(RlhfkitError, match="--segment-pooling must be one of end, mean, got 'max'"):
        config(aspect="relevance", segment_pooling="max")


def test_training_defaults_of_presets_trained_together():
    # Worked by hand: the longest max_length (600); each prompt budget capped at half of it
    # (min(400, 300) = 300, min(100, 300) = 100), the longest kept; the smallest lr; the most epochs.
    wide = AspectPreset("segment", max_length=600, max_prompt_length=400, lr=1e-3, epochs=1)
    narrow = AspectPreset("preference", max_length=300, max_prompt_length=100, lr=5e-5, epochs=3)
    assert training_defaults([wide, narrow]) == {"max_length": 600, "max_prompt_length": 300, "lr": 5e-5, "epochs": 3}
    # An explicit --max-length 200 caps both budgets at 100.
    assert training_defaults([wide, narrow], 200)["max_prompt_length"] == 100
    # One preset: its own values.
    assert training_defaults([narrow]) == {"max_length": 300, "max_prompt_length": 100, "lr": 5e-5, "epochs": 3}


def test_data_fingerprint_hashes_each_file_once_then_the_options(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_bytes(b"one\n")
    second.write_bytes(b"two\n")
    options = ("factuality", 640, 0.2)
    # sha256 of the file bytes followed by repr(options): what checkpoints written before the
    # fingerprint moved into rlhfkit.rewards.data hold, so their --resume still matches.
    assert data_fingerprint([str(first)], options) == hashlib.sha256(b"one\n" + repr(options).encode()).hexdigest()
    # A file two aspects share is read once; order matters.
    expected = hashlib.sha256(b"one\ntwo\n" + repr(options).encode()).hexdigest()
    assert data_fingerprint([str(first), str(second), str(first)], options) == expected
    assert data_fingerprint([str(second), str(first)], options) != expected


def test_records_for_an_aspect(tmp_path, span_file, preference_file):
    settings = config(aspect="factuality").settings()
    other = tmp_path / "other.jsonl"
    write_records(other, [SpanFeedback("a", "p", "Some text.", [Span(0, 4, "Toxic", "toxicity")], ["toxicity", "style"])])
    with pytest.raises(RlhfkitError, match="no span_feedback record judged aspect 'factuality'; found aspects: style, toxicity"):
        load_aspect_records(str(other), "factuality", settings)
    with pytest.raises(RlhfkitError, match="a segment reward model trains on 'span_feedback' records; this file has 12 'preference'"):
        load_aspect_records(str(preference_file), "factuality", settings)
    # Completeness: the sample's preferences are holistic, used in its place.
    comp = config(aspect="completeness").settings()
    assert len(load_aspect_records(str(preference_file), "completeness", comp)) == 12
    assert len(load_aspect_records(str(preference_file), "completeness", comp, ties="drop")) == 9
    with pytest.raises(RlhfkitError, match="no preference record has aspect 'style'; found aspects: preference"):
        load_aspect_records(str(preference_file), "style", config(aspect="style", kind="preference").settings())
    same = tmp_path / "same.jsonl"
    write_records(same, [Preference("dup", "p", "Same answer.", "Same answer.", aspect="preference")])
    with pytest.raises(RlhfkitError, match="preference 'dup' has identical chosen and rejected responses"):
        load_aspect_records(str(same), "preference", comp)


def test_split_keeps_a_prompts_records_together():
    records = [Preference(f"{p}-{k}", f"prompt {p}", f"a{k}", f"b{k}") for p in range(10) for k in range(3)]
    train, held = split_by_prompt(records, 0.2, seed=0)
    assert len(held) == 6 and len(train) == 24
    assert not {r.prompt for r in train} & {r.prompt for r in held}
    assert split_by_prompt(records, 0.2, seed=0) == (train, held)
    with pytest.raises(RlhfkitError, match="only 1 distinct prompt"):
        split_by_prompt(records[:3], 0.2, seed=0)


def test_regression_targets_from_preferences(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    settings = config(aspect="preference", kind="regression").settings()
    pairs = [Preference("a", "p", "good", "bad"), Preference("b", "p", "fine", "also fine", tie=True)]
    examples, too_long = encode_examples(functools.partial(encode_pair, tokenizer, max_length=64), pairs, "preference", settings)
    assert too_long == 0
    assert [e.target for e in examples] == [1.0, 0.0, 0.5, 0.5]
    assert all(isinstance(e, ScoreExample) for e in examples)


def test_preference_groups_score_each_response_once(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    encode = functools.partial(encode_pair, tokenizer, max_length=64)
    pairs = [
        Preference("1", "p", "A.", "B."),
        Preference("2", "p", "A.", "C.", margin=0.5),
        Preference("3", "p", "C.", "B.", tie=True),
        Preference("4", "q", "D.", "E."),
    ]
    groups, too_long = encode_preference_groups(encode, pairs)
    assert too_long == 0 and [len(g.responses) for g in groups] == [3, 2]
    assert [(c.chosen, c.rejected, c.margin, c.tie) for c in groups[0].comparisons] == [
        (0, 1, 0.0, False), (0, 2, 0.5, False), (2, 1, 0.0, True)
    ]
    # The grouped loss is the sum of the pairs' Bradley-Terry losses on separately scored responses.
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    batch = make_collate("preference", tokenizer.pad_token_id)(groups)
    with torch.no_grad():
        loss, count = make_loss_fn("preference", 1.0)(model, batch)

        def score(prompt, response):
            ids = torch.tensor([encode(prompt, response).input_ids])
            return sequence_scores(model, ids, torch.ones_like(ids))

        expected = sum(
            bradley_terry_loss(score(r.prompt, r.chosen), score(r.prompt, r.rejected), torch.tensor([r.margin or 0.0]), torch.tensor([r.tie])).item()
            for r in pairs
        )
    assert count == 4
    assert loss.item() == pytest.approx(expected, abs=1e-5)


# --- the stage end to end -------------------------------------------------------------------


def read_json(path):
    return json.loads(path.read_text())


def learnable_span_records(n: int = 12) -> list[SpanFeedback]:
    """Like span_records, but the factuality error is one the tiny RM learns in a few steps:
    even records say "It was built on the moon." (an error, the whole sentence marked) where
    odd ones give a year; as before, records 0, 3, 6, 9 have a relevance error on their third
    sentence."""
    return span_records(
        n, second=lambda i: "It was built on the moon." if i % 2 == 0 else f"It was built in {1800 + i}.",
        factual_error=lambda i: i % 2 == 0, whole_sentence=True,
    )


# Enough steps at a high learning rate for the tiny RM to learn the written data exactly
# (a few seconds): measured error probabilities ~0.95 on errors, <= 0.09 elsewhere.
LEARN = ["--max-length", "96", "--batch-size", "4", "--lr", "1e-3"]


def test_segment_rm_end_to_end(run_cli, tiny_model_dir, tmp_path):
    data = tmp_path / "span_feedback.jsonl"
    write_records(data, learnable_span_records())
    out = tmp_path / "fact"
    result = run_cli("train-rm", "--aspect", "factuality", "--data", data, "--model", tiny_model_dir, "--out", out, *LEARN, "--max-steps", "30")
    assert result.exit_code == 0, result.output
    spec = read_json(model_dir(out) / SPEC_FILE)
    assert {k: spec[k] for k in ("aspect", "kind", "granularity", "positive_reward", "negative_reward", "max_length", "backbone")} == {
        "aspect": "factuality",
        "kind": "segment",
        "granularity": "sentence",
        "positive_reward": 1.0,
        "negative_reward": -1.0,
        "max_length": 96,
        "backbone": str(tiny_model_dir),
    }
    metrics = read_json(out / METRICS_FILE)
    held = metrics["held_out"]
    # 12 records, 20% held out by prompt: the seeded split (test_split_keeps_a_prompts_records_together
    # checks the split itself) holds out s6 and s8. By hand:
    #   s6: sentence 1 no error, sentence 2 error, sentence 3 only a relevance error: left out
    #       of factuality metrics by the reference's rule -> 2 segments, 1 error;
    #   s8: no error, error, no error -> 3 segments, 1 error.
    # 5 segments, 2 errors: the majority class (no error) is right on 3/5 = 0.6. The RM has
    # learned the data: accuracy 5/5, F1 1, AUC 1.
    assert (metrics["train_records"], metrics["held_out_records"]) == (10, 2)
    assert (held["segments"], held["error_segments"], held["predicted_errors"]) == (5, 2, 2)
    assert held["majority_baseline_accuracy"] == pytest.approx(3 / 5)
    assert (held["accuracy"], held["error_f1"], held["error_auc"]) == (1.0, 1.0, 1.0)
    assert metrics["steps"] == 30 and metrics["beats_baseline"] is True
    # The reliability table holds the same 5 segments: with every verdict right, the 2 errors
    # sit in bins above 0.5 (error rate 1 there) and the 3 others below it (error rate 0).
    bins = held["calibration"]
    assert sum(b["segments"] for b in bins) == 5
    assert sum(b["segments"] * b["error_rate"] for b in bins) == pytest.approx(2)
    above = [b for b in bins if b["low"] >= 0.5]
    assert sum(b["segments"] for b in above) == 2 and all(b["error_rate"] == 1.0 for b in above)
    assert all(b["error_rate"] == 0.0 for b in bins if b["low"] < 0.5)
    # Bootstrap over the 2 held-out prompts: a resample is s6s6, s6s8 or s8s8 (p 1/4, 1/2, 1/4);
    # accuracy minus majority: s6 alone 1 - 1/2 = 0.5, s8 alone 1 - 2/3 = 1/3, both 1 - 3/5 =
    # 0.4, so the 95% interval of 1000 draws is [1/3, 0.5], above 0: clearly better.
    assert held["bootstrap_prompts"] == 2
    assert held["accuracy_minus_baseline_ci95"] == pytest.approx([1 / 3, 0.5])
    assert metrics["beats_baseline_clearly"] is True
    assert "difference 95% CI [+0.333, +0.500]: clearly better" in " ".join(result.output.split())
    assert read_json(out / "run_config.json")["stage"] == "train-rm"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines if "loss" in row] == list(range(1, 31))

    # The saved RM gives -1 at the end of the error sentence and +1 elsewhere, at the
    # sentences' end characters (29 = len("The tower is 100 metres tall.")).
    rm = load_reward_model(out, device="cpu")
    s0, s1 = learnable_span_records(2)
    scored = rm.score([s0.prompt, s1.prompt], [s0.response, s1.response])
    assert [s.values for s in scored] == [[1.0, -1.0, 1.0], [1.0, 1.0, 1.0]]
    assert scored[0].char_ends == [29, 29 + len(" It was built on the moon."), len(s0.response)]

    # --eval-only scores the saved RM on labelled data and writes metrics only. By hand:
    # 36 sentences less the 4 relevance-only ones (s0, s3, s6, s9) = 32, with 6 errors (the
    # even records): majority 26/32 = 0.8125; the RM gets all 32 right.
    evaluated = tmp_path / "eval"
    result = run_cli("train-rm", "--eval-only", "--aspect", "factuality", "--data", data, "--model", out, "--out", evaluated)
    assert result.exit_code == 0, result.output
    eval_metrics = read_json(evaluated / METRICS_FILE)
    evaluated_held = eval_metrics["held_out"]
    assert eval_metrics["eval_only"] is True
    assert (evaluated_held["segments"], evaluated_held["error_segments"], evaluated_held["predicted_errors"]) == (32, 6, 6)
    assert evaluated_held["majority_baseline_accuracy"] == pytest.approx(26 / 32) and evaluated_held["accuracy"] == 1.0
    assert evaluated_held["bootstrap_prompts"] == 12 and eval_metrics["beats_baseline_clearly"] is True
    # Seeded by --seed: a second evaluation repeats the intervals.
    again = tmp_path / "eval-again"
    assert run_cli("train-rm", "--eval-only", "--aspect", "factuality", "--data", data, "--model", out, "--out", again).exit_code == 0
    assert read_json(again / METRICS_FILE)["held_out"] == evaluated_held
    assert not (evaluated / MODEL_SUBDIR).exists() and not (evaluated / SPEC_FILE).exists() and not list(evaluated.glob("*.safetensors"))


def test_relevance_preset_uses_subsentences(run_cli, tiny_model_dir, span_file, tmp_path):
    out = tmp_path / "rel"
    result = run_cli("train-rm", "--aspect", "relevance", "--data", span_file, "--model", tiny_model_dir, "--out", out, *FAST, "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    spec = read_json(model_dir(out) / SPEC_FILE)
    assert (spec["granularity"], spec["positive_reward"], spec["negative_reward"]) == ("subsentence", 1.0, -1.0)
    rm = load_reward_model(out, device="cpu")
    # "People like it, and it is made of iron." has fewer than 5 words after the comma: one piece.
    response = span_records(1)[0].response
    assert rm.score(["q"], [response])[0].char_ends == [len("The tower is 100 metres tall."), response.index(" People"), len(response)]
    assert read_json(out / METRICS_FILE)["held_out"] == {}


def test_mean_pooled_segment_rm_is_saved_and_scored_as_trained(run_cli, tiny_model_dir, span_file, tmp_path):
    out = tmp_path / "rel-mean"
    result = run_cli(
        "train-rm", "--aspect", "relevance", "--segment-pooling", "mean", "--data", span_file, "--model", tiny_model_dir,
        "--out", out, *FAST, "--eval-fraction", "0",
    )
    assert result.exit_code == 0, result.output
    assert read_json(model_dir(out) / SPEC_FILE)["segment_pooling"] == "mean"
    rm = load_reward_model(out, device="cpu")
    response = span_records(1)[0].response
    (segments, probs), = rm.error_probabilities(["q"], [response])
    # The saved model's token logits, averaged over each sub-sentence's tokens by hand.
    pair = rm.encode("q", response)
    with torch.no_grad():
        logits = rm.model(input_ids=torch.tensor([pair.input_ids])).logits[0]
    first, expected = pair.response_positions[0], []
    for position in segment_end_positions(pair, segments, response):
        expected.append(logits[first : position + 1].mean(0).softmax(-1)[1].item())
        first = position + 1
    assert probs == pytest.approx(expected, abs=1e-6)  # float32 logits, no padding


def test_preference_rm_stores_score_normalisation(run_cli, tiny_model_dir, preference_file, tmp_path):
    out = tmp_path / "comp"
    result = run_cli("train-rm", "--aspect", "completeness", "--data", preference_file, "--model", tiny_model_dir, "--out", out, *LEARN, "--max-steps", "20")
    assert result.exit_code == 0, result.output
    assert "holistic preferences" in result.output
    spec = read_json(model_dir(out) / SPEC_FILE)
    assert spec["kind"] == "preference" and spec["normalization"]["computed_on"] == "training responses"
    metrics = read_json(out / METRICS_FILE)
    held = metrics["held_out"]
    # preference_records(12): ties are p3, p7, p11 (i % 4 == 3). The seeded split holds out
    # p6 and p8 (see test_segment_rm_end_to_end): 2 decided pairs, no tie, 2 prompts; the 3
    # ties train. The RM learns to prefer "Tower i is N metres tall." (measured margin ~4.8):
    # both held-out pairs right, in every resample too, so the interval is [1, 1] > 0.5.
    assert (held["pairs"], held["ties"], held["bootstrap_prompts"], metrics["train_ties"]) == (2, 0, 2, 3)
    assert held["pairwise_baseline_accuracy"] == 0.5 and held["pairwise_accuracy"] == 1.0
    assert held["pairwise_accuracy_ci95"] == [1.0, 1.0] and metrics["beats_baseline_clearly"] is True
    assert "95% CI [1.000, 1.000]" in result.output

    # Normalised scores of the training responses have mean 0 and std 1: the 10 training
    # records' 20 (prompt, response) pairs, all distinct (every record has its own prompt).
    assert spec["normalization"]["responses"] == 20
    rm = load_reward_model(out, device="cpu")
    train = [r for r in preference_records() if r.id not in ("p6", "p8")]
    pairs = [(r.prompt, r.chosen) for r in train] + [(r.prompt, r.rejected) for r in train]
    values = [s.values[0] for s in rm.score([p for p, _ in pairs], [r for _, r in pairs])]
    # Mean and std of 20 float32 scores of size ~1, normalised in float64: error ~1e-6.
    assert statistics.fmean(values) == pytest.approx(0.0, abs=1e-4)
    assert statistics.pstdev(values) == pytest.approx(1.0, abs=1e-4)


def test_preference_rm_options(run_cli, tiny_model_dir, preference_file, tmp_path):
    samples = tmp_path / "sft_samples.jsonl"
    write_records(samples, [Demonstration(f"d{i}", f"question {i}?", f"Answer number {i}.") for i in range(5)])
    out = tmp_path / "pref"
    result = run_cli(
        "train-rm", "--aspect", "preference", "--data", preference_file, "--model", tiny_model_dir, "--out", out,
        *FAST, "--ties", "drop", "--normalize-on", samples, "--lora-r", "2",
    )
    assert result.exit_code == 0, result.output
    spec = read_json(model_dir(out) / SPEC_FILE)
    assert spec["normalization"]["computed_on"] == str(samples) and spec["normalization"]["responses"] == 5
    metrics = read_json(out / METRICS_FILE)
    assert metrics["train_ties"] == 0 and metrics["held_out"]["ties"] == 0
    assert metrics["trainable_parameters"] < metrics["total_parameters"]
    assert metrics["saved_model_class"] == "GPT2ForSequenceClassification"  # LoRA merged in
    rm = load_reward_model(out, device="cpu")
    (scored,) = rm.score(["question 0?"], ["Answer number 0."])
    assert len(scored.values) == 1 and math.isfinite(scored.values[0])


def test_regression_rm_on_scores(run_cli, tiny_model_dir, tmp_path):
    data = tmp_path / "scores.jsonl"
    # Target k = i % 5 for a response of k + 1 words: the RM can read it off the length.
    write_records(data, [ScalarScore(f"c{i}", f"question {i}?", "word " * (i % 5 + 1), float(i % 5), aspect="length") for i in range(15)])
    out = tmp_path / "reg"
    result = run_cli("train-rm", "--aspect", "length", "--kind", "regression", "--data", data, "--model", tiny_model_dir, "--out", out,
                     "--max-length", "96", "--batch-size", "4", "--max-steps", "30", "--lr", "3e-3",
                     # Here the target *is* the length: batches grouped by length would each hold
                     # one target, and 30 steps would not show the RM the whole range.
                     "--no-group-by-length")
    assert result.exit_code == 0, result.output
    assert read_json(model_dir(out) / SPEC_FILE)["kind"] == "regression"
    metrics = read_json(out / METRICS_FILE)
    held = metrics["held_out"]
    # The seeded split holds out c8, c10, c12: targets 3, 0, 2. The baseline predicts the
    # training labels' mean: all 15 labels sum to 3 x (0 + 1 + 2 + 3 + 4) = 30, less 5 held
    # out: 25 / 12. Its errors 11/12, -25/12, -1/12: MSE (121 + 625 + 1) / 144 / 3 = 747/432.
    assert held["scores"] == 3 and held["mean_baseline_of"] == "training labels"
    assert held["mean_baseline"] == pytest.approx(25 / 12)
    assert held["mean_baseline_mse"] == pytest.approx(747 / 432)
    # The held-out MSE is the mean squared error of the saved RM's own predictions.
    rm = load_reward_model(out, device="cpu")
    predictions = rm.raw_scores(["question 8?", "question 10?", "question 12?"], ["word " * 4, "word ", "word " * 3])
    assert held["mse"] == pytest.approx(((predictions[0] - 3) ** 2 + predictions[1] ** 2 + (predictions[2] - 2) ** 2) / 3, rel=1e-5)
    # After 30 steps it has learned the length (measured: MSE 0.37).
    assert held["mse"] < held["mean_baseline_mse"] / 2
    # The interval of (baseline MSE - RM MSE) over the 3 prompts: a resample of one prompt
    # three times has probability 1/27 = 3.7% > 2.5%, so the ends are the worst and the best
    # prompt's own gain (float32 predictions: 1e-5).
    gains = [(25 / 12 - t) ** 2 - (p - t) ** 2 for p, t in zip(predictions, [3.0, 0.0, 2.0])]
    assert held["baseline_mse_minus_mse_ci95"] == pytest.approx([min(gains), max(gains)], abs=1e-5)
    assert metrics["beats_baseline_clearly"] == (min(gains) > 0)
    # Scores in the labels' units: score() is the head's own output, no standardisation.
    assert read_json(model_dir(out) / SPEC_FILE)["normalization"] == {"mean": 0.0, "std": 1.0, "computed_on": None, "units": "labels"}
    scored = rm.score(["question 8?", "question 10?", "question 12?"], ["word " * 4, "word ", "word " * 3])
    assert [s.values[0] for s in scored] == pytest.approx(predictions, abs=1e-6)

    # --regression-scores standardized: (raw - mean) / std of the RM's scores on the training responses.
    out = tmp_path / "standardized"
    result = run_cli("train-rm", "--aspect", "length", "--kind", "regression", "--data", data, "--model", tiny_model_dir, "--out", out,
                     "--max-length", "96", "--batch-size", "4", "--max-steps", "2", "--regression-scores", "standardized")
    assert result.exit_code == 0, result.output
    norm = read_json(model_dir(out) / SPEC_FILE)["normalization"]
    assert norm["computed_on"] == "training responses" and norm["responses"] == 12
    rm = load_reward_model(out, device="cpu")
    [raw] = rm.raw_scores(["question 8?"], ["word " * 4])
    [scored] = rm.score(["question 8?"], ["word " * 4])
    assert scored.values[0] == pytest.approx((raw - norm["mean"]) / norm["std"], rel=1e-5)


def test_responses_that_do_not_fit_are_counted(run_cli, tiny_model_dir, span_file, tmp_path):
    out = tmp_path / "short"
    records = span_records()
    records[1] = SpanFeedback("long", "q", "A long answer. " * 40, [], ["factuality"])
    write_records(span_file, records)
    result = run_cli("train-rm", "--aspect", "factuality", "--data", span_file, "--model", tiny_model_dir, "--out", out, *FAST, "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    assert "1 training record(s) have a response longer than --max-length 96" in " ".join(result.output.split())
    assert read_json(out / METRICS_FILE)["train_records_too_long"] == 1


# --- bad input ------------------------------------------------------------------------------


def test_bad_input_exits_2_with_one_clear_line(run_cli, tiny_model_dir, span_file, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    same = tmp_path / "same.jsonl"
    write_records(same, [Preference("dup", "p", "Same.", "Same.", aspect="preference")])
    other = tmp_path / "other.jsonl"
    write_records(other, [SpanFeedback("a", "p", "Some text.", [Span(0, 4, "Toxic", "toxicity")], ["toxicity"])])
    out = tmp_path / "out"
    cases = [
        (["--aspect", "factuality", "--data", empty, "--model", tiny_model_dir], "no records (the file is empty)"),
        (["--aspect", "preference", "--data", same, "--model", tiny_model_dir], "has identical chosen and rejected responses"),
        (["--aspect", "factuality", "--data", other, "--model", tiny_model_dir], "no span_feedback record judged aspect 'factuality'; found aspects: toxicity"),
        (["--aspect", "toxicity", "--data", other, "--model", tiny_model_dir], "has no preset; give --kind"),
        (["--aspect", "factuality", "--data", tmp_path / "missing.jsonl", "--model", tiny_model_dir], "no such file"),
        (["--eval-only", "--aspect", "factuality", "--data", span_file, "--model", tiny_model_dir], "is not an rlhfkit reward model (no rlhfkit_rm.json)"),
    ]
    for args, message in cases:
        result = run_cli("train-rm", *args, "--out", out, *FAST)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (message, result.output)


# --- acceptance on the shipped sample (minutes) ---------------------------------------------


@pytest.fixture(scope="module")
def shipped_sample(tmp_path_factory, make_tiny_model, repo_root):
    """The QA-Feedback sample imported, and the tiny backbone `rlhfkit init-model` builds by default."""
    from rlhfkit.stages.annotate_import import ImportConfig, run_import
    from rlhfkit.stages.init_model import SHIPPED_CORPUS, InitModelConfig

    defaults = InitModelConfig()
    backbone = make_tiny_model(
        "gpt2",
        vocab_size=defaults.vocab_size,
        n_layer=defaults.n_layer,
        n_embd=defaults.n_embd,
        n_head=defaults.n_head,
        max_positions=defaults.max_positions,
        seed=defaults.seed,
        corpus=[str(repo_root / path) for path in SHIPPED_CORPUS],
    )
    imported = tmp_path_factory.mktemp("qa-import")
    run_import(build_config(ImportConfig, format="qa-feedback", inputs=[str(repo_root / "data/qa_feedback/feedback.json")], out=str(imported)))
    return backbone, imported


# Labelled segments of the shipped sample under the reference's rules (issue 10, counted
# against create_rel_fact_rm_files.py): 1,281 sentences, of which 651 carry only a relevance
# error and are left out of factuality; 2,170 relevance sub-sentences.
SHIPPED_SEGMENTS = {"factuality": 1281 - 651, "relevance": 2170}


@pytest.mark.slow
@pytest.mark.parametrize("aspect", ["relevance", "factuality", "completeness"])
def test_presets_on_the_shipped_sample_report_baselines_with_intervals(aspect, shipped_sample, tmp_path, repo_root):
    """The report holds what is known about the sample without the RM: 80 of the 400
    questions held out, and (evaluating a trained segment RM on the whole sample) exactly the
    segments the reference's label rules give. Of the learning, only what the tiny random
    backbone reliably shows: relevance errors rank above non-errors (measured: error AUC 0.580,
    95% CI [0.513, 0.651]; accuracy 0.569 vs majority 0.542, difference CI [-0.061, +0.102]).
    Factuality errors need the full passages (~1,600 tokens) to detect and the holistic
    preferences show no signal it can learn (measured: factuality predicts every held-out
    sentence an error, 138 of 138, accuracy 0.297 vs majority 0.703)."""
    from rlhfkit.stages.train_rm import run_train_rm

    backbone, imported = shipped_sample
    data = imported / ("preferences.jsonl" if aspect == "completeness" else "span_feedback.jsonl")
    out = tmp_path / aspect
    metrics = run_train_rm(build_config(TrainRMConfig, aspect=aspect, data=str(data), model=str(backbone), out=str(out)))
    held = metrics["held_out"]
    # 400 questions, each with 4 answers compared in 6 pairs: 20% of the prompts = 80 held out.
    per_question = 6 if aspect == "completeness" else 1
    assert (metrics["train_records"], metrics["held_out_records"]) == (320 * per_question, 80 * per_question)
    if aspect == "relevance":
        assert metrics["beats_baseline"], held
        assert held["error_auc_ci95"][0] > 0.5, held
    evaluated = run_train_rm(build_config(TrainRMConfig, aspect=aspect, data=str(data), model=str(out), out=str(tmp_path / "eval"), eval_only=True))
    whole = evaluated["held_out"]
    assert (whole["records"], whole["records_too_long"]) == (400 * per_question, 0)
    if aspect == "completeness":
        # The raw file's 6 preference labels per question: 0 is a tie (the reference's
        # create_comp_rm_files.py get_preference), 1 or 2 the preferred answer of the pair.
        raw = json.loads((repo_root / "data/qa_feedback/feedback.json").read_text())
        ties = sum(label == 0 for record in raw for label in record["preference"])
        assert (whole["pairs"], whole["ties"]) == (2400 - ties, ties)
        assert whole["pairwise_baseline_accuracy"] == 0.5
    else:
        assert whole["segments"] == SHIPPED_SEGMENTS[aspect]
