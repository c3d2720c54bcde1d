"""`rlhfkit ppo`: PPO with fine-grained, multi-reward-model dense rewards (Wu et al. 2023).

One iteration, read top to bottom in `ppo_iteration`:
1. roll out: sample `samples_per_prompt` responses per prompt (left padding, KV cache);
2. score: every reward source puts its rewards on the policy tokens where they are earned
   (segment ends, the last token, or every token when redistributed), weighted as the user
   says; the policy's and the reference's log-probs give the KL at every token;
3. rewards and advantages: minus beta * (logp_policy - logp_ref) at every token, then GAE
   over a value model (the paper), or group-normalised returns (GRPO/RLOO, critic-free);
4. update: several epochs of clipped policy loss + clipped value loss over minibatches
   (--grad-accum of them per optimizer step), stopping an epoch early when the approximate
   KL to the rollout policy passes a threshold.
The RL math lives in rlhfkit.rl (pure, unit-tested functions); this file wires it together.

With `--deepspeed` (several processes via `rlhfkit launch`) each process rolls out its
shard of the step's prompts, scores and advantages its own rollouts, and trains the policy
and value model in DeepSpeed engines on minibatches of `--minibatch-size / processes`
rollouts. The update calls the same things either way (rlhfkit.distributed: the learners'
`backward`/`step`, collectives that are no-ops in one process), and everything that is a
statistic of the batch stays global: advantage (and reward) whitening, the KL controller's
KL, the logged metrics, the KL early stop, and the token-mean losses, whose gradients are
scaled so that N processes take the update one process would take on the same global
minibatch. The reference policy is inference-only (sharded under ZeRO-3); reward models are
plain eval copies in every process.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from rlhfkit.chat import (
    APPLY_CHAT_TEMPLATE_HELP,
    load_chat_template,
    override_chat_template,
    render_prompt,
)
from rlhfkit.config import DEFAULT_SEED, REQUIRED, check_numbers, check_sampling, opt
from rlhfkit.console import console
from rlhfkit.distributed import (
    DEEPSPEED_HELP,
    OFFLOAD_OPTIMIZER_HELP,
    OFFLOAD_PARAMS_HELP,
    DeepSpeedLearner,
    Learner,
    all_reduce_sum,
    backward_together,
    check_deepspeed_options,
    check_zero3_accumulation,
    deepspeed_engine,
    deepspeed_inference_module,
    deepspeed_zero_stage,
    full_parameters,
    is_main_process,
    mean_over_processes,
    shard,
    stage_deepspeed_config,
    sum_over_processes,
    token_means,
    world_info,
)
from rlhfkit.errors import RlhfkitError, TrainingDiverged
from rlhfkit.generation import (
    Rollout,
    SamplingConfig,
    forward_response,
    generate,
    model_max_positions,
)
from rlhfkit.generation_backends import (
    HFGeneration,
    check_generation_backend,
    make_generation_backend,
)
from rlhfkit.io import append_lines, write_json
from rlhfkit.lengths import fit_generation_lengths
from rlhfkit.model_card import PUSH_TO_HUB_HELP, finish_model, scalar_metrics
from rlhfkit.models import (
    ATTN_IMPLEMENTATION_HELP,
    GRADIENT_CHECKPOINTING_HELP,
    add_lora,
    check_attn_implementation,
    disable_dropout,
    load_policy,
    resolve_device,
    resolve_dtype,
    save_model,
)
from rlhfkit.plots import draw, ppo_panels, save_png
from rlhfkit.rewards.placement import NORMALIZE_REWARDS, compose_token_rewards, normalize_per_source
from rlhfkit.rewards.sources import (
    build_reward_sources,
    parse_named,
    parse_redistribute,
    parse_weights,
    reward_model_name,
)
from rlhfkit.rl.advantages import (
    GROUP_BASELINES,
    AdaptiveKLController,
    FixedKLController,
    gae,
    group_token_returns,
    kl_penalty,
    masked_mean,
    masked_whiten,
)
from rlhfkit.rl.losses import policy_loss, value_loss
from rlhfkit.runs import (
    OVERWRITE_HELP,
    RAW_REWARD_PREFIX,
    TOTAL_REWARD_KEY,
    RunDir,
    normalized_reward_key,
    progress_bar,
    raw_reward_key,
    read_metric_series,
    set_seed,
    weighted_reward_key,
)
from rlhfkit.schema import (
    Generation,
    load_records,
    read_records,
    record_to_dict,
    record_writer,
)
from rlhfkit.tracking import REPORT_TO_HELP, parse_report_to
from rlhfkit.training import (
    autocast,
    load_deepspeed_states,
    load_model_weights,
    make_optimizer,
    resumable_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from rlhfkit.truncation import TRUNCATION_HELP, check_truncation_side

ADVANTAGES = ("gae", "grpo", "rloo")
VALUE_MODELS = ("separate", "shared")
KL_LOGPROBS = ("untempered", "tempered")


@dataclass
class PPOConfig:
    policy: str = opt(REQUIRED, "Initial policy: a directory (e.g. the `sft` output) or a hub name.", panel="Model")
    prompts: str = opt(REQUIRED, "Training prompts: JSONL of `prompt` records (see `annotate-import`).", panel="Data")
    out: str = opt(REQUIRED, "Output directory: model/ (the final policy and its model card), checkpoints, metrics, rollouts.", panel="Output")
    rewards: str = opt(REQUIRED, "Weighted reward sources, e.g. rel=0.3,fact=0.5,comp=0.3 (pref=1.0: holistic).", panel="Rewards")
    rm: list[str] = opt([], "Reward source NAME=SPEC, repeatable: an rlhfkit RM dir, hf:CLASSIFIER[@LABEL], or py:module:function.", panel="Rewards")
    redistribute: list[str] = opt([], "R3HF: spread a sequence RM's score over tokens: NAME[:token|:sentence], repeatable.", panel="Rewards")
    ref: Optional[str] = opt(None, "Reference policy for the KL penalty (default: the initial policy; with --lora-r, the policy with its adapters disabled).", panel="Model")
    eval_prompts: Optional[str] = opt(None, "Held-out prompts evaluated every --eval-every steps.", panel="Data")
    advantage: str = opt("gae", "Advantage estimator: gae (value model, the paper), grpo or rloo (critic-free).", panel="PPO")
    group_baseline: str = opt(
        "per-reward",
        "grpo/rloo with dense rewards: 'per-reward' normalises each given reward against the group's rewards and gives "
        "each token the reward-to-go (rewards keep their positions, but a sample's number of rewards does not count: "
        "+0.3 on 2 or on 4 sub-sentences both get 0); 'sequence-sum' compares each sample's summed reward with the "
        "group's (more good segments win) and gives every token that one advantage (positions are lost).",
        panel="PPO",
    )
    value_model: str = opt("separate", "gae only: 'separate' value model (the paper) or 'shared' head on the policy trunk.", panel="Model")
    value_init: Optional[str] = opt(None, "Backbone of the separate value model (default: the policy).", panel="Model")
    steps: int = opt(100, "PPO iterations (rollout + update).", panel="PPO")
    prompts_per_step: int = opt(8, "Prompts per rollout batch.", panel="PPO")
    samples_per_prompt: int = opt(4, "Responses sampled per prompt (the paper: 4).", panel="PPO")
    minibatch_size: int = opt(8, "Rollouts per forward/backward pass (a micro-batch).", panel="PPO")
    grad_accum: int = opt(
        1,
        "Minibatches whose gradients are accumulated into one optimizer step (token-weighted, so the step is the "
        "one a single pass over them would take). The reference accumulates a whole rollout batch: one step per "
        "PPO epoch, i.e. rollouts / --minibatch-size.",
        panel="Training",
    )
    ppo_epochs: int = opt(2, "Passes over each rollout batch.", panel="PPO")
    lr: float = opt(1e-5, "Policy learning rate.", panel="Training")
    value_lr: Optional[float] = opt(None, "Value model learning rate (default: --lr).", panel="PPO")
    warmup_steps: int = opt(0, "Linear LR warm-up, in optimizer steps.", panel="Training")
    kl_coef: float = opt(0.3, "Initial beta of the per-token KL penalty (the paper: 0.3).", panel="PPO")
    target_kl: Optional[float] = opt(None, "Adaptive KL controller target (Ziegler et al.); fixed beta when unset.", panel="PPO")
    kl_horizon: int = opt(10000, "Adaptive KL controller horizon.", panel="PPO")
    kl_stop: Optional[float] = opt(None, "Stop an update epoch when approx. KL to the rollout policy exceeds this.", panel="PPO")
    gamma: float = opt(1.0, "Discount.", panel="PPO")
    lam: float = opt(0.95, "GAE lambda (the paper: 0.95 fine-grained, 0.99 holistic).", panel="PPO")
    clip: float = opt(0.2, "Policy ratio clip.", panel="PPO")
    value_clip: float = opt(0.2, "Value clip around the rollout values.", panel="PPO")
    vf_coef: float = opt(0.5, "Value loss weight (shared value head).", panel="PPO")
    entropy_coef: float = opt(0.0, "Entropy bonus weight.", panel="PPO")
    whiten_rewards: bool = opt(
        False,
        "gae: scale the KL-penalised per-token rewards to unit std over the global batch's tokens (mean kept) before "
        "GAE. The reference's whiten_rewards whitens the same rewards but divides by the square root of their std (a "
        "bug: the result keeps a std of sqrt(std), not 1); rlhfkit divides by the std, what whitening means. Off by "
        "default: for sparse rewards it scales by ~sqrt(length), which the 0.2 value clip then cannot follow.",
        panel="Rewards",
    )
    kl_logprobs: str = opt(
        "untempered",
        "Log-probs the KL to the reference (and the logged entropy / entropy bonus) use: 'untempered' (softmax of the "
        "raw logits, as the reference, so --kl-coef means what it means there) or 'tempered' (logits / --temperature). "
        "The PPO ratio always uses the sampling temperature.",
        panel="PPO",
    )
    max_grad_norm: float = opt(0.5, "Gradient clipping max norm, policy and value apart (the paper: 0.5; 0 = no clipping).", panel="Training")
    truncation_penalty: Optional[float] = opt(None, "Reward added at the last token of responses cut at --max-new-tokens (none: no penalty).", panel="Rewards")
    normalize_rewards: str = opt(
        "none",
        "Before weighting: none, or per-source (for sources on different scales): each source's per-response reward (the "
        "sum over the positions it rewards) is standardised over the global batch (all processes): its positions are "
        "divided by the std of those sums and the mean is subtracted at the response's last rewarded position, so a "
        "dense, segment or R3HF (--redistribute) reward keeps its shape and telescoping sum. Logged as "
        "reward/normalized/NAME beside the raw score reward/raw/NAME.",
        panel="Rewards",
    )
    chat_template: Optional[str] = opt(None, "Jinja chat template file for conversational prompts (default: the policy tokenizer's own, if any).", panel="Model")
    max_new_tokens: int = opt(200, "Max response tokens (the paper: 200).", panel="Generation")
    max_prompt_length: int = opt(1024, "Max prompt tokens; longer prompts are cut on --truncation-side.", panel="Generation")
    truncation_side: str = opt("right", TRUNCATION_HELP, panel="Data")
    generation_backend: str = opt("hf", "Rollout sampling: hf (the policy's generate) or vllm (a colocated vLLM engine, weights pushed after each update; the optional 'vllm' extra, CUDA).", panel="Generation")
    temperature: float = opt(0.7, "Sampling temperature (the paper: 0.7); logprobs use the same.", panel="Generation")
    top_k: int = opt(20, "Top-k sampling (the paper: 20; 0 = off).", panel="Generation")
    top_p: float = opt(1.0, "Top-p sampling.", panel="Generation")
    lora_r: int = opt(0, "LoRA rank (0 = full fine-tuning). With LoRA the reference is the policy with adapters disabled.", panel="Model")
    lora_alpha: int = opt(16, "LoRA alpha.", panel="Model")
    rm_batch_size: int = opt(8, "Reward-model scoring batch size.", panel="Rewards")
    eval_every: int = opt(0, "Evaluate on --eval-prompts every N steps (0 = only at the end).", panel="Training")
    save_every: int = opt(10, "Checkpoint every N steps (0 = only at the end).", panel="Output")
    keep_checkpoints: int = opt(2, "Newest checkpoints to keep (0 = all).", panel="Output")
    resume: bool = opt(False, "Resume from the latest checkpoint in --out (same prompts, rewards and batch options).", panel="Training")
    overwrite: bool = opt(False, OVERWRITE_HELP, panel="Output")
    log_rollouts: int = opt(4, "Rollouts per step written to rollouts.jsonl with their per-token rewards.", panel="Output")
    dtype: str = opt("auto", "Compute dtype: auto (bf16 on supporting GPUs, fp32 on CPU), float32, bfloat16. Trained weights (and the reference, so the first KL is 0) stay fp32 unless --lora-r; ratios, KL, advantages and values are fp32.", panel="Model")
    device: str = opt("auto", "Device: auto, cpu, cuda, cuda:N.", panel="Distributed")
    seed: int = opt(DEFAULT_SEED, "Random seed.", panel="Training")
    gradient_checkpointing: bool = opt(False, GRADIENT_CHECKPOINTING_HELP, panel="Training")
    attn_implementation: Optional[str] = opt(None, ATTN_IMPLEMENTATION_HELP, panel="Model")
    deepspeed: Optional[str] = opt(None, DEEPSPEED_HELP + " --prompts-per-step and --minibatch-size are global (split over the processes).", panel="Distributed")
    offload_optimizer: bool = opt(False, OFFLOAD_OPTIMIZER_HELP, panel="Distributed")
    offload_params: bool = opt(False, OFFLOAD_PARAMS_HELP, panel="Distributed")
    report_to: list[str] = opt([], REPORT_TO_HELP, panel="Output")
    push_to_hub: Optional[str] = opt(None, PUSH_TO_HUB_HELP, panel="Output")
    apply_chat_template: bool = opt(False, APPLY_CHAT_TEMPLATE_HELP, panel="Data")

    def validate(self) -> None:
        check_deepspeed_options(self.deepspeed, self.offload_optimizer, self.offload_params)
        if self.deepspeed is not None:
            check_zero3_accumulation(deepspeed_zero_stage(self.deepspeed), self.grad_accum,
                                     "use --grad-accum 1 with a larger --minibatch-size, or zero2")
        if self.normalize_rewards not in NORMALIZE_REWARDS:
            raise RlhfkitError(f"unknown --normalize-rewards {self.normalize_rewards!r}; valid: {', '.join(NORMALIZE_REWARDS)}")
        load_chat_template(self.chat_template)
        parse_report_to(self.report_to)
        world_size = world_info()[2]
        for name in ("prompts_per_step", "minibatch_size"):
            if getattr(self, name) % world_size:
                raise RlhfkitError(f"--{name.replace('_', '-')} {getattr(self, name)} must be a multiple of the {world_size} processes")
        if self.deepspeed is not None and self.advantage == "gae" and self.value_model == "shared":
            # One loss through two engines' parameters (the policy trunk and the head).
            raise RlhfkitError("--value-model shared is not supported with --deepspeed; use --value-model separate")
        if self.advantage not in ADVANTAGES:
            raise RlhfkitError(f"--advantage must be one of {', '.join(ADVANTAGES)}, got '{self.advantage}'")
        if self.value_model not in VALUE_MODELS:
            raise RlhfkitError(f"--value-model must be one of {', '.join(VALUE_MODELS)}, got '{self.value_model}'")
        rollouts = self.prompts_per_step * self.samples_per_prompt
        if self.minibatch_size < 1 or rollouts % self.minibatch_size:
            raise RlhfkitError(
                f"--minibatch-size {self.minibatch_size} must divide the rollouts per step "
                f"(--prompts-per-step {self.prompts_per_step} x --samples-per-prompt {self.samples_per_prompt} = {rollouts})"
            )
        if self.grad_accum < 1 or (rollouts // self.minibatch_size) % self.grad_accum:
            raise RlhfkitError(
                f"--grad-accum {self.grad_accum} must divide the {rollouts // self.minibatch_size} minibatches of a rollout "
                f"batch ({rollouts} rollouts / --minibatch-size {self.minibatch_size})"
            )
        if self.group_baseline not in GROUP_BASELINES:
            raise RlhfkitError(f"--group-baseline must be one of {', '.join(GROUP_BASELINES)}, got '{self.group_baseline}'")
        if self.kl_logprobs not in KL_LOGPROBS:
            raise RlhfkitError(f"--kl-logprobs must be one of {', '.join(KL_LOGPROBS)}, got '{self.kl_logprobs}'")
        check_truncation_side(self.truncation_side)
        check_attn_implementation(self.attn_implementation, self.device)
        if self.advantage in ("grpo", "rloo") and self.samples_per_prompt < 2:
            raise RlhfkitError(f"--advantage {self.advantage} needs --samples-per-prompt >= 2 (it compares samples of one prompt)")
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "ppo_epochs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise RlhfkitError(f"--{name.replace('_', '-')} must be >= 1")
        weights = parse_weights(self.rewards)
        rm_paths = parse_named(self.rm, "--rm")
        unused = sorted(set(rm_paths) - {reward_model_name(name, rm_paths) for name in weights})
        if unused:
            raise RlhfkitError(
                f"--rm {', '.join(unused)}: not named by --rewards {self.rewards}; give it a weight there or drop the --rm"
            )
        parse_redistribute(self.redistribute)
        check_generation_backend(self.generation_backend, lora=bool(self.lora_r))
        self.validate_numbers()

    def validate_numbers(self) -> None:
        check_numbers(
            self,
            positive=("clip", "value_clip", "target_kl", "kl_stop"),
            at_least_one=("kl_horizon", "max_prompt_length", "rm_batch_size"),
            # --lr 0 is a diagnostic: nothing may change, so KL and clip fractions must be 0.
            non_negative=("lr", "value_lr", "kl_coef", "warmup_steps", "vf_coef", "max_grad_norm", "eval_every", "save_every",
                          "keep_checkpoints", "log_rollouts", "lora_r"),
            unit=("gamma", "lam"),
            finite=("kl_coef", "vf_coef", "entropy_coef", "max_grad_norm", "truncation_penalty"),
        )
        check_sampling(self.temperature, self.top_k, self.top_p)


class ValueHead(nn.Module):
    """A scalar head on hidden states; zero-initialised so early values do not swamp GAE."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # In the head's dtype (fp32, or bf16 where a DeepSpeed engine cast it), values in fp32.
        return self.linear(hidden.to(self.linear.weight.dtype)).float().squeeze(-1)


def hidden_size_of(model) -> int:
    config = model.config
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise RlhfkitError(f"cannot find the hidden size of {type(model).__name__}")


@dataclass
class PolicyBundle:
    policy: nn.Module
    tokenizer: object
    is_encoder_decoder: bool
    ref: Optional[nn.Module]  # None with LoRA and no --ref: the policy with adapters disabled is the reference
    value_backbone: Optional[nn.Module]  # None for shared heads and critic-free runs
    value_head: Optional[ValueHead]
    value_model_shared: bool = False
    policy_engine: object = None  # DeepSpeed engines (--deepspeed), training the models above
    value_engine: object = None
    compute_dtype: torch.dtype = torch.float32  # of the forward passes (autocast; see `precision`)
    # Each prompt as the policy's template rendered it -> (the record's prompt, its meta), so a
    # reward model renders it with its own template (RewardModel.render_prompt), as in train-rm.
    prompt_sources: dict = field(default_factory=dict)

    @property
    def templated_prompts(self) -> set[str]:
        return {text for text, (prompt, _) in self.prompt_sources.items() if text != prompt}

    @property
    def engines(self) -> list:
        return [e for e in (self.policy_engine, self.value_engine) if e is not None]

    def precision(self):
        """Autocast of the forward passes to the compute dtype. Enter it per forward, never
        around an optimizer step: autocast keeps the cast weights until it exits."""
        return autocast(next(self.policy.parameters()).device, self.compute_dtype)


def load_models(cfg: PPOConfig, device: torch.device) -> PolicyBundle:
    """The policy, its reference and value model. In bf16, full fine-tuning keeps fp32 weights
    and autocasts the forwards (as sft does: AdamW steps of ~1e-6 relative size vanish in bf16
    weights, whose spacing is 2^-8 relative); the reference is loaded like the policy, so both
    compute alike and the first step's KL is 0. A frozen LoRA base is loaded in the compute dtype."""
    compute_dtype = resolve_dtype(cfg.dtype, device)
    weights_dtype = cfg.dtype if cfg.lora_r else "float32"
    # The trained models may recompute activations; the frozen reference keeps no activations anyway.
    trained = {"gradient_checkpointing": cfg.gradient_checkpointing, "attn_implementation": cfg.attn_implementation}
    policy, tokenizer, is_encdec = load_policy(cfg.policy, dtype=weights_dtype, device=device, **trained)
    disable_dropout(policy)  # before LoRA wraps it: the adapters are made without dropout below
    fit_generation_lengths(cfg, model_max_positions(policy), "ppo", "the policy", is_encdec)
    ref = None
    if cfg.lora_r:
        policy = add_lora(policy, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=0.0)
    if not cfg.lora_r or cfg.ref:
        # With LoRA and no --ref, the policy with its adapters disabled is the reference.
        ref, _, _ = load_policy(cfg.ref or cfg.policy, dtype=weights_dtype, device=device, attn_implementation=cfg.attn_implementation)
        ref.eval().requires_grad_(False)
    value_backbone = value_head = None
    if cfg.advantage == "gae":
        if cfg.value_model == "separate":
            value_backbone, _, _ = load_policy(cfg.value_init or cfg.policy, dtype="float32", device=device, **trained)
            value_head = ValueHead(hidden_size_of(value_backbone)).to(device)
        else:
            value_head = ValueHead(hidden_size_of(policy)).to(device)
    # Dropout would make the rollout log-probs, the reference's and the update's disagree.
    for module in (policy, ref, value_backbone):
        if module is not None:
            disable_dropout(module)
    shared = cfg.advantage == "gae" and cfg.value_model == "shared"
    return PolicyBundle(policy, tokenizer, is_encdec, ref, value_backbone, value_head, shared, compute_dtype=compute_dtype)


# --- one PPO iteration: the update proper ------------------------------------------------------


def ppo_iteration(cfg: PPOConfig, bundle: PolicyBundle, sources, weights, prompts: list[str], optimizers, schedulers, kl_ctl, step: int,
                  backend=None):
    """One rollout + update; returns (metrics, rollout, per-token rewards) for logging.

    Read as one process: under --deepspeed the collectives (all_reduce_sum, sum_over_processes,
    token_means, mean_over_processes) make the batch statistics global and the learners'
    backward/step run the engines; in one process they are plain PyTorch.
    `backend` samples the rollout (rlhfkit.generation_backends; default: the policy's generate).
    """
    backend = backend or HFGeneration()
    policy, value = make_learners(cfg, bundle, optimizers, schedulers)
    device = next(bundle.policy.parameters()).device
    kl_temp = kl_temperature(cfg)

    # --- 1. roll out: --samples-per-prompt responses per prompt ------------------------------
    started = time.perf_counter()
    sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, do_sample=True)
    with bundle.precision():
        rollout = backend.generate(
            bundle.policy, bundle.tokenizer, [p for p in prompts for _ in range(cfg.samples_per_prompt)], sampling,
            max_prompt_length=cfg.max_prompt_length, is_encoder_decoder=bundle.is_encoder_decoder, truncation_side=cfg.truncation_side,
            templated=bundle.templated_prompts,
        )
    generation_seconds = time.perf_counter() - started
    mask = rollout.response_mask.float()

    # --- 2. score: task rewards where earned, the KL to the reference at every token ----------
    # The ratio uses the sampling temperature (the probabilities the tokens were drawn
    # with); the KL to the reference and the entropy use --kl-logprobs (untempered, as the
    # reference, by default). Log-probs are taken in fp32 from the (bf16) logits.
    with torch.no_grad(), bundle.precision():
        # Without an entropy bonus the entropy is only logged: read it once, here, from the
        # rollout policy's logits, instead of a vocabulary-sized softmax on every minibatch.
        by_temperature, entropy, hidden = response_logprobs(
            bundle, rollout, (cfg.temperature, kl_temp), entropy_temperature=kl_temp if cfg.entropy_coef == 0 else None,
            want_hidden=bundle.value_model_shared,
        )
        old_logprobs, old_kl_logprobs = by_temperature[cfg.temperature], by_temperature[kl_temp]
        rollout_entropy = None
        if entropy is not None:
            rollout_entropy = token_means({"entropy": masked_mean(entropy, mask)}, mask.sum())["entropy"]
        ref_logprobs = response_logprobs(bundle, rollout, (kl_temp,), reference=True)[0][kl_temp]
        old_values = value_estimates(bundle, rollout, hidden) * mask if cfg.advantage == "gae" else None
    task_rewards, reward_given, reward_logs = score_rollout(sources, weights, rollout, cfg, bundle.prompt_sources, all_reduce=all_reduce_sum)
    task_rewards, reward_given = task_rewards.to(device, torch.float32), reward_given.to(device)
    score_per_sequence = (task_rewards * mask).sum(dim=1)
    kl = (old_kl_logprobs - ref_logprobs) * mask

    # --- 3. rewards and advantages -------------------------------------------------------------
    # GAE (the paper): the KL penalty is part of every token's reward; --whiten-rewards
    # whitens that penalised reward, as the reference does. Critic-free (GRPO/RLOO): task
    # rewards are normalised within each prompt's group of samples (--group-baseline) and
    # the KL term moves into the loss, as in GRPO, since normalising it with the task
    # rewards would mix two scales. all_reduce_sum: statistics of the global batch.
    if cfg.advantage == "gae":
        rewards = task_rewards - kl_ctl.value * kl
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=all_reduce_sum) * mask
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask, all_reduce=all_reduce_sum) * mask
    else:
        rewards = task_rewards
        advantages = group_token_returns(
            task_rewards, mask, cfg.samples_per_prompt, kind=cfg.advantage, reward_mask=reward_given, baseline=cfg.group_baseline
        )
        returns = None

    # --- 4. update: epochs x optimizer steps x accumulated minibatches of clipped losses -------
    stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clipfrac", "vf_clipfrac", "approx_kl", "entropy", "grad_norm")}
    n = rollout.response_ids.shape[0]
    minibatch_size = cfg.minibatch_size // world_info()[2]  # this process's share of a minibatch
    stopped_early = False
    bundle.policy.train()
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(n)
        minibatches = [order[start : start + minibatch_size] for start in range(0, n, minibatch_size)]
        for first in range(0, len(minibatches), cfg.grad_accum):
            accumulated = minibatches[first : first + cfg.grad_accum]
            # Each minibatch's token-mean loss is weighted by its share of the accumulated
            # tokens (of all processes), so the step is the token mean over all of them.
            step_tokens = sum_over_processes(torch.stack([mask[idx].sum() for idx in accumulated]).sum())
            for k, idx in enumerate(accumulated):
                mb = select(rollout, idx.to(rollout.response_ids.device))
                mb_mask = mask[idx]
                kl_in_loss = cfg.advantage != "gae"
                with bundle.precision():
                    by_temperature, entropy, hidden = response_logprobs(
                        bundle, mb, (cfg.temperature, *([kl_temp] if kl_in_loss else [])),
                        entropy_temperature=kl_temp if cfg.entropy_coef != 0 else None, want_hidden=bundle.value_model_shared,
                    )
                logprobs = by_temperature[cfg.temperature]
                pg_loss, pg_stats = policy_loss(logprobs, old_logprobs[idx], advantages[idx], mb_mask, cfg.clip)
                logged = {"policy_loss": pg_loss, "clipfrac": pg_stats["clipfrac"], "approx_kl": pg_stats["approx_kl"]}
                objective = pg_loss
                if cfg.entropy_coef != 0:  # else it was logged once from the rollout pass
                    logged["entropy"] = masked_mean(entropy, mb_mask)
                    objective = objective - cfg.entropy_coef * logged["entropy"]
                if kl_in_loss:
                    kl_logprobs = by_temperature[kl_temp]
                    objective = objective + kl_ctl.value * masked_mean(kl_penalty(kl_logprobs, ref_logprobs[idx], kind="k3"), mb_mask)
                losses = [(policy, objective)]
                if value is not None:
                    with bundle.precision():
                        values = value_estimates(bundle, mb, hidden)
                    vf_loss, vf_stats = value_loss(values, old_values[idx], returns[idx], mb_mask, cfg.value_clip)
                    logged.update(value_loss=vf_loss, vf_clipfrac=vf_stats["vf_clipfrac"])
                    losses.append((value, (cfg.vf_coef if bundle.value_model_shared else 1.0) * vf_loss))
                means = token_means({**logged, "loss": sum(loss for _, loss in losses)}, mb_mask.sum())
                if not all(math.isfinite(v) for v in means.values()):  # the same on every process: all stop
                    raise TrainingDiverged(
                        f"step {step}: the PPO loss is not finite ({means}); "
                        "the last good checkpoint is kept; lower --lr or check the reward sources"
                    )
                share = policy.loss_scale(mb_mask.sum().item(), step_tokens)
                backward_together([(learner, loss * share) for learner, loss in losses], last=k == len(accumulated) - 1)
                for name in logged:
                    stats[name].append(means[name])
            # Policy and value are clipped separately: a large value-loss gradient must not
            # shrink the policy's step through a shared norm.
            stats["grad_norm"].append(policy.step())
            if value is not None:
                value.step()
        if cfg.kl_stop is not None and np.mean(stats["approx_kl"][-len(minibatches):]) > cfg.kl_stop:
            stopped_early = True
            break
    if rollout_entropy is not None:
        stats["entropy"].append(rollout_entropy)
    backend.policy_updated()  # the next rollout's engine must see these weights

    # --- 5. statistics of the global batch ------------------------------------------------------
    mean_kl = masked_mean(kl.sum(dim=1), torch.ones(n, device=kl.device), all_reduce=all_reduce_sum).item()
    beta = kl_ctl.value  # the coefficient this step's rewards used, logged before it adapts
    kl_ctl.update(mean_kl, n * world_info()[2])
    tokens = sum_over_processes(mask.sum())
    metrics = {
        TOTAL_REWARD_KEY: mean_over_processes(score_per_sequence),
        **{key: mean_over_processes(values) for key, values in reward_logs.items()},
        "kl": mean_kl,
        "kl_coef": kl_ctl.value,
        "kl_penalty": mean_over_processes((beta * kl).sum(dim=1)),
        "response_length": mean_over_processes(rollout.response_lengths.float()),
        "truncated_fraction": mean_over_processes((~rollout.finished).float()),
        "prompts_cut": rollout.prompts_cut,
        "epochs_run": epoch + 1,
        "early_stopped": stopped_early,
        **{k: float(np.mean(v)) for k, v in stats.items() if v},
        "lr": schedulers[0].get_last_lr()[0],
        "tokens_per_second": tokens / (time.perf_counter() - started),
        "generation_tokens_per_second": tokens / generation_seconds,
    }
    return metrics, rollout, rewards


def policy_logits(bundle: PolicyBundle, rollout: Rollout, *, reference: bool = False, want_hidden: bool = False):
    """Logits predicting the rollout's tokens (ResponseLogits: made a chunk at a time) and
    hidden states, under the policy or the reference."""
    if reference and bundle.ref is None:
        with bundle.policy.disable_adapter():
            return forward_response(bundle.policy, rollout, is_encoder_decoder=bundle.is_encoder_decoder, want_hidden=want_hidden)
    model = bundle.ref if reference else bundle.policy
    return forward_response(model, rollout, is_encoder_decoder=bundle.is_encoder_decoder, want_hidden=want_hidden)


def response_logprobs(bundle: PolicyBundle, rollout: Rollout, temperatures, *, entropy_temperature: Optional[float] = None,
                      reference: bool = False, want_hidden: bool = False):
    """({temperature: log-probs of the rollout's tokens}, per-token entropy or None, hidden
    states) under the policy or the reference, from one pass of the LM head."""
    logits, hidden = policy_logits(bundle, rollout, reference=reference, want_hidden=want_hidden)
    by_temperature, entropy = logits.token_stats(rollout.response_ids, temperatures, entropy_temperature)
    return by_temperature, entropy, hidden


def kl_temperature(cfg: PPOConfig) -> float:
    """The temperature of the log-probs the KL (and entropy) is taken on (see --kl-logprobs)."""
    return cfg.temperature if cfg.kl_logprobs == "tempered" else 1.0


def value_estimates(bundle: PolicyBundle, rollout: Rollout, policy_hidden: Optional[torch.Tensor]) -> torch.Tensor:
    if bundle.value_backbone is None:
        return bundle.value_head(policy_hidden)
    _, hidden = forward_response(
        bundle.value_backbone, rollout, is_encoder_decoder=bundle.is_encoder_decoder, want_hidden=True, want_logits=False
    )
    return bundle.value_head(hidden)


def select(rollout: Rollout, index: torch.Tensor) -> Rollout:
    """A minibatch of a rollout (tensors indexed, per-row lists picked)."""
    rows = index.tolist()
    return Rollout(
        prompts=[rollout.prompts[i] for i in rows],
        query_ids=rollout.query_ids[index],
        query_mask=rollout.query_mask[index],
        response_ids=rollout.response_ids[index],
        response_mask=rollout.response_mask[index],
        texts=[rollout.texts[i] for i in rows],
        finished=rollout.finished[index],
        token_char_spans=[rollout.token_char_spans[i] for i in rows],
    )


def score_rollout(sources, weights, rollout: Rollout, cfg: PPOConfig, prompt_sources: Optional[dict] = None, all_reduce=None
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted per-token task rewards (B, T), where any reward is given (B, T), and the
    per-sequence values to log by their names (rlhfkit.runs: reward/raw/, reward/normalized/, reward/weighted/):
    each source's raw score, its normalised value (--normalize-rewards), its weighted value.
    `all_reduce`: the statistics of --normalize-rewards over the global batch. Each source's
    unweighted token rewards are kept in `rollout.source_rewards` (the rollout log's heat maps).

    An rlhfkit reward model reads each prompt rendered by its own tokenizer's template
    (`prompt_sources`: rendered text -> the record's prompt and meta), as train-rm trained it,
    not by the policy's; other sources read the policy's text."""
    length = rollout.response_ids.shape[1]
    components, given = {}, torch.zeros(rollout.response_ids.shape, dtype=torch.bool)
    given_by_source = {}
    for name, source in sources.items():
        prompts = rollout.prompts
        rm = getattr(source, "rm", None)
        if rm is not None and prompt_sources:
            prompts = [rm.render_prompt(*prompt_sources[p]) if p in prompt_sources else p for p in prompts]
        values, source_given = source.token_rewards(prompts, rollout.texts, rollout.token_char_spans).padded(length)
        components[name] = values
        given_by_source[name] = source_given
        given |= source_given
    logged = {raw_reward_key(name): values.sum(dim=1) for name, values in components.items()}
    if cfg.normalize_rewards == "per-source":
        components = normalize_per_source(components, given_by_source, all_reduce=all_reduce)
        logged |= {normalized_reward_key(name): values.sum(dim=1) for name, values in components.items()}
    total, weighted = compose_token_rewards(components, weights)
    logged |= {weighted_reward_key(name): values for name, values in weighted.items()}
    rollout.source_rewards = components
    if cfg.truncation_penalty is not None:
        last = (rollout.response_lengths - 1).clamp(min=0).cpu()
        unfinished = (~rollout.finished).cpu()
        total[unfinished, last[unfinished]] += cfg.truncation_penalty
        given[unfinished, last[unfinished]] = True
    return total, given, logged


def make_learners(cfg: PPOConfig, bundle: PolicyBundle, optimizers, schedulers) -> tuple[Learner, Optional[Learner]]:
    """The policy's and the value model's learners (None: critic-free): their engines under
    --deepspeed (start_engines), else their optimizers with --max-grad-norm clipping."""
    (policy_opt, value_opt), (policy_sched, value_sched) = optimizers, schedulers
    if bundle.policy_engine is not None:
        value = DeepSpeedLearner(bundle.value_engine, value_sched) if bundle.value_engine is not None else None
        return DeepSpeedLearner(bundle.policy_engine, policy_sched), value
    policy = Learner(policy_parameters(bundle), policy_opt, policy_sched, cfg.max_grad_norm)
    value = Learner(value_parameters(bundle), value_opt, value_sched, cfg.max_grad_norm) if value_opt is not None else None
    return policy, value


def policy_parameters(bundle: PolicyBundle) -> list[nn.Parameter]:
    return [p for p in bundle.policy.parameters() if p.requires_grad]


def value_parameters(bundle: PolicyBundle) -> list[nn.Parameter]:
    """The value model's own parameters (with a shared head, just the head)."""
    params = []
    for module in (bundle.value_backbone, bundle.value_head):
        if module is not None:
            params += [p for p in module.parameters() if p.requires_grad]
    return params


def make_optimizers(cfg: PPOConfig, bundle: PolicyBundle):
    from transformers import get_scheduler

    # The stages' AdamW (fused where the device has the kernel), no weight decay, Adam eps
    # 1e-5 as in the reference implementations (the checklist).
    policy_opt = make_optimizer(bundle.policy, cfg.lr, eps=1e-5)
    value_modules = [m for m in (bundle.value_backbone, bundle.value_head) if m is not None]
    value_opt = make_optimizer(nn.ModuleList(value_modules), cfg.lr if cfg.value_lr is None else cfg.value_lr, eps=1e-5) if value_modules else None
    updates = cfg.steps * cfg.ppo_epochs * (cfg.prompts_per_step * cfg.samples_per_prompt // (cfg.minibatch_size * cfg.grad_accum))
    schedulers = [get_scheduler("linear", opt_, num_warmup_steps=cfg.warmup_steps, num_training_steps=updates) for opt_ in (policy_opt, value_opt) if opt_ is not None]
    return (policy_opt, value_opt), schedulers + ([] if value_opt else [None])


def prompt_texts(path: str, tokenizer=None, option: str = "--prompts", plain_as_user_turn: bool = False,
                 sources: Optional[dict] = None) -> list[str]:
    """The prompts of `path`; with a tokenizer, conversational ones (and with
    `plain_as_user_turn` plain ones) rendered by its chat template. `sources` collects what
    each text was rendered from."""
    records = load_records(path, option=option)
    texts = []
    for record in records:
        if not hasattr(record, "prompt"):
            raise RlhfkitError(f"{option} {path}: '{record.type_name}' records carry no prompt")
        text = record.prompt if tokenizer is None else render_prompt(tokenizer, record.prompt, record.meta, plain_as_user_turn)
        texts.append(text)
        if sources is not None:
            sources[text] = (record.prompt, record.meta)
    return texts


# --- checkpoints -------------------------------------------------------------------------
# The policy is saved with save_pretrained (adapters only with LoRA); everything else that a
# resumed run needs to continue exactly (optimizers, schedules, value model, KL coefficient,
# RNG streams) goes into the checkpoint's state file, loaded with weights_only=True.


def ppo_identity(cfg: PPOConfig, weights: dict[str, float], rm_specs: dict[str, str]) -> dict:
    """What must match for a checkpoint's step N to mean the same prompts, rewards and updates."""
    identity = {
        "prompts": hashlib.sha256(Path(cfg.prompts).read_bytes()).hexdigest(),
        "policy": cfg.policy,
        "rewards": weights,
        "rm": rm_specs,
        "seed": cfg.seed,
        "prompts_per_step": cfg.prompts_per_step,
        "samples_per_prompt": cfg.samples_per_prompt,
        "minibatch_size": cfg.minibatch_size,
        "ppo_epochs": cfg.ppo_epochs,
        "advantage": cfg.advantage,
        "value_model": cfg.value_model,
        "lora_r": cfg.lora_r,
    }
    if world_info()[2] > 1:
        identity["processes"] = world_info()[2]
    return identity


# What a PPO checkpoint's training_state.pt holds (save_ppo_checkpoint).
PPO_STATE_KEYS = ("identity", "step", "kl_coef", "optimizers", "schedulers", "value_head", "value_backbone", "rng")


def check_resume_identity(checkpoint: Path, state: dict, identity: dict) -> None:
    """Refuse to continue a checkpoint another run (other prompts, rewards, batches) wrote."""
    saved = state["identity"]
    if saved is None:
        raise RlhfkitError(f"{checkpoint} records no run identity (written by an older rlhfkit); it cannot be resumed safely; use another --out")
    changed = [f"{k}: {saved.get(k)!r} then, {v!r} now" for k, v in identity.items() if saved.get(k) != v]
    if changed:
        raise RlhfkitError(
            f"{checkpoint} belongs to another run ({'; '.join(changed)}); resume with the same --policy, --prompts, "
            "--rewards, --rm, --seed and batch options, or use another --out"
        )


def save_ppo_checkpoint(out: Path, bundle: PolicyBundle, optimizers, schedulers, kl_ctl, step: int,
                        identity: Optional[dict] = None, keep: int = 0) -> Path:
    # Under DeepSpeed the engines' checkpoints hold the optimizers and the value model.
    in_state = not bundle.engines
    state = {
        "identity": identity,
        "step": step,
        "kl_coef": kl_ctl.value,
        "optimizers": [o.state_dict() if o is not None and in_state else None for o in optimizers],
        "schedulers": [s.state_dict() if s is not None else None for s in schedulers],
        "value_head": bundle.value_head.state_dict() if bundle.value_head is not None and in_state else None,
        "value_backbone": bundle.value_backbone.state_dict() if bundle.value_backbone is not None and in_state else None,
        "rng": rng_state(),
    }
    return save_checkpoint(out, step, bundle.policy, state, engines=bundle.engines, keep=keep)


def restore_ppo_checkpoint(path: Path, state: dict, bundle: PolicyBundle, optimizers, schedulers, kl_ctl) -> int:
    """Put back the policy, value model, optimizers, schedules, KL coefficient and RNG of the
    checkpoint at `path`, whose training state (resumable_checkpoint) is `state`; its step."""
    if bundle.engines:
        load_deepspeed_states(path, bundle.engines)
    else:
        if state["optimizers"][0] is None:  # the policy's optimizer state is in the engine's checkpoint
            raise RlhfkitError(f"{path} was saved under --deepspeed; resume with --deepspeed")
        load_model_weights(bundle.policy, path)
        for opt_, opt_state in zip(optimizers, state["optimizers"]):
            if opt_ is not None:
                opt_.load_state_dict(opt_state)
        if bundle.value_head is not None:
            bundle.value_head.load_state_dict(state["value_head"])
        if bundle.value_backbone is not None:
            bundle.value_backbone.load_state_dict(state["value_backbone"])
    for sched, sched_state in zip(schedulers, state["schedulers"]):
        if sched is not None:
            sched.load_state_dict(sched_state)
    kl_ctl.value = state["kl_coef"]
    set_rng_state(state["rng"])
    return int(state["step"])


# --- the stage -----------------------------------------------------------------------------


def run_ppo(cfg: PPOConfig) -> dict:
    """Train a policy with PPO on fine-grained, weighted rewards from several reward models.

    `--rewards rel=0.3,fact=0.5,comp=0.3 --rm fact=runs/rm-fact --rm rel=... --rm comp=...`
    is Fine-Grained RLHF; `--rewards pref=1.0` the holistic baseline; `--redistribute pref`
    spreads a sequence RM's score over tokens (R3HF).
    """
    weights = parse_weights(cfg.rewards)
    rm_paths = parse_named(cfg.rm, "--rm")
    redistribute = parse_redistribute(cfg.redistribute)
    # Read once before any model loads (file errors first); rendered with the chat template below.
    prompt_texts(cfg.prompts, option="--prompts")
    if cfg.eval_prompts:
        prompt_texts(cfg.eval_prompts, option="--eval-prompts")
    out = Path(cfg.out)
    identity = ppo_identity(cfg, weights, rm_paths)
    found = resumable_checkpoint(out, PPO_STATE_KEYS, "ppo") if cfg.resume and out.is_dir() else None
    if cfg.resume and found is None:
        raise RlhfkitError(f"--resume: no checkpoint under {out / 'checkpoints'}")
    resume_from, resume_state = found if found is not None else (None, None)
    if resume_from is not None:
        check_resume_identity(resume_from, resume_state, identity)
    run = RunDir(out, "ppo", cfg, resume=resume_from is not None)

    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    sources = build_reward_sources(weights, rm_paths, redistribute, device=device, dtype=cfg.dtype, batch_size=cfg.rm_batch_size)
    bundle = load_models(cfg, device)
    override_chat_template(bundle.tokenizer, load_chat_template(cfg.chat_template))
    prompts = prompt_texts(cfg.prompts, bundle.tokenizer, "--prompts", cfg.apply_chat_template, bundle.prompt_sources)
    eval_prompts = prompt_texts(cfg.eval_prompts, bundle.tokenizer, "--eval-prompts", cfg.apply_chat_template,
                                bundle.prompt_sources) if cfg.eval_prompts else []
    optimizers, schedulers = make_optimizers(cfg, bundle)
    if cfg.deepspeed is not None:
        start_engines(cfg, bundle, optimizers)
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.target_kl else FixedKLController(cfg.kl_coef)

    start_step = 0
    if resume_from is not None:
        start_step = restore_ppo_checkpoint(resume_from, resume_state, bundle, optimizers, schedulers, kl_ctl)
        run.truncate_metrics(start_step)
        console.print(f"resuming from {resume_from} (step {start_step})")
    for name, source in sources.items():
        console.print(f"reward '{name}' x {weights[name]}: {source.description}")
    check_generation_backend(cfg.generation_backend, lora=bool(cfg.lora_r), encoder_decoder=bundle.is_encoder_decoder)
    backend = make_generation_backend(cfg.generation_backend, cfg.policy, dtype=cfg.dtype, seed=cfg.seed, resumed=resume_from is not None)

    order = prompt_order(len(prompts), cfg.seed)
    history = []
    rollouts_path = run.path / "rollouts.jsonl"
    main = is_main_process()
    rank, _, world_size = world_info()
    if main and rollouts_path.exists():
        keep_rollouts_up_to(rollouts_path, start_step)
    with progress_bar("ppo", cfg.steps) as advance:
        advance(start_step)
        for step in range(start_step + 1, cfg.steps + 1):
            # The step's prompts are global; each process rolls out its shard of them.
            batch = shard(prompts_for_step(prompts, order, step, cfg.prompts_per_step, cfg.seed), rank, world_size)
            metrics, rollout, rewards = ppo_iteration(cfg, bundle, sources, weights, batch, optimizers, schedulers, kl_ctl, step, backend=backend)
            history.append(run.log_metrics(step=step, **metrics))
            if main:
                logged = append_rollouts(rollouts_path, rollout, rewards, step, cfg.log_rollouts)
                run.log_table("rollouts", ROLLOUT_TABLE_COLUMNS, [rollout_table_row(g) for g in logged], step)
            if cfg.eval_every and eval_prompts and step % cfg.eval_every == 0:
                run.log_metrics(step=step, **evaluate_prompts(cfg, bundle, sources, weights, eval_prompts))
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                save_ppo_checkpoint(out, bundle, optimizers, schedulers, kl_ctl, step, identity, cfg.keep_checkpoints)
            advance(1, metrics=metrics)

    final_metrics = evaluate_prompts(cfg, bundle, sources, weights, eval_prompts) if eval_prompts else {}
    with full_parameters(bundle.policy):  # gathered from the ZeRO-3 shards: every process enters
        if main:
            save_final_policy(bundle, out)
    summary = {"steps": cfg.steps, "last": history[-1] if history else {}, "eval": final_metrics}
    if main:
        write_json(out / "ppo_summary.json", summary)
        plot_reward_curves(run.metrics_path, out / "reward_curves.png", f"ppo: {out.name}")
        finish_model(out, cfg.push_to_hub, title=out.name, stage="ppo", base_model=cfg.policy, data=[cfg.prompts],
                     rewards={name: (str(weight), rm_paths.get(reward_model_name(name, rm_paths) or name, "python/hf source"))
                              for name, weight in weights.items()},
                     metrics={"steps": cfg.steps, **scalar_metrics(summary["last"], ["reward/total", "kl", "response_length"], "last step "),
                              **scalar_metrics(final_metrics, list(final_metrics))})
    run.close()
    console.print(ppo_summary_line(history, final_metrics, out), markup=False, highlight=False, soft_wrap=True)
    return summary


def ppo_summary_line(history: list[dict], final_metrics: dict, out: Path) -> str:
    """One line at the end: the reward and KL of the first and last steps, speed, where it went."""
    if not history:
        return f"ppo: nothing to do (already at the last step); policy in {out}"
    first, last = history[0], history[-1]
    raw = [key for key in last if key.startswith(RAW_REWARD_PREFIX)]
    text = (
        f"ppo: {len(history)} step(s) to step {last['step']}: {TOTAL_REWARD_KEY} {first[TOTAL_REWARD_KEY]:+.4f} -> "
        f"{last[TOTAL_REWARD_KEY]:+.4f} ("
        + ", ".join(f"{key} {first[key]:+.4f} -> {last[key]:+.4f}" for key in raw)
        + f"), KL {first['kl']:.4f} -> {last['kl']:.4f}, "
        f"{sum(r['tokens_per_second'] for r in history) / len(history):,.0f} tokens/s"
    )
    if f"eval/{TOTAL_REWARD_KEY}" in final_metrics:
        text += f"; eval reward/total {final_metrics[f'eval/{TOTAL_REWARD_KEY}']:+.4f}"
    return text + f"; policy saved to {out}"


def start_engines(cfg: PPOConfig, bundle: PolicyBundle, optimizers) -> None:
    """Put the trained models in DeepSpeed engines and the frozen reference in inference mode.

    Each engine's micro-batch is this process's share of --minibatch-size, --grad-accum
    micro-batches per optimizer step; the policy and value model clip their gradients separately.
    """
    policy_opt, value_opt = optimizers

    def config() -> dict:
        return stage_deepspeed_config(
            cfg.deepspeed,
            micro_batch_size=cfg.minibatch_size // world_info()[2],
            grad_accum=cfg.grad_accum,
            dtype=bundle.compute_dtype,  # DeepSpeed's bf16 keeps its own fp32 master weights
            max_grad_norm=cfg.max_grad_norm,
            offload_optimizer=cfg.offload_optimizer,
            offload_params=cfg.offload_params,
        )

    bundle.policy_engine = deepspeed_engine(bundle.policy, policy_opt, config())
    if value_opt is not None:
        # One module for the engine; the stage keeps calling the backbone and head by name.
        value_model = nn.ModuleDict({"backbone": bundle.value_backbone, "head": bundle.value_head})
        bundle.value_engine = deepspeed_engine(value_model, value_opt, config())
    if bundle.ref is not None:
        bundle.ref = deepspeed_inference_module(bundle.ref, config())


def prompt_order(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    return order


def prompts_for_step(prompts: list[str], order: list[int], step: int, per_step: int, seed: int) -> list[str]:
    """The prompts of a step: epochs over a seeded permutation, a new permutation per epoch.

    A pure function of (step, seed), so a resumed run sees the same prompts."""
    picked = []
    n = len(prompts)
    for k in range((step - 1) * per_step, step * per_step):
        epoch, index = divmod(k, n)
        perm = order if epoch == 0 else prompt_order(n, seed + epoch)
        picked.append(prompts[perm[index]])
    return picked


@torch.no_grad()
def evaluate_prompts(cfg: PPOConfig, bundle: PolicyBundle, sources, weights, prompts: list[str]) -> dict:
    """Greedy responses on held-out prompts, scored by every reward source."""
    sampling = SamplingConfig(cfg.max_new_tokens, do_sample=False)
    totals: dict[str, list[float]] = {}
    for i in range(0, len(prompts), cfg.prompts_per_step):
        with bundle.precision():
            rollout = generate(bundle.policy, bundle.tokenizer, prompts[i : i + cfg.prompts_per_step], sampling,
                               max_prompt_length=cfg.max_prompt_length, is_encoder_decoder=bundle.is_encoder_decoder,
                               truncation_side=cfg.truncation_side, templated=bundle.templated_prompts)
        # Every process scores the same eval prompts, so each one's batch is the global one.
        rewards, _, reward_logs = score_rollout(sources, weights, rollout, cfg, bundle.prompt_sources)
        totals.setdefault(f"eval/{TOTAL_REWARD_KEY}", []).extend((rewards * rollout.response_mask.cpu()).sum(1).tolist())
        for key, values in reward_logs.items():
            totals.setdefault(f"eval/{key}", []).extend(values.tolist())
        totals.setdefault("eval/response_length", []).extend(rollout.response_lengths.float().tolist())
    return {k: float(np.mean(v)) for k, v in totals.items()}


def keep_rollouts_up_to(path: Path, step: int) -> None:
    """Drop logged rollouts of steps after `step` (all of them for a fresh run)."""
    kept = [record_to_dict(r) for r in read_records(path, "generation") if _rollout_step(r) <= step]
    with record_writer(path) as writer:
        writer.write_all(kept)


def _rollout_step(record: Generation) -> float:
    step = record.meta.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else math.inf


ROLLOUT_TABLE_COLUMNS = ["step", "prompt", "response", "reward", "tokens", "finished"]


def rollout_table_row(record: Generation) -> list:
    """A logged rollout as a row of the trackers' sample table (reward: its token rewards' sum)."""
    return [record.meta["step"], record.prompt, record.response, round(sum(record.token_rewards), 6),
            len(record.token_rewards), record.meta["finished"]]


def append_rollouts(path: Path, rollout: Rollout, rewards: torch.Tensor, step: int, count: int) -> list[Generation]:
    """Append the first `count` rollouts of a step to rollouts.jsonl; returns them.

    `token_rewards` are the rewards PPO learns from (weighted sources and the KL penalty);
    `meta.source_token_rewards` each source's own token rewards, before its weight."""
    import json

    written = []
    for i in range(min(count, len(rollout.texts))):
        n = int(rollout.response_lengths[i])
        ids = rollout.response_ids[i, :n].tolist()
        record = Generation(
            id=f"step{step}-{i}",
            prompt=rollout.prompts[i],
            response=rollout.texts[i],
            model=f"ppo step {step}",
            tokens=[rollout.texts[i][s:e] for s, e in rollout.token_char_spans[i]] if rollout.token_char_spans[i] else [str(t) for t in ids],
            token_rewards=[round(float(r), 6) for r in rewards[i, :n].tolist()],
            meta={"step": step, "finished": bool(rollout.finished[i]),
                  "source_token_rewards": {name: [round(float(r), 6) for r in values[i, :n].tolist()]
                                           for name, values in rollout.source_rewards.items()}},
        )
        written.append(record)
    append_lines(path, [json.dumps(record_to_dict(record), ensure_ascii=False) for record in written])
    return written


def save_final_policy(bundle: PolicyBundle, out: Path) -> None:
    save_model(bundle.policy, bundle.tokenizer, out, merge_lora=True)


def plot_reward_curves(metrics_path: Path, png_path: Path, title: str) -> None:
    """The rewards (total and each source's) and the KL per PPO step, as a PNG."""
    panels = ppo_panels(read_metric_series(metrics_path.parent))
    if panels:
        save_png(draw(title, panels, columns=min(3, len(panels))), png_path)
