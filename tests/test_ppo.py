"""`rlhfkit ppo` and `rlhfkit redistribute` end to end on tiny offline models.

Reward models are trained for a couple of steps with `train-rm` (their quality does not
matter here: these tests check the wiring, the artifacts, resume and bad input).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.schema import Generation, Preference, PromptRecord, Span, SpanFeedback, write_records

QUESTIONS = [
    "Who wrote the album Bloom?",
    "When was the bridge opened?",
    "Where is the river Nile?",
    "What is the capital of France?",
    "Who painted the famous ceiling?",
    "When did the war end?",
]
RESPONSES = [
    "Bloom was written by Troye Sivan. It was released in 2018.",
    "The bridge opened in 1937. It is red.",
    "The Nile is in Africa. It is long.",
    "Paris is the capital. The city is old.",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ppo-data")
    write_records(d / "prompts.jsonl", [PromptRecord(id=f"p{i}", prompt=f"question: {q} answer:") for i, q in enumerate(QUESTIONS)])
    spans = []
    for i in range(16):
        response = RESPONSES[i % 4]
        first_end = response.index(".") + 1
        span_list = []
        if i % 2:
            span_list.append(Span(0, first_end, "Unverifiable", "factuality"))
        if i % 3 == 0:
            span_list.append(Span(first_end + 1, len(response), "Irrelevant", "relevance"))
        spans.append(SpanFeedback(id=f"s{i}", prompt=f"question: {QUESTIONS[i % 6]} answer:", response=response,
                                  spans=span_list, aspects=["factuality", "relevance"]))
    write_records(d / "spans.jsonl", spans)
    prefs = [
        Preference(id=f"q{i}", prompt=f"question: {QUESTIONS[i % 6]} answer:", chosen=RESPONSES[i % 4],
                   rejected=RESPONSES[i % 4].split(".")[0] + ".", aspect="preference")
        for i in range(12)
    ]
    write_records(d / "prefs.jsonl", prefs)
    return d


@pytest.fixture(scope="module")
def reward_models(tiny_model_dir, data_dir, tmp_path_factory) -> dict[str, Path]:
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    root = tmp_path_factory.mktemp("rms")
    out = {}
    for aspect, data in (("factuality", "spans.jsonl"), ("relevance", "spans.jsonl"), ("completeness", "prefs.jsonl")):
        result = CliRunner().invoke(app, [
            "train-rm", "--aspect", aspect, "--data", str(data_dir / data), "--model", str(tiny_model_dir),
            "--out", str(root / aspect), "--max-steps", "2", "--batch-size", "4", "--max-length", "128",
            "--eval-fraction", "0",
        ], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        out[aspect] = root / aspect
    return out


def ppo_args(policy: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "ppo", "--policy", str(policy), "--prompts", str(data_dir / "prompts.jsonl"), "--out", str(out),
        "--steps", "2", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--minibatch-size", "2",
        "--ppo-epochs", "1", "--max-new-tokens", "12", "--max-prompt-length", "64", "--save-every", "1",
        "--lr", "1e-4", "--seed", "3", *extra,
    ]


def test_fine_grained_ppo_with_three_reward_models(run_cli, tiny_model_dir, data_dir, reward_models, tmp_path):
    out = tmp_path / "run"
    result = run_cli(*ppo_args(
        tiny_model_dir, data_dir, out,
        "--rewards", "fact=0.3,rel=0.5,comp=0.3",
        "--rm", f"fact={reward_models['factuality']}", "--rm", f"rel={reward_models['relevance']}",
        "--rm", f"comp={reward_models['completeness']}",
        "--eval-prompts", str(data_dir / "prompts.jsonl"), "--eval-every", "1",
    ))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward/total" in r]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("reward/factuality", "reward/relevance", "reward/completeness", "kl", "entropy", "policy_loss",
                "value_loss", "clipfrac", "approx_kl", "response_length"):
        assert key in train[0], key
    # The policy starts as the reference: no KL on the first rollout.
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert any("eval/reward_total" in r for r in rows)
    assert (out / "checkpoints" / "step-1" / "training_state.pt").is_file()
    assert (out / "reward_curves.png").stat().st_size > 1000
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts[0]["tokens"]) == len(rollouts[0]["token_rewards"])
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["config"]["rewards"] == "fact=0.3,rel=0.5,comp=0.3"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_resume_gives_the_same_policy_as_an_uninterrupted_run(run_cli, tiny_model_dir, data_dir, tmp_path, monkeypatch):
    from rlhfkit.stages import ppo

    judge = ["--rewards", "judge=1", "--rm", "judge=py:tests.judges:count_letters_e"]
    straight = tmp_path / "straight"
    assert run_cli(*ppo_args(tiny_model_dir, data_dir, straight, *judge, "--steps", "3")).exit_code == 0

    # The same run, killed during step 3 (after the step-2 checkpoint), then resumed.
    real_iteration = ppo.ppo_iteration

    def crash_at_step_3(*args, **kwargs):
        if args[-1] == 3:
            raise KeyboardInterrupt
        return real_iteration(*args, **kwargs)

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(ppo, "ppo_iteration", crash_at_step_3)
    assert run_cli(*ppo_args(tiny_model_dir, data_dir, interrupted, *judge, "--steps", "3")).exit_code == 130
    assert not (interrupted / "model.safetensors").exists()
    monkeypatch.setattr(ppo, "ppo_iteration", real_iteration)
    result = run_cli(*ppo_args(tiny_model_dir, data_dir, interrupted, *judge, "--steps", "3", "--resume"))
    assert result.exit_code == 0, result.output
    a, b = _weights(straight), _weights(interrupted)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@pytest.mark.parametrize("extra", [
    ["--advantage", "grpo"],
    ["--advantage", "rloo"],
    ["--value-model", "shared"],
    ["--lora-r", "4"],
])
def test_variants_run(run_cli, tiny_model_dir, data_dir, tmp_path, extra):
    out = tmp_path / "run"
    result = run_cli(*ppo_args(tiny_model_dir, data_dir, out, "--rewards", "judge=1",
                               "--rm", "judge=py:tests.judges:count_letters_e", "--steps", "1", *extra))
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists()


def test_encoder_decoder_policy(run_cli, tiny_t5_dir, data_dir, tmp_path):
    out = tmp_path / "t5"
    result = run_cli(*ppo_args(tiny_t5_dir, data_dir, out, "--rewards", "judge=1",
                               "--rm", "judge=py:tests.judges:sentence_rewards", "--steps", "1"))
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForSeq2SeqLM

    AutoModelForSeq2SeqLM.from_pretrained(out)


def test_redistributed_preference_reward(run_cli, tiny_model_dir, data_dir, reward_models, tmp_path):
    out = tmp_path / "r3hf"
    result = run_cli(*ppo_args(tiny_model_dir, data_dir, out, "--rewards", "comp=1",
                               "--rm", f"comp={reward_models['completeness']}", "--redistribute", "comp", "--steps", "1"))
    assert result.exit_code == 0, result.output
    rollout = json.loads((out / "rollouts.jsonl").read_text().splitlines()[0])
    # Dense: (almost) every token carries a reward, not just the last one.
    assert sum(1 for r in rollout["token_rewards"] if r != 0) > 1


def test_redistribute_stage_sums_to_sequence_minus_prompt_score(run_cli, data_dir, reward_models, tmp_path):
    from rlhfkit.rewards.reward_model import load_reward_model

    generations = tmp_path / "gens.jsonl"
    write_records(generations, [Generation(id=f"g{i}", prompt=f"question: {QUESTIONS[i]} answer:", response=r, model="m")
                                for i, r in enumerate(RESPONSES)])
    out = tmp_path / "token_rewards.jsonl"
    html = tmp_path / "report.html"
    result = run_cli("redistribute", "--rm", reward_models["completeness"], "--input", generations, "--out", out, "--html", html)
    assert result.exit_code == 0, result.output
    # Issue 13: success says so (it printed nothing).
    assert f"redistribute: {len(RESPONSES)} record(s), mean sequence score" in " ".join(result.output.split())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    rm = load_reward_model(reward_models["completeness"], device="cpu")
    sequence = rm.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    for row, scored in zip(rows, sequence):
        assert "".join(row["tokens"]) == row["response"]
        total = sum(row["token_rewards"])
        assert total == pytest.approx(scored.values[0] - row["meta"]["prompt_score"], abs=1e-4)
    page = html.read_text()
    assert page.count("<section>") == len(RESPONSES) and 'class="t"' in page


def test_reward_placement_on_policy_tokens(tiny_model_dir):
    """A written 2-sentence answer: the segment rewards land on the last token of each sentence."""
    from rlhfkit.generation import token_char_spans
    from rlhfkit.models import load_tokenizer
    from rlhfkit.rewards.sources import PythonFunctionSource

    tokenizer = load_tokenizer(str(tiny_model_dir))
    text = "Paris is old. It is big."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded, spans = token_char_spans(tokenizer, ids)
    assert decoded == text
    source = PythonFunctionSource("fact", "tests.judges:sentence_rewards")
    rewards = source.token_rewards(["q"], [text], [spans])
    values, given = rewards.padded(len(ids))
    first_end = next(i for i, (s, e) in enumerate(spans) if e >= len("Paris is old."))
    expected = torch.zeros(len(ids))
    expected[first_end] = 0.5  # sentence_rewards: +0.5 for a sentence without "big"
    expected[len(ids) - 1] = -0.5
    torch.testing.assert_close(values[0], expected)
    assert given[0].nonzero().flatten().tolist() == [first_end, len(ids) - 1]


@pytest.mark.parametrize("args, message", [
    (["--rewards", "fact=0.3,oops=1", "--rm", "fact=py:tests.judges:count_letters_e"],
     "--rewards names oops but no reward model is given for it"),
    (["--rewards", "fact=high", "--rm", "fact=py:tests.judges:count_letters_e"],
     "the weight of 'fact' is not a number: 'high'"),
    (["--rewards", "judge=1", "--rm", "judge=py:tests.judges:count_letters_e", "--advantage", "ppo2"],
     "--advantage must be one of gae, grpo, rloo"),
    (["--rewards", "judge=1", "--rm", "judge=py:tests.judges:count_letters_e", "--minibatch-size", "3"],
     "--minibatch-size 3 must divide the rollouts per step"),
    (["--rewards", "judge=1", "--rm", "judge=py:tests.judges:count_letters_e", "--truncation-side", "top"],
     "--truncation-side must be one of right, left, middle, got 'top'"),
    (["--rewards", "judge=1", "--rm", "judge=py:tests.judges:count_letters_e", "--max-prompt-length", "4000"],
     "exceeds the 2048 positions the policy allows"),
])
def test_bad_input(run_cli, tiny_model_dir, data_dir, tmp_path, args, message):
    result = run_cli(*ppo_args(tiny_model_dir, data_dir, tmp_path / "x", *args))
    assert result.exit_code == 2
    assert message in result.output.replace("\n", " ")


def test_rm_directory_of_the_wrong_kind(run_cli, tiny_model_dir, data_dir, reward_models, tmp_path):
    result = run_cli(*ppo_args(tiny_model_dir, data_dir, tmp_path / "x", "--rewards", "fact=1", "--rm", f"fact={tiny_model_dir}"))
    assert result.exit_code == 2 and "is not an rlhfkit reward model" in result.output.replace("\n", " ")
    result = run_cli(*ppo_args(tiny_model_dir, data_dir, tmp_path / "y", "--rewards", "fact=1",
                               "--rm", f"fact={reward_models['factuality']}", "--redistribute", "fact"))
    assert result.exit_code == 2 and "is a segment reward model, which is already dense" in result.output.replace("\n", " ")
