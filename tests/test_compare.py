"""`rlhfkit compare` on two hand-made run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def make_run(path: Path, stage: str, rows: list[dict]) -> Path:
    path.mkdir(parents=True)
    (path / "run_config.json").write_text(json.dumps({"stage": stage, "config": {}}))
    (path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def two_runs(tmp_path) -> tuple[Path, Path]:
    fine = make_run(tmp_path / "ppo-fine-grained", "ppo", [
        {"step": 1, "reward/total": 0.10, "kl": 0.0},
        {"step": 2, "reward/total": 0.35, "kl": 0.5},
        {"step": 2, "eval/reward_total": 0.2},          # an eval row of the same step
        {"step": 3, "reward/total": 0.60, "kl": "nan"},  # a non-finite value, as RunDir writes it
    ])
    holistic = make_run(tmp_path / "ppo-holistic", "ppo", [
        {"step": 1, "reward/total": -0.25, "kl": 0.25},
        {"step": 2, "reward/total": 0.125, "kl": 1.0},
        {"reward/total": 9.0},                           # no step: left out
    ])
    return fine, holistic


def test_markdown_table_of_first_and_last_values(run_cli, two_runs, tmp_path):
    fine, holistic = two_runs
    out = tmp_path / "cmp.md"
    result = run_cli("compare", fine, holistic, "--metric", "reward/total", "--metric", "kl", "--out", out)
    assert result.exit_code == 0, result.output
    # reward/total: fine-grained 0.10 -> 0.60 (change +0.50, last step 3); holistic -0.25 -> 0.125
    # (change +0.375, last step 2; the step-less 9.0 is ignored). kl: fine-grained's step-3 "nan"
    # is skipped, so 0.0 -> 0.5 at step 2; holistic 0.25 -> 1.0 (+0.75).
    assert out.read_text() == (
        "# Run comparison: reward/total, kl\n"
        "\n"
        "## reward/total\n"
        "\n"
        "| run | stage | last step | first | last | change |\n"
        "|---|---|---:|---:|---:|---:|\n"
        "| ppo-fine-grained | ppo | 3 | 0.1000 | 0.6000 | +0.5000 |\n"
        "| ppo-holistic | ppo | 2 | -0.2500 | 0.1250 | +0.3750 |\n"
        "\n"
        "## kl\n"
        "\n"
        "| run | stage | last step | first | last | change |\n"
        "|---|---|---:|---:|---:|---:|\n"
        "| ppo-fine-grained | ppo | 2 | 0.0000 | 0.5000 | +0.5000 |\n"
        "| ppo-holistic | ppo | 2 | 0.2500 | 1.0000 | +0.7500 |\n"
    )


def test_default_metric_labels_and_png(run_cli, two_runs, tmp_path):
    fine, holistic = two_runs
    md = tmp_path / "default.md"
    result = run_cli("compare", fine, holistic, "--labels", "FG", "--labels", "H", "--out", md)
    assert result.exit_code == 0, result.output
    text = md.read_text()
    assert text.startswith("# Run comparison: reward/total\n")  # the default metric of PPO runs
    assert "| FG | ppo | 3 | 0.1000 | 0.6000 | +0.5000 |" in text
    png = tmp_path / "curves.png"
    result = run_cli("compare", fine, holistic, "--out", png)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--metric", "reward/totl"], "no 'reward/totl' in metrics.jsonl; did you mean 'reward/total'?"),
        (["--out-kind"], "No such option"),
    ],
)
def test_bad_metric(run_cli, two_runs, tmp_path, extra, message):
    fine, holistic = two_runs
    out = tmp_path / "x.md"
    result = run_cli("compare", fine, holistic, "--out", out, *extra)
    assert result.exit_code == 2
    assert message in result.output
    assert not out.exists()


def test_bad_inputs(run_cli, two_runs, tmp_path):
    fine, _ = two_runs
    result = run_cli("compare", fine, tmp_path / "missing", "--out", tmp_path / "x.md")
    assert result.exit_code == 2 and "missing: no metrics.jsonl (not an rlhfkit run directory)" in result.output
    result = run_cli("compare", fine, "--out", tmp_path / "x.txt")
    assert result.exit_code == 2 and "--out must end in .png or .md" in result.output
    broken = make_run(tmp_path / "broken", "sft", [{"step": 1, "loss": 1.0}])
    with open(broken / "metrics.jsonl", "a") as handle:
        handle.write("{not json\n")
    result = run_cli("compare", broken, "--out", tmp_path / "x.md")
    assert result.exit_code == 2 and f"{broken / 'metrics.jsonl'}:2: invalid JSON" in result.output
    assert not (tmp_path / "x.md").exists()


def test_an_old_ppo_run_is_read_by_todays_reward_names(run_cli, tmp_path):
    # Before issue 23 a PPO run logged the weighted value as reward/NAME (and eval/reward_NAME);
    # today's run logs reward/raw/NAME beside reward/weighted/NAME.
    old = make_run(tmp_path / "old", "ppo", [
        {"step": 1, "reward/total": 0.1, "reward/factuality": 0.25},
        {"step": 2, "reward/total": 0.3, "reward/factuality": 0.5, "eval/reward_factuality": 0.75},
    ])
    new = make_run(tmp_path / "new", "ppo", [
        {"step": 1, "reward/total": 0.2, "reward/raw/factuality": 1.0, "reward/weighted/factuality": 0.5},
        {"step": 2, "reward/total": 0.4, "reward/raw/factuality": 2.0, "reward/weighted/factuality": 1.0},
    ])
    out = tmp_path / "cmp.md"
    result = run_cli("compare", old, new, "--metric", "reward/weighted/factuality", "--out", out)
    assert result.exit_code == 0, result.output
    assert "old logged rewards under the old names" in " ".join(result.output.split())
    assert "new logged" not in result.output
    # old: 0.25 -> 0.5 (+0.25); new: 0.5 -> 1.0 (+0.5)
    assert "| old | ppo | 2 | 0.2500 | 0.5000 | +0.2500 |" in out.read_text()
    assert "| new | ppo | 2 | 0.5000 | 1.0000 | +0.5000 |" in out.read_text()
    # a raw score the old run never logged: a clear error naming what it has
    result = run_cli("compare", old, new, "--metric", "reward/raw/factuality", "--out", out)
    assert result.exit_code == 2
    assert "old: no 'reward/raw/factuality'" in result.output and "reward/weighted/factuality" in result.output
