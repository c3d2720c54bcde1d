"""The shared training loop (rlhfkit.training) on toy models whose numbers can be worked out by hand."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhfkit.errors import RlhfkitError, TrainingDiverged
from rlhfkit.runs import RunDir
from rlhfkit.training import (
    STATE_FILE,
    LoopSettings,
    StepPlan,
    checkpoint_dir,
    fit,
    group_batches,
    latest_checkpoint,
    list_checkpoints,
    padding_counts,
    split_held_out,
)


@dataclass
class ToyConfig:
    seed: int = 0


class ToyModel(nn.Module):
    """A linear regressor with dropout (so resuming must restore the RNG) and the
    save_pretrained / from_pretrained pair checkpoints use."""

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.linear = nn.Linear(3, 1)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(x)).squeeze(-1)

    def save_pretrained(self, directory: Path) -> None:
        save_file(self.state_dict(), str(Path(directory) / "toy.safetensors"))

    @classmethod
    def from_pretrained(cls, directory: Path, dtype: torch.dtype = torch.float32) -> ToyModel:
        model = cls()
        model.load_state_dict(load_file(str(Path(directory) / "toy.safetensors")))
        return model.to(dtype)


def toy_items(n: int = 12) -> list[tuple[list[float], float]]:
    generator = torch.Generator().manual_seed(1)
    xs = torch.randn(n, 3, generator=generator)
    ys = xs @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
    return [(x.tolist(), float(y)) for x, y in zip(xs, ys)]


def toy_collate(items):
    return {"x": torch.tensor([x for x, _ in items]), "y": torch.tensor([y for _, y in items])}


def toy_loss(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).sum(), len(batch["y"])


def settings(tmp_path: Path, **overrides) -> LoopSettings:
    values = {"out": tmp_path, "batch_size": 2, "grad_accum": 2, "epochs": 3, "lr": 0.05, "seed": 0}
    values.update(overrides)
    return LoopSettings(**values)


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_held_out_split_is_seeded_disjoint_and_complete():
    items = list(range(20))
    train, held = split_held_out(items, 0.1, seed=3)
    assert len(held) == 2 and len(train) == 18
    assert sorted(train + held) == items
    assert split_held_out(items, 0.1, seed=3) == (train, held)
    # any fraction > 0 holds out at least one item; 0 holds out none
    assert len(split_held_out(items, 0.01, seed=3)[1]) == 1
    assert split_held_out(items, 0.0, seed=3) == (items, [])
    with pytest.raises(RlhfkitError, match="cannot be split"):
        split_held_out([1], 0.5, seed=0)


def test_step_plan_covers_every_item_once_per_epoch():
    # 10 items, micro-batches of 3, 2 per step: windows of 6 items -> [3, 3] then [3, 1].
    plan = StepPlan(n_items=10, batch_size=3, grad_accum=2, epochs=2, max_steps=None, seed=0)
    assert plan.steps_per_epoch == 2 and plan.total_steps == 4
    windows = list(plan.windows())
    assert [step for step, _ in windows] == [1, 2, 3, 4]
    assert [[len(b) for b in batches] for _, batches in windows] == [[3, 3], [3, 1], [3, 3], [3, 1]]
    for epoch in (windows[:2], windows[2:]):
        assert sorted(i for _, batches in epoch for b in batches for i in b) == list(range(10))
    # the two epochs use different orders, and a resumed plan sees exactly the same windows
    assert windows[0][1] != windows[2][1]
    assert list(plan.windows(start_step=3)) == windows[3:]
    # max_steps overrides epochs and wraps into a third epoch
    longer = StepPlan(n_items=10, batch_size=3, grad_accum=2, epochs=2, max_steps=5, seed=0)
    assert [step for step, _ in longer.windows()] == [1, 2, 3, 4, 5] and list(longer.windows())[:4] == windows


class Scalar(nn.Module):
    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))


def values_collate(items):
    width = max(len(v) for v in items)
    values = torch.tensor([v + [0.0] * (width - len(v)) for v in items])
    mask = torch.tensor([[1.0] * len(v) + [0.0] * (width - len(v)) for v in items])
    return {"values": values, "mask": mask}


def values_loss(model, batch):
    # loss = w * sum(values): d loss / d w = sum(values), counted per value ("token")
    return model.w * (batch["values"] * batch["mask"]).sum(), batch["mask"].sum()


def test_accumulated_gradient_is_the_mean_over_all_tokens_of_the_window(tmp_path):
    # Items [1, 1, 1] and [4] in two micro-batches of one: over the 4 tokens the mean
    # gradient is (1 + 1 + 1 + 4) / 4 = 1.75 (a mean of per-batch means would give 2.5),
    # and the loss at w = 2 is 2 * 7 / 4 = 3.5.
    run = RunDir(tmp_path, "toy", ToyConfig())
    result = fit(
        Scalar(2.0),
        [[1.0, 1.0, 1.0], [4.0]],
        values_collate,
        values_loss,
        settings(tmp_path, batch_size=1, grad_accum=2, epochs=1, max_grad_norm=0.0),
        run,
    )
    assert result.steps == 1 and result.samples == 2
    (row,) = metric_rows(tmp_path)
    assert row["grad_norm"] == pytest.approx(1.75)
    assert row["loss"] == pytest.approx(3.5)


def test_linear_warmup_then_decay(tmp_path):
    # 10 steps, warm-up ratio 0.2 -> 2 warm-up steps. The lr used at step s (1-based) is
    # 0.1 * (s - 1) / 2 during warm-up, then 0.1 * (10 - (s - 1)) / 8.
    run = RunDir(tmp_path, "toy", ToyConfig())
    fit(ToyModel(), toy_items(4), toy_collate, toy_loss, settings(tmp_path, batch_size=4, grad_accum=1, epochs=10, lr=0.1, warmup_ratio=0.2), run)
    lrs = [row["lr"] for row in metric_rows(tmp_path)]
    assert lrs == pytest.approx([0.0, 0.05, 0.1, 0.0875, 0.075, 0.0625, 0.05, 0.0375, 0.025, 0.0125])


def test_training_lowers_the_loss_and_evaluates_before_and_after(tmp_path):
    # Seeded: the dropout draws come from torch's global generator, which torch 2.13 seeds
    # afresh in every process, and with dropout 0.5 on the inputs the final/initial eval-loss
    # ratio depends on them: 0.19-0.30 over seeds 0-11, above the bound below for 2 of those
    # 12 (unseeded, the test failed now and then). Seed 0 gives 0.2425, 3% inside the bound, far more than float
    # rounding moves a 60-step fp32 run of a 4-weight model.
    torch.manual_seed(0)
    run = RunDir(tmp_path, "toy", ToyConfig())
    model = ToyModel()
    items = toy_items()
    result = fit(
        model, items, toy_collate, toy_loss, settings(tmp_path, epochs=20, lr=0.05), run,
        evaluate=lambda: {"loss": toy_loss(model, toy_collate(items))[0].item() / len(items)},
    )
    assert [e["step"] for e in result.evals] == [0, result.steps] and result.steps == 60
    assert result.evals[-1]["loss"] < 0.25 * result.evals[0]["loss"]
    rows = metric_rows(tmp_path)
    assert rows[0] == {"step": 0, "eval_loss": result.evals[0]["loss"]}
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 61))


class Interrupt(Exception):
    pass


def interrupting(loss_fn, after_calls: int):
    calls = {"n": 0}

    def wrapped(model, batch):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise Interrupt
        return loss_fn(model, batch)

    return wrapped


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    items = toy_items()
    # 12 items, 2 x 2 per step -> 3 steps per epoch, 9 steps; dropout draws from torch's RNG.
    straight = ToyModel()
    torch.manual_seed(5)
    fit(straight, items, toy_collate, toy_loss, settings(tmp_path / "a", save_every=2), RunDir(tmp_path / "a", "toy", ToyConfig()))

    out = tmp_path / "b"
    torch.manual_seed(5)
    with pytest.raises(Interrupt):
        # 2 micro-batches per step: dies inside step 6, after the step-4 checkpoint
        fit(ToyModel(), items, toy_collate, interrupting(toy_loss, 11), settings(out, save_every=2), RunDir(out, "toy", ToyConfig()))
    assert [p.name for p in list_checkpoints(out)] == ["step-2", "step-4"]
    torch.manual_seed(123)  # whatever the RNG is now, the checkpoint's state is restored
    resumed = ToyModel(seed=99)
    result = fit(resumed, items, toy_collate, toy_loss, settings(out, save_every=2, resume=True), RunDir(out, "toy", ToyConfig(), resume=True))
    assert result.resumed_from == 4 and result.steps == 9 and len(result.losses) == 9
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert [r["step"] for r in metric_rows(out)] == list(range(1, 10))
    assert metric_rows(out) == metric_rows(tmp_path / "a")


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    items = toy_items()
    fit(ToyModel(), items, toy_collate, toy_loss, settings(tmp_path, epochs=1, save_every=1), RunDir(tmp_path, "toy", ToyConfig()))
    with pytest.raises(RlhfkitError, match=r"batch_size: 2 then, 3 now"):
        fit(ToyModel(), items, toy_collate, toy_loss, settings(tmp_path, batch_size=3, resume=True), RunDir(tmp_path, "toy", ToyConfig(), resume=True))


def test_old_checkpoints_are_pruned_and_the_final_step_is_not_a_checkpoint(tmp_path):
    fit(ToyModel(), toy_items(), toy_collate, toy_loss, settings(tmp_path, epochs=2, save_every=1, keep_checkpoints=2), RunDir(tmp_path, "toy", ToyConfig()))
    # 6 steps; checkpoints after steps 1..5, the newest two kept
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-4", "step-5"]
    assert (checkpoint_dir(tmp_path, 5) / STATE_FILE).is_file()
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temporary directories left


def nan_at_call(loss_fn, call: int):
    calls = {"n": 0}

    def wrapped(model, batch):
        calls["n"] += 1
        loss, count = loss_fn(model, batch)
        return (loss * float("nan") if calls["n"] == call else loss), count

    return wrapped


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(tmp_path):
    model = ToyModel()
    # one micro-batch per step: call 3 is step 3, after the step-2 checkpoint
    with pytest.raises(TrainingDiverged) as caught:
        fit(model, toy_items(), toy_collate, nan_at_call(toy_loss, 3), settings(tmp_path, grad_accum=1, save_every=2), RunDir(tmp_path, "toy", ToyConfig()))
    message = str(caught.value)
    assert "training diverged at step 3: the loss is nan" in message
    assert f"the last good checkpoint is {checkpoint_dir(tmp_path, 2)}" in message
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 2)
    # the bad step was never applied: the weights are finite, and the checkpoint is loadable
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved = ToyModel.from_pretrained(checkpoint_dir(tmp_path, 2))
    assert all(torch.isfinite(p).all() for p in saved.parameters())
    assert TrainingDiverged.exit_code == 3


def test_infinite_lr_is_caught_before_a_broken_checkpoint_is_written(tmp_path):
    model = ToyModel()
    with pytest.raises(TrainingDiverged, match="step 1: a parameter became NaN/inf; no checkpoint had been saved yet"):
        fit(model, toy_items(), toy_collate, toy_loss, settings(tmp_path, lr=math.inf, save_every=1), RunDir(tmp_path, "toy", ToyConfig()))
    assert list_checkpoints(tmp_path) == []


def test_infinite_lr_without_checkpoints_fails_at_the_next_loss(tmp_path):
    with pytest.raises(TrainingDiverged, match="step 2: the loss is (nan|inf)"):
        fit(ToyModel(), toy_items(), toy_collate, toy_loss, settings(tmp_path, lr=math.inf), RunDir(tmp_path, "toy", ToyConfig()))


# --- length-grouped batching ------------------------------------------------------------------

LENGTHS = [5, 1, 9, 3, 7, 2]


def test_length_grouped_batches_by_hand():
    batches = group_batches(list(range(6)), 2, torch.Generator().manual_seed(0), lengths=LENGTHS)
    # One window (2 x 50 > 6 items), sorted longest first: 9 (item 2), 7 (4), 5 (0), 3 (3), 2 (5), 1 (1).
    assert sorted(batches) == [[0, 3], [2, 4], [5, 1]]
    # Seeded: the same generator state gives the same batch order.
    assert batches == group_batches(list(range(6)), 2, torch.Generator().manual_seed(0), lengths=LENGTHS)
    rows = [[n] for n in LENGTHS]
    # [9, 7]: width 9 x 2 = 18 tokens, 2 padded; [5, 3]: 10 tokens, 2 padded; [2, 1]: 4 tokens, 1 padded -> 5 / 32.
    assert padding_counts(batches, rows) == (5, 32)
    # In arrival order: [5, 1]: 10 tokens, 4 padded; [9, 3]: 18, 6; [7, 2]: 14, 5 -> 15 / 42.
    assert padding_counts([[0, 1], [2, 3], [4, 5]], rows) == (15, 42)


def test_groups_never_share_a_batch():
    groups = ["a", "b", "a", "b", "a", "b"]
    batches = group_batches(list(range(6)), 2, torch.Generator().manual_seed(0), groups=groups, lengths=LENGTHS)
    # a: items 0, 2, 4 (lengths 5, 9, 7) -> [2, 4], [0]; b: items 1, 3, 5 (1, 3, 2) -> [3, 5], [1].
    assert sorted(batches) == [[0], [1], [2, 4], [3, 5]]
    plan = StepPlan(6, 2, 3, 1, None, 0, groups=tuple(groups))
    assert plan.batches_per_epoch == 4 and plan.steps_per_epoch == 2
    assert sorted(i for _, window in plan.windows() for batch in window for i in batch) == list(range(6))


def test_padding_of_a_preference_group_counts_every_response():
    # Item 0 puts two responses (3 and 5 tokens) in the batch, item 1 one of 2: width 5 x 3 rows = 15, 10 real.
    assert padding_counts([[0, 1]], [[3, 5], [2]]) == (5, 15)


def test_fit_reports_the_padding_fraction(tmp_path):
    items = toy_items(6)
    run = RunDir(tmp_path, "test", ToyConfig())
    result = fit(ToyModel(), items, toy_collate, toy_loss, settings(tmp_path, grad_accum=1, epochs=1, group_by_length=True),
                 run, item_lengths=[[n] for n in LENGTHS])
    run.close()
    # Every item once, in the batches of test_length_grouped_batches_by_hand: 5 of 32 tokens padded.
    assert result.padding_fraction == pytest.approx(5 / 32, abs=1e-12)
    assert all("padding_fraction" in row for row in metric_rows(tmp_path) if "loss" in row)
