"""PPO iteration throughput against TRL's GRPOTrainer (`make bench-ppo`), and reward-model costs.

One iteration = generate + score + update. Both sides get the same policy (a GPT-2 built by
`rlhfkit init-model`'s code into a temporary directory and loaded from there by each), the same
prompt batch (8 short prompts x 4 samples), the same reward (`bench/ppo_reward.py`, a python
function both call), the same sampling (temperature 0.7, top-k 20), a KL penalty against a
reference model (TRL beta = rlhfkit --kl-coef, so both load a reference and score with it),
and the same optimizer steps per iteration (rollouts / minibatch x epochs: TRL
steps_per_generation x num_iterations). Every response is exactly --new-tokens long on both
sides: EOS is suppressed until then with transformers' `min_new_tokens` (TRL: through
`generation_kwargs`; rlhfkit: on the policy's generation_config, which `generate` honours),
so generated tokens/s compare like for like. TRL is set up like for like: fp32 (its
bf16 default off), no gradient checkpointing (its default on), dropout off, no logging,
saving or evaluation. Its optimizer stays its default (fused AdamW); rlhfkit's is AdamW.

rlhfkit runs twice: `--advantage grpo` (critic-free, the like-for-like row) and `gae` (the
paper's separate value model, an extra model to run and train). Each configuration runs in
a fresh subprocess, so its peak memory is its own: on CPU the peak RSS (getrusage) minus the
RSS after imports, before any model is loaded; on CUDA torch.cuda.max_memory_allocated.
Each subprocess runs one warm-up iteration, then --repeats timed ones; the table shows the
median. Tokens/s = generated response tokens / wall time of the whole iteration.

Reward-model costs (score only: `score_rollout` on one rollout batch, as `ppo` calls it):
three reward models (factuality + relevance segment RMs, completeness preference RM, each
trained for 2 steps with `train-rm` on the tiny backbone) against completeness alone, and
R3HF redistribution of the completeness RM (`--redistribute comp`: prefix scores) against
its plain sequence score. The same comparisons are also timed as whole iterations.
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
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `bench.ppo_reward` must import the same way on both sides
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
MODEL_SIZES = {"tiny": dict(n_layer=4, n_embd=128, n_head=4), "small": dict(n_layer=12, n_embd=768, n_head=12)}
ITERATION_CONFIGS = ("trl-grpo", "rlhfkit-grpo", "rlhfkit-gae")
# Span feedback and preferences for the three tiny reward models (as tests/test_ppo.py trains them).
RM_RESPONSES = [
    "Bloom was written by Troye Sivan. It was released in 2018.",
    "The bridge opened in 1937. It is red.",
    "The Nile is in Africa. It is long.",
    "Paris is the capital. The city is old.",
]


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
    profile_dir: Optional[str] = None

    @property
    def rollouts(self) -> int:
        return self.prompts * self.samples_per_prompt

    @property
    def updates_per_iteration(self) -> int:
        return self.rollouts // self.minibatch * self.epochs

    def prompt_texts(self) -> list[str]:
        return [f"question: {QUESTIONS[i % len(QUESTIONS)]} answer:" for i in range(self.prompts)]


# --- worker side: one configuration per fresh process -------------------------------------------


def start_worker(spec: BenchSpec):
    import torch

    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)


def memory_baseline(device) -> int:
    import psutil
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    return psutil.Process().memory_info().rss


def peak_memory(device, baseline: int) -> int:
    """Bytes: CUDA allocator peak, or the process's peak RSS above its post-import RSS."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return peak - baseline


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def force_length(model, new_tokens: int) -> None:
    """Suppress EOS until `new_tokens` are generated (transformers' MinNewTokensLengthLogitsProcessor)."""
    model.generation_config.min_new_tokens = new_tokens


def rlhfkit_config(spec: BenchSpec, advantage: str, rewards: str, rm: list[str], redistribute: list[str] = ()):
    from rlhfkit.config import build_config
    from rlhfkit.schema import PromptRecord, write_records
    from rlhfkit.stages.ppo import PPOConfig

    prompts_file = Path(spec.workdir) / "prompts.jsonl"
    if not prompts_file.exists():
        write_records(prompts_file, [PromptRecord(id=f"p{i}", prompt=p) for i, p in enumerate(spec.prompt_texts())])
    return build_config(
        PPOConfig,
        policy=spec.model_dir,
        prompts=str(prompts_file),
        out=str(Path(spec.workdir) / f"rlhfkit-{advantage}"),
        rewards=rewards,
        rm=list(rm),
        redistribute=list(redistribute),
        advantage=advantage,
        steps=1 + spec.repeats,
        prompts_per_step=spec.prompts,
        samples_per_prompt=spec.samples_per_prompt,
        minibatch_size=spec.minibatch,
        ppo_epochs=spec.epochs,
        lr=spec.lr,
        kl_coef=spec.kl_coef,
        max_new_tokens=spec.new_tokens,
        max_prompt_length=64,
        temperature=spec.temperature,
        top_k=spec.top_k,
        top_p=1.0,
        dtype=spec.dtype,
        device=spec.device,
        seed=spec.seed,
    )


class RlhfkitTrainer:
    """What `run_ppo` sets up before its loop, so single iterations can be timed."""

    def __init__(self, cfg, sources=None):
        from rlhfkit.models import resolve_device
        from rlhfkit.rewards.sources import build_reward_sources, parse_named, parse_redistribute, parse_weights
        from rlhfkit.rl.advantages import FixedKLController
        from rlhfkit.runs import set_seed
        from rlhfkit.stages.ppo import load_models, make_optimizers

        set_seed(cfg.seed)
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.weights = parse_weights(cfg.rewards)
        self.sources = sources or build_reward_sources(
            self.weights, parse_named(cfg.rm, "--rm"), parse_redistribute(cfg.redistribute),
            device=self.device, dtype=cfg.dtype, batch_size=cfg.rm_batch_size,
        )
        self.bundle = load_models(cfg, self.device)
        force_length(self.bundle.policy, cfg.max_new_tokens)
        self.optimizers, self.schedulers = make_optimizers(cfg, self.bundle)
        self.kl_ctl = FixedKLController(cfg.kl_coef)
        self.step = 0

    def iteration(self, prompts: list[str]) -> tuple[float, int]:
        """(seconds, generated tokens) of one `ppo_iteration`."""
        from rlhfkit.stages.ppo import ppo_iteration

        self.step += 1
        synchronize(self.device)
        started = time.perf_counter()
        metrics, rollout, _ = ppo_iteration(
            self.cfg, self.bundle, self.sources, self.weights, prompts, self.optimizers, self.schedulers, self.kl_ctl, self.step
        )
        synchronize(self.device)
        return time.perf_counter() - started, int(rollout.response_mask.sum())


def run_rlhfkit_iterations(spec: BenchSpec, advantage: str) -> dict:
    import torch

    from rlhfkit.models import resolve_device

    device = resolve_device(spec.device)
    baseline = memory_baseline(device)
    trainer = RlhfkitTrainer(rlhfkit_config(spec, advantage, "judge=1.0", [f"judge={REWARD_SPEC}"]))
    prompts = spec.prompt_texts()
    trainer.iteration(prompts)  # warm-up
    profiler = start_profile(spec)
    seconds, tokens = [], []
    for _ in range(spec.repeats):
        s, t = trainer.iteration(prompts)
        seconds.append(s)
        tokens.append(t)
    stop_profile(profiler, spec, f"rlhfkit-{advantage}")
    return {
        "seconds": seconds,
        "tokens": tokens,
        "peak_memory": peak_memory(device, baseline),
        "threads": torch.get_num_threads(),
    }


def run_trl_iterations(spec: BenchSpec) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from bench.ppo_reward import letter_e_share
    from rlhfkit.models import resolve_device

    device = resolve_device(spec.device)
    baseline = memory_baseline(device)
    steps_per_generation = spec.rollouts // spec.minibatch
    per_iteration = steps_per_generation * spec.epochs

    class IterationClock(TrainerCallback):
        """Time at the end of every iteration's last optimizer step; the logged completion lengths."""

        def __init__(self):
            self.marks: list[float] = []
            self.logs: list[dict] = []
            self.profiler = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % per_iteration == 0:
                synchronize(device)
                self.marks.append(time.perf_counter())
                if len(self.marks) == 1:
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
        max_steps=(1 + spec.repeats) * per_iteration,
        model_init_kwargs={"dtype": spec.dtype},
        gradient_checkpointing=False,
        bf16=False,
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
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir, padding_side="left")
    clock = IterationClock()
    trainer = GRPOTrainer(
        model=spec.model_dir,
        reward_funcs=letter_e_share,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": spec.prompt_texts()}),
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    seconds = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    lengths = [log for log in clock.logs if "completions/mean_length" in log]
    mean_length = lengths[-1]["completions/mean_length"] if lengths else float("nan")
    min_length = lengths[-1]["completions/min_length"] if lengths else float("nan")
    return {
        "seconds": seconds,
        "tokens": [round(mean_length * spec.rollouts)] * len(seconds),
        "min_length": min_length,
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
    prefs = [
        Preference(id=f"q{i}", prompt=prompts[i % len(prompts)], chosen=RM_RESPONSES[i % 4],
                   rejected=RM_RESPONSES[i % 4].split(".")[0] + ".", aspect="preference")
        for i in range(12)
    ]
    write_records(root / "prefs.jsonl", prefs)
    out = {}
    for aspect, data in (("factuality", "spans.jsonl"), ("relevance", "spans.jsonl"), ("completeness", "prefs.jsonl")):
        cfg = build_config(
            TrainRMConfig, aspect=aspect, data=str(root / data), model=spec.rm_backbone, out=str(root / aspect),
            max_steps=2, batch_size=4, max_length=256, eval_fraction=0.0, device=spec.device, dtype=spec.dtype,
        )
        run_train_rm(cfg)
        out[aspect] = str(root / aspect)
    return out


def run_rm_costs(spec: BenchSpec) -> dict:
    """Score-only and whole-iteration seconds of: completeness alone, three RMs, completeness redistributed."""
    from rlhfkit.generation import SamplingConfig, generate
    from rlhfkit.rewards.sources import build_reward_sources
    from rlhfkit.stages.ppo import score_rollout

    rms = train_reward_models(spec)
    one = {"completeness": 1.0}
    three = {"factuality": 0.3, "relevance": 0.5, "completeness": 0.3}
    setups = {
        "comp": (one, {}),
        "fact+rel+comp": (three, {}),
        "comp redistributed": (one, {"completeness": "token"}),
    }
    cfgs = {
        name: rlhfkit_config(
            spec, "grpo", ",".join(f"{k}={v}" for k, v in weights.items()), [f"{k}={rms[k]}" for k in weights],
            [f"{k}:{g}" for k, g in redistribute.items()],
        )
        for name, (weights, redistribute) in setups.items()
    }
    trainers = {}
    for name, cfg in cfgs.items():
        from rlhfkit.models import resolve_device
        from rlhfkit.rewards.sources import parse_named, parse_redistribute, parse_weights

        sources = build_reward_sources(
            parse_weights(cfg.rewards), parse_named(cfg.rm, "--rm"), parse_redistribute(cfg.redistribute),
            device=resolve_device(cfg.device), dtype=cfg.dtype, batch_size=cfg.rm_batch_size,
        )
        trainers[name] = RlhfkitTrainer(cfg, sources)

    prompts = spec.prompt_texts()
    expanded = [p for p in prompts for _ in range(spec.samples_per_prompt)]
    first = next(iter(trainers.values()))
    rollout = generate(
        first.bundle.policy, first.bundle.tokenizer, expanded,
        SamplingConfig(spec.new_tokens, spec.temperature, spec.top_k, 1.0, do_sample=True),
        max_prompt_length=64, is_encoder_decoder=first.bundle.is_encoder_decoder,
    )
    score_seconds: dict[str, list[float]] = {name: [] for name in setups}
    iteration_seconds: dict[str, list[float]] = {name: [] for name in setups}
    profiler = None
    for repeat in range(1 + spec.repeats):  # the first round is the warm-up
        if repeat == 1:
            profiler = start_profile(spec)
        for name, trainer in trainers.items():  # interleaved, so background load hits all alike
            synchronize(trainer.device)
            started = time.perf_counter()
            score_rollout(trainer.sources, trainer.weights, rollout, trainer.cfg)
            synchronize(trainer.device)
            if repeat:
                score_seconds[name].append(time.perf_counter() - started)
        for name, trainer in trainers.items():
            seconds, _ = trainer.iteration(prompts)
            if repeat:
                iteration_seconds[name].append(seconds)
    stop_profile(profiler, spec, "rm-costs")
    return {"score_seconds": score_seconds, "iteration_seconds": iteration_seconds,
            "response_tokens": int(rollout.response_mask.sum())}


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
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(35)
    path = Path(spec.profile_dir) / f"profile-{name}.txt"
    path.write_text(out.getvalue())
    print(f"profile of {name}'s timed part: {path}", file=sys.stderr)


WORKERS = {
    "trl-grpo": run_trl_iterations,
    "rlhfkit-grpo": lambda spec: run_rlhfkit_iterations(spec, "grpo"),
    "rlhfkit-gae": lambda spec: run_rlhfkit_iterations(spec, "gae"),
    "rm-costs": run_rm_costs,
}


def worker_main(name: str, spec_path: str, result_path: str) -> int:
    spec = BenchSpec(**json.loads(Path(spec_path).read_text()))
    start_worker(spec)
    result = WORKERS[name](spec)
    Path(result_path).write_text(json.dumps(result))
    return 0


# --- driver side --------------------------------------------------------------------------------


def run_worker(name: str, spec: BenchSpec, root: Path) -> dict:
    """Run one configuration in a fresh interpreter; its output is shown only if it fails."""
    workdir = root / name.replace(" ", "-")
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = workdir / "spec.json", workdir / "result.json"
    spec_path.write_text(json.dumps(asdict(BenchSpec(**{**asdict(spec), "workdir": str(workdir)}))))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads), "MKL_NUM_THREADS": str(spec.threads)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", name, str(spec_path), str(result_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True,
    )
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-5000:] + done.stderr[-10000:])
        raise SystemExit(f"benchmark worker '{name}' failed (exit {done.returncode})")
    result = json.loads(result_path.read_text())
    result["wall"] = time.perf_counter() - started
    return result


def build_model(root: Path, size: str) -> Path:
    from rlhfkit.config import build_config
    from rlhfkit.stages.init_model import InitModelConfig, run_init_model

    return run_init_model(build_config(InitModelConfig, out=str(root / f"policy-{size}"), arch="gpt2", **MODEL_SIZES[size]))


@dataclass
class IterationRow:
    name: str
    seconds: list[float]
    tokens: list[int]
    peak_memory: int

    @property
    def tokens_per_second(self) -> float:
        return statistics.median(t / s for t, s in zip(self.tokens, self.seconds))


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def print_report(spec: BenchSpec, size: str, rows: list[IterationRow], trl_min_length, rm: Optional[dict], threads: int, device: str) -> None:
    import torch
    import transformers
    import trl
    from rich.console import Console
    from rich.table import Table

    out = Console(width=160)
    memory_kind = "CUDA max allocated" if device.startswith("cuda") else "peak RSS - RSS after imports"
    title = (
        f"one PPO iteration (generate + score + {spec.updates_per_iteration} optimizer steps): {spec.prompts} prompts x "
        f"{spec.samples_per_prompt} samples x {spec.new_tokens} new tokens, {size} GPT-2, {device} {spec.dtype}, "
        f"{threads} torch thread(s); median of {spec.repeats} after 1 warm-up"
    )
    table = Table(title=title, title_justify="left")
    for column in ("configuration", "tokens/s", "s / iteration (each)", f"peak memory ({memory_kind})", "vs TRL tokens/s"):
        table.add_column(column)
    trl_rate = next(r.tokens_per_second for r in rows if r.name == "trl-grpo")
    for row in rows:
        table.add_row(
            row.name,
            f"{row.tokens_per_second:,.0f}",
            f"{statistics.median(row.seconds):.2f} (" + " ".join(f"{s:.2f}" for s in row.seconds) + ")",
            mib(row.peak_memory),
            f"{row.tokens_per_second / trl_rate:.2f}x",
        )
    out.print(table)
    out.print(
        f"generated tokens per iteration: " + ", ".join(f"{r.name} {statistics.median(r.tokens)}" for r in rows)
        + f" (TRL shortest completion: {trl_min_length:g} tokens)"
    )
    goal = min(r.tokens_per_second for r in rows if r.name == "rlhfkit-grpo") / trl_rate
    out.print(f"goal rlhfkit (grpo) >= 1.5x TRL tokens/s: {goal:.2f}x -> {'met' if goal >= 1.5 else 'NOT met'}")
    if rm:
        score, iteration = rm["score_seconds"], rm["iteration_seconds"]
        med = {k: statistics.median(v) for k, v in score.items()}
        it = {k: statistics.median(v) for k, v in iteration.items()}
        table = Table(title=f"reward-model cost ({rm['response_tokens']} response tokens per batch; median of {spec.repeats})", title_justify="left")
        for column in ("reward sources", "score only, s (each)", "whole grpo iteration, s (each)"):
            table.add_column(column)
        for name in score:
            table.add_row(
                name,
                f"{med[name]:.3f} (" + " ".join(f"{s:.3f}" for s in score[name]) + ")",
                f"{it[name]:.2f} (" + " ".join(f"{s:.2f}" for s in iteration[name]) + ")",
            )
        out.print(table)
        three = med["fact+rel+comp"] / med["comp"]
        redistributed = med["comp redistributed"] / med["comp"]
        out.print(
            f"three RMs / one: score only {three:.2f}x, whole iteration "
            f"{it['fact+rel+comp'] / it['comp']:.2f}x -> goal <= 1.3x {'met' if three <= 1.3 else 'NOT met'} (score only)"
        )
        out.print(
            f"redistributed / plain: score only {redistributed:.2f}x, whole iteration "
            f"{it['comp redistributed'] / it['comp']:.2f}x -> goal <= 1.05x {'met' if redistributed <= 1.05 else 'NOT met'} (score only)"
        )
    out.print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
              f"{os.cpu_count()} CPUs, torch threads {threads} (torch.set_num_threads in every worker)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on supporting GPUs), float32, bfloat16")
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="tiny",
                        help="tiny: 4 layers x 128 (CPU); small: 12 layers x 768 (GPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (1: stable numbers on a shared machine)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64, help="response length, forced on both sides")
    parser.add_argument("--minibatch", type=int, default=8, help="rollouts per optimizer step")
    parser.add_argument("--epochs", type=int, default=2, help="passes over each rollout batch (TRL num_iterations)")
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations per configuration, after one warm-up")
    parser.add_argument("--skip-rm-costs", action="store_true", help="only the TRL comparison")
    parser.add_argument("--profile-dir", help="write a cProfile of each worker's timed part here")
    parser.add_argument("--worker", nargs=3, metavar=("NAME", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)

    from rlhfkit.models import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = {v: k for k, v in __import__("rlhfkit.models", fromlist=["DTYPES"]).DTYPES.items()}[resolve_dtype(args.dtype, device)]
    if (args.prompts * args.samples_per_prompt) % args.minibatch:
        raise SystemExit("--minibatch must divide --prompts x --samples-per-prompt")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-ppo-") as tmp:
        root = Path(tmp)
        policy = build_model(root, args.model_size)
        rm_backbone = policy if args.model_size == "tiny" else build_model(root, "tiny")
        spec = BenchSpec(
            model_dir=str(policy), rm_backbone=str(rm_backbone), workdir=str(root), device=str(device), dtype=dtype,
            threads=args.threads, prompts=args.prompts, samples_per_prompt=args.samples_per_prompt,
            new_tokens=args.new_tokens, minibatch=args.minibatch, epochs=args.epochs, repeats=args.repeats,
            profile_dir=str(Path(args.profile_dir).resolve()) if args.profile_dir else None,
        )
        rows, trl_min_length, threads = [], None, None
        for name in ITERATION_CONFIGS:
            result = run_worker(name, spec, root)
            rows.append(IterationRow(name, result["seconds"], result["tokens"], result["peak_memory"]))
            trl_min_length = result.get("min_length", trl_min_length)
            threads = result["threads"]
        rm = None if args.skip_rm_costs else run_worker("rm-costs", spec, root)
    print_report(spec, args.model_size, rows, trl_min_length, rm, threads, str(device))
    print(f"total bench time {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
