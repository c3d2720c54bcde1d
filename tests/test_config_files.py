"""A recipe accepts what a stage's --config file accepts (YAML 1.1 reads `1e-5` as a string)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlhfkit.errors import RlhfkitError
from rlhfkit.recipes import load_plan, resolve_plan


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_recipe_accepts_1e_minus_5_in_config_and_with(tmp_path):
    assert yaml.safe_load("lr: 1e-5") == {"lr": "1e-5"}  # why: YAML 1.1 floats need a dot
    write(tmp_path / "cfg/ppo.yaml", "lr: 1e-5\nsteps: '3'\nwhiten-rewards: 'yes'\n")
    plan = write(tmp_path / "plan.yaml", (
        "steps:\n  - stage: ppo\n    config: cfg/ppo.yaml\n"
        "    with: {policy: p, prompts: q, out: o, rewards: a=1, value_lr: 2e-5}\n"
    ))
    (resolved,) = resolve_plan(load_plan(plan))
    # the same conversions click makes for `rlhfkit ppo --config cfg/ppo.yaml`
    assert resolved.config.lr == 1e-05 and isinstance(resolved.config.lr, float)
    assert resolved.config.value_lr == 2e-05
    assert resolved.config.steps == 3
    assert resolved.config.whiten_rewards is True


def test_stage_config_file_reads_1e_minus_5_the_same_way(tmp_path):
    import typer
    from typer.testing import CliRunner

    from rlhfkit.config import command_from_config
    from rlhfkit.stages.ppo import PPOConfig

    seen = {}
    app = typer.Typer()
    app.command()(command_from_config(PPOConfig, lambda cfg: seen.update(lr=cfg.lr), lambda entry, make, debug: entry(make())))
    config = write(tmp_path / "ppo.yaml", "lr: 1e-5\n")
    result = CliRunner().invoke(app, ["--config", str(config), "--policy", "p", "--prompts", "q", "--out", "o", "--rewards", "a=1"])
    assert result.exit_code == 0, result.output
    assert seen == {"lr": 1e-05}


def test_recipe_still_rejects_a_non_number(tmp_path):
    plan = write(tmp_path / "plan.yaml", "steps:\n  - stage: ppo\n    with: {policy: p, prompts: q, out: o, rewards: a=1, lr: 1e-5x}\n")
    with pytest.raises(RlhfkitError, match=r"step 1 \(ppo\): option lr must be float, got '1e-5x'"):
        resolve_plan(load_plan(plan))
