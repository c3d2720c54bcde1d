"""Training-loop throughput against TRL (`make bench-train`): CPU, fp32, a tiny model.

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

Each side's samples/s is timed from the end of its first (warm-up) optimizer step to the
end of its last. On CPU the main figure uses the process's CPU time with one torch thread
(--threads 1, the default there): that is the work done, whatever else the machine runs;
wall-clock samples/s is shown beside it. On CUDA (--device cuda) only wall time means
anything (the clock synchronizes the device). Trials alternate between the two sides so
background load hits both alike; the table shows the median trial.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
import tempfile
import time
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
from rlhfkit.models import load_policy, load_tokenizer
from rlhfkit.rewards.data import Comparison, PreferenceGroup, encode_preference_groups
from rlhfkit.rewards.data import make_collate as make_rm_collate
from rlhfkit.rewards.losses import make_loss_fn as make_rm_loss_fn
from rlhfkit.rewards.reward_model import encode_pair
from rlhfkit.runs import RunDir
from rlhfkit.schema import load_records
from rlhfkit.stages.annotate_import import ImportConfig, run_import
from rlhfkit.stages.init_model import InitModelConfig, run_init_model
from rlhfkit.training import LoopSettings, fit

REPO_ROOT = Path(__file__).resolve().parent.parent
QA_FEEDBACK = REPO_ROOT / "data/qa_feedback/feedback.json"
LR = 5e-5


@dataclass
class Rate:
    """samples/s of one trial: by CPU time of the process and by wall time."""

    cpu: float
    wall: float


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

    def now(self) -> tuple[float, float]:
        self.sync()
        return time.perf_counter(), time.process_time()


def rate(samples: float, start: tuple[float, float], end: tuple[float, float]) -> Rate:
    return Rate(cpu=samples / (end[1] - start[1]), wall=samples / (end[0] - start[0]))


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


def build_model(workdir: Path, arch: str = "gpt2") -> Path:
    """A tiny model with `rlhfkit init-model`'s defaults (tokenizer trained on the shipped data)."""
    return run_init_model(build_config(InitModelConfig, out=str(workdir / f"tiny-{arch}"), arch=arch))


def import_qa_feedback(workdir: Path) -> Path:
    """`rlhfkit annotate-import --format qa-feedback data/qa_feedback/feedback.json`."""
    out = workdir / "import"
    run_import(build_config(ImportConfig, format="qa-feedback", inputs=[str(QA_FEEDBACK)], out=str(out)))
    return out


# --- SFT ------------------------------------------------------------------------------------


def time_rlhfkit_sft(model_dir: Path, examples: list[SFTExample], *, batch_size: int, steps: int, seed: int, workdir: Path, device: Device) -> Rate:
    model, tokenizer, _ = load_policy(model_dir, dtype="float32", device=device.name)
    collate = make_collate(tokenizer.pad_token_id, False)
    clock = {"calls": 0, "start": None}

    def timed_collate(items: list) -> dict:
        clock["calls"] += 1
        if clock["calls"] == 2:  # step 1 (the warm-up) is done
            clock["start"] = device.now()
        return collate(items)

    settings = loop_settings(workdir, device, batch_size=batch_size, max_steps=steps, seed=seed)
    run = RunDir(workdir, "bench-sft", BenchSettings(batch_size, steps, LR, seed))
    fit(model, examples, timed_collate, make_loss_fn(model, False), settings, run)
    return rate((steps - 1) * batch_size, clock["start"], device.now())


@dataclass
class BenchSettings:
    """What run_config.json records for a timed rlhfkit run."""

    batch_size: int
    max_steps: int
    lr: float
    seed: int


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


def bench_sft(
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
    tokenizer = load_tokenizer(model_dir)
    records = load_records(demonstrations_file, "demonstration")
    examples = [encode_demonstration(tokenizer, r.prompt, r.response, max_length, False) for r in records]
    if len(examples) < batch_size * steps:
        raise SystemExit(f"{len(examples)} demonstrations are too few for {steps} steps of {batch_size} in one epoch")
    mean_tokens = sum(len(e.input_ids) for e in examples) / len(examples)
    mean_targets = sum(sum(1 for t in e.labels if t != -100) for e in examples) / len(examples)
    ours, theirs = [], []
    for trial in range(trials):
        ours.append(time_rlhfkit_sft(model_dir, examples, batch_size=batch_size, steps=steps, seed=seed, workdir=workdir / f"rlhfkit-{trial}", device=device))
        theirs.append(time_trl_sft(model_dir, examples, batch_size=batch_size, max_length=max_length, steps=steps, seed=seed, workdir=workdir / f"trl-{trial}", device=device))
    setting = (
        f"batch {batch_size}, max length {max_length}, {steps} steps; {len(examples)} QA demos, "
        f"mean {mean_tokens:.0f} tokens ({mean_targets:.0f} supervised)"
    )
    return BenchRow("sft", setting, ours, theirs)


# --- reward model -------------------------------------------------------------------------


def load_reward_backbone(model_dir: Path, device: Device | None = None):
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device.name)
    return model, tokenizer


def time_rlhfkit_reward(model_dir: Path, groups: list, *, batch_size: int, steps: int, seed: int, workdir: Path, device: Device) -> Rate:
    """Pairs/s of rlhfkit's RM loop; `groups` are rlhfkit.rewards.data.PreferenceGroup items."""
    model, tokenizer = load_reward_backbone(model_dir, device)
    collate = make_rm_collate("preference", tokenizer.pad_token_id)
    clock = {"calls": 0, "start": None, "pairs": 0}

    def timed_collate(items: list) -> dict:
        clock["calls"] += 1
        if clock["calls"] == 2:  # step 1 (the warm-up) is done
            clock["start"] = device.now()
        if clock["calls"] >= 2:
            clock["pairs"] += sum(len(g.comparisons) for g in items)
        return collate(items)

    settings = loop_settings(workdir, device, batch_size=batch_size, max_steps=steps, seed=seed)
    run = RunDir(workdir, "bench-reward", BenchSettings(batch_size, steps, LR, seed))
    fit(model, groups, timed_collate, make_rm_loss_fn("preference", 1.0), settings, run)
    return rate(clock["pairs"], clock["start"], device.now())


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
    pairs_per_group = sum(len(g.comparisons) for g in grouped) / len(grouped)
    # Enough prompts per grouped micro-batch to hold at least batch_size pairs on average.
    group_batch = math.ceil(batch_size / pairs_per_group)
    mean_tokens = sum(len(c) + len(r) for c, r in pairs) / (2 * len(pairs))
    ours, grouped_ours, theirs = [], [], []
    for trial in range(trials):
        ours.append(time_rlhfkit_reward(model_dir, per_pair, batch_size=batch_size, steps=steps, seed=seed, workdir=workdir / f"rlhfkit-{trial}", device=device))
        theirs.append(time_trl_reward(model_dir, pairs, batch_size=batch_size, max_length=max_length, steps=steps, seed=seed, workdir=workdir / f"trl-{trial}", device=device))
        grouped_ours.append(time_rlhfkit_reward(model_dir, grouped, batch_size=group_batch, steps=steps, seed=seed, workdir=workdir / f"rlhfkit-grouped-{trial}", device=device))
    setting = f"batch {batch_size} pairs, max length {max_length}, {steps} steps; {len(pairs)} non-tie QA pairs, mean {mean_tokens:.0f} tokens"
    grouped_setting = f"rlhfkit grouped by prompt ({group_batch} prompts ~ {group_batch * pairs_per_group:.0f} pairs per batch) vs TRL per pair"
    return [BenchRow("reward (pairs/s)", setting, ours, theirs), BenchRow("reward (pairs/s)", grouped_setting, grouped_ours, theirs)]


# --- report ---------------------------------------------------------------------------------


def print_table(rows: list[BenchRow], device: Device, steps: int) -> None:
    import transformers
    import trl

    basis = device.basis
    on_cpu = device.name == "cpu"
    table = Table(
        title=(
            f"training loops, {device.name} {device.dtype}, {torch.get_num_threads()} torch thread(s): samples/s "
            f"({'by process CPU time' if on_cpu else 'by wall time'}) over steps 2-{steps}, median of trials"
        ),
        title_justify="left",
    )
    columns = ["section", "setting", "rlhfkit", "TRL", "rlhfkit / TRL", "trials rlhfkit | TRL"]
    if on_cpu:
        columns += ["wall: rlhfkit | TRL", "wall ratio"]
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
            cells += [f"{row.median('rlhfkit', 'wall'):.2f} | {row.median('trl', 'wall'):.2f}", f"{row.ratio('wall'):.2f}x"]
        table.add_row(*cells)
    out = Console(width=220)
    out.print(table)
    like_for_like = [row for row in rows if "grouped" not in row.setting]
    for row in like_for_like:
        verdict = "met" if row.ratio(basis) >= 1.0 else "NOT met"
        out.print(f"goal: rlhfkit {row.section} at least as fast as TRL: {row.ratio(basis):.2f}x -> {verdict}")
    out.print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
        f"{os.cpu_count()} CPUs; torch.set_num_threads({torch.get_num_threads()})"
    )


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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 on CPU, so CPU time is the work done; torch's choice on CUDA)")
    args = parser.parse_args(argv)
    device = Device("cuda" if args.device.startswith("cuda") else "cpu", args.dtype)
    if device.name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    threads = args.threads or (1 if device.name == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (the first is warm-up)")

    started = time.perf_counter()
    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-train-") as tmp:
        workdir = Path(tmp)
        model_dir = build_model(workdir)
        imported = import_qa_feedback(workdir)
        common = {"batch_size": args.batch_size, "steps": args.steps, "trials": args.trials, "seed": args.seed, "device": device}
        rows.append(bench_sft(model_dir, imported / "demonstrations.jsonl", max_length=args.max_length, workdir=workdir / "sft", **common))
        rows.extend(bench_reward(model_dir, imported / "preferences.jsonl", max_length=args.rm_max_length, workdir=workdir / "reward", **common))
    print_table(rows, device, args.steps)
    print(f"bench time {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
