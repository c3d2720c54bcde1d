"""--report-to: TensorBoard event files hold exactly metrics.jsonl's scalars; parsing and errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlhfkit.errors import RlhfkitError
from rlhfkit.schema import PromptRecord, write_records
from rlhfkit.tracking import markdown_table, parse_report_to, scalars


def read_event_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from the event files, read with TensorBoard's own loader."""
    from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    accumulator = EventAccumulator(str(log_dir), size_guidance={TENSORS: 0})  # 0: keep every event
    accumulator.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in accumulator.Tags()[TENSORS]:
        if tag.endswith("/text_summary"):  # the config and rollout tables
            continue
        out[tag] = {event.step: make_ndarray(event.tensor_proto).item() for event in accumulator.Tensors(tag)}
    return out


def read_event_texts(log_dir: Path, tag: str) -> dict[int, str]:
    from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    accumulator = EventAccumulator(str(log_dir), size_guidance={TENSORS: 0})
    accumulator.Reload()
    return {event.step: make_ndarray(event.tensor_proto).item().decode() for event in accumulator.Tensors(f"{tag}/text_summary")}


def test_ppo_tensorboard_event_file_equals_metrics_jsonl(run_cli, tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_records(prompts, [PromptRecord(id=f"p{i}", prompt=f"question: what is {i} plus {i}? answer:") for i in range(4)])
    out = tmp_path / "ppo"
    result = run_cli(
        "ppo", "--policy", tiny_model_dir, "--prompts", prompts, "--out", out,
        "--rewards", "judge=1", "--rm", "judge=py:tests.judges:count_letters_e",
        "--steps", 2, "--prompts-per-step", 2, "--samples-per-prompt", 2, "--minibatch-size", 4,
        "--ppo-epochs", 1, "--max-new-tokens", 8, "--max-prompt-length", 32, "--log-rollouts", 2,
        "--report-to", "tensorboard",
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in scalars(row).items():
            expected.setdefault(key, {})[row["step"]] = value
    # The scalars are written as float64 tensors, so equality is exact (no float32 rounding).
    logged = read_event_scalars(out / "tensorboard")
    assert logged == expected
    # the trackers carry the same reward names as metrics.jsonl (raw and weighted per source)
    assert {"reward/total", "reward/raw/judge", "reward/weighted/judge", "kl", "tokens_per_second"} <= set(logged)
    assert sorted(logged["reward/total"]) == [1, 2]

    # the resolved config, and a table of the 2 logged rollouts per step
    config = read_event_texts(out / "tensorboard", "config")[0]
    assert json.loads(config.removeprefix("```json\n").removesuffix("\n```")) == json.loads(
        (out / "run_config.json").read_text()
    )["config"]
    tables = read_event_texts(out / "tensorboard", "rollouts")
    assert sorted(tables) == [1, 2]
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    step1 = [r for r in rollouts if r["meta"]["step"] == 1]
    table_rows = tables[1].splitlines()[2:]
    assert len(table_rows) == len(step1) == 2
    # each row: step | prompt | response | reward (the token rewards' sum) | tokens | finished
    assert table_rows[0].startswith(f"| 1 | {step1[0]['prompt']} |")
    assert f"| {round(sum(step1[0]['token_rewards']), 6):.4f} | {len(step1[0]['token_rewards'])} |" in table_rows[0]


def test_report_to_parsing():
    assert parse_report_to(["tensorboard"]) == ["tensorboard"]
    assert parse_report_to(["tensorboard,tensorboard", " TensorBoard "]) == ["tensorboard"]
    assert parse_report_to([]) == []
    assert parse_report_to(["none"]) == []
    with pytest.raises(RlhfkitError, match=r"unknown --report-to 'tensorbord' \(did you mean tensorboard\?\)"):
        parse_report_to(["tensorbord"])
    with pytest.raises(RlhfkitError, match="cannot be combined"):
        parse_report_to(["none,tensorboard"])


def test_missing_tracker_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RlhfkitError) as err:
        parse_report_to(["tensorboard,wandb"])
    assert str(err.value) == "--report-to wandb needs the wandb package: pip install 'rlhfkit[wandb]'"


def test_bad_report_to_fails_before_writing(run_cli, tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_records(prompts, [PromptRecord(id="p0", prompt="question: why? answer:")])
    out = tmp_path / "never"
    result = run_cli("ppo", "--policy", tiny_model_dir, "--prompts", prompts, "--out", out, "--rewards", "j=1",
                     "--rm", "j=py:tests.judges:count_letters_e", "--report-to", "mlflw")
    assert result.exit_code == 2
    assert "unknown --report-to 'mlflw' (did you mean mlflow?)" in result.output
    assert not out.exists()


def test_scalars_and_markdown_table():
    # step is the x axis, strings (non-finite values as metrics.jsonl writes them) are skipped
    assert scalars({"step": 3, "loss": 0.5, "early_stopped": True, "kl": "nan", "epochs_run": 2}) == {
        "loss": 0.5, "early_stopped": 1.0, "epochs_run": 2.0,
    }
    assert markdown_table(["a", "b"], [[1, "x|y\nz"], [0.25, "w"]]) == "| a | b |\n|---|---|\n| 1 | x\\|y z |\n| 0.2500 | w |"


@dataclass
class _TrackedConfig:
    report_to: list[str]
    lr: float = 1e-5


def test_mlflow_local_store_gets_the_same_scalars(tmp_path):
    mlflow = pytest.importorskip("mlflow")  # the `mlflow` extra; not in `dev`
    from rlhfkit.runs import RunDir

    run = RunDir(tmp_path / "run", "ppo", _TrackedConfig(["mlflow"]))
    run.log_metrics(step=1, **{"reward/total": 0.5, "kl": 0.01, "flag": "nan"})
    run.log_metrics(step=2, **{"reward/total": 0.75})
    run.close()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    (logged,) = client.search_runs([mlflow.get_experiment_by_name("rlhfkit").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(logged.info.run_id, "reward/total")] == [(1, 0.5), (2, 0.75)]
    assert logged.data.params["lr"] == "1e-05"
