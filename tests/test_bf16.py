"""bf16 on CPU: sft, train-rm and ppo run end to end with --dtype bfloat16, PPO's first step
agrees with fp32 within a tolerance derived from bf16's precision, and bf16 PPO keeps fp32
trained weights (an AdamW step of 1e-6 is lost in bf16 weights)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.config import build_config
from rlhfkit.models import model_dir
from rlhfkit.rewards.sources import build_reward_sources, parse_named, parse_weights
from rlhfkit.rl.advantages import FixedKLController
from rlhfkit.schema import Demonstration, Preference, PromptRecord, write_records
from rlhfkit.stages.ppo import PPOConfig, load_models, make_optimizers, policy_logits, ppo_iteration

# bf16 keeps 8 significant bits: unit roundoff u = 2^-8 (a rounded x is x(1 + d), |d| <= u).
BF16_UNIT_ROUNDOFF = 2.0**-8

PROMPTS = ["question: why is the sky blue? answer:", "question: what do bees make? answer:"]
JUDGE = {"rewards": "judge=1", "rm": ["judge=py:tests.judges:count_letters_e"]}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_records(path, [PromptRecord(id=f"p{i}", prompt=p) for i, p in enumerate(PROMPTS)])
    return path


class FixedRollout:
    """A generation backend that hands back one rollout: both precisions score the same tokens."""

    name = "fixed"

    def __init__(self, rollout):
        self.rollout = rollout

    def generate(self, *args, **kwargs):
        return self.rollout

    def policy_updated(self) -> None:
        pass


def first_step(policy, ref, prompts_file, out, dtype, rollout=None):
    """(rollout, per-token log-probs, step-1 metrics) of a GRPO step in `dtype` (one minibatch:
    the whole batch, so the metrics are the first update's)."""
    cfg = build_config(
        PPOConfig, policy=str(policy), ref=str(ref), prompts=str(prompts_file), out=str(out), dtype=dtype, device="cpu",
        advantage="grpo", prompts_per_step=2, samples_per_prompt=2, minibatch_size=4, ppo_epochs=1, max_new_tokens=12,
        max_prompt_length=64, kl_coef=0.5, seed=3, **JUDGE,
    )
    torch.manual_seed(cfg.seed)
    bundle = load_models(cfg, torch.device("cpu"))
    weights = parse_weights(cfg.rewards)
    sources = build_reward_sources(weights, parse_named(cfg.rm, "--rm"), {}, device=torch.device("cpu"))
    optimizers, schedulers = make_optimizers(cfg, bundle)
    backend = FixedRollout(rollout) if rollout is not None else None
    metrics, rollout, _ = ppo_iteration(cfg, bundle, sources, weights, PROMPTS, optimizers, schedulers,
                                        FixedKLController(cfg.kl_coef), 1, backend=backend)
    return rollout, metrics


def rollout_logprobs(policy, ref, prompts_file, out, dtype, rollout):
    cfg = build_config(PPOConfig, policy=str(policy), ref=str(ref), prompts=str(prompts_file), out=str(out), dtype=dtype,
                       device="cpu", **JUDGE)
    bundle = load_models(cfg, torch.device("cpu"))
    with torch.no_grad(), bundle.precision():
        logits, _ = policy_logits(bundle, rollout)  # ResponseLogits: the LM head runs a chunk at a time
        ref_logits, _ = policy_logits(bundle, rollout, reference=True)
        policy_logp = logits.token_stats(rollout.response_ids, (cfg.temperature,))[0][cfg.temperature]
        ref_logp = ref_logits.token_stats(rollout.response_ids, (1.0,))[0][1.0]
        whole = logits.hidden if logits.head is None else logits.head(logits.hidden)
    mask = rollout.response_mask.bool()
    return policy_logp[mask], ref_logp[mask], whole.float()


def test_bf16_first_ppo_step_matches_fp32_within_bf16_rounding(make_tiny_model, prompts_file, tmp_path):
    policy = make_tiny_model("gpt2")
    ref = make_tiny_model("gpt2", seed=1)  # another reference, so the KL is not 0
    rollout, fp32_metrics = first_step(policy, ref, prompts_file, tmp_path / "fp32", "float32")
    _, bf16_metrics = first_step(policy, ref, prompts_file, tmp_path / "bf16", "bfloat16", rollout)
    logp32, ref32, logits32 = rollout_logprobs(policy, ref, prompts_file, tmp_path / "a", "float32", rollout)
    logp16, ref16, _ = rollout_logprobs(policy, ref, prompts_file, tmp_path / "b", "bfloat16", rollout)

    # Propagation. Under autocast every matmul rounds both operands to bf16, each product term
    # is then off by at most 2u relative, and the bf16 result by u more: 3u relative to the
    # terms' magnitude. The tiny GPT-2 (2 layers) has 6 matmuls per layer (qkv, q.k, p.v,
    # attention out, MLP in, MLP out) and the LM head: K = 13 rounded matmuls on the way to
    # a logit. LayerNorm rescales the residual stream, so each matmul's relative error adds
    # once to the logits, to first order: |dz| <= 3uK * max|z|. A log-prob z_t - logsumexp(z)
    # moves by dz_t - sum_i p_i dz_i, at most 2 max|dz|; so per token
    #     |d logp| <= 2 * 3uK * max|z| = 78u * max|z|  (~0.3 max|z|),
    # a worst case: rounding errors of random sign mostly cancel (measured 2026-12-07: max|z|
    # 1.05, bound 0.32, largest error 0.0044 on the policy and 0.0018 on the reference).
    scale = logits32.abs().max().item()
    logp_tol = 2 * 3 * BF16_UNIT_ROUNDOFF * 13 * scale
    assert logp16.dtype == torch.float32  # taken in fp32 from the bf16 logits
    assert (logp16 - logp32).abs().max().item() <= logp_tol
    assert (ref16 - ref32).abs().max().item() <= logp_tol
    # The KL is a per-sequence sum over <= 12 tokens of logp - ref_logp: both move.
    assert abs(bf16_metrics["kl"] - fp32_metrics["kl"]) <= 12 * 2 * logp_tol
    # ... yet the ratio is computed in fp32 from log-probs that the rollout pass and the
    # update took alike: on the first minibatch it is exactly 1 in bf16 too (no bf16 noise in
    # the ratio), so approx_kl and the clip fraction are 0, and the policy loss is
    # -mean(advantages) in both (the advantages come from the same rewards, in fp32).
    assert bf16_metrics["approx_kl"] == 0 and bf16_metrics["clipfrac"] == 0
    assert bf16_metrics["policy_loss"] == pytest.approx(fp32_metrics["policy_loss"], abs=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_ppo_keeps_fp32_weights_so_small_steps_land(make_tiny_model, prompts_file, tmp_path, device):
    # An AdamW step moves a weight by ~lr = 1e-6. bf16 weights near 0.02 are spaced
    # 2^-6 * 2^-7 = 1.2e-4 apart, so in bf16 weights the step rounds away; in the fp32 master
    # weights (spacing 1.9e-9 there) it lands. So after one step most weights have changed.
    policy = make_tiny_model("gpt2")
    out = tmp_path / "run"
    cfg = build_config(
        PPOConfig, policy=str(policy), prompts=str(prompts_file), out=str(out), dtype="bfloat16", device=device,
        advantage="grpo", prompts_per_step=2, samples_per_prompt=2, minibatch_size=4, ppo_epochs=1, max_new_tokens=12,
        max_prompt_length=64, lr=1e-6, steps=1, seed=3, **JUDGE,
    )
    from rlhfkit.stages.ppo import run_ppo

    run_ppo(cfg)
    before, after = load_file(str(policy / "model.safetensors")), load_file(str(model_dir(out) / "model.safetensors"))
    weight = "transformer.h.0.mlp.c_fc.weight"
    assert after[weight].dtype == torch.float32
    changed = (after[weight] != before[weight]).float().mean().item()
    assert changed > 0.9, changed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stage", ["sft", "train-rm", "ppo"])
def test_stages_run_end_to_end_in_bf16(run_cli, tiny_model_dir, prompts_file, tmp_path, stage, device):
    out = tmp_path / stage
    common = ["--out", out, "--dtype", "bfloat16", "--device", device]
    if stage == "sft":
        data = tmp_path / "demos.jsonl"
        write_records(data, [Demonstration(id=f"d{i}", prompt=p, response=" blue light scatters.") for i, p in enumerate(PROMPTS * 2)])
        args = ["sft", "--model", tiny_model_dir, "--data", data, "--max-steps", "2", "--batch-size", "2", "--eval-fraction", "0"]
    elif stage == "train-rm":
        data = tmp_path / "prefs.jsonl"
        write_records(data, [Preference(id=f"q{i}", prompt=p, chosen=" blue light scatters.", rejected=" no.", aspect="preference")
                             for i, p in enumerate(PROMPTS * 2)])
        args = ["train-rm", "--aspect", "preference", "--model", tiny_model_dir, "--data", data, "--max-steps", "2",
                "--batch-size", "2", "--max-length", "64", "--eval-fraction", "0"]
    else:
        args = ["ppo", "--policy", tiny_model_dir, "--prompts", prompts_file, "--rewards", JUDGE["rewards"], "--rm", JUDGE["rm"][0],
                "--steps", "2", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--minibatch-size", "2",
                "--max-new-tokens", "8", "--max-prompt-length", "32"]
    result = run_cli(*args, *common)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run_config.json").read_text())["config"]["dtype"] == "bfloat16"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r[k] for r in rows for k in ("loss", "policy_loss", "value_loss") if k in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
