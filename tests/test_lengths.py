"""Default lengths are lowered to the model's positions; lengths the user gives are not."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from rlhfkit.config import opt
from rlhfkit.errors import RlhfkitError
from rlhfkit.lengths import fit_default_lengths, fit_generation_lengths
from rlhfkit.schema import Demonstration, write_records


@dataclass
class Lengths:
    max_prompt_length: int = opt(1024)
    max_new_tokens: int = opt(200)


def test_both_defaults_share_the_positions():
    cfg = Lengths()
    assert fit_default_lengths(cfg, 512, ("max_prompt_length", "max_new_tokens"), "ppo")
    # 200 new tokens fit in half of 512, so they stay; the prompt gets 512 - 200 = 312
    assert (cfg.max_prompt_length, cfg.max_new_tokens) == (312, 200)
    cfg = Lengths()
    fit_default_lengths(cfg, 64, ("max_prompt_length", "max_new_tokens"), "ppo")
    assert (cfg.max_prompt_length, cfg.max_new_tokens) == (32, 32)  # 200 > 64 // 2 = 32; prompt 64 - 32


def test_generation_lengths_are_fitted_then_checked():
    cfg = Lengths()
    fit_generation_lengths(cfg, 64, "ppo", "the policy", is_encoder_decoder=False)
    assert (cfg.max_prompt_length, cfg.max_new_tokens) == (32, 32)  # as fit_default_lengths: 64 // 2, the rest
    cfg = Lengths(max_prompt_length=60, max_new_tokens=10)  # both given, 70 > 64: refused, not cut
    with pytest.raises(RlhfkitError, match="--max-prompt-length 60 \\+ --max-new-tokens 10 exceeds the 64 positions the policy allows"):
        fit_generation_lengths(cfg, 64, "ppo", "the policy", is_encoder_decoder=False)
    cfg = Lengths(max_prompt_length=60, max_new_tokens=10)  # an encoder-decoder reads and writes apart
    fit_generation_lengths(cfg, 64, "ppo", "the policy", is_encoder_decoder=True)
    assert (cfg.max_prompt_length, cfg.max_new_tokens) == (60, 10)


def test_a_given_length_is_kept_and_the_default_takes_the_rest():
    cfg = Lengths(max_new_tokens=48)
    fit_default_lengths(cfg, 512, ("max_prompt_length", "max_new_tokens"), "ppo")
    assert (cfg.max_prompt_length, cfg.max_new_tokens) == (464, 48)  # 512 - 48
    cfg = Lengths(max_prompt_length=2000, max_new_tokens=20)  # both given: untouched, the stage errors
    assert not fit_default_lengths(cfg, 512, ("max_prompt_length", "max_new_tokens"), "ppo")
    assert (cfg.max_prompt_length, cfg.max_new_tokens) == (2000, 20)
    cfg = Lengths(max_new_tokens=600)  # no room left for a prompt: untouched
    assert not fit_default_lengths(cfg, 512, ("max_prompt_length", "max_new_tokens"), "ppo")
    cfg = Lengths()
    assert not fit_default_lengths(cfg, 4096, ("max_prompt_length", "max_new_tokens"), "ppo")  # fits already
    assert not fit_default_lengths(cfg, None, ("max_prompt_length", "max_new_tokens"), "ppo")  # no known limit


def test_sft_default_max_length_is_clipped_to_a_small_model(run_cli, make_tiny_model, tmp_path):
    model = make_tiny_model("gpt2", max_positions=64)
    data = tmp_path / "demos.jsonl"
    write_records(data, [Demonstration(id=f"d{i}", prompt=f"question: {i}? answer:", response=" yes.") for i in range(4)])
    out = tmp_path / "sft"
    result = run_cli("sft", "--model", model, "--data", data, "--out", out, "--max-steps", 1, "--batch-size", 2,
                     "--eval-fraction", 0, "--save-every", 0)
    assert result.exit_code == 0, result.output
    assert "sft: note: default --max-length 1024 exceeds the model's 64 positions; using --max-length 64" in result.output
    assert json.loads((out / "run_config.json").read_text())["config"]["max_length"] == 64
    # a length the user gives is never changed: it is an error, as before
    result = run_cli("sft", "--model", model, "--data", data, "--out", tmp_path / "sft2", "--max-length", 100)
    assert result.exit_code == 2 and "--max-length 100 exceeds the 64 positions" in result.output
