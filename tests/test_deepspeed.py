"""`--deepspeed` in sft, train-rm and ppo: two CPU processes (gloo) against one process.

Data parallelism must not change the algorithm: two processes with --batch-size B (per
process) train on the same global batches as one process with --batch-size 2B, so their
losses, gradient norms and final weights agree up to float summation order (REL below).
The tiny models are copied with dropout off, since dropout masks depend on how a batch is
split over processes.

The processes are forked from pytest, so they share its imports (importing deepspeed
costs ~15 s per process on 2 cores); each one runs the real CLI with the launcher's
environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from rlhfkit.models import model_dir
from rlhfkit.schema import Demonstration, PromptRecord, write_records

# Tolerances: 1 and 2 processes add the same float32 terms in another order (the shards'
# partial sums, then their all-reduce). Reordering a sum of n terms changes it by at most
# about n * u * sum|terms|, u = 2^-24 ~ 6e-8 (Higham, Accuracy and Stability of Numerical
# Algorithms, 2nd ed., sec. 4.2).
# - Logged metrics (loss, gradient norm, eval loss) are sums over at most ~10^3 token terms
#   of one sign (losses, squares) reduced in float64 at the end: relative error <= 10^3 * u
#   ~ 6e-5, so REL = 1e-4.
REL = 1e-4
# - Weights: a weight's Adam update is lr * m/(sqrt(v) + eps), a ratio of gradient sums, so
#   where the gradient is well above its rounding error the two runs' updates agree to a
#   relative ~REL. But a gradient that nearly cancels (|g| within a few rounding errors of 0)
#   can come out with a different size or sign, and Adam's normalisation turns that into a
#   different step of up to 2 * lr; no element-wise tolerance below 2 * lr * steps is safe
#   (on an AMD EPYC one weight of 16,384 moved 1.49e-5 = 1.5% of one 1e-3 step apart).
#   So the weights are compared through the model's update (final - initial weights, all
#   tensors as one vector): ||update_2 - update_1|| <= UPDATE_REL * ||update_1||. When N
#   weights moved ~lr per step, ||update_1|| ~ lr * steps * sqrt(N); k weights taking a fully
#   different path add <= 2 * lr * steps * sqrt(k), i.e. 2 * sqrt(k / N) relative. The tiny
#   models move N > 10^5 weights, so UPDATE_REL = 2e-2 admits k ~ 10 such weights, while
#   ordinary rounding gives ~REL. A real mistake gives far more (measured in
#   test_a_real_mistake_is_caught).
UPDATE_REL = 2e-2
WORLD_SIZE = 2
TIMEOUT_S = 300  # a collective that one process never joins hangs: fail instead


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


WRITING_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def record_writes_under(root: str, written: list[str]) -> None:
    """Append to `written` every path under `root` this process opens for writing, creates,
    renames or removes (Python's audit events: torch.save and safetensors write from C++ and
    Rust, but only into directories made or renamed from Python, which are caught)."""
    import sys

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if not (mode and any(c in mode for c in "wax+")) and not (flags or 0) & WRITING_FLAGS:
                return
            paths = [path]
        elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            paths = list(args[:2]) if event == "os.rename" else [args[0]]
        else:
            return
        written.extend(str(p) for p in paths if isinstance(p, (str, os.PathLike)) and str(p).startswith(root))

    sys.addaudithook(hook)


def _cli_worker(rank: int, world_size: int, port: int, args: list[str], out_dir: str, watched: str, launched: bool) -> None:
    written: list[str] = []
    if rank != 0:
        record_writes_under(watched, written)
    if launched:  # what a launcher (deepspeed, torchrun) sets; else the stage starts its own group
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
        )
    else:
        for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
            os.environ.pop(name, None)
    # On CPU, DeepSpeed's TorchBackend JIT-compiles a shared-memory all-reduce op (C++) the
    # first time a process group starts: minutes on a clean machine (cached afterwards in
    # ~/.cache/torch_extensions). build_shm_op() in deepspeed/comm/torch.py builds it only if
    # deepspeed.ops.__compatible_ops__ marks it compatible, and that dict is what it probes
    # lazily on first access, so setting it first skips both the probe and the build; the
    # collectives then go through gloo. Initialising torch.distributed ourselves would not
    # help: DeepSpeed still creates its TorchBackend (and builds the op) on top of it.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {}
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    result = CliRunner().invoke(app, args, catch_exceptions=False)
    report = {"exit_code": result.exit_code, "output": result.output, "written": written}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_processes(tmp_path: Path, *args, world_size: int = WORLD_SIZE, exit_code: int = 0, launched: bool = True) -> list[dict]:
    """Run `rlhfkit ARGS` in `world_size` forked processes; each one's exit code, output and
    (ranks > 0) the paths under `tmp_path` it wrote."""
    import deepspeed  # noqa: F401  (imported once here, the forked processes share it)

    out_dir = tmp_path / f"ranks-{time.monotonic_ns()}"
    out_dir.mkdir()
    context = mp.start_processes(
        _cli_worker, args=(world_size, _free_port(), [str(a) for a in args], str(out_dir), str(tmp_path), launched),
        nprocs=world_size,
        start_method="fork", join=False,
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world_size} processes did not finish in {TIMEOUT_S} s (a collective one of them skipped?)")
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world_size)]
    for rank, result in enumerate(results):
        assert result["exit_code"] == exit_code, f"rank {rank}: {result['output']}"
    return results


def written_by_other_ranks(results: list[dict]) -> list[str]:
    return [path for result in results[1:] for path in result["written"]]


@pytest.fixture(scope="module")
def model_without_dropout(tiny_model_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("no-dropout") / "model"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0, classifier_dropout=0.0)
    (path / "config.json").write_text(json.dumps(config))
    return path


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(one: Path, two: Path, keys: tuple[str, ...], initial: Path, update_rel: float = UPDATE_REL) -> None:
    """Same metric lines (each once) up to REL, and the same update of every weight tensor
    from the `initial` model up to `update_rel` (see UPDATE_REL)."""
    rows_one, rows_two = metric_rows(one), metric_rows(two)
    assert [sorted(r) for r in rows_one] == [sorted(r) for r in rows_two]
    for a, b in zip(rows_one, rows_two):
        assert a["step"] == b["step"]
        for key in keys:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=REL), (a["step"], key)
    assert update_distance(one, two, initial) <= update_rel


def update_distance(one: Path, two: Path, initial: Path) -> float:
    """||update_2 - update_1|| / ||update_1||, the updates from `initial` over all weights
    (a tensor the initial model lacks, such as a new score head, counts from 0)."""
    start = load_file(model_dir(initial) / "model.safetensors")
    weights_one, weights_two = load_file(model_dir(one) / "model.safetensors"), load_file(model_dir(two) / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    difference = norm = 0.0
    for name, final_one in weights_one.items():
        begin = start[name].double() if name in start else 0.0
        update_one, update_two = final_one.double() - begin, weights_two[name].double() - begin
        difference += (update_two - update_one).pow(2).sum().item()
        norm += update_one.pow(2).sum().item()
    return (difference / norm) ** 0.5


# --- sft and train-rm --------------------------------------------------------------------------


def write_demos(path: Path, n: int = 18) -> Path:
    # Responses of different lengths, so that token counts differ between the processes'
    # shards (a mean of per-process means would then differ from the global mean).
    write_records(path, [
        Demonstration(id=f"d{i}", prompt=f"question: What colour is the sky over town {i}? answer:",
                      response=" The sky is blue." + " Very blue." * (i % 4))
        for i in range(n)
    ])
    return path


def sft_args(model: Path, data: Path, out: Path, batch_size: int, *extra) -> list:
    # 14 training demonstrations in global micro-batches of 4, 2 per step: the last
    # micro-batch of the epoch has 2 items and the epoch's last step 1 micro-batch.
    return ["sft", "--model", model, "--data", data, "--out", out, "--batch-size", batch_size, "--grad-accum", 2,
            "--max-steps", 3, "--lr", "1e-3", "--eval-fraction", "0.25", "--save-every", 0, *extra]


def test_sft_on_two_processes_matches_one(model_without_dropout, tmp_path, run_cli):
    data = write_demos(tmp_path / "demos.jsonl")
    one, two = tmp_path / "sft-one", tmp_path / "sft-two"
    assert run_cli(*sft_args(model_without_dropout, data, one, 4)).exit_code == 0
    results = run_processes(tmp_path, *sft_args(model_without_dropout, data, two, 2, "--deepspeed", "zero2"))
    assert written_by_other_ranks(results) == []
    assert_same_training(one, two, ("loss", "grad_norm", "lr", "eval_loss", "eval_perplexity"), model_without_dropout)
    a, b = (json.loads((out / "sft_metrics.json").read_text()) for out in (one, two))
    assert b["eval_loss_after"] == pytest.approx(a["eval_loss_after"], rel=REL)
    assert b["samples_per_second"] > 0 and (b["steps"], b["train_examples"]) == (a["steps"], a["train_examples"])


def test_sft_under_deepspeed_in_one_process_without_a_launcher(model_without_dropout, tmp_path):
    # `sft --deepspeed zero2` on one GPU, started as a plain command: DeepSpeed's engine used to
    # stop with "DeepSpeed requires the LOCAL_RANK environment variable".
    data = write_demos(tmp_path / "demos.jsonl")
    out = tmp_path / "sft"
    run_processes(tmp_path, *sft_args(model_without_dropout, data, out, 4, "--deepspeed", "zero2"), world_size=1, launched=False)
    assert (out / "sft_metrics.json").is_file()


def count_mistake(kind: str):
    """A stand-in for rlhfkit.training's all_reduce_sum that makes a real data-parallel mistake.

    _train_step calls it twice per DeepSpeed optimizer step: first for the global count the summed
    loss is divided by, then for the loss it logs.
    - "per-process-mean": each process divides by its own count, so DeepSpeed's average of
      the processes' gradients is the mean of per-process token means, not the global mean;
    - "one-process-dropped": rank 1's count is taken as huge, so its gradients count ~0;
    - "divided-twice": the count is multiplied by the number of processes once too often
      (every gradient halved)."""
    from rlhfkit.distributed import all_reduce_sum

    calls = []

    def reduce(tensor):
        local = tensor.clone()
        total = all_reduce_sum(tensor)  # every process still joins every collective
        calls.append(1)
        if len(calls) % 2 == 0:
            return total
        if kind == "per-process-mean":
            return local * WORLD_SIZE
        if kind == "one-process-dropped":
            return total * (1e12 if os.environ["RANK"] == "1" else 1.0)
        return total * WORLD_SIZE

    return reduce


@pytest.mark.slow
@pytest.mark.parametrize("mistake", ["per-process-mean", "one-process-dropped", "divided-twice"])
def test_a_real_mistake_is_caught(model_without_dropout, tmp_path, run_cli, monkeypatch, mistake):
    """The tolerances above still fail a data-parallel run that computes the wrong gradient.

    Measured (2 cores, x86-64; update distance, then step-1 loss one/two processes): the
    correct run 1.5e-5, losses equal to 1e-7 relative; per-process-mean 0.149 (7x
    UPDATE_REL), loss 6.903/5.752; one-process-dropped 0.323, grad norm 5.13/3.09. Adam
    divides each step by the gradient's own scale, so a uniformly scaled gradient
    ("divided-twice") leaves the weights where they were (1.5e-5 again): the logged loss
    (6.903/3.451) and gradient norm, compared to REL, catch it."""
    from rlhfkit import training

    data = write_demos(tmp_path / "demos.jsonl")
    one, two = tmp_path / "sft-one", tmp_path / "sft-two"
    # Ungrouped batches: grouping by length gives the processes' shards nearly equal token
    # counts, which hides the per-process-mean mistake (distance 0.043 instead of 0.149).
    ungrouped = "--no-group-by-length"
    assert run_cli(*sft_args(model_without_dropout, data, one, 4, ungrouped)).exit_code == 0
    monkeypatch.setattr(training, "all_reduce_sum", count_mistake(mistake))  # the forked processes inherit it
    run_processes(tmp_path, *sft_args(model_without_dropout, data, two, 2, ungrouped, "--deepspeed", "zero2"))
    distance = update_distance(one, two, model_without_dropout)
    if mistake != "divided-twice":
        assert distance > 5 * UPDATE_REL, distance
    with pytest.raises(AssertionError):
        assert_same_training(one, two, ("loss", "grad_norm"), model_without_dropout)


def test_train_rm_on_two_processes_matches_one(model_without_dropout, tmp_path, run_cli):
    from tests.test_train_rm import span_records

    data = tmp_path / "spans.jsonl"
    write_records(data, span_records(14))
    # Segment RM: the class-weighted cross-entropy summed over labelled segment ends, whose
    # number differs between records and so between the processes' shards.
    common = ["train-rm", "--aspect", "factuality", "--data", data, "--model", model_without_dropout, "--max-length", 96,
              "--max-steps", 3, "--grad-accum", 2, "--eval-fraction", "0.2"]
    one, two = tmp_path / "rm-one", tmp_path / "rm-two"
    assert run_cli(*common, "--out", one, "--batch-size", 2).exit_code == 0
    results = run_processes(tmp_path, *common, "--out", two, "--batch-size", 1, "--deepspeed", "zero2")
    assert written_by_other_ranks(results) == []
    assert_same_training(one, two, ("loss", "grad_norm", "lr", "eval_accuracy", "eval_error_auc"), model_without_dropout)
    a, b = (json.loads((out / "rm_metrics.json").read_text()) for out in (one, two))
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=REL)
    assert (model_dir(two) / "rlhfkit_rm.json").read_text() == (model_dir(one) / "rlhfkit_rm.json").read_text().replace(str(one), str(two))


# --- ppo ---------------------------------------------------------------------------------------


def ppo_args(policy: Path, data_dir: Path, out: Path, *extra) -> list:
    # --top-k 1: sampling picks the most likely token, so the rollouts do not depend on how
    # the prompts are split over processes (each process has its own sampling RNG stream).
    # 4 prompts x 2 samples = 8 rollouts, one minibatch of 8 (4 per process) per epoch.
    return ["ppo", "--policy", policy, "--prompts", data_dir / "prompts.jsonl", "--out", out, "--steps", 2,
            "--prompts-per-step", 4, "--samples-per-prompt", 2, "--minibatch-size", 8, "--ppo-epochs", 2,
            "--top-k", 1, "--max-new-tokens", 12, "--max-prompt-length", 64, "--save-every", 1, "--lr", "1e-3",
            "--seed", 3, "--rewards", "judge=1", "--rm", "judge=py:tests.judges:count_letters_e", *extra]


def write_prompts(data_dir: Path) -> Path:
    from tests.test_ppo import QUESTIONS

    data_dir.mkdir()
    write_records(data_dir / "prompts.jsonl", [PromptRecord(id=f"p{i}", prompt=f"question: {q} answer:") for i, q in enumerate(QUESTIONS)])
    return data_dir


PPO_KEYS = ("reward/total", "kl", "kl_penalty", "response_length", "policy_loss", "value_loss", "clipfrac",
            "vf_clipfrac", "approx_kl", "entropy", "grad_norm", "lr")


def test_ppo_on_two_processes_matches_one(tiny_model_dir, tmp_path, run_cli):
    data_dir = write_prompts(tmp_path / "data")
    one, two = tmp_path / "ppo-one", tmp_path / "ppo-two"
    assert run_cli(*ppo_args(tiny_model_dir, data_dir, one)).exit_code == 0
    results = run_processes(tmp_path, *ppo_args(tiny_model_dir, data_dir, two, "--deepspeed", "zero2"))
    assert [p for p in written_by_other_ranks(results) if "checkpoints" not in p] == []
    rows = metric_rows(two)
    assert rows[1]["kl"] != 0 and rows[1]["policy_loss"] != 0  # the second step moved away from the reference
    assert_same_training(one, two, PPO_KEYS, tiny_model_dir)
    assert len((two / "rollouts.jsonl").read_text().splitlines()) == len((one / "rollouts.jsonl").read_text().splitlines())


def test_ppo_resume_under_deepspeed_gives_the_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    from rlhfkit.stages import ppo

    data_dir = write_prompts(tmp_path / "data")
    three_steps = ("--steps", 3, "--deepspeed", "zero2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_processes(tmp_path, *ppo_args(tiny_model_dir, data_dir, straight, *three_steps))

    # Killed in step 3 (after the step-2 checkpoint) in both processes, then resumed: the
    # engines' sharded optimizer states, the value model and each process's RNG come back.
    real_iteration = ppo.ppo_iteration

    def crash_at_step_3(*args, **kwargs):
        if args[-1] == 3:
            raise KeyboardInterrupt
        return real_iteration(*args, **kwargs)

    monkeypatch.setattr(ppo, "ppo_iteration", crash_at_step_3)  # the forked processes inherit it
    run_processes(tmp_path, *ppo_args(tiny_model_dir, data_dir, resumed, *three_steps), exit_code=130)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-1", "step-2"]
    monkeypatch.setattr(ppo, "ppo_iteration", real_iteration)
    results = run_processes(tmp_path, *ppo_args(tiny_model_dir, data_dir, resumed, *three_steps, "--resume"))
    assert "resuming from" in results[0]["output"]
    assert [r["step"] for r in metric_rows(resumed)] == [1, 2, 3]
    a, b = load_file(model_dir(straight) / "model.safetensors"), load_file(model_dir(resumed) / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0)
    state = torch.load(resumed / "checkpoints" / "step-3" / "training_state.pt", weights_only=True)
    assert len(state["rng"]) == WORLD_SIZE and state["optimizers"] == [None, None]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero0", "zero2"])
def test_ppo_gradient_accumulation_on_two_processes_matches_one(tiny_model_dir, tmp_path, run_cli, stage):
    # 8 rollouts in minibatches of 4 (2 per process), 2 accumulated per optimizer step: the
    # logged grad_norm is the step's global norm (without ZeRO DeepSpeed does not report it:
    # it is measured before the engine's step), as in one process.
    data_dir = write_prompts(tmp_path / "data")
    one, two = tmp_path / "ppo-one", tmp_path / "ppo-two"
    accumulate = ("--minibatch-size", 4, "--grad-accum", 2)
    assert run_cli(*ppo_args(tiny_model_dir, data_dir, one, *accumulate)).exit_code == 0
    run_processes(tmp_path, *ppo_args(tiny_model_dir, data_dir, two, *accumulate, "--deepspeed", stage))
    assert_same_training(one, two, PPO_KEYS, tiny_model_dir)


def test_ppo_refuses_zero3_with_gradient_accumulation(tiny_model_dir, tmp_path, run_cli):
    # Measured (DeepSpeed 0.19.8, 2 processes, the test above with zero3): the step's gradient
    # is half the one-process one, the earlier minibatch's lost; so it is refused up front.
    data_dir = write_prompts(tmp_path / "data")
    args = ppo_args(tiny_model_dir, data_dir, tmp_path / "out", "--minibatch-size", 4, "--grad-accum", 2, "--deepspeed", "zero3")
    result = run_cli(*args)
    assert result.exit_code == 2
    assert "--deepspeed zero3 with --grad-accum > 1 is not supported yet; use --grad-accum 1 with a larger --minibatch-size" in (
        result.output.replace("\n", " ")
    )
    assert not (tmp_path / "out").exists()


# --- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, env, message",
    [
        (["--deepspeed", "zero4"], {}, "--deepspeed must be one of zero0, zero1, zero2, zero3 or a path to a DeepSpeed .json file"),
        (["--deepspeed", "missing.json"], {}, "--deepspeed: missing.json: file not found"),
        (["--offload-optimizer"], {}, "--offload-optimizer and --offload-params need --deepspeed"),
        (["--deepspeed", "zero2", "--offload-params"], {}, "parameter offload needs ZeRO stage 3"),
        ([], {"WORLD_SIZE": "2"}, "this is one of 2 processes (WORLD_SIZE=2) but --deepspeed is not set"),
    ],
)
def test_bad_deepspeed_options_exit_2(tiny_model_dir, tmp_path, run_cli, monkeypatch, extra, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    data = write_demos(tmp_path / "demos.jsonl")
    result = run_cli(*sft_args(tiny_model_dir, data, tmp_path / "out", 2, *extra))
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_deepspeed_not_installed(monkeypatch):
    from rlhfkit.distributed import require_deepspeed
    from rlhfkit.errors import RlhfkitError

    monkeypatch.setitem(__import__("sys").modules, "deepspeed", None)  # `import deepspeed` raises ImportError
    with pytest.raises(RlhfkitError, match="--deepspeed needs the deepspeed package, which is not installed here"):
        require_deepspeed()


@pytest.mark.slow
@pytest.mark.parametrize("stage, extra", [("zero1", []), ("zero3", ["--grad-accum", 1])])
def test_sft_under_other_zero_stages_matches_one_process(model_without_dropout, tmp_path, run_cli, stage, extra):
    # ZeRO-3 shards the parameters too: saving gathers them (from_pretrained must load the
    # result); it refuses --grad-accum > 1 (see rlhfkit.training.fit).
    data = write_demos(tmp_path / "demos.jsonl")
    one, two = tmp_path / "sft-one", tmp_path / "sft-two"
    assert run_cli(*sft_args(model_without_dropout, data, one, 4, *extra)).exit_code == 0
    run_processes(tmp_path, *sft_args(model_without_dropout, data, two, 2, "--deepspeed", stage, *extra))
    # ZeRO-3 updates partitions: a weight with a ~0 gradient moved 1.4e-5 (of a 1e-3 step)
    # apart once, which the update comparison (UPDATE_REL) allows for.
    assert_same_training(one, two, ("loss", "grad_norm", "lr", "eval_loss"), model_without_dropout)
