"""The supervised training loop the training stages share (sft, train-rm).

A stage hands `fit` its model, its training items (anything: token lists, pairs...), a
`collate` that turns a list of items into a dict of tensors, and a `loss_fn(model, batch)`
that returns the loss *summed* over the batch together with the number of things it was
summed over (response tokens for SFT, pairs for a reward model). Gradients are divided by
that count over the whole accumulation window, so every token weighs the same whichever
micro-batch it lands in (the mean-of-means alternative over-weights short batches).

`fit` owns the rest: seeded data order, gradient accumulation, clipping, the warm-up/decay
schedule (transformers.get_scheduler), a NaN/inf guard, checkpoints every N steps,
`--resume`, an evaluation hook, metrics.jsonl lines and a progress bar.

Checkpoints are `out/checkpoints/step-N/`: the model via `save_pretrained` (a LoRA model
saves its adapter) and `training_state.pt` (optimizer, scheduler, RNG, step, loss history),
read back with `weights_only=True`. Each is written to a temporary directory and renamed
into place, so a crash mid-save never leaves a checkpoint that `--resume` would trust.

With `--deepspeed` (LoopSettings.deepspeed) the model and optimizer train inside a
DeepSpeed engine (rlhfkit.distributed.DeepSpeedLearner; in one process a Learner takes the
same calls), data-parallel over the processes `rlhfkit launch` started. The step plan
stays global: a micro-batch of `batch_size` items per process is a global micro-batch of
`batch_size x processes` items, of which each process takes its `shard`; so N processes
with --batch-size B see the same items per step as one process with --batch-size N*B, and
every optimizer step divides the summed loss by the count of the whole global step, as in
one process. The optimizer's state (and under ZeRO-2/3 the gradients and parameters) is
sharded by DeepSpeed; its checkpoint goes into `step-N/deepspeed/` beside the
from_pretrained model, and only rank 0 writes everything else.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import get_scheduler

from rlhfkit.console import console
from rlhfkit.distributed import (
    DeepSpeedLearner,
    Learner,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    check_zero3_accumulation,
    deepspeed_engine,
    full_parameters,
    is_main_process,
    shard,
    stage_deepspeed_config,
    world_info,
)
from rlhfkit.errors import EnvironmentFailure, RlhfkitError, TrainingDiverged
from rlhfkit.io import match_umask
from rlhfkit.models import safe_torch_load, save_weights
from rlhfkit.runs import RunDir, progress_bar

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.pt"
DEEPSPEED_TAG = "deepspeed"  # step-N/deepspeed/: the engine's (sharded) model and optimizer states
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")

Batch = dict[str, Any]
LossFn = Callable[[torch.nn.Module, Batch], "tuple[torch.Tensor, torch.Tensor | int]"]
CountFn = Callable[[Batch], "torch.Tensor | int"]
"""The count a LossFn divides by, from the batch alone (needed under DeepSpeed, see fit)."""


@dataclass
class LoopSettings:
    """How `fit` trains; a stage config with options of the same names gives `from_config`."""

    out: Path
    batch_size: int
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 5e-5
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 0
    keep_checkpoints: int = 2
    eval_every: int = 0
    seed: int = 0
    resume: bool = False
    # bf16 runs keep fp32 weights and autocast the forward: AdamW steps of ~1e-5 relative
    # size vanish in bf16 weights (8 mantissa bits).
    compute_dtype: torch.dtype = torch.float32
    deepspeed: str | None = None  # zero0..zero3 or a JSON path: train in a DeepSpeed engine
    offload_optimizer: bool = False
    offload_params: bool = False
    # Micro-batches of similar lengths (StepPlan.lengths) when the stage gives item lengths.
    group_by_length: bool = False

    @classmethod
    def from_config(cls, cfg: Any, compute_dtype: torch.dtype = torch.float32) -> LoopSettings:
        names = [f for f in cls.__dataclass_fields__ if f not in ("out", "compute_dtype")]
        # Stages without the DeepSpeed options train in one process.
        values = {name: getattr(cfg, name, cls.__dataclass_fields__[name].default) for name in names}
        return cls(out=Path(cfg.out), compute_dtype=compute_dtype, **values)


def validate_loop_options(cfg: Any) -> None:
    """Check the options a stage config shares with `LoopSettings` (before any model loads)."""
    for name in ("batch_size", "grad_accum", "epochs"):
        if getattr(cfg, name) < 1:
            raise RlhfkitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise RlhfkitError(f"--max-steps must be >= 1 (or left out to train --epochs), got {cfg.max_steps}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise RlhfkitError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.lr_scheduler not in LR_SCHEDULERS:
        raise RlhfkitError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got '{cfg.lr_scheduler}'")
    if not 0 <= cfg.warmup_ratio < 1:
        raise RlhfkitError(f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.weight_decay < 0 or cfg.max_grad_norm < 0:
        raise RlhfkitError("--weight-decay and --max-grad-norm must be >= 0 (--max-grad-norm 0: no clipping)")
    for name in ("save_every", "keep_checkpoints", "eval_every"):
        if getattr(cfg, name) < 0:
            raise RlhfkitError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")


# --- data ---------------------------------------------------------------------------------


def split_held_out(items: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held_out): a seeded random `fraction` of the items (at least one if > 0) held out.

    The split depends only on the number of items, `fraction` and `seed`, never on the
    global RNG, so a resumed run holds out the same items.
    """
    if not 0 <= fraction < 1:
        raise RlhfkitError(f"--eval-fraction must be in [0, 1), got {fraction}")
    n_held = 0 if fraction == 0 else max(1, round(len(items) * fraction))
    if n_held and len(items) - n_held < 1:
        raise RlhfkitError(
            f"{len(items)} record(s) cannot be split into training and held-out data; "
            "give more records or --eval-fraction 0"
        )
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(order[:n_held])
    held_set = set(held)
    return [items[i] for i in range(len(items)) if i not in held_set], [items[i] for i in held]


LENGTH_GROUP_WINDOW = 50
"""Length grouping sorts the items of this many batches at a time (transformers'
LengthGroupedSampler uses the same "megabatch" of 50): batches hold similar lengths, and
which items meet in a batch still changes from epoch to epoch."""


@dataclass(frozen=True)
class StepPlan:
    """Which items each optimizer step trains on: a seeded permutation per epoch, cut into
    micro-batches of `batch_size` and windows of `grad_accum` micro-batches (an epoch's
    last window may be shorter). `max_steps` overrides `epochs` and wraps into new epochs.

    `groups` (one label per item) keeps items of different groups out of one micro-batch
    (the shared-backbone RM: one aspect per batch). `lengths` (a sort key per item) groups
    items of similar length into micro-batches (`group_batches`); with either, the epoch's
    micro-batches are then shuffled as wholes, so no group or length comes first.
    """

    n_items: int
    batch_size: int
    grad_accum: int
    epochs: int
    max_steps: int | None
    seed: int
    groups: tuple | None = None
    lengths: tuple[int, ...] | None = None

    @property
    def batches_per_epoch(self) -> int:
        if self.groups is None:
            return math.ceil(self.n_items / self.batch_size)
        return sum(math.ceil(n / self.batch_size) for n in Counter(self.groups).values())

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.grad_accum)

    @property
    def total_steps(self) -> int:
        return self.max_steps if self.max_steps is not None else self.epochs * self.steps_per_epoch

    def epoch_batches(self, generator: torch.Generator) -> list[list[int]]:
        order = torch.randperm(self.n_items, generator=generator).tolist()
        if self.groups is None and self.lengths is None:
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return group_batches(order, self.batch_size, generator, self.groups, self.lengths)

    def windows(self, start_step: int = 0):
        """Yield (step, [micro-batch index lists]) for steps start_step+1 .. total_steps."""
        generator = torch.Generator().manual_seed(self.seed)
        step = 0
        while step < self.total_steps:
            # Every epoch's batches are drawn, even skipped ones, so step N sees the same
            # items whether or not the run was resumed before it.
            batches = self.epoch_batches(generator)
            for begin in range(0, len(batches), self.grad_accum):
                step += 1
                if step > start_step:
                    yield step, batches[begin : begin + self.grad_accum]
                if step == self.total_steps:
                    return


def group_batches(
    order: Sequence[int],
    batch_size: int,
    generator: torch.Generator,
    groups: Sequence | None = None,
    lengths: Sequence[int] | None = None,
) -> list[list[int]]:
    """Cut a permutation into micro-batches of one group each, similar lengths together, in shuffled order.

    Within each group (all items when `groups` is None) the permuted items are taken
    LENGTH_GROUP_WINDOW batches at a time and sorted by length, longest first (a stable
    sort: equal lengths keep their random order), then cut into batches of `batch_size`;
    the batches of all groups are then put in a random order drawn from `generator`.
    """
    by_group: dict = {}
    for index in order:
        by_group.setdefault(None if groups is None else groups[index], []).append(index)
    batches: list[list[int]] = []
    window = batch_size * LENGTH_GROUP_WINDOW
    for members in by_group.values():
        for begin in range(0, len(members), window):
            chunk = members[begin : begin + window]
            if lengths is not None:
                chunk = sorted(chunk, key=lambda i: -lengths[i])
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def padding_counts(batches: Sequence[Sequence[int]], rows: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(padded tokens, all tokens) of right-padded micro-batches: `rows[i]` are the lengths of
    the sequences item i puts in its batch (one for SFT or a segment example, every response
    of a preference group), and a batch is as wide as its longest sequence."""
    padded = total = 0
    for batch in batches:
        lengths = [n for i in batch for n in rows[i]]
        if lengths:
            total += max(lengths) * len(lengths)
            padded += max(lengths) * len(lengths) - sum(lengths)
    return padded, total


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast(device: torch.device, compute_dtype: torch.dtype) -> AbstractContextManager:
    if compute_dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype)


# --- optimizer and schedule ---------------------------------------------------------------


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0, eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; biases and norm weights (1-D) are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RlhfkitError("the model has no trainable parameters")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    try:
        # One fused kernel per step instead of ~a dozen ops per tensor (as transformers' default).
        return torch.optim.AdamW(groups, lr=lr, eps=eps, fused=True)
    except RuntimeError:  # a device without the fused kernel
        return torch.optim.AdamW(groups, lr=lr, eps=eps)


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_ratio: float):
    """Linear warm-up over `warmup_ratio` of the steps, then `name`'s decay (transformers)."""
    return get_scheduler(
        name, optimizer, num_warmup_steps=math.ceil(warmup_ratio * total_steps), num_training_steps=total_steps
    )


# --- checkpoints --------------------------------------------------------------------------


def checkpoint_dir(out: str | os.PathLike, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"step-{step}"


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `out`, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = re.fullmatch(r"step-(\d+)", path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(out)
    return checkpoints[-1] if checkpoints else None


# What training_state.pt holds: `fit`'s and ppo's (rlhfkit.stages.ppo.save_ppo_checkpoint).
FIT_STATE_KEYS = ("identity", "optimizer", "scheduler", "rng", "progress")


def checkpoint_damage(checkpoint: Path, state_keys: Sequence[str]) -> tuple[str | None, dict | None]:
    """(None, its training state) for a checkpoint whose files read whole, else (what is
    wrong, naming the file, None): a disk that filled or a copy cut short after the atomic
    save. The weights' safetensors headers must cover their files; JSON files must parse."""
    state_path = checkpoint / STATE_FILE
    try:
        state = safe_torch_load(state_path)
    except OSError as err:
        return f"{state_path} cannot be read ({err.strerror or err})", None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError):  # never retried without weights_only
        return f"{state_path} is damaged (truncated, or not a PyTorch file of tensors)", None
    missing = [key for key in state_keys if key not in state] if isinstance(state, dict) else list(state_keys)
    if missing:
        return f"{state_path} is damaged (no {', '.join(missing)})", None
    from safetensors import SafetensorError, safe_open

    for path in sorted(checkpoint.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as weights:
                weights.keys()
        except (SafetensorError, OSError) as err:
            return f"{path} is damaged ({err})", None
    for path in sorted(checkpoint.glob("*.json")):
        try:
            json.loads(path.read_bytes())
        except (ValueError, OSError) as err:
            return f"{path} is damaged ({type(err).__name__})", None
    return None, state


def resumable_checkpoint(out: str | os.PathLike, state_keys: Sequence[str], description: str) -> tuple[Path, dict] | None:
    """The newest checkpoint in `out` whose files read whole, and its training state, for
    --resume (fit, ppo). A damaged newer one is passed over with a one-line notice naming
    its bad file; when none is left, RlhfkitError names them. None: no checkpoint at all."""
    damaged = []
    for checkpoint in reversed(list_checkpoints(out)):
        problem, state = checkpoint_damage(checkpoint, state_keys)
        if problem is None:
            return checkpoint, state
        damaged.append(problem)
        console.print(f"{description}: {problem}; trying the checkpoint before it", soft_wrap=True)
    if damaged:
        raise RlhfkitError(
            f"--resume: {'; '.join(damaged)}; no complete checkpoint is left in {Path(out) / CHECKPOINTS} "
            "(start again with --overwrite, or use another --out)"
        )
    return None


def _is_peft_model(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def load_model_weights(model: torch.nn.Module, directory: Path) -> None:
    """Put the weights `save_pretrained` wrote to `directory` into `model` (in place)."""
    if _is_peft_model(model):
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(model, load_peft_weights(str(directory)))
        return
    # from_pretrained resolves shards and tied weights; the copy keeps the caller's model
    # object (and the optimizer's references to its parameters).
    saved = type(model).from_pretrained(directory, dtype=next(model.parameters()).dtype)
    model.load_state_dict(saved.state_dict())


def _parameters_finite(model: torch.nn.Module) -> bool:
    flags = [torch.isfinite(p.detach()).all() for p in model.parameters() if p.requires_grad]
    return bool(torch.stack(flags).all()) if flags else True


def save_checkpoint(
    out: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    state: dict,
    *,
    tokenizer: Any = None,
    keep: int = 0,
    engines: Sequence[Any] = (),
) -> Path:
    """Write `out/checkpoints/step-N` atomically; keep the newest `keep` (0: all).

    With DeepSpeed `engines`, every process must call this (saving is a collective): each
    writes its optimizer shard to `step-N/deepspeed/` (several engines: `deepspeed-K/`),
    and rank 0 the from_pretrained model (gathered from ZeRO-3 shards) and `state`.
    """
    final = checkpoint_dir(out, step)
    tmp = final.with_name(f".{final.name}.tmp")
    main = is_main_process()
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()  # the directory exists before any process writes its shard
    try:
        for index, engine in enumerate(engines):
            engine.save_checkpoint(str(tmp), tag=deepspeed_tag(index))
        with full_parameters(model):
            if main:
                save_weights(model, tokenizer, tmp, final)
                try:
                    torch.save(state, tmp / STATE_FILE)
                except RuntimeError as err:  # torch's zip writer reports a failed write (a full disk) so
                    if "write failed" not in str(err):
                        raise
                    raise EnvironmentFailure(f"cannot write {final / STATE_FILE}: the write failed (disk full?)") from None
                match_umask(tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep and main:
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    barrier()  # nobody reads the checkpoints before rank 0 has renamed and pruned them
    return final


def deepspeed_tag(index: int) -> str:
    """The sub-directory of a checkpoint holding the `index`-th engine's DeepSpeed states."""
    return DEEPSPEED_TAG if index == 0 else f"{DEEPSPEED_TAG}-{index}"


def load_deepspeed_states(checkpoint: Path, engines: Sequence[Any]) -> None:
    """Load each engine's model and (sharded) optimizer states saved by `save_checkpoint`."""
    for index, engine in enumerate(engines):
        if not (checkpoint / deepspeed_tag(index)).is_dir():
            raise RlhfkitError(
                f"{checkpoint} was saved without --deepspeed (no {deepspeed_tag(index)}/ in it); "
                "resume with the options it was trained with, or use another --out"
            )
        # The stage steps its own LR scheduler (restored from training_state.pt).
        engine.load_checkpoint(str(checkpoint), tag=deepspeed_tag(index), load_lr_scheduler_states=False)


def rng_state() -> dict | list[dict]:
    """torch's generator states; under several processes, a list with every rank's."""
    # Only torch's generators: dropout draws from them; the data order has its own generator.
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if world_info()[2] == 1:
        return state
    # Each process has drawn differently shaped dropout masks, so each resumes its own stream.
    return all_gather_objects(state)


def set_rng_state(rng: dict | list[dict]) -> None:
    if isinstance(rng, list):
        rank, _, world_size = world_info()
        if len(rng) != world_size:
            raise RlhfkitError(
                f"the checkpoint was saved by {len(rng)} processes, this run has {world_size}; resume with the same number"
            )
        rng = rng[rank]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


# --- the loop -----------------------------------------------------------------------------


@dataclass
class FitResult:
    steps: int
    losses: list[float]  # training loss of every optimizer step, step 1 first
    evals: list[dict]  # {"step": N, metric: value, ...} for every evaluation
    samples: int
    train_seconds: float  # time in training steps only (no evaluation, no checkpoints)
    steps_per_epoch: int
    resumed_from: int | None = None
    padding_fraction: float | None = None  # padded tokens / all tokens of the batches trained on

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds > 0 else float("nan")

    @property
    def final_epoch_loss(self) -> float:
        """Mean training loss over the last epoch's steps (all steps if fewer)."""
        tail = self.losses[-self.steps_per_epoch :]
        return sum(tail) / len(tail) if tail else float("nan")


@dataclass
class _Progress:
    step: int = 0
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    samples: int = 0
    train_seconds: float = 0.0
    padded_tokens: int = 0
    batch_tokens: int = 0

    def record(self, step: int, loss: float, seconds: float, micro_batches: list[list[int]], item_lengths) -> dict:
        """Count a finished step; returns its padding fraction for the log (none without item lengths)."""
        self.step = step
        self.losses.append(loss)
        self.samples += sum(len(indices) for indices in micro_batches)
        self.train_seconds += seconds
        if item_lengths is None:
            return {}
        padded, total = padding_counts(micro_batches, item_lengths)
        self.padded_tokens += padded
        self.batch_tokens += total
        return {"padding_fraction": round(padded / max(total, 1), 6)}


def evaluate_loss(
    model: torch.nn.Module,
    items: Sequence,
    collate: Callable[[list], Batch],
    loss_fn: LossFn,
    batch_size: int,
    compute_dtype: torch.dtype = torch.float32,
) -> float:
    """The loss summed over all `items`, divided by the total count `loss_fn` reports."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with torch.no_grad():
        for begin in range(0, len(items), batch_size):
            batch = to_device(collate(list(items[begin : begin + batch_size])), device)
            with autocast(device, compute_dtype):
                loss_sum, n = loss_fn(model, batch)
            total += loss_sum.double()
            count += int(n)
    model.train(was_training)
    return total.item() / max(count, 1)


def fit(
    model: torch.nn.Module,
    train_items: Sequence,
    collate: Callable[[list], Batch],
    loss_fn: LossFn,
    settings: LoopSettings,
    run: RunDir,
    *,
    evaluate: Callable[[], dict[str, float]] | None = None,
    tokenizer: Any = None,
    data_fingerprint: str = "",
    description: str = "train",
    count_fn: CountFn | None = None,
    item_lengths: Sequence[Sequence[int]] | None = None,
    item_groups: Sequence | None = None,
) -> FitResult:
    """Train `model` in place; `evaluate()` runs at step 0, every `eval_every` steps and at the end.

    With `settings.resume`, training continues from the latest checkpoint in `settings.out`
    (and from step 0 when there is none). A non-finite loss, gradient norm, or parameter
    raises TrainingDiverged before the bad update is applied or saved, so the newest
    checkpoint is always a good one (under DeepSpeed a non-finite gradient norm is only
    seen after the engine's step; the parameter check still runs before every save).

    `count_fn(batch)` gives the count `loss_fn` returns without running the model; it is
    required with `settings.deepspeed`, where each micro-batch's gradient is reduced across
    the processes during its backward, so the step's global count must be known before
    the first one. Every process must call `fit` (and run `evaluate`) under DeepSpeed.

    `item_lengths[i]`: the lengths of the sequences item i puts in its batch; with them the
    padding fraction (padded / all tokens of the batches trained on) is logged and
    returned, and `settings.group_by_length` batches similar lengths together.
    `item_groups[i]`: a label; items of different labels never share a micro-batch.
    """
    if not train_items:
        raise RlhfkitError("no training items")
    group_lengths = settings.group_by_length and item_lengths is not None
    plan = StepPlan(
        len(train_items), settings.batch_size * world_info()[2], settings.grad_accum, settings.epochs, settings.max_steps, settings.seed,
        groups=tuple(item_groups) if item_groups is not None else None,
        lengths=tuple(max(rows, default=0) for rows in item_lengths) if group_lengths else None,
    )
    optimizer = make_optimizer(model, settings.lr, settings.weight_decay)
    scheduler = make_scheduler(optimizer, settings.lr_scheduler, plan.total_steps, settings.warmup_ratio)
    learner = _make_learner(model, optimizer, scheduler, settings, count_fn)
    identity = _fit_identity(len(train_items), settings, data_fingerprint, group_lengths)
    progress = _resume(settings, run, model, learner, identity, plan.total_steps, description)
    resumed_from = progress.step if progress is not None else None
    progress = progress or _Progress()

    def run_evaluation(step: int) -> None:
        if evaluate is None:
            return
        model.eval()
        with torch.no_grad(), autocast(learner.device, settings.compute_dtype):
            metrics = evaluate()
        model.train()
        progress.evals.append({"step": step, **metrics})
        run.log_metrics(step=step, **{f"eval_{k}": v for k, v in metrics.items()})
        console.print(f"{description}: step {step}: " + ", ".join(f"eval {k} {v:.4f}" for k, v in metrics.items()))

    if progress.step == 0:
        run_evaluation(0)
    model.train()
    with progress_bar(description, plan.total_steps) as advance:
        advance(progress.step)
        for step, micro_batches in plan.windows(progress.step):
            started = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            loss, grad_norm = _train_step(
                learner, model, train_items, micro_batches, collate, loss_fn, count_fn, settings.compute_dtype,
                lambda what, step=step: _diverged(settings.out, what, step),
            )
            padding = progress.record(step, loss, time.perf_counter() - started, micro_batches, item_lengths)
            run.log_metrics(step=step, loss=loss, lr=lr, grad_norm=grad_norm, epoch=round(step / plan.steps_per_epoch, 4), **padding)
            advance(metrics={"loss": loss, "samples_per_second": progress.samples / max(progress.train_seconds, 1e-9)})
            if settings.eval_every and step % settings.eval_every == 0 and step < plan.total_steps:
                run_evaluation(step)
            if settings.save_every and step % settings.save_every == 0 and step < plan.total_steps:
                _save(settings, step, model, tokenizer, learner, identity, progress)
    if not _parameters_finite(model):
        raise _diverged(settings.out, "a parameter became NaN/inf", progress.step)
    if not progress.evals or progress.evals[-1]["step"] != progress.step:
        run_evaluation(progress.step)
    return FitResult(
        steps=progress.step,
        losses=progress.losses,
        evals=progress.evals,
        samples=progress.samples,
        train_seconds=progress.train_seconds,
        steps_per_epoch=plan.steps_per_epoch,
        resumed_from=resumed_from,
        padding_fraction=progress.padded_tokens / progress.batch_tokens if progress.batch_tokens else None,
    )


def _train_step(
    learner: Learner,
    model: torch.nn.Module,
    items: Sequence,
    micro_batches: list[list[int]],
    collate: Callable[[list], Batch],
    loss_fn: LossFn,
    count_fn: CountFn | None,
    compute_dtype: torch.dtype,
    diverged: Callable[[str], TrainingDiverged],
) -> tuple[float, float]:
    """One optimizer step of `fit` on the step's global micro-batches: (loss, grad norm), both global.

    Each process trains on its shard of every micro-batch (all of it in one process). The
    loss is sum(loss over the global step) / global count, and the step's gradient is that
    loss's. One process backpropagates the summed losses and divides the gradient by the
    count after the last backward. A DeepSpeed engine reduces the gradients over the
    processes during each backward, so there the count is taken from the batches first
    (count_fn) and each summed loss is multiplied by learner.loss_scale before its backward:
    the reduced gradient is then exactly the one-process gradient, and clipping (DeepSpeed's
    `gradient_clipping`, from --max-grad-norm) sees the global norm.
    """
    rank, _, world_size = world_info()
    device = learner.device
    batches, weights = [], []
    for indices in micro_batches:
        mine = shard(indices, rank, world_size)
        # ZeRO reduces gradients during every backward (a collective), so every process
        # runs one per global micro-batch: an empty shard runs the batch's first item at weight 0.
        batches.append(to_device(collate([items[i] for i in (mine or indices[:1])]), device))
        weights.append(1.0 if mine else 0.0)
    global_count = None
    if learner.reduces_in_backward:
        local_count = sum(float(count_fn(batch)) * weight for batch, weight in zip(batches, weights))
        global_count = max(all_reduce_sum(torch.tensor([local_count], dtype=torch.float64, device=device)).item(), 1.0)
    loss_total = torch.zeros(1, dtype=torch.float64, device=device)
    count_total = torch.zeros((), dtype=torch.float64, device=device)
    for k, (batch, weight) in enumerate(zip(batches, weights)):
        with autocast(device, compute_dtype):
            loss_sum, n = loss_fn(model, batch)
        scaled = loss_sum if global_count is None else loss_sum * learner.loss_scale(weight, global_count)
        learner.backward(scaled, last=k == len(batches) - 1)
        loss_total += loss_sum.detach().double() * weight
        count_total += n
    count = global_count if global_count is not None else max(count_total.item(), 1.0)  # one device sync per step
    loss = all_reduce_sum(loss_total).item() / count
    if not math.isfinite(loss):
        raise diverged(f"the loss is {loss}")
    grad_norm = learner.step(grad_divisor=None if learner.reduces_in_backward else count, skip_nonfinite=True)
    if not math.isfinite(grad_norm):
        raise diverged(f"the gradient norm is {grad_norm}")
    return loss, grad_norm


def _make_learner(model: torch.nn.Module, optimizer, scheduler, settings: LoopSettings, count_fn: CountFn | None) -> Learner:
    """The model's learner: in a DeepSpeed engine with `settings.deepspeed`, else plain PyTorch."""
    if settings.deepspeed is None:
        params = [p for p in model.parameters() if p.requires_grad]
        return Learner(params, optimizer, scheduler, settings.max_grad_norm)
    if count_fn is None:
        raise ValueError("fit: count_fn is required with settings.deepspeed")
    config = stage_deepspeed_config(
        settings.deepspeed,
        micro_batch_size=settings.batch_size,
        grad_accum=settings.grad_accum,
        dtype=settings.compute_dtype,
        max_grad_norm=settings.max_grad_norm,
        offload_optimizer=settings.offload_optimizer,
        offload_params=settings.offload_params,
    )
    check_zero3_accumulation(config["zero_optimization"]["stage"], settings.grad_accum, "use --grad-accum 1 with a larger --batch-size, or zero2")
    return DeepSpeedLearner(deepspeed_engine(model, optimizer, config), scheduler)


def _fit_identity(n_items: int, settings: LoopSettings, data_fingerprint: str, group_lengths: bool) -> dict:
    """What must match for a checkpoint's step N to mean the same items and updates."""
    identity = {
        "items": n_items,
        "batch_size": settings.batch_size,
        "grad_accum": settings.grad_accum,
        "seed": settings.seed,
        "data": data_fingerprint,
    }
    if group_lengths:
        identity["group_by_length"] = True
    if world_info()[2] > 1:
        identity["processes"] = world_info()[2]  # the global batch is batch_size x processes
    return identity


def _resume(settings: LoopSettings, run: RunDir, model: torch.nn.Module, learner: Learner, identity: dict,
            total_steps: int, description: str) -> _Progress | None:
    """With settings.resume, the progress of the latest checkpoint, with the model, optimizer,
    schedule and RNG put back as they were there; None for a fresh start."""
    if not settings.resume:
        return None
    found = resumable_checkpoint(settings.out, FIT_STATE_KEYS, description)
    if found is None:
        console.print(f"{description}: no checkpoint in {Path(settings.out) / CHECKPOINTS}; starting from step 0")
        run.truncate_metrics(-1)  # lines of an earlier attempt that died before its first checkpoint
        return None
    checkpoint, saved = found
    changed = [f"{k}: {saved['identity'].get(k)!r} then, {v!r} now" for k, v in identity.items() if saved["identity"].get(k) != v]
    if changed:
        raise RlhfkitError(
            f"{checkpoint} was trained on other data or settings ({'; '.join(changed)}); "
            "resume with the same data, --batch-size, --grad-accum and --seed, or use another --out"
        )
    if learner.engines:
        load_deepspeed_states(checkpoint, learner.engines)
    elif saved["optimizer"] is None:
        raise RlhfkitError(f"{checkpoint} was saved under --deepspeed; resume with --deepspeed")
    else:
        load_model_weights(model, checkpoint)
        learner.optimizer.load_state_dict(saved["optimizer"])
    learner.scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(saved["rng"])
    progress = _Progress(**saved["progress"])
    run.truncate_metrics(progress.step)
    console.print(f"{description}: resuming from {checkpoint} (step {progress.step} of {total_steps})")
    return progress


def _save(settings: LoopSettings, step: int, model: torch.nn.Module, tokenizer: Any, learner: Learner, identity: dict,
          progress: _Progress) -> None:
    """Checkpoint step `step` (never a model with a NaN/inf parameter)."""
    if not _parameters_finite(model):
        raise _diverged(settings.out, "a parameter became NaN/inf", step)
    state = {
        "identity": identity,
        # Under DeepSpeed the optimizer's (sharded) state is in the engine's checkpoint.
        "optimizer": learner.optimizer.state_dict() if not learner.engines else None,
        "scheduler": learner.scheduler.state_dict(),
        "rng": rng_state(),
        "progress": vars(progress),
    }
    save_checkpoint(settings.out, step, model, state, tokenizer=tokenizer, keep=settings.keep_checkpoints, engines=learner.engines)


def _diverged(out: Path, what: str, step: int) -> TrainingDiverged:
    checkpoint = latest_checkpoint(out)
    last_good = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint had been saved yet"
    return TrainingDiverged(
        f"training diverged at step {step}: {what}; {last_good} "
        f"(lower --lr, raise --warmup-ratio, or check the data; --resume continues from the checkpoint)"
    )
