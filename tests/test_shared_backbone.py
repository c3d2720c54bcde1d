"""Shared-backbone reward model: one backbone, a head per aspect, all aspects scored in one pass.

Heads are checked on a stand-in backbone whose hidden states are known (an embedding
table), so each loss and reward is worked out by hand; the rest runs the tiny GPT-2 through
train-rm --shared-backbone into ppo and evaluate.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rlhfkit.config import build_config
from rlhfkit.errors import RlhfkitError
from rlhfkit.models import MODEL_SUBDIR, load_tokenizer
from rlhfkit.rewards.data import make_collate
from rlhfkit.rewards.losses import make_shared_loss_fn
from rlhfkit.rewards.shared_backbone import (
    AspectRewardModel,
    MultiAspectRewardModel,
    SharedBackboneScorer,
    load_reward_models,
)
from rlhfkit.rewards.sources import build_reward_sources, canonical_name, parse_named, parse_weights
from rlhfkit.schema import (
    Generation,
    Preference,
    PromptRecord,
    Span,
    SpanFeedback,
    load_records,
    write_records,
)
from rlhfkit.stages.train_rm import TrainRMConfig

# float32 arithmetic on a handful of values: a few ulps of ~1, far below 1e-6.
TOL = 1e-6


class StandInBackbone(nn.Module):
    """last_hidden_state = table[input_ids]: hidden states chosen by hand (a 'gpt2', so causal)."""

    def __init__(self, table: list[list[float]]):
        super().__init__()
        self.embed = nn.Embedding(len(table), len(table[0]))
        self.embed.weight.data = torch.tensor(table)
        self.config = SimpleNamespace(model_type="gpt2", hidden_size=len(table[0]), initializer_range=0.02)
        self.calls = 0

    def forward(self, input_ids, attention_mask):
        self.calls += 1
        return SimpleNamespace(last_hidden_state=self.embed(input_ids))


def set_head(head: nn.Linear, weight: list[list[float]], bias: list[float]) -> None:
    head.weight.data = torch.tensor(weight)
    head.bias.data = torch.tensor(bias)


def stand_in_model(table) -> MultiAspectRewardModel:
    model = MultiAspectRewardModel(StandInBackbone(table), {"factuality": "segment", "relevance": "segment", "completeness": "preference"})
    # factuality logits (no error, error) = (0, 2 h0 - 2 h1); relevance = (0, -2 h0); completeness score = h0 + 2 h1.
    set_head(model.heads["factuality"], [[0.0, 0.0], [2.0, -2.0]], [0.0, 0.0])
    set_head(model.heads["relevance"], [[0.0, 0.0], [-2.0, 0.0]], [0.0, 0.0])
    set_head(model.heads["completeness"], [[1.0, 2.0]], [0.0])
    return model


# Token 0 (pad) -> (0, 0), token 1 -> (1, 0), token 2 -> (0, 1).
TABLE = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]


def test_segment_head_loss_by_hand():
    model = stand_in_model(TABLE)
    loss_fn = make_shared_loss_fn(model.kinds, {"factuality": 0.5, "relevance": 1.0, "completeness": 1.0},
                                  {"factuality": 3.0, "relevance": 1.0})
    batch = {"input_ids": torch.tensor([[1, 2, 1]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor([[1, 0, -100]]), "aspect": "factuality"}
    loss, count = loss_fn(model, batch)
    # Token 1: logits (0, 2), label error: CE = log(1 + e^-2) = 0.126928, class weight 3.
    # Token 2: logits (0, -2), label none: CE = log(1 + e^-2) = 0.126928, weight 1. Token 3 unlabelled.
    # Sum 4 x 0.126928 over 2 labelled segments = 0.253856 mean; aspect weight 0.5 -> 0.126928.
    assert count == 1
    assert loss.item() == pytest.approx(0.5 * 4 * math.log1p(math.exp(-2)) / 2, abs=TOL)


def test_preference_head_loss_by_hand():
    model = stand_in_model(TABLE)
    loss_fn = make_shared_loss_fn(model.kinds, {"factuality": 1.0, "relevance": 1.0, "completeness": 2.0}, {})
    # Response A = [1, 2, 1] ends on token 1 (score 1); B = [2, 2] (+ pad) ends on token 2 (score 2).
    batch = {"input_ids": torch.tensor([[1, 2, 1], [2, 2, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
             "chosen": torch.tensor([1]), "rejected": torch.tensor([0]), "margin": torch.tensor([0.0]),
             "tie": torch.tensor([False]), "aspect": "completeness"}
    loss, _ = loss_fn(model, batch)
    # -log sigmoid(2 - 1) = log(1 + e^-1) = 0.313262, one comparison, aspect weight 2 -> 0.626523.
    assert loss.item() == pytest.approx(2 * math.log1p(math.exp(-1)), abs=TOL)


def test_collated_segment_batch_into_the_loss():
    """make_collate's labels reach the head at the positions the example names."""
    from rlhfkit.rewards.data import SegmentExample

    model = stand_in_model(TABLE)
    # Row 1's one segment is tokens 0-1 (ends at 1), row 2's is token 0.
    batch = make_collate("segment", 0)([SegmentExample([1, 2], [1], [1], [0]), SegmentExample([2], [0], [0], [0])])
    loss, _ = make_shared_loss_fn(model.kinds, {"relevance": 1.0}, {"relevance": 1.0})(model, {**batch, "aspect": "relevance"})
    # Relevance logits (0, -2 h0): token 2 -> (0, 0), label error: log 2; the same token in row 2, label none: log 2.
    assert loss.item() == pytest.approx(math.log(2), abs=TOL)
    # Mean pooling: row 1 reads ((0, -2) + (0, 0)) / 2 = (0, -1), label error: log(1 + e) = 1.3132617;
    # row 2 as before, log 2; the shared loss is their mean, (1.3132617 + 0.6931472) / 2.
    mean = make_shared_loss_fn(model.kinds, {"relevance": 1.0}, {"relevance": 1.0}, {"relevance": "mean"})
    assert mean(model, {**batch, "aspect": "relevance"})[0].item() == pytest.approx((1.3132617 + 0.6931472) / 2, abs=TOL)


@pytest.fixture(scope="module")
def stand_in_rms(tiny_model_dir):
    """Every aspect of a stand-in model behind the tiny tokenizer: every token's hidden state is (1, 0)."""
    tokenizer = load_tokenizer(str(tiny_model_dir), padding_side="right")
    model = stand_in_model([[1.0, 0.0]] * len(tokenizer))
    spec = {
        "format": 1, "kind": "multi_aspect", "max_length": 128, "max_prompt_length": 32, "truncation_side": "right",
        "aspects": {
            "factuality": {"kind": "segment", "granularity": "sentence", "positive_reward": 1.0, "negative_reward": -1.0},
            "relevance": {"kind": "segment", "granularity": "sentence", "positive_reward": 0.5, "negative_reward": -0.5},
            "completeness": {"kind": "preference", "granularity": "response", "normalization": {"mean": 0.5, "std": 2.0}},
        },
    }
    scorer = SharedBackboneScorer(model)
    return scorer, {a: AspectRewardModel(scorer, a, tokenizer, spec, torch.device("cpu")) for a in spec["aspects"]}


def test_every_aspect_scored_from_one_forward_pass(stand_in_rms):
    scorer, rms = stand_in_rms
    prompts, responses = ["Q?", "Who?"], ["It is red. It is old.", "Paris."]
    before = scorer.model.backbone.calls
    fact = rms["factuality"].score(prompts, responses, batch_size=8)
    rel = rms["relevance"].score(prompts, responses, batch_size=8)
    comp = rms["completeness"].score(prompts, responses, batch_size=8)
    assert scorer.model.backbone.calls - before == 1  # one batch of 2, three aspects
    # factuality: P(error) = sigmoid(2 x 1) = 0.8808 > 0.5 at every segment end -> -1 per sentence.
    assert fact[0].values == [-1.0, -1.0] and fact[0].char_ends == [10, 21] and fact[1].values == [-1.0]
    assert fact[0].error_probs[0] == pytest.approx(1 / (1 + math.exp(-2)), abs=TOL)
    # relevance: P(error) = sigmoid(-2) = 0.1192 -> +0.5 per sentence.
    assert rel[0].values == [0.5, 0.5] and rel[1].values == [0.5]
    # completeness: raw score 1 x 1 + 2 x 0 = 1, normalised (1 - 0.5) / 2 = 0.25, at the response's end.
    assert comp[0].values == pytest.approx([0.25], abs=TOL) and comp[0].char_ends == [21]


def test_prefix_scores_of_a_sequence_aspect(stand_in_rms):
    _, rms = stand_in_rms
    scores, _, prompt_scores = rms["completeness"].prefix_scores(["Q?"], ["It is red."])
    # Every prefix reads hidden (1, 0): raw 1, normalised 0.25, the prompt's score too.
    assert torch.allclose(scores[0], torch.full_like(scores[0], 0.25), atol=TOL)
    assert prompt_scores.tolist() == pytest.approx([0.25], abs=TOL)


def test_aspect_names_and_aliases():
    assert canonical_name("fg.fact") == "fg.factuality"
    assert canonical_name("fg.rel") == "fg.relevance"
    assert canonical_name("comp") == "completeness"
    assert parse_weights("fg.fact=0.5,fg.comp=0.3") == {"fg.factuality": 0.5, "fg.completeness": 0.3}


# --- training, saving, loading, ppo -------------------------------------------------------------

RESPONSES = ["Bloom was written by Troye Sivan. It was released in 2018.", "The bridge opened in 1937. It is red."]


@pytest.fixture(scope="module")
def fg_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fg-data")
    spans, prefs = [], []
    for i in range(12):
        response = RESPONSES[i % 2]
        first = response.index(".") + 1
        found = [Span(0, first, "Unverifiable", "factuality")] if i % 2 else []
        if i % 3 == 0:
            found.append(Span(first + 1, len(response), "Irrelevant", "relevance"))
        spans.append(SpanFeedback(id=f"s{i}", prompt=f"question {i % 6}?", response=response, spans=found,
                                  aspects=["factuality", "relevance"]))
        prefs.append(Preference(id=f"p{i}", prompt=f"question {i % 6}?", chosen=response, rejected=response.split(".")[0] + ".",
                                aspect="preference"))
    write_records(d / "spans.jsonl", spans)
    write_records(d / "prefs.jsonl", prefs)
    write_records(d / "prompts.jsonl", [PromptRecord(id=f"q{i}", prompt=f"question {i}?") for i in range(4)])
    return d


@pytest.fixture(scope="module")
def fg_model(fg_data, tiny_model_dir, tmp_path_factory) -> Path:
    from rlhfkit.stages.train_rm import run_train_rm

    out = tmp_path_factory.mktemp("fg") / "rm"
    cfg = build_config(
        TrainRMConfig, aspect="factuality,relevance,completeness", shared_backbone=True, data=str(fg_data / "spans.jsonl"),
        data_for=[f"completeness={fg_data / 'prefs.jsonl'}"], model=str(tiny_model_dir), out=str(out), max_steps=3,
        batch_size=4, max_length=96, max_prompt_length=16, eval_fraction=0.25, aspect_weights="1,0.5,2", device="cpu",
    )
    cfg.validate()
    metrics = run_train_rm(cfg)
    assert set(metrics["aspects"]) == {"factuality", "relevance", "completeness"}
    return out


def test_saved_model_lists_its_aspects(fg_model):
    spec = json.loads((fg_model / MODEL_SUBDIR / "rlhfkit_rm.json").read_text())
    assert spec["kind"] == "multi_aspect" and spec["reads"] == "last_token"
    assert {a: e["kind"] for a, e in spec["aspects"].items()} == {"factuality": "segment", "relevance": "segment", "completeness": "preference"}
    assert [spec["aspects"][a]["weight"] for a in ("factuality", "relevance", "completeness")] == [1.0, 0.5, 2.0]
    assert spec["aspects"]["factuality"]["label_rules"]["ignore_with_aspects"] == ["relevance"]
    assert spec["aspects"]["completeness"]["normalization"]["computed_on"] == "training responses"
    assert (fg_model / MODEL_SUBDIR / "aspect_heads.safetensors").is_file() and (fg_model / MODEL_SUBDIR / "model.safetensors").is_file()
    metrics = json.loads((fg_model / "rm_metrics.json").read_text())
    # The padding fraction's arithmetic is tested by hand in test_training; here: it is reported.
    assert isinstance(metrics["padding_fraction"], float)
    assert "accuracy" in metrics["aspects"]["factuality"]["held_out"]
    assert "pairwise_accuracy" in metrics["aspects"]["completeness"]["held_out"]


def test_sources_of_one_model_share_a_forward_pass(fg_model):
    weights = parse_weights("fg.fact=0.5,fg.rel=0.3,fg.comp=0.3")
    sources = build_reward_sources(weights, parse_named([f"fg={fg_model}"], "--rm"), {}, device=torch.device("cpu"))
    assert set(sources) == {"fg.factuality", "fg.relevance", "fg.completeness"}
    scorer = sources["fg.factuality"].rm.scorer
    assert all(s.rm.scorer is scorer for s in sources.values())
    prompts, responses = ["question 1?"] * 3, ["It is red. It is old.", "Paris.", "No."]
    spans = [[(0, 2), (2, len(r))] for r in responses]
    before = scorer.forward_passes
    out = {name: s.token_rewards(prompts, responses, spans) for name, s in sources.items()}
    assert scorer.forward_passes - before == 1  # batch_size 8 >= 3 responses: one batch, three aspects
    # The loaded model gives what a fresh forward pass of the saved weights gives.
    again = load_reward_models(fg_model, device="cpu")["completeness"].raw_scores(prompts, responses)
    assert again == pytest.approx(sources["fg.completeness"].rm.raw_scores(prompts, responses), abs=1e-5)
    assert all(len(r.per_token) == 3 for r in out.values())


def test_shared_model_names_must_be_aspects(fg_model):
    paths = parse_named([f"fg={fg_model}"], "--rm")
    with pytest.raises(RlhfkitError, match="name its aspects as fg.factuality, fg.relevance, fg.completeness"):
        build_reward_sources({"fg": 1.0}, paths, {}, device=torch.device("cpu"))
    with pytest.raises(RlhfkitError, match="fg.tone"):
        build_reward_sources({"fg.tone": 1.0}, paths, {}, device=torch.device("cpu"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"aspect": "factuality", "shared_backbone": True}, "give several"),
        ({"aspect_weights": "1,2"}, "2 weight"),
        ({"aspect_weights": "1,0,1"}, "> 0"),
        ({"data_for": ["tone=x.jsonl"]}, "--data-for tone: not in --aspect"),
        ({"shared_backbone": False, "aspect_weights": "1,1,1"}, "add --shared-backbone"),
        ({"lora_r": 4}, "--lora-r is not supported"),
    ],
)
def test_bad_shared_options(fg_data, tiny_model_dir, tmp_path, options, message):
    values = {"aspect": "factuality,relevance,completeness", "shared_backbone": True, "data": str(fg_data / "spans.jsonl"),
              "model": str(tiny_model_dir), "out": str(tmp_path / "o"), **options}
    with pytest.raises(RlhfkitError, match=message):
        build_config(TrainRMConfig, **values).validate()
    assert not (tmp_path / "o").exists()


def test_shared_model_into_ppo_and_evaluate(run_cli, fg_model, fg_data, tiny_model_dir, tmp_path):
    out = tmp_path / "ppo"
    run_cli(
        "ppo", "--policy", str(tiny_model_dir), "--prompts", str(fg_data / "prompts.jsonl"), "--out", str(out),
        "--steps", "1", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--minibatch-size", "2",
        "--ppo-epochs", "1", "--max-new-tokens", "8", "--max-prompt-length", "16",
        "--rm", f"fg={fg_model}", "--rewards", "fg.fact=0.5,fg.relevance=0.3,fg.comp=0.3",
    )
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    rollouts = [json.loads(row) for row in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 4  # the whole step: 2 prompts x 2 samples
    # Each aspect's raw reward is the mean over the step's responses of what that aspect's RM
    # gives them (a segment aspect: the sum over its segments), scored here on its own; the
    # weighted one is weight x raw, and the total their sum. float32 scores: 1e-5.
    aspects = load_reward_models(fg_model, device="cpu")
    weights = {"factuality": 0.5, "relevance": 0.3, "completeness": 0.3}
    for aspect, weight in weights.items():
        scored = aspects[aspect].score([r["prompt"] for r in rollouts], [r["response"] for r in rollouts])
        assert line[f"reward/raw/fg.{aspect}"] == pytest.approx(sum(sum(s.values) for s in scored) / 4, abs=1e-5)
        assert line[f"reward/weighted/fg.{aspect}"] == pytest.approx(weight * line[f"reward/raw/fg.{aspect}"], abs=1e-5)
    assert line["reward/total"] == pytest.approx(sum(line[f"reward/weighted/fg.{a}"] for a in weights), abs=1e-5)

    ev = tmp_path / "eval"
    run_cli("evaluate", "--policy", str(tiny_model_dir), "--prompts", str(fg_data / "prompts.jsonl"), "--max-prompts", "2",
            "--max-new-tokens", "8", "--rm", f"fg={fg_model}", "--out", str(ev))
    [system] = json.loads((ev / "metrics.json").read_text())["systems"].values()
    generations = load_records(ev / "generations.jsonl", "generation")
    pairs = ([g.prompt for g in generations], [g.response for g in generations])
    completeness = aspects["completeness"].score(*pairs)
    assert system["reward/raw/fg.completeness"] == pytest.approx(sum(s.values[0] for s in completeness) / 2, abs=1e-5)
    probs = [p for s in aspects["factuality"].score(*pairs) for p in s.error_probs]
    assert system["error_rate/fg.factuality"] == pytest.approx(sum(p > 0.5 for p in probs) / len(probs) if probs else 0.0)


def test_a_sequence_aspect_can_be_redistributed(fg_model):
    """R3HF on a shared model's completeness head: the token rewards telescope to the last prefix
    score minus the prompt's (both normalised), as for a separate causal RM."""
    paths = parse_named([f"fg={fg_model}"], "--rm")
    sources = build_reward_sources({"fg.completeness": 1.0}, paths, {"fg.completeness": "token"}, device=torch.device("cpu"))
    source = sources["fg.completeness"]
    assert "redistributed per token" in source.description
    response = "It is red. It is old."
    spans = [[(0, 5), (5, 10), (10, len(response))]]
    rewards = source.token_rewards(["question 1?"], [response], spans).per_token[0]
    _, _, prompt_scores = source.rm.prefix_scores(["question 1?"], [response])
    # The sum telescopes to the sequence score the head gives the whole response, read by the
    # other code path (score, the one PPO pays without --redistribute; normalised with the
    # spec's mean/std), minus the prompt's: unnormalised or scaled prefix scores fail this.
    # float32 sums of 3 values of size ~1: well within 1e-5.
    [whole] = load_reward_models(fg_model, device="cpu")["completeness"].score(["question 1?"], [response])
    assert rewards.sum().item() == pytest.approx(whole.values[0] - prompt_scores[0].item(), abs=1e-5)
    assert whole.values[0] != pytest.approx(prompt_scores[0].item(), abs=1e-3)  # a non-trivial sum


def test_audit_and_redistribute_load_real_reward_model_directories(run_cli, fg_model, fg_data, tiny_model_dir, tmp_path):
    """`evaluate --audit-rm` and `redistribute` on saved RMs (a shared-backbone one, whose
    aspects are fg.ASPECT, and a single factuality RM), no stand-ins: the expected figures are
    recomputed from each RM's own scores of the rollouts and the judge's rule ('bad' marks a
    false sentence; tests.judges.audit_truth)."""
    from tests.test_audit import ROLLOUTS

    rollouts = tmp_path / "run" / "rollouts.jsonl"
    rollouts.parent.mkdir()
    write_records(rollouts, [Generation(id=f"r{i}", prompt=p, response=r, meta={"step": s}) for i, (s, p, r) in enumerate(ROLLOUTS)])
    single = tmp_path / "fact-rm"
    result = run_cli("train-rm", "--aspect", "factuality", "--data", fg_data / "spans.jsonl", "--model", tiny_model_dir,
                     "--out", single, "--max-steps", "2", "--batch-size", "4", "--max-length", "96", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    out = tmp_path / "audit"
    result = run_cli("evaluate", "--audit-rm", f"fg={fg_model}", "--audit-rm", f"solo={single}",
                     "--audit-judge", "py:tests.judges:audit_truth", "--rollouts", f"arm={rollouts}", "--out", out)
    assert result.exit_code == 0, result.output
    audited = json.loads((out / "audit.json").read_text())["runs"]["arm"]["rms"]
    assert set(audited) == {"fg.factuality", "fg.relevance", "fg.completeness", "solo"}
    rms = {"fg.factuality": load_reward_models(fg_model, device="cpu")["factuality"],
           "solo": load_reward_models(single, device="cpu")["factuality"]}
    for name, rm in rms.items():
        for step, row in zip((0, 1), audited[name]):
            rows = [(p, r) for s, p, r in ROLLOUTS if s == step]
            scored = rm.error_probabilities([p for p, _ in rows], [r for _, r in rows])
            agree = [(prob > 0.5) == ("bad" in seg.text) for segments, probs in scored for seg, prob in zip(segments, probs)]
            assert row["segments"] == len(agree) and row["accuracy"] == pytest.approx(sum(agree) / len(agree), abs=1e-12)

    # redistribute: the shared model's one sequence aspect (completeness); each record's
    # sequence score is the prompt score plus the token rewards, which telescope to the score
    # the head gives the whole response (6-decimal rounding of <= 30 values: 1e-4).
    out = tmp_path / "r3hf.jsonl"
    result = run_cli("redistribute", "--rm", fg_model, "--input", rollouts, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    completeness = load_reward_models(fg_model, device="cpu")["completeness"]
    records = load_records(out, "generation")
    whole = completeness.score([r.prompt for r in records], [r.response for r in records])
    for record, scored in zip(records, whole):
        assert record.meta["sequence_score"] == pytest.approx(scored.values[0], abs=1e-4)
    result = run_cli("redistribute", "--rm", fg_model, "--aspect", "factuality", "--input", rollouts, "--out", out)
    assert result.exit_code == 2 and "--aspect factuality: not a sequence aspect of" in result.output and "valid: completeness" in result.output
