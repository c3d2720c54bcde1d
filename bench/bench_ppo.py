"""PPO iteration throughput against TRL's GRPOTrainer (`make bench-ppo`), and reward-model costs.

One iteration = generate + score + update. Both sides get the same policy (a GPT-2 built by
`rlhfkit init-model`'s code into a temporary directory and loaded from there by each), the
same prompt batch (8 short prompts x 4 samples), the same reward (`bench/ppo_reward.py`, one
python function both call), the same sampling (temperature 0.7, top-k 20), a KL penalty
against a reference model (TRL beta = rlhfkit --kl-coef, so both load and run a reference),
and the same optimizer steps per iteration (rollouts / minibatch x epochs; TRL:
steps_per_generation x num_iterations, which also makes it compute the rollout logprobs as
rlhfkit does). Every response is exactly --new-tokens long on both sides: EOS is suppressed
until then by transformers' `min_new_tokens` (TRL: `generation_kwargs`; rlhfkit: the policy's
generation_config, which `generate` honours), so tokens/s compare like for like. TRL runs
like for like: fp32 (its bf16 default off), no gradient checkpointing (its default on),
dropout off, no logging, saving or evaluation; its optimizer stays its default.

rlhfkit runs twice: `--advantage grpo` (critic-free: the like-for-like row) and `gae` (the
paper's separate value model: one more model to run and train). Each configuration runs in
a fresh subprocess, so peak memory is its own: on CPU the peak RSS (getrusage) minus the
RSS after imports, before any model is loaded; on CUDA torch.cuda.max_memory_allocated.
Each subprocess runs one warm-up iteration, then --repeats timed ones; tables show medians.
Tokens/s = generated response tokens / time of the whole iteration. On CPU the time is the
process's CPU time (one torch thread, so it is the work done, whatever else the machine
runs); wall time is shown beside it. On CUDA only wall time means anything.

Reward-model costs, score only (`score_rollout` on one rollout batch, as `ppo` calls it):
three reward models (factuality + relevance segment RMs, a completeness preference RM, each
trained for 2 steps by `train-rm` on the tiny backbone) against completeness alone; and R3HF
redistribution of the completeness RM (`--redistribute comp`: prefix scores) against its
plain sequence score. The same reward setups are also timed as whole grpo iterations.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from typing_extensions import Self

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `bench.ppo_reward` imports the same way on both sides
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REWARD_SPEC = "py:bench.ppo_reward:letter_e_share"
QUESTIONS = [
    "Who wrote the album Bloom?",
    "When was the bridge opened?",
    "Where is the river Nile?",
    "What is the capital of France?",
    "Who painted the famous ceiling?",
    "When did the war end?",
    "How tall is the tower?",
    "Why is the sky blue?",
]
MODEL_SIZES = {
    "tiny": {"n_layer": 4, "n_embd": 128, "n_head": 4},
    "small": {"n_layer": 12, "n_embd": 768, "n_head": 12},
}
# --model-size smollm2: the real pretrained SmolLM2-135M-Instruct (`--model smollm2`, 49,152
# tokens) with LoRA adapters on both sides (peft's defaults for Llama, q_proj and v_proj; TRL's
# reference is then the policy with its adapters disabled, as rlhfkit's is).
PRETRAINED_SIZES = {"smollm2": "smollm2"}
LORA_R, LORA_ALPHA = 16, 32
ITERATION_CONFIGS = ("trl-grpo", "rlhfkit-grpo", "rlhfkit-gae")
# Where a profiled rlhfkit iteration's time goes: phase -> the attribute of rlhfkit.stages.ppo
# whose calls it times ("Class.method" for a method; "f(flag)" for the calls of f with flag=True).
# A call counts for the first phase it matches; a call whose result carries autograd history is
# a forward pass of the update and is left to "update", which is the rest of the iteration
# (advantages, the minibatch forward and backward passes, the optimizer steps).
PHASES = {
    "generation": "HFGeneration.generate",
    "reference log-probs": "response_logprobs(reference)",
    "rollout log-probs": "response_logprobs",
    "value": "value_estimates",
    "rewards": "score_rollout",
}
PROFILED_ITERATIONS = 3
MAX_PROMPT_TOKENS = 64
# Feedback for the three tiny reward models, as tests/test_ppo.py trains them.
RM_RESPONSES = [
    "Bloom was written by Troye Sivan. It was released in 2018.",
    "The bridge opened in 1937. It is red.",
    "The Nile is in Africa. It is long.",
    "Paris is the capital. The city is old.",
]
# Scoring is cheap and its differences small: it is timed this many times per timed iteration.
SCORINGS_PER_ROUND = 5
# Whole iterations are timed with one and with three RMs; redistribution's extra cost (~0.01 s
# per batch) is far below the noise of a whole iteration.
ITERATION_SETUPS = ("comp", "fact+rel+comp", "fg: fact+rel+comp, one backbone")
RM_SETUPS = {  # name: (reward weights, redistributed sources); fg is the shared-backbone RM of the three aspects
    "comp": ({"completeness": 1.0}, {}),
    "fact+rel+comp": ({"factuality": 0.3, "relevance": 0.5, "completeness": 0.3}, {}),
    "fg: fact+rel+comp, one backbone": ({"fg.factuality": 0.3, "fg.relevance": 0.5, "fg.completeness": 0.3}, {}),
    "comp redistributed": ({"completeness": 1.0}, {"completeness": "token"}),
}


@dataclass
class BenchSpec:
    """Everything a worker subprocess needs; the same for every configuration."""

    model_dir: str
    rm_backbone: str
    workdir: str
    device: str
    dtype: str
    threads: int
    prompts: int
    samples_per_prompt: int
    new_tokens: int
    minibatch: int
    epochs: int
    repeats: int
    lr: float = 1e-5
    kl_coef: float = 0.3
    temperature: float = 0.7
    top_k: int = 20
    seed: int = 0
    profile_dir: str | None = None
    same_malloc: bool = False  # TRL's worker gets rlhfkit's malloc setting too
    lora_r: int = 0  # LoRA adapters of this rank on both sides (0: full fine-tuning)

    @property
    def rollouts(self) -> int:
        return self.prompts * self.samples_per_prompt

    @property
    def updates_per_iteration(self) -> int:
        return self.rollouts // self.minibatch * self.epochs

    def prompt_texts(self) -> list[str]:
        return [f"question: {QUESTIONS[i % len(QUESTIONS)]} answer:" for i in range(self.prompts)]


# --- worker side: one configuration per fresh process -------------------------------------------


class Clock:
    """Wall and process CPU time of a section (CUDA work finished before each reading)."""

    def __init__(self, device):
        self.device = device
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Self:
        self._sync()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu

    def _sync(self) -> None:
        synchronize(self.device)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def carries_autograd(result) -> bool:
    values = result if isinstance(result, tuple) else (result,)
    values = [v for value in values for v in (value.values() if isinstance(value, dict) else [value])]
    return any(getattr(value, "requires_grad", False) for value in values)


def install_phase_timers(device) -> dict[str, list[Clock]]:
    """Wrap the PHASES attributes of rlhfkit.stages.ppo in clocks; returns {phase: clocks of its calls}."""
    import functools

    from rlhfkit.stages import ppo

    calls: dict[str, list[Clock]] = {phase: [] for phase in PHASES}
    by_attribute: dict[str, list[tuple[str, str | None]]] = {}
    for phase, target in PHASES.items():
        attribute, _, flag = target.partition("(")
        by_attribute.setdefault(attribute, []).append((phase, flag.rstrip(")") or None))
    for attribute, phases in by_attribute.items():
        owner_name, _, name = attribute.rpartition(".")
        owner = getattr(ppo, owner_name) if owner_name else ppo
        function = getattr(owner, name)

        @functools.wraps(function)
        def timed(*args, _function=function, _phases=phases, **kwargs):
            phase = next((p for p, flag in _phases if flag is None or kwargs.get(flag)), None)
            with Clock(device) as clock:
                result = _function(*args, **kwargs)
            if phase is not None and not carries_autograd(result):
                calls[phase].append(clock)
            return result

        setattr(owner, name, timed)
    return calls


def profile_phases(ppo: RlhfkitPPO, prompts: list[str]) -> dict:
    """PROFILED_ITERATIONS iterations with the phase timers in place: seconds per phase, summed
    over them, and the iterations' own seconds ('update' is the difference)."""
    calls = install_phase_timers(ppo.device)
    clocks = [ppo.iteration(prompts)[0] for _ in range(PROFILED_ITERATIONS)]
    return {
        basis: {
            "iteration": sum(getattr(c, basis) for c in clocks),
            "phases": {phase: sum(getattr(c, basis) for c in cs) for phase, cs in calls.items()},
        }
        for basis in ("cpu", "wall")
    }


def memory_baseline(device) -> int:
    import psutil
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    return psutil.Process().memory_info().rss


def peak_memory(device, baseline: int) -> int:
    """Bytes: the CUDA allocator's peak, or the process's peak RSS above its post-import RSS."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024) - baseline  # Linux reports KiB, macOS bytes


def rlhfkit_config(spec: BenchSpec, advantage: str, weights: dict[str, float], rm: dict[str, str], redistribute: dict[str, str]):
    from rlhfkit.config import build_config
    from rlhfkit.schema import PromptRecord, write_records
    from rlhfkit.stages.ppo import PPOConfig

    prompts_file = Path(spec.workdir) / "prompts.jsonl"
    write_records(prompts_file, [PromptRecord(id=f"p{i}", prompt=p) for i, p in enumerate(spec.prompt_texts())])
    return build_config(
        PPOConfig,
        policy=spec.model_dir,
        prompts=str(prompts_file),
        out=str(Path(spec.workdir) / "run"),
        rewards=",".join(f"{name}={weight}" for name, weight in weights.items()),
        rm=[f"{name}={target}" for name, target in rm.items()],
        redistribute=[f"{name}:{granularity}" for name, granularity in redistribute.items()],
        advantage=advantage,
        steps=1 + spec.repeats,
        prompts_per_step=spec.prompts,
        samples_per_prompt=spec.samples_per_prompt,
        minibatch_size=spec.minibatch,
        ppo_epochs=spec.epochs,
        lr=spec.lr,
        kl_coef=spec.kl_coef,
        max_new_tokens=spec.new_tokens,
        max_prompt_length=MAX_PROMPT_TOKENS,
        temperature=spec.temperature,
        top_k=spec.top_k,
        top_p=1.0,
        dtype=spec.dtype,
        device=spec.device,
        seed=spec.seed,
        lora_r=spec.lora_r,
        lora_alpha=LORA_ALPHA,
    )


def reward_sources(cfg):
    from rlhfkit.models import resolve_device
    from rlhfkit.rewards.sources import (
        build_reward_sources,
        parse_named,
        parse_redistribute,
        parse_weights,
    )

    return build_reward_sources(
        parse_weights(cfg.rewards), parse_named(cfg.rm, "--rm"), parse_redistribute(cfg.redistribute),
        device=resolve_device(cfg.device), dtype=cfg.dtype, batch_size=cfg.rm_batch_size,
    )


class RlhfkitPPO:
    """What `run_ppo` sets up before its loop, so that single iterations can be timed."""

    def __init__(self, cfg):
        from rlhfkit.models import resolve_device
        from rlhfkit.rewards.sources import parse_weights
        from rlhfkit.rl.advantages import FixedKLController
        from rlhfkit.runs import set_seed
        from rlhfkit.stages.ppo import load_models, make_optimizers

        set_seed(cfg.seed)
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.weights = parse_weights(cfg.rewards)
        self.sources = reward_sources(cfg)
        self.bundle = load_models(cfg, self.device)
        # Fixed-length responses: EOS is suppressed until max_new_tokens.
        self.bundle.policy.generation_config.min_new_tokens = cfg.max_new_tokens
        self.optimizers, self.schedulers = make_optimizers(cfg, self.bundle)
        self.kl_ctl = FixedKLController(cfg.kl_coef)
        self.step = 0
        self.last_metrics: dict = {}

    def iteration(self, prompts: list[str], sources=None, weights=None) -> tuple[Clock, torch.Tensor]:
        """One `ppo_iteration` (with these reward sources, default the config's): its clock and response lengths."""
        from rlhfkit.stages.ppo import ppo_iteration

        self.step += 1
        with Clock(self.device) as clock:
            self.last_metrics, rollout, _ = ppo_iteration(
                self.cfg, self.bundle, sources or self.sources, weights or self.weights, prompts,
                self.optimizers, self.schedulers, self.kl_ctl, self.step,
            )
        return clock, rollout.response_lengths.cpu()


def run_rlhfkit_iterations(spec: BenchSpec, advantage: str) -> dict:
    import torch

    from rlhfkit.models import resolve_device

    device = resolve_device(spec.device)
    baseline = memory_baseline(device)
    ppo = RlhfkitPPO(rlhfkit_config(spec, advantage, {"judge": 1.0}, {"judge": REWARD_SPEC}, {}))
    prompts = spec.prompt_texts()
    ppo.iteration(prompts)  # warm-up
    profiler = start_profile(spec)
    clocks, lengths = [], []
    for _ in range(spec.repeats):
        clock, response_lengths = ppo.iteration(prompts)
        clocks.append(clock)
        lengths.append(response_lengths)
    stop_profile(profiler, spec, f"rlhfkit-{advantage}")
    memory = peak_memory(device, baseline)  # before the profiled iterations
    utilisation = phase_flops(spec, ppo, prompts) if spec.lora_r else None
    return {
        "phase_flops": utilisation,
        "wall": [c.wall for c in clocks],
        "cpu": [c.cpu for c in clocks],
        "tokens": [int(n.sum()) for n in lengths],
        "shortest_response": min(int(n.min()) for n in lengths),
        "peak_memory": memory,
        "threads": torch.get_num_threads(),
        "phases": profile_phases(ppo, prompts),  # after the timed iterations, which run unwrapped
    }


def phase_flops(spec: BenchSpec, ppo: RlhfkitPPO, prompts: list[str]) -> dict:
    """Matmul FLOPs of each phase of one iteration, counted from the shapes, and this worker's
    matmul peak (bench_train.matmul_peak: a square torch.mm on the same threads).

    Linear layers: 2 FLOPs per weight per token. Generation runs every prompt and new token
    through the decoder layers once (KV cache) and the LM head once per new token; a log-prob
    pass runs prompt + response through the layers and the head over the response only. The
    update: per epoch a forward pass and a backward pass; with LoRA the frozen weights get no
    weight gradient, so the backward is ~1 forward, plus the head's checkpointed recompute.
    Attention scores (QK^T, AV) are left out: ~3% at these lengths (96 positions x 576 wide vs
    ~3.5M weights a layer).
    """
    from bench.bench_train import Device, matmul_peak

    base = ppo.bundle.policy.get_base_model()
    head = base.get_output_embeddings().weight
    layers = sum(p.numel() for name, p in base.named_parameters() if p.dim() == 2 and "embed" not in name and p is not head
                 and "lora_" not in name)
    rows = spec.rollouts
    prompt_tokens = sum(len(ppo.bundle.tokenizer(p)["input_ids"]) for p in prompts) * spec.samples_per_prompt
    response_tokens = rows * spec.new_tokens
    head_flops = 2 * head.numel() * response_tokens
    forward = 2 * layers * (prompt_tokens + response_tokens) + head_flops
    return {
        "flops": {
            "generation": 2 * layers * (prompt_tokens + response_tokens) + head_flops,
            "reference log-probs": forward,
            "rollout log-probs": forward,
            "update": spec.epochs * (2 * forward + head_flops),
        },
        "matmul_peak": matmul_peak(Device(spec.device, spec.dtype)),
    }


def run_trl_iterations(spec: BenchSpec) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from bench.ppo_reward import letter_e_share
    from rlhfkit.models import resolve_device, resolve_dtype, reuse_freed_cpu_memory

    device = resolve_device(spec.device)
    # bf16 as rlhfkit trains in it: fp32 weights, the forward autocast (TRL's bf16=True).
    mixed = resolve_dtype(spec.dtype, device) == torch.bfloat16
    if spec.same_malloc and device.type == "cpu":
        reuse_freed_cpu_memory()  # what rlhfkit's model loader does in its workers
    baseline = memory_baseline(device)
    steps_per_generation = spec.rollouts // spec.minibatch
    steps_per_iteration = steps_per_generation * spec.epochs

    class IterationClock(TrainerCallback):
        """Clock readings at the end of each iteration's last optimizer step; the logged lengths."""

        def __init__(self):
            self.readings: list[tuple[float, float]] = []
            self.logs: list[dict] = []
            self.profiler = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % steps_per_iteration == 0:
                synchronize(device)
                self.readings.append((time.perf_counter(), time.process_time()))
                if len(self.readings) == 1:  # the warm-up iteration is over
                    self.profiler = start_profile(spec)

        def on_train_end(self, args, state, control, **kwargs):
            stop_profile(self.profiler, spec, "trl-grpo")

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    args = GRPOConfig(
        output_dir=str(Path(spec.workdir) / "trl"),
        per_device_train_batch_size=spec.minibatch,
        gradient_accumulation_steps=1,
        steps_per_generation=steps_per_generation,
        num_generations=spec.samples_per_prompt,
        num_iterations=spec.epochs,
        max_completion_length=spec.new_tokens,
        generation_kwargs={"min_new_tokens": spec.new_tokens},
        temperature=spec.temperature,
        top_k=spec.top_k,
        top_p=1.0,
        beta=spec.kl_coef,
        epsilon=0.2,
        learning_rate=spec.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.5,
        max_steps=(1 + spec.repeats) * steps_per_iteration,
        model_init_kwargs={"dtype": "float32" if mixed else spec.dtype},
        activation_checkpointing=False,  # TRL's default is on; rlhfkit does not checkpoint
        bf16=mixed,
        fp16=False,
        use_cpu=device.type == "cpu",
        disable_dropout=True,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=spec.seed,
    )
    clock = IterationClock()
    peft_config = None
    if spec.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec.lora_r, lora_alpha=LORA_ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = GRPOTrainer(
        peft_config=peft_config,
        model=spec.model_dir,
        reward_funcs=letter_e_share,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": spec.prompt_texts()}),
        processing_class=AutoTokenizer.from_pretrained(spec.model_dir, padding_side="left"),
        callbacks=[clock],
    )
    trainer.train()
    pairs = list(zip(clock.readings, clock.readings[1:]))
    # TRL logs once, at the end: lengths averaged over every generation (the warm-up's too).
    lengths = next(log for log in reversed(clock.logs) if "completions/mean_length" in log)
    return {
        "wall": [b[0] - a[0] for a, b in pairs],
        "cpu": [b[1] - a[1] for a, b in pairs],
        "tokens": [round(lengths["completions/mean_length"] * spec.rollouts)] * len(pairs),
        "shortest_response": lengths["completions/min_length"],
        "peak_memory": peak_memory(device, baseline),
        "threads": torch.get_num_threads(),
    }


def train_reward_models(spec: BenchSpec) -> dict[str, str]:
    """factuality + relevance (segment) and completeness (preference) RMs, 2 optimizer steps each."""
    from rlhfkit.config import build_config
    from rlhfkit.schema import Preference, Span, SpanFeedback, write_records
    from rlhfkit.stages.train_rm import TrainRMConfig, run_train_rm

    root = Path(spec.workdir) / "rms"
    root.mkdir(parents=True, exist_ok=True)
    prompts = spec.prompt_texts()
    spans = []
    for i in range(16):
        response = RM_RESPONSES[i % 4]
        first_end = response.index(".") + 1
        marked = []
        if i % 2:
            marked.append(Span(0, first_end, "Unverifiable", "factuality"))
        if i % 3 == 0:
            marked.append(Span(first_end + 1, len(response), "Irrelevant", "relevance"))
        spans.append(SpanFeedback(id=f"s{i}", prompt=prompts[i % len(prompts)], response=response, spans=marked,
                                  aspects=["factuality", "relevance"]))
    write_records(root / "spans.jsonl", spans)
    write_records(root / "prefs.jsonl", [
        Preference(id=f"q{i}", prompt=prompts[i % len(prompts)], chosen=RM_RESPONSES[i % 4],
                   rejected=RM_RESPONSES[i % 4].split(".")[0] + ".", aspect="preference")
        for i in range(12)
    ])
    out = {}
    for aspect, data in (("factuality", "spans.jsonl"), ("relevance", "spans.jsonl"), ("completeness", "prefs.jsonl")):
        run_train_rm(build_config(
            TrainRMConfig, aspect=aspect, data=str(root / data), model=spec.rm_backbone, out=str(root / aspect),
            max_steps=2, batch_size=4, max_length=256, eval_fraction=0.0, device=spec.device, dtype=spec.dtype,
        ))
        out[aspect] = str(root / aspect)
    # The same three aspects on one backbone (train-rm --shared-backbone), with the same lengths.
    run_train_rm(build_config(
        TrainRMConfig, aspect="factuality,relevance,completeness", shared_backbone=True, data=str(root / "spans.jsonl"),
        data_for=[f"completeness={root / 'prefs.jsonl'}"], model=spec.rm_backbone, out=str(root / "fg"),
        max_steps=2, batch_size=4, max_length=256, eval_fraction=0.0, device=spec.device, dtype=spec.dtype,
    ))
    out["fg"] = str(root / "fg")
    return out


def forget_cached_outputs(sources) -> None:
    """A shared-backbone RM keeps its head outputs per input batch; scoring the same rollout
    again must run the model again to be timed."""
    for source in sources.values():
        scorer = getattr(getattr(source, "rm", None), "scorer", None)
        if scorer is not None:
            scorer.clear()


def run_rm_costs(spec: BenchSpec) -> dict:
    """Clocks of scoring one rollout batch for each of RM_SETUPS, and of whole grpo iterations with one and three RMs."""
    import dataclasses

    from rlhfkit.generation import SamplingConfig, generate
    from rlhfkit.rewards.sources import parse_weights
    from rlhfkit.stages.ppo import score_rollout

    rms = train_reward_models(spec)
    cfgs = {
        name: rlhfkit_config(spec, "grpo", weights, {k.partition(".")[0]: rms[k.partition(".")[0]] for k in weights}, redistribute)
        for name, (weights, redistribute) in RM_SETUPS.items()
    }
    setups = {name: (reward_sources(cfg), parse_weights(cfg.rewards), cfg) for name, cfg in cfgs.items()}
    # One policy for all setups: they differ only in their reward sources.
    ppo = RlhfkitPPO(dataclasses.replace(cfgs["comp"], steps=1 + spec.repeats * len(ITERATION_SETUPS)))
    prompts = spec.prompt_texts()
    rollout = generate(
        ppo.bundle.policy, ppo.bundle.tokenizer, [p for p in prompts for _ in range(spec.samples_per_prompt)],
        SamplingConfig(spec.new_tokens, spec.temperature, spec.top_k, 1.0, do_sample=True),
        max_prompt_length=MAX_PROMPT_TOKENS, is_encoder_decoder=ppo.bundle.is_encoder_decoder,
    )
    for sources, weights, cfg in setups.values():  # warm-up
        forget_cached_outputs(sources)
        score_rollout(sources, weights, rollout, cfg)
    ppo.iteration(prompts)
    score: dict[str, list[Clock]] = {name: [] for name in setups}
    iteration: dict[str, list[Clock]] = {name: [] for name in ITERATION_SETUPS}
    profiler = start_profile(spec)
    for _ in range(spec.repeats):  # setups interleaved, so background load hits all alike
        for _ in range(SCORINGS_PER_ROUND):
            for name, (sources, weights, cfg) in setups.items():
                forget_cached_outputs(sources)
                with Clock(ppo.device) as clock:
                    score_rollout(sources, weights, rollout, cfg)
                score[name].append(clock)
        for name in ITERATION_SETUPS:
            sources, weights, _ = setups[name]
            clock, _ = ppo.iteration(prompts, sources, weights)
            iteration[name].append(clock)
    stop_profile(profiler, spec, "rm-costs")
    return {"score": clock_lists(score), "iteration": clock_lists(iteration), "response_tokens": int(rollout.response_mask.sum())}


def clock_lists(clocks: dict[str, list[Clock]]) -> dict[str, dict[str, list[float]]]:
    return {name: {"wall": [c.wall for c in cs], "cpu": [c.cpu for c in cs]} for name, cs in clocks.items()}


def start_profile(spec: BenchSpec):
    if not spec.profile_dir:
        return None
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    return profiler


def stop_profile(profiler, spec: BenchSpec, name: str) -> None:
    if profiler is None:
        return
    import io
    import pstats

    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(40)
    stats.sort_stats("tottime").print_stats(25)
    path = Path(spec.profile_dir) / f"profile-{name}.txt"
    path.write_text(out.getvalue())


WORKERS = {
    "trl-grpo": run_trl_iterations,
    "rlhfkit-grpo": lambda spec: run_rlhfkit_iterations(spec, "grpo"),
    "rlhfkit-gae": lambda spec: run_rlhfkit_iterations(spec, "gae"),
    "rm-costs": run_rm_costs,
}


def worker_main(name: str, spec_path: str, result_path: str) -> int:
    import torch

    spec = BenchSpec(**json.loads(Path(spec_path).read_text()))
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    Path(result_path).write_text(json.dumps(WORKERS[name](spec)))
    return 0


# --- driver side --------------------------------------------------------------------------------


def run_worker(name: str, spec: BenchSpec, root: Path) -> dict:
    """Run one configuration in a fresh interpreter; its output is shown only if it fails."""
    workdir = root / name
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = workdir / "spec.json", workdir / "result.json"
    spec_path.write_text(json.dumps(asdict(spec) | {"workdir": str(workdir)}))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads), "MKL_NUM_THREADS": str(spec.threads)}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", name, str(spec_path), str(result_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-5000:] + done.stderr[-10000:])
        raise SystemExit(f"benchmark worker '{name}' failed (exit {done.returncode})")
    return json.loads(result_path.read_text())


def build_model(root: Path, size: str) -> Path:
    from rlhfkit.config import build_config
    from rlhfkit.models import resolve_model_path
    from rlhfkit.stages.init_model import InitModelConfig, run_init_model

    if size in PRETRAINED_SIZES:
        return Path(resolve_model_path(PRETRAINED_SIZES[size]))

    return run_init_model(build_config(InitModelConfig, out=str(root / f"policy-{size}"), arch="gpt2", **MODEL_SIZES[size]))


def median(values: list[float]) -> float:
    return statistics.median(values)


def each(values: list[float], digits: int = 2) -> str:
    return f"{median(values):.{digits}f} (" + " ".join(f"{v:.{digits}f}" for v in values) + ")"


def print_phases(out, profiles: dict[str, dict], basis: str, utilisation: dict | None = None) -> None:
    """Seconds per iteration and share of the iteration of each PHASES entry, and of the update."""
    from rich.table import Table

    table = Table(
        title=f"where an rlhfkit iteration's time goes: {basis} seconds per iteration, {PROFILED_ITERATIONS} more iterations "
              "with timers on the PHASES functions of rlhfkit.stages.ppo; update = the rest of the iteration",
        title_justify="left",
    )
    table.add_column("phase (timed function)")
    for name in profiles:
        table.add_column(f"{name} s", justify="right")
        table.add_column("%", justify="right")
    if utilisation:
        table.add_column("GFLOP / iteration", justify="right")
        table.add_column("% of matmul peak", justify="right")
    rows = {name: {**p["phases"], "update": p["iteration"] - sum(p["phases"].values()), "iteration": p["iteration"]} for name, p in profiles.items()}
    for phase in [*PHASES, "update", "iteration"]:
        cells = [f"{phase} ({PHASES[phase]})" if phase in PHASES else phase]
        for name, profile in profiles.items():
            seconds = rows[name][phase]
            cells += [f"{seconds / PROFILED_ITERATIONS:.3f}", f"{seconds / profile['iteration']:.0%}"]
        if utilisation:
            flops = utilisation["flops"].get(phase, sum(utilisation["flops"].values()) if phase == "iteration" else 0)
            seconds = next(iter(rows.values()))[phase] / PROFILED_ITERATIONS
            cells += [f"{flops / 1e9:.1f}", f"{flops / seconds / utilisation['matmul_peak']:.0%}" if flops and seconds else "-"]
        table.add_row(*cells)
    out.print(table)
    if utilisation:
        out.print(f"matmul peak of a worker: {utilisation['matmul_peak'] / 1e9:.1f} GFLOP/s (bench_train.matmul_peak); FLOPs counted "
                  "from the shapes (phase_flops): the share of the peak each phase reaches")


def print_report(spec: BenchSpec, size: str, results: dict[str, dict], rm: dict | None) -> None:
    import torch
    import transformers
    import trl
    from rich.console import Console
    from rich.table import Table

    on_cpu = spec.device == "cpu"
    basis = "cpu" if on_cpu else "wall"
    out = Console(width=180)
    threads = results["trl-grpo"]["threads"]
    table = Table(
        title=(
            f"one PPO iteration = generate + score + {spec.updates_per_iteration} optimizer steps: {spec.prompts} prompts x "
            f"{spec.samples_per_prompt} samples x {spec.new_tokens} new tokens; "
            f"{'SmolLM2-135M-Instruct, LoRA r=' + str(spec.lora_r) if spec.lora_r else size + ' GPT-2'}, {spec.device} {spec.dtype}, "
            f"{threads} torch thread(s); median of {spec.repeats} timed iterations after 1 warm-up"
        ),
        title_justify="left",
    )
    columns = ["configuration", "tokens/s" + (" (CPU time)" if on_cpu else "")]
    columns += (["CPU s / iteration (each)", "tokens/s (wall)"] if on_cpu else []) + ["wall s / iteration (each)"]
    columns += ["peak memory" + (" (peak RSS - RSS after imports)" if on_cpu else " (CUDA max allocated)"), "vs TRL"]
    for column in columns:
        table.add_column(column, justify="left" if column == "configuration" else "right")
    rate = {name: median([t / s for t, s in zip(r["tokens"], r[basis])]) for name, r in results.items()}
    for name, r in results.items():
        row = [name, f"{rate[name]:,.0f}"]
        if on_cpu:
            row += [each(r["cpu"]), f"{median([t / s for t, s in zip(r['tokens'], r['wall'])]):,.0f}"]
        row += [each(r["wall"]), f"{r['peak_memory'] / 2**20:,.0f} MiB", f"{rate[name] / rate['trl-grpo']:.2f}x"]
        table.add_row(*row)
    out.print(table)
    out.print(
        "generated tokens per iteration: " + ", ".join(f"{name} {median(r['tokens']):.0f}" for name, r in results.items())
        + "; shortest response: " + ", ".join(f"{name} {r['shortest_response']:g}" for name, r in results.items())
    )
    ratio = rate["rlhfkit-grpo"] / rate["trl-grpo"]
    out.print(f"goal: rlhfkit (grpo) >= 1.5x TRL tokens/s: {ratio:.2f}x -> {'met' if ratio >= 1.5 else 'NOT met'}")
    memory = results["rlhfkit-grpo"]["peak_memory"] / results["trl-grpo"]["peak_memory"]
    out.print(f"goal: rlhfkit (grpo) peak memory <= TRL's: {memory:.2f}x -> {'met' if memory <= 1 else 'NOT met'}")
    print_phases(out, {name: r["phases"][basis] for name, r in results.items() if "phases" in r}, basis,
                 results["rlhfkit-grpo"].get("phase_flops"))
    if rm:
        table = Table(
            title=f"reward-model cost: one batch of {spec.rollouts} rollouts, {rm['response_tokens']} response tokens; {basis} "
                  f"seconds, median of {SCORINGS_PER_ROUND * spec.repeats} scorings and of {spec.repeats} iterations",
            title_justify="left",
        )
        for column in ("reward sources", "score only, s (min-max)", "vs comp", "whole grpo iteration, s (each)", "vs comp"):
            table.add_column(column, justify="left" if column == "reward sources" else "right")
        score = {name: r[basis] for name, r in rm["score"].items()}
        iteration = {name: r[basis] for name, r in rm["iteration"].items()}
        for name, seconds in score.items():
            whole = [each(iteration[name]), f"{median(iteration[name]) / median(iteration['comp']):.2f}x"] if name in iteration else ["-", "-"]
            table.add_row(
                name, f"{median(seconds):.3f} ({min(seconds):.3f}-{max(seconds):.3f})",
                f"{median(seconds) / median(score['comp']):.2f}x", *whole,
            )
        out.print(table)
        three = median(score["fact+rel+comp"]) / median(score["comp"])
        spread = median(score["comp redistributed"]) / median(score["comp"])
        whole = median(iteration["fact+rel+comp"]) / median(iteration["comp"])
        shared_name = "fg: fact+rel+comp, one backbone"
        shared = median(score[shared_name]) / median(score["comp"])
        shared_whole = median(iteration[shared_name]) / median(iteration["comp"])
        out.print(
            f"three separate RMs vs one: score only {three:.2f}x, whole iteration {whole:.2f}x (the goal of 1.3x was for these)"
        )
        out.print(
            f"goal: three aspects on one backbone <= 1.15x one RM: score only {shared:.2f}x -> "
            f"{'met' if shared <= 1.15 else 'NOT met'}; whole iteration {shared_whole:.2f}x"
        )
        out.print(f"goal: redistribution <= 1.05x plain scoring (score only): {spread:.2f}x -> {'met' if spread <= 1.05 else 'NOT met'}")
    out.print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; {os.cpu_count()} CPUs; "
        f"torch.set_num_threads({threads}) in every worker; TRL's with {'rlhfkit' if spec.same_malloc else 'the default'} malloc settings"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPUs that support it), float32, bfloat16")
    parser.add_argument("--model-size", choices=sorted([*MODEL_SIZES, *PRETRAINED_SIZES]), default="tiny",
                        help="tiny: 4 layers x 128 wide (CPU); small: 12 layers x 768 wide (GPU); smollm2: the pretrained "
                             f"SmolLM2-135M-Instruct with LoRA r={LORA_R} on both sides, rlhfkit grpo against TRL only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (1: stable numbers on a shared machine)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64, help="response length, forced on both sides")
    parser.add_argument("--minibatch", type=int, default=8, help="rollouts per optimizer step")
    parser.add_argument("--epochs", type=int, default=2, help="passes over each rollout batch (TRL: num_iterations)")
    parser.add_argument("--repeats", type=int, default=5, help="timed iterations per configuration, after one warm-up")
    parser.add_argument("--skip-rm-costs", action="store_true", help="only the comparison with TRL")
    parser.add_argument("--profile-dir", help="write a cProfile of each worker's timed part into this directory")
    parser.add_argument("--same-malloc", action="store_true",
                        help="give TRL's worker rlhfkit's malloc setting too (on CPU: the comparison without it)")
    parser.add_argument("--worker", nargs=3, metavar=("NAME", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)

    from rlhfkit.models import DTYPES, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    torch_dtype = resolve_dtype(args.dtype, device)
    dtype = next(name for name, value in DTYPES.items() if value == torch_dtype)
    if (args.prompts * args.samples_per_prompt) % args.minibatch:
        raise SystemExit("--minibatch must divide --prompts x --samples-per-prompt")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-ppo-") as tmp:
        root = Path(tmp)
        policy = build_model(root, args.model_size)
        pretrained = args.model_size in PRETRAINED_SIZES
        spec = BenchSpec(
            model_dir=str(policy),
            rm_backbone=str(policy if args.model_size == "tiny" or pretrained else build_model(root, "tiny")),
            workdir=str(root), device=str(device), dtype=dtype, threads=args.threads, prompts=args.prompts,
            samples_per_prompt=args.samples_per_prompt, new_tokens=args.new_tokens, minibatch=args.minibatch,
            epochs=args.epochs, repeats=args.repeats,
            profile_dir=str(Path(args.profile_dir).resolve()) if args.profile_dir else None, same_malloc=args.same_malloc,
            lora_r=LORA_R if pretrained else 0,
        )
        if spec.profile_dir:
            Path(spec.profile_dir).mkdir(parents=True, exist_ok=True)
        # The pretrained model: the like-for-like comparison only (its RM costs are the tiny section's).
        configs = ITERATION_CONFIGS[:2] if pretrained else ITERATION_CONFIGS
        results = {name: run_worker(name, spec, root) for name in configs}
        rm = None if args.skip_rm_costs or pretrained else run_worker("rm-costs", spec, root)
    print_report(spec, args.model_size, results, rm)
    print(f"bench time {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
