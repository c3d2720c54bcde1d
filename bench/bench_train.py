"""Training-loop throughput against TRL (`make bench-train`): CPU, fp32, a tiny model.

SFT: rlhfkit's loop (rlhfkit.training.fit with the sft stage's collate and loss) against
TRL's SFTTrainer. Both get the same tiny GPT-2 (built by `rlhfkit init-model`'s code into a
temporary directory), the same token sequences (the QA-Feedback demonstrations, tokenized and
truncated once by rlhfkit and handed to TRL as `input_ids` + `labels`, so the supervised
tokens are identical), batch size, max length, steps, optimizer (fused AdamW, TRL's default)
and LR schedule. TRL is set up like-for-like: completion-only loss, no packing, no
padding-free batches, dynamic padding, no evaluation, no logging, no saving, report_to none.

Each side's samples/s is timed from the end of its first (warm-up) optimizer step to the
end of its last. Trials alternate between the two so background load hits both alike;
the table shows the median trial.
"""

from __future__ import annotations

import argparse
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

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from rlhfkit.config import build_config  # noqa: E402
from rlhfkit.models import load_policy, load_tokenizer  # noqa: E402
from rlhfkit.runs import RunDir  # noqa: E402
from rlhfkit.schema import load_records  # noqa: E402
from rlhfkit.stages.annotate_import import ImportConfig, run_import  # noqa: E402
from rlhfkit.stages.init_model import InitModelConfig, run_init_model  # noqa: E402
from rlhfkit.stages.sft import SFTExample, encode_demonstration, make_collate, make_loss_fn  # noqa: E402
from rlhfkit.training import LoopSettings, fit  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
QA_FEEDBACK = REPO_ROOT / "data/qa_feedback/feedback.json"
LR = 5e-5


@dataclass
class BenchRow:
    section: str
    setting: str
    rlhfkit: list[float]  # samples/s of each trial
    trl: list[float]

    @property
    def ratio(self) -> float:
        return statistics.median(self.rlhfkit) / statistics.median(self.trl)


def build_model(workdir: Path, arch: str = "gpt2") -> Path:
    """A tiny model with `rlhfkit init-model`'s defaults (tokenizer trained on the shipped data)."""
    return run_init_model(build_config(InitModelConfig, out=str(workdir / f"tiny-{arch}"), arch=arch))


def import_qa_feedback(workdir: Path) -> Path:
    """`rlhfkit annotate-import --format qa-feedback data/qa_feedback/feedback.json`."""
    out = workdir / "import"
    run_import(build_config(ImportConfig, format="qa-feedback", inputs=[str(QA_FEEDBACK)], out=str(out)))
    return out


# --- SFT ------------------------------------------------------------------------------------


def time_rlhfkit_sft(model_dir: Path, examples: list[SFTExample], *, batch_size: int, steps: int, seed: int, workdir: Path) -> float:
    model, tokenizer, _ = load_policy(model_dir, dtype="float32", device="cpu")
    collate = make_collate(tokenizer.pad_token_id, False)
    clock = {"calls": 0, "start": None}

    def timed_collate(items: list) -> dict:
        clock["calls"] += 1
        if clock["calls"] == 2:  # step 1 (the warm-up) is done
            clock["start"] = time.perf_counter()
        return collate(items)

    settings = LoopSettings(out=workdir, batch_size=batch_size, max_steps=steps, lr=LR, seed=seed)
    run = RunDir(workdir, "bench-sft", BenchSettings(batch_size, steps, LR, seed))
    fit(model, examples, timed_collate, make_loss_fn(model, False), settings, run)
    return (steps - 1) * batch_size / (time.perf_counter() - clock["start"])


@dataclass
class BenchSettings:
    """What run_config.json records for a timed rlhfkit run."""

    batch_size: int
    max_steps: int
    lr: float
    seed: int


def time_trl_sft(model_dir: Path, examples: list[SFTExample], *, batch_size: int, max_length: int, steps: int, seed: int, workdir: Path) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class StepClock(TrainerCallback):
        start = end = None

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if state.global_step == 1:
                self.start = now
            self.end = now

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(model_dir)
    dataset = Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})
    args = SFTConfig(
        output_dir=str(workdir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=max_length,
        packing=False,
        padding_free=False,
        completion_only_loss=True,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=seed,
    )
    clock = StepClock()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    return (steps - 1) * batch_size / (clock.end - clock.start)


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
        ours.append(time_rlhfkit_sft(model_dir, examples, batch_size=batch_size, steps=steps, seed=seed, workdir=workdir / f"rlhfkit-{trial}"))
        theirs.append(time_trl_sft(model_dir, examples, batch_size=batch_size, max_length=max_length, steps=steps, seed=seed, workdir=workdir / f"trl-{trial}"))
    setting = (
        f"batch {batch_size}, max length {max_length}, {steps} steps; {len(examples)} QA demos, "
        f"mean {mean_tokens:.0f} tokens ({mean_targets:.0f} supervised)"
    )
    return BenchRow("sft", setting, ours, theirs)


# --- report ---------------------------------------------------------------------------------


def print_table(rows: list[BenchRow]) -> None:
    import transformers
    import trl

    table = Table(title=f"training loops, CPU fp32, {torch.get_num_threads()} threads (samples/s, median of trials)")
    for column in ("section", "setting", "rlhfkit", "TRL", "rlhfkit / TRL", "trials rlhfkit | TRL"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.section,
            row.setting,
            f"{statistics.median(row.rlhfkit):.1f}",
            f"{statistics.median(row.trl):.1f}",
            f"{row.ratio:.2f}x",
            " ".join(f"{v:.1f}" for v in row.rlhfkit) + " | " + " ".join(f"{v:.1f}" for v in row.trl),
        )
    out = Console(width=200)
    out.print(table)
    out.print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per trial (the first is warm-up)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-train-") as tmp:
        workdir = Path(tmp)
        model_dir = build_model(workdir)
        imported = import_qa_feedback(workdir)
        rows.append(
            bench_sft(
                model_dir,
                imported / "demonstrations.jsonl",
                batch_size=args.batch_size,
                max_length=args.max_length,
                steps=args.steps,
                trials=args.trials,
                seed=args.seed,
                workdir=workdir / "sft",
            )
        )
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
