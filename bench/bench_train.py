"""Training-loop throughput against TRL, and FLOP/s against the matmul peak (`make bench-train`).

SFT: rlhfkit's loop (rlhfkit.training.fit with the sft stage's collate and loss) against
TRL's SFTTrainer. Both get the same tiny GPT-2 (built by `rlhfkit init-model`'s code into a
temporary directory), the same token sequences (the QA-Feedback demonstrations, tokenized and
truncated once by rlhfkit and handed to TRL as `input_ids` + `labels`, so the supervised
tokens are identical), batch size, max length, steps, optimizer (fused AdamW, TRL's default)
and LR schedule. TRL is set up like-for-like: completion-only loss, no activation
checkpointing (TRL turns it on by default; rlhfkit does not checkpoint), no packing, no
padding-free batches, dynamic padding, no evaluation, no logging, no saving, report_to none.

Reward model: rlhfkit's Bradley-Terry loop (fit with the train-rm stage's collate and loss)
against TRL's RewardTrainer on the same non-tie QA-Feedback preference pairs, encoded once by
rlhfkit (prompt + separator + response, prompt cut from the left) and handed to TRL as
`chosen_ids` / `rejected_ids`, so both score identical token sequences. Like-for-like, every
pair is its own item on both sides (rlhfkit's default groups a prompt's pairs so each
response is scored once; that row is shown separately, in pairs/s): same tiny GPT-2 with a
1-output head, batch of pairs, steps, AdamW, linear schedule; TRL with dropout kept (as
rlhfkit trains), no padding to a multiple, no centering term, no evaluation/logging/saving.

Each side runs in its own worker process (one per side for the whole run, so each keeps its
own process-wide settings: rlhfkit's model loader tunes glibc malloc on CPU, TRL runs with
the defaults), and trials alternate between the two so background load hits both alike; the
table shows the median trial. Each side's samples/s is timed from the end of its first
(warm-up) optimizer step to the end of its last. On CPU the main figure uses the process's CPU
time with one torch thread (--threads 1, the default there): that is the work done, whatever
else the machine runs; wall-clock samples/s and the system share of the CPU time are shown
beside it. On CUDA (--device cuda) only wall time means anything (the clock synchronizes the
device).

FLOP/s (models of >= 20M parameters, rlhfkit only): `rlhfkit sft` on a 28M-parameter GPT-2
built by init-model's code (8 layers x 512, 8 heads) and `rlhfkit train-rm` of a preference RM
on the pretrained all-MiniLM-L6-v2 encoder (22.7M), each with its stage's defaults (length-
grouped batches; preferences grouped by prompt). The FLOPs are those torch's FlopCounterMode
counts in the matmuls and attention of the timed steps themselves (forward and backward, padded
positions included), divided by their CPU time (wall time on CUDA) and set against the peak of a
square torch.mm in the compute dtype (fp32 on CPU, bf16 on a GPU with --dtype bfloat16) on the
same threads, measured in the same run (best of a few).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from rich.console import Console
from rich.table import Table

from rlhfkit.config import build_config
from rlhfkit.finetune import SFTExample, encode_demonstration, make_collate, make_loss_fn
from rlhfkit.models import (
    count_parameters,
    load_policy,
    load_pretrained,
    load_tokenizer,
    reuse_freed_cpu_memory,
)
from rlhfkit.rewards.data import Comparison, PreferenceGroup, encode_preference_groups, example_rows
from rlhfkit.rewards.data import make_collate as make_rm_collate
from rlhfkit.rewards.losses import make_loss_fn as make_rm_loss_fn
from rlhfkit.rewards.reward_model import encode_pair, reward_model_class
from rlhfkit.runs import RunDir
from rlhfkit.schema import load_records
from rlhfkit.stages.annotate_import import ImportConfig, run_import
from rlhfkit.stages.init_model import InitModelConfig, run_init_model
from rlhfkit.training import LoopSettings, fit

REPO_ROOT = Path(__file__).resolve().parent.parent
QA_FEEDBACK = REPO_ROOT / "data/qa_feedback/feedback.json"
LR = 5e-5
# The >= 20M-parameter models of the FLOP/s section and the settings their stages train them with.
LARGE_GPT2 = {"n_layer": 8, "n_embd": 512, "n_head": 8}  # 28.4M parameters with the 4,096-token vocabulary
LARGE_SFT = {"batch_size": 4, "max_length": 512}  # `rlhfkit sft`'s default batch; the SFT row's max length
# The completeness RM of recipes/qa_feedback/tiny/rm_completeness.yaml (minilm).
LARGE_RM = {"batch_size": 4, "max_length": 224, "max_prompt_length": 96}
GOAL_OF_PEAK = {"cpu": 0.25, "cuda": 0.40}
PEAK_SIZE = {"cpu": 2048, "cuda": 8192}  # square matmuls that saturate the bench's threads / a GPU


@dataclass
class Reading:
    wall: float
    cpu: float  # process CPU time, user + system
    system: float  # its system (kernel) part: page faults, allocation


@dataclass
class Rate:
    """samples/s of one trial: by CPU time of the process and by wall time."""

    cpu: float
    wall: float
    system_share: float  # of the CPU time


@dataclass
class BenchRow:
    section: str
    setting: str
    rlhfkit: list[Rate]  # one per trial
    trl: list[Rate]

    def median(self, side: str, basis: str) -> float:
        return statistics.median(getattr(r, basis) for r in getattr(self, side))

    def ratio(self, basis: str) -> float:
        return self.median("rlhfkit", basis) / self.median("trl", basis)


@dataclass
class Device:
    """Where and in what precision both sides train."""

    name: str  # "cpu" or "cuda"
    dtype: str  # "float32" or "bfloat16" (autocast over fp32 weights on both sides)

    @property
    def basis(self) -> str:
        return "cpu" if self.name == "cpu" else "wall"

    def sync(self) -> None:
        if self.name != "cpu":
            torch.cuda.synchronize()

    def now(self) -> Reading:
        self.sync()
        return Reading(time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_stime)

    def seconds(self, start: Reading, end: Reading) -> float:
        """The time the figures use: CPU time on CPU, wall time on CUDA."""
        return getattr(end, self.basis) - getattr(start, self.basis)


def rate(samples: float, start: Reading, end: Reading) -> Rate:
    cpu = end.cpu - start.cpu
    return Rate(cpu=samples / cpu, wall=samples / (end.wall - start.wall), system_share=(end.system - start.system) / cpu)


def trl_precision(device: Device) -> dict:
    """TRL's settings for `device`: fp32 weights, bf16 autocast when asked (as rlhfkit's fit)."""
    return {"use_cpu": device.name == "cpu", "bf16": device.dtype == "bfloat16", "fp16": False}


def loop_settings(workdir: Path, device: Device, **kwargs) -> LoopSettings:
    return LoopSettings(out=workdir, lr=LR, compute_dtype=getattr(torch, device.dtype), **kwargs)


def step_clock(device: Device):
    """A TrainerCallback that reads the clocks after optimizer step 1 (.start) and after the last (.end)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        start = end = None

        def on_step_end(self, args, state, control, **kwargs):
            now = device.now()
            if state.global_step == 1:
                self.start = now
            self.end = now

    return StepClock()


def build_model(workdir: Path, arch: str = "gpt2", **sizes) -> Path:
    """A model with `rlhfkit init-model`'s defaults (tokenizer trained on the shipped data), or `sizes`."""
    name = "-".join([arch, *(f"{k}{v}" for k, v in sizes.items())])
    return run_init_model(build_config(InitModelConfig, out=str(workdir / name), arch=arch, **sizes))


def import_qa_feedback(workdir: Path) -> Path:
    """`rlhfkit annotate-import --format qa-feedback data/qa_feedback/feedback.json`."""
    out = workdir / "import"
    run_import(build_config(ImportConfig, format="qa-feedback", inputs=[str(QA_FEEDBACK)], out=str(out)))
    return out


# --- the two sides' worker processes ---------------------------------------------------------


def start_worker(threads: int | None, reuse_freed_memory: bool = False) -> ProcessPoolExecutor:
    """A fresh interpreter (spawned, not forked) that runs one side's trials, one call at a time.

    `reuse_freed_memory`: apply rlhfkit's malloc setting (models.reuse_freed_cpu_memory) from
    the start, as rlhfkit's model loader does in its own worker (--same-malloc, for TRL's).
    """
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(1, mp_context=context, initializer=_start_worker, initargs=(threads, reuse_freed_memory))


def _start_worker(threads: int | None, reuse_freed_memory: bool) -> None:
    if threads:
        torch.set_num_threads(threads)
    if reuse_freed_memory:
        reuse_freed_cpu_memory()


def call(worker: ProcessPoolExecutor, function: Callable, *args, **kwargs):
    return worker.submit(function, *args, **kwargs).result()


# --- rlhfkit's loop, timed (and its FLOPs counted) over steps 2..N ----------------------------


@dataclass
class LoopWindow:
    """What steps 2..N of one `fit` did: items (examples or pairs), batch positions, real tokens, FLOPs, clocks."""

    items: int
    positions: int
    tokens: int
    flops: int
    start: Reading
    end: Reading


class _WindowedCollate:
    """A loop's collate that opens the window at its second call (optimizer step 1 is done)."""

    def __init__(self, collate: Callable, count: Callable[[list], int], device: Device, counter):
        self.collate, self.count, self.device, self.counter = collate, count, device, counter
        self.calls = self.items = self.positions = self.tokens = self.flops_at_start = 0
        self.start: Reading | None = None

    def __call__(self, items: list) -> dict:
        self.calls += 1
        batch = self.collate(items)
        if self.calls == 2:
            self.flops_at_start = self.counter.get_total_flops() if self.counter is not None else 0
            self.start = self.device.now()
        if self.calls >= 2:
            self.items += self.count(items)
            self.positions += batch["input_ids"].numel()
            self.tokens += int(batch["attention_mask"].sum())
        return batch


def flop_counter():
    """torch's FlopCounterMode, which also counts the CPU flash-attention kernels (unregistered in torch)."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    return flop_counter.FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: flop_counter.sdpa_flop.__wrapped__,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: flop_counter.sdpa_backward_flop.__wrapped__,
    })


def fit_window(
    model, items: list, collate: Callable, loss_fn: Callable, settings: LoopSettings, device: Device, *,
    count: Callable[[list], int] = len, count_flops: bool = False, item_lengths: list | None = None,
) -> LoopWindow:
    """rlhfkit's `fit` over `items`, measured from the end of optimizer step 1 to the end."""
    counter = flop_counter() if count_flops else None
    windowed = _WindowedCollate(collate, count, device, counter)
    run = RunDir(settings.out, "bench", BenchSettings(settings.batch_size, settings.max_steps, settings.lr, settings.seed))
    with counter if counter is not None else contextlib.nullcontext():
        fit(model, items, windowed, loss_fn, settings, run, item_lengths=item_lengths)
        flops = counter.get_total_flops() - windowed.flops_at_start if counter is not None else 0
    return LoopWindow(windowed.items, windowed.positions, windowed.tokens, flops, windowed.start, device.now())


@dataclass
class BenchSettings:
    """What run_config.json records for a timed rlhfkit run."""

    batch_size: int
    max_steps: int
    lr: float
    seed: int


# --- SFT ------------------------------------------------------------------------------------


def time_rlhfkit_sft(model_dir: Path, examples: list[SFTExample], *, batch_size: int, steps: int, seed: int, workdir: Path, device: Device) -> Rate:
    model, tokenizer, _ = load_policy(model_dir, dtype="float32", device=device.name)
    settings = loop_settings(workdir, device, batch_size=batch_size, max_steps=steps, seed=seed)
    window = fit_window(model, examples, make_collate(tokenizer.pad_token_id, False), make_loss_fn(model, False), settings, device)
    return rate(window.items, window.start, window.end)


def trl_loop_args(workdir: Path, *, batch_size: int, max_length: int, steps: int, seed: int, device: Device) -> dict:
    """The TRL training arguments both loops share, set like for like with rlhfkit's loop."""
    return {
        "output_dir": str(workdir),
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        "learning_rate": LR,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "max_length": max_length,
        # TRL turns activation checkpointing on by default (recomputes the forward in the
        # backward pass); rlhfkit does not checkpoint, so neither does TRL here.
        "activation_checkpointing": False,
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        **trl_precision(device),
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
        "seed": seed,
    }


def time_trl_sft(model_dir: Path, examples: list[SFTExample], *, batch_size: int, max_length: int, steps: int, seed: int, workdir: Path, device: Device) -> Rate:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(model_dir)
    dataset = Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})
    args = SFTConfig(
        **trl_loop_args(workdir, batch_size=batch_size, max_length=max_length, steps=steps, seed=seed, device=device),
        packing=False,
        padding_free=False,
        completion_only_loss=True,
    )
    clock = step_clock(device)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    return rate((steps - 1) * batch_size, clock.start, clock.end)


def encode_demonstrations(model_dir: Path, demonstrations_file: Path, max_length: int) -> list[SFTExample]:
    tokenizer = load_tokenizer(model_dir)
    return [encode_demonstration(tokenizer, r.prompt, r.response, max_length, False) for r in load_records(demonstrations_file, "demonstration")]


def bench_sft(
    workers: tuple[ProcessPoolExecutor, ProcessPoolExecutor],
    model_dir: Path,
    demonstrations_file: Path,
    *,
    batch_size: int = 8,
    max_length: int = 512,
    steps: int = 20,
    trials: int = 3,
    seed: int = 0,
    workdir: Path,
    device: Device,
) -> BenchRow:
    """samples/s of rlhfkit's and TRL's SFT loops, `trials` alternating runs each."""
    examples = encode_demonstrations(model_dir, demonstrations_file, max_length)
    if len(examples) < batch_size * steps:
        raise SystemExit(f"{len(examples)} demonstrations are too few for {steps} steps of {batch_size} in one epoch")
    mean_tokens = sum(len(e.input_ids) for e in examples) / len(examples)
    mean_targets = sum(sum(1 for t in e.labels if t != -100) for e in examples) / len(examples)
    ours, theirs = [], []
    common = {"batch_size": batch_size, "steps": steps, "seed": seed, "device": device}
    for trial in range(trials):
        ours.append(call(workers[0], time_rlhfkit_sft, model_dir, examples, workdir=workdir / f"rlhfkit-{trial}", **common))
        theirs.append(call(workers[1], time_trl_sft, model_dir, examples, max_length=max_length, workdir=workdir / f"trl-{trial}", **common))
    setting = (
        f"batch {batch_size}, max length {max_length}, {steps} steps; {len(examples)} QA demos, "
        f"mean {mean_tokens:.0f} tokens ({mean_targets:.0f} supervised)"
    )
    return BenchRow("sft", setting, ours, theirs)


# --- reward model -------------------------------------------------------------------------


def load_reward_backbone(model_dir: Path):
    """The tiny GPT-2 with a 1-output head as TRL's side loads it (its head initialised from seed 0)."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_rlhfkit_reward_backbone(backbone: str | Path, device: Device):
    """A preference RM's backbone as `rlhfkit train-rm` loads it (its head initialised from seed 0)."""
    tokenizer = load_tokenizer(str(backbone), padding_side="right")
    torch.manual_seed(0)
    model = load_pretrained(reward_model_class("preference"), str(backbone), dtype="float32", device=device.name, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def pairs_of(groups: list) -> int:
    return sum(len(g.comparisons) for g in groups)


def time_rlhfkit_reward(model_dir: Path, groups: list, *, batch_size: int, steps: int, seed: int, workdir: Path, device: Device) -> Rate:
    """Pairs/s of rlhfkit's RM loop; `groups` are rlhfkit.rewards.data.PreferenceGroup items."""
    model, tokenizer = load_rlhfkit_reward_backbone(model_dir, device)
    settings = loop_settings(workdir, device, batch_size=batch_size, max_steps=steps, seed=seed)
    collate, loss_fn = make_rm_collate("preference", tokenizer.pad_token_id), make_rm_loss_fn("preference", 1.0)
    window = fit_window(model, groups, collate, loss_fn, settings, device, count=pairs_of)
    return rate(window.items, window.start, window.end)


def time_trl_reward(model_dir: Path, pairs: list[tuple[list[int], list[int]]], *, batch_size: int, max_length: int, steps: int, seed: int, workdir: Path, device: Device) -> Rate:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    model, tokenizer = load_reward_backbone(model_dir)
    dataset = Dataset.from_dict({"chosen_ids": [c for c, _ in pairs], "rejected_ids": [r for _, r in pairs]})
    args = RewardConfig(
        **trl_loop_args(workdir, batch_size=batch_size, max_length=max_length, steps=steps, seed=seed, device=device),
        disable_dropout=False,
        pad_to_multiple_of=None,
        center_rewards_coefficient=None,
    )
    clock = step_clock(device)
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    return rate((steps - 1) * batch_size, clock.start, clock.end)


def bench_reward(
    workers: tuple[ProcessPoolExecutor, ProcessPoolExecutor],
    model_dir: Path,
    preferences_file: Path,
    *,
    batch_size: int = 8,
    max_length: int = 384,
    steps: int = 20,
    trials: int = 3,
    seed: int = 0,
    workdir: Path,
    device: Device,
) -> list[BenchRow]:
    """Pairs/s of rlhfkit's and TRL's reward-model loops: per pair, and rlhfkit grouped by prompt."""
    tokenizer = load_tokenizer(model_dir)
    records = [r for r in load_records(preferences_file, "preference") if not r.tie]
    pairs, kept = [], []
    for r in records:
        chosen, rejected = (encode_pair(tokenizer, r.prompt, text, max_length) for text in (r.chosen, r.rejected))
        if chosen is not None and rejected is not None:
            pairs.append((chosen.input_ids, rejected.input_ids))
            kept.append(r)
    if len(pairs) < batch_size * steps:
        raise SystemExit(f"{len(pairs)} preference pairs are too few for {steps} steps of {batch_size} in one epoch")
    per_pair = [PreferenceGroup([c, r], [Comparison(0, 1, 0.0, False)]) for c, r in pairs]
    grouped, _ = encode_preference_groups(functools.partial(encode_pair, tokenizer, max_length=max_length), kept)
    pairs_per_group = pairs_of(grouped) / len(grouped)
    # Enough prompts per grouped micro-batch to hold at least batch_size pairs on average.
    group_batch = math.ceil(batch_size / pairs_per_group)
    mean_tokens = sum(len(c) + len(r) for c, r in pairs) / (2 * len(pairs))
    ours, grouped_ours, theirs = [], [], []
    common = {"steps": steps, "seed": seed, "device": device}
    for trial in range(trials):
        ours.append(call(workers[0], time_rlhfkit_reward, model_dir, per_pair, batch_size=batch_size, workdir=workdir / f"rlhfkit-{trial}", **common))
        theirs.append(call(workers[1], time_trl_reward, model_dir, pairs, batch_size=batch_size, max_length=max_length, workdir=workdir / f"trl-{trial}", **common))
        grouped_ours.append(call(workers[0], time_rlhfkit_reward, model_dir, grouped, batch_size=group_batch, workdir=workdir / f"rlhfkit-grouped-{trial}", **common))
    setting = f"batch {batch_size} pairs, max length {max_length}, {steps} steps; {len(pairs)} non-tie QA pairs, mean {mean_tokens:.0f} tokens"
    grouped_setting = f"rlhfkit grouped by prompt ({group_batch} prompts ~ {group_batch * pairs_per_group:.0f} pairs per batch) vs TRL per pair"
    return [BenchRow("reward (pairs/s)", setting, ours, theirs), BenchRow("reward (pairs/s)", grouped_setting, grouped_ours, theirs)]


# --- FLOP/s of >= 20M-parameter models against the matmul peak ---------------------------------


@dataclass
class Utilisation:
    stage: str
    setting: str
    parameters: int
    steps: int  # timed
    window: LoopWindow
    seconds: float
    peak: float  # FLOP/s

    @property
    def achieved(self) -> float:
        return self.window.flops / self.seconds

    @property
    def fraction(self) -> float:
        return self.achieved / self.peak


def matmul_peak(device: Device, repeats: int = 5) -> float:
    """FLOP/s of a square torch.mm in the compute dtype on this worker's threads: best of `repeats`."""
    n = PEAK_SIZE[device.name]
    a, b = (torch.randn(n, n, device=device.name, dtype=getattr(torch, device.dtype)) for _ in range(2))
    per_round = 2 if device.name == "cpu" else 50  # ~0.4 s on one CPU thread, ~0.1 s on an H100
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        start = device.now()
        for _ in range(per_round):
            torch.mm(a, b)
        best = max(best, 2 * n**3 * per_round / device.seconds(start, device.now()))
    return best


def sft_utilisation(
    model_dir: Path, demonstrations_file: Path, *, steps: int, seed: int, workdir: Path, device: Device, batch_size: int | None = None,
) -> Utilisation:
    """`rlhfkit sft`'s loop on the large GPT-2 (its defaults: length-grouped batches), FLOPs counted."""
    model, tokenizer, _ = load_policy(model_dir, dtype="float32", device=device.name)
    examples = encode_demonstrations(model_dir, demonstrations_file, LARGE_SFT["max_length"])
    batch_size = batch_size or LARGE_SFT["batch_size"]
    settings = loop_settings(workdir, device, batch_size=batch_size, max_steps=steps, seed=seed, group_by_length=True)
    window = fit_window(
        model, examples, make_collate(tokenizer.pad_token_id, False), make_loss_fn(model, False), settings, device,
        count_flops=True, item_lengths=[[len(e.input_ids)] for e in examples],
    )
    setting = f"init-model GPT-2 {LARGE_GPT2['n_layer']} x {LARGE_GPT2['n_embd']}, batch {batch_size}, max length {LARGE_SFT['max_length']}"
    return Utilisation("sft", setting, count_parameters(model).total, steps - 1, window, device.seconds(window.start, window.end), matmul_peak(device))


def reward_utilisation(
    backbone: str, preferences_file: Path, *, steps: int, seed: int, workdir: Path, device: Device, batch_size: int | None = None,
) -> Utilisation:
    """`rlhfkit train-rm`'s preference loop on `backbone` (grouped by prompt, length-grouped), FLOPs counted."""
    batch_size = batch_size or LARGE_RM["batch_size"]
    model, tokenizer = load_rlhfkit_reward_backbone(backbone, device)
    encode = functools.partial(encode_pair, tokenizer, max_length=LARGE_RM["max_length"], max_prompt_length=LARGE_RM["max_prompt_length"])
    groups, _ = encode_preference_groups(encode, load_records(preferences_file, "preference"))
    settings = loop_settings(workdir, device, batch_size=batch_size, max_steps=steps, seed=seed, group_by_length=True)
    window = fit_window(
        model, groups, make_rm_collate("preference", tokenizer.pad_token_id), make_rm_loss_fn("preference", 1.0),
        settings, device, count=pairs_of, count_flops=True, item_lengths=[example_rows(g) for g in groups],
    )
    setting = (
        f"{backbone} preference RM, batch {batch_size} prompts (all their pairs), max length {LARGE_RM['max_length']}, "
        f"prompt {LARGE_RM['max_prompt_length']}"
    )
    return Utilisation("train-rm", setting, count_parameters(model).total, steps - 1, window, device.seconds(window.start, window.end), matmul_peak(device))


# --- report ---------------------------------------------------------------------------------


def print_table(out: Console, rows: list[BenchRow], device: Device, steps: int) -> None:
    basis = device.basis
    on_cpu = device.name == "cpu"
    table = Table(
        title=(
            f"training loops, {device.name} {device.dtype}: samples/s "
            f"({'by process CPU time' if on_cpu else 'by wall time'}) over steps 2-{steps}, median of trials"
        ),
        title_justify="left",
    )
    columns = ["section", "setting", "rlhfkit", "TRL", "rlhfkit / TRL", "trials rlhfkit | TRL"]
    if on_cpu:
        columns += ["wall: rlhfkit | TRL", "wall ratio", "system share of CPU time: rlhfkit | TRL"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("section", "setting") else "right")
    for row in rows:
        cells = [
            row.section,
            row.setting,
            f"{row.median('rlhfkit', basis):.2f}",
            f"{row.median('trl', basis):.2f}",
            f"{row.ratio(basis):.2f}x",
            " ".join(f"{getattr(v, basis):.2f}" for v in row.rlhfkit) + " | " + " ".join(f"{getattr(v, basis):.2f}" for v in row.trl),
        ]
        if on_cpu:
            cells += [
                f"{row.median('rlhfkit', 'wall'):.2f} | {row.median('trl', 'wall'):.2f}", f"{row.ratio('wall'):.2f}x",
                f"{row.median('rlhfkit', 'system_share'):.0%} | {row.median('trl', 'system_share'):.0%}",
            ]
        table.add_row(*cells)
    out.print(table)
    like_for_like = [row for row in rows if "grouped" not in row.setting]
    for row in like_for_like:
        verdict = "met" if row.ratio(basis) >= 1.0 else "NOT met"
        out.print(f"goal: rlhfkit {row.section} at least as fast as TRL: {row.ratio(basis):.2f}x -> {verdict}")


def print_utilisation(out: Console, rows: list[Utilisation], device: Device) -> None:
    clock = "CPU time" if device.name == "cpu" else "wall time, CUDA synchronized"
    table = Table(
        title=(
            f"FLOP/s of rlhfkit's training loops on >= 20M-parameter models, {device.name} {device.dtype}: FLOPs counted by "
            f"torch's FlopCounterMode over the timed steps (forward + backward, padding included) / {clock}, against "
            f"the best square torch.mm ({PEAK_SIZE[device.name]}, {device.dtype}) measured in the same worker"
        ),
        title_justify="left",
    )
    for column in ("stage", "setting", "parameters", "timed steps", "positions / step (real tokens)", "GFLOP / step",
                   "achieved GFLOP/s", "peak GFLOP/s", "of peak"):
        table.add_column(column, justify="left" if column in ("stage", "setting") else "right")
    for u in rows:
        w = u.window
        table.add_row(
            u.stage, u.setting, f"{u.parameters / 1e6:.1f}M", str(u.steps), f"{w.positions / u.steps:,.0f} ({w.tokens / u.steps:,.0f})",
            f"{w.flops / u.steps / 1e9:,.1f}", f"{u.achieved / 1e9:,.1f}", f"{u.peak / 1e9:,.1f}", f"{u.fraction:.0%}",
        )
    out.print(table)
    goal = GOAL_OF_PEAK[device.name]
    for u in rows:
        out.print(f"goal: rlhfkit {u.stage} at >= {goal:.0%} of the matmul peak: {u.fraction:.0%} -> {'met' if u.fraction >= goal else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="float32, or bfloat16 autocast over fp32 weights on both sides (GPU)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--rm-max-length", type=int, default=384, help="max length of the reward-model benchmark")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per trial (the first is warm-up)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--large-steps", type=int, default=3, help="optimizer steps of each FLOP/s run (the first is warm-up)")
    parser.add_argument("--large-batch-size", type=int, default=None,
                        help=f"batch of the FLOP/s runs (default: the stages' defaults, sft {LARGE_SFT['batch_size']} demonstrations, "
                             f"train-rm {LARGE_RM['batch_size']} prompts; a GPU needs far more to be busy)")
    parser.add_argument("--large-rm", default="minilm", help="backbone of the FLOP/s section's reward model (default: all-MiniLM-L6-v2)")
    parser.add_argument("--skip-large", action="store_true", help="leave out the FLOP/s section")
    parser.add_argument("--skip-trl", action="store_true", help="leave out the comparison with TRL")
    parser.add_argument("--same-malloc", action="store_true",
                        help="give TRL's worker rlhfkit's malloc setting too (on CPU: the comparison without it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 on CPU, so CPU time is the work done; torch's choice on CUDA)")
    args = parser.parse_args(argv)
    device = Device("cuda" if args.device.startswith("cuda") else "cpu", args.dtype)
    if device.name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    threads = args.threads or (1 if device.name == "cpu" else None)
    if args.steps < 2 or args.large_steps < 2:
        raise SystemExit("--steps and --large-steps must be at least 2 (the first is warm-up)")

    started = time.perf_counter()
    rows: list[BenchRow] = []
    large: list[Utilisation] = []
    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-train-") as tmp, start_worker(threads) as ours, start_worker(threads, args.same_malloc) as theirs:
        workdir = Path(tmp)
        model_dir = build_model(workdir)
        imported = import_qa_feedback(workdir)
        if not args.skip_trl:
            common = {"batch_size": args.batch_size, "steps": args.steps, "trials": args.trials, "seed": args.seed, "device": device}
            rows.append(bench_sft((ours, theirs), model_dir, imported / "demonstrations.jsonl", max_length=args.max_length, workdir=workdir / "sft", **common))
            rows.extend(bench_reward((ours, theirs), model_dir, imported / "preferences.jsonl", max_length=args.rm_max_length, workdir=workdir / "reward", **common))
        if not args.skip_large:
            common = {"steps": args.large_steps, "seed": args.seed, "device": device, "batch_size": args.large_batch_size}
            large_gpt2 = build_model(workdir, **LARGE_GPT2)
            large.append(call(ours, sft_utilisation, large_gpt2, imported / "demonstrations.jsonl", workdir=workdir / "sft-large", **common))
            large.append(call(ours, reward_utilisation, args.large_rm, imported / "preferences.jsonl", workdir=workdir / "rm-large", **common))
    import transformers
    import trl

    out = Console(width=220)
    if rows:
        print_table(out, rows, device, args.steps)
    if large:
        print_utilisation(out, large, device)
    out.print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
        f"{os.cpu_count()} CPUs; torch.set_num_threads({threads or 'default'}) in each side's worker process; "
        f"TRL's worker with {'rlhfkit' if args.same_malloc else 'the default'} malloc settings"
    )
    print(f"bench time {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
