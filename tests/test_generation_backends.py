"""`--generation-backend`: the vLLM seam's weight-sync bookkeeping and rollout building, with a stand-in engine."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from rlhfkit.errors import RlhfkitError
from rlhfkit.generation import SamplingConfig
from rlhfkit.generation_backends import (
    VLLM_MISSING,
    VLLMGeneration,
    WeightSync,
    check_generation_backend,
)
from rlhfkit.models import load_tokenizer


class StandInEngine:
    """Records what it was sent; answers each prompt with the next canned response."""

    def __init__(self, responses=()):
        self.loads: list[dict[str, torch.Tensor]] = []
        self.prompts: list[list[int]] = []
        self.responses = list(responses)

    def generate(self, prompt_token_ids, sampling):
        self.prompts += prompt_token_ids
        return [self.responses[i % len(self.responses)] for i in range(len(prompt_token_ids))]

    def load_weights(self, weights):
        self.loads.append({name: tensor.clone() for name, tensor in weights})


def test_weights_are_pushed_once_per_update_and_only_when_changed():
    policy = nn.Linear(2, 1)
    engine = StandInEngine()
    sync = WeightSync(engine)
    assert sync.ensure_synced(policy) is False and engine.loads == []  # the engine loaded the initial weights itself
    with torch.no_grad():
        policy.weight.fill_(3.0)
    sync.policy_updated()
    sync.policy_updated()  # two updates between rollouts: one push of the latest weights
    assert sync.ensure_synced(policy) is True
    assert sync.ensure_synced(policy) is False
    assert sync.syncs == 1 and sync.tensors_sent == 2  # weight and bias
    assert torch.equal(engine.loads[0]["weight"], torch.full((1, 2), 3.0))


def test_a_resumed_run_pushes_before_its_first_rollout():
    engine = StandInEngine()
    sync = WeightSync(engine, engine_has_policy_weights=False)
    assert sync.ensure_synced(nn.Linear(2, 1)) is True and len(engine.loads) == 1


def test_engine_rollout_matches_the_trainer_s_layout(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir), padding_side="left")
    eos = tokenizer.eos_token_id
    hello = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    # Row 1 ends with EOS and then junk the engine would not send (masked anyway); row 2 is cut off.
    engine = StandInEngine([hello + [eos], hello[:1]])
    backend = VLLMGeneration(engine)
    policy = nn.Linear(2, 1)
    rollout = backend.generate(policy, tokenizer, ["a b c", "d"], SamplingConfig(8), max_prompt_length=16)
    # The engine got each prompt's real tokens, without the left padding.
    assert engine.prompts == [tokenizer("a b c")["input_ids"], tokenizer("d")["input_ids"]]
    assert rollout.response_mask.tolist() == [[1] * (len(hello) + 1), [1] + [0] * len(hello)]
    assert rollout.finished.tolist() == [True, False]
    assert rollout.texts == ["Hello there", tokenizer.decode(hello[:1])]
    assert rollout.response_ids[1, 1:].tolist() == [tokenizer.pad_token_id] * len(hello)
    backend.policy_updated()
    backend.generate(policy, tokenizer, ["a"], SamplingConfig(8), max_prompt_length=16)
    assert backend.sync.syncs == 1


def test_backend_names_and_the_missing_extra():
    with pytest.raises(RlhfkitError, match="must be one of hf, vllm"):
        check_generation_backend("sglang")
    check_generation_backend("hf")
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(RlhfkitError, match="pip install 'rlhfkit\\[vllm\\]'"):
            check_generation_backend("vllm")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_ppo_refuses_vllm_without_the_extra(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from rlhfkit.cli import app
    from rlhfkit.schema import PromptRecord, write_records

    write_records(tmp_path / "p.jsonl", [PromptRecord(id="p", prompt="q?")])
    result = CliRunner().invoke(app, [
        "ppo", "--policy", str(tiny_model_dir), "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o"),
        "--rewards", "r=1", "--rm", "r=py:len", "--generation-backend", "vllm",
    ])
    assert result.exit_code == 2 and VLLM_MISSING.split(";")[0] in result.output
    assert not (tmp_path / "o").exists()
