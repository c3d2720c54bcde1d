"""The conventions every stage shares: options from the config dataclass, --config YAML,
command line over file over defaults, one-line errors with exit 2, run_config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import typer
from typer.testing import CliRunner

from rlhfkit.config import REQUIRED, build_config, command_from_config, opt, run_stage
from rlhfkit.errors import RlhfkitError
from rlhfkit.runs import RUN_CONFIG, RunDir


@dataclass
class ToyConfig:
    out: str = opt(REQUIRED, "Output directory.")
    lr: float = opt(1e-5, "Learning rate.")
    steps: int = opt(10, "Steps.")
    use_lora: bool = opt(False, "LoRA.")
    rm: list[str] = opt([], "NAME=PATH, repeatable.")

    def validate(self) -> None:
        if self.steps < 1:
            raise RlhfkitError(f"--steps must be >= 1, got {self.steps}")


seen: list[ToyConfig] = []


def run_toy(cfg: ToyConfig) -> None:
    """Toy stage."""
    if cfg.out == "explode":
        raise RlhfkitError("input.jsonl:3: invalid JSON [with brackets]")
    seen.append(cfg)
    RunDir(cfg.out, "toy", cfg).log_metrics(step=1, loss=0.5)


toy_app = typer.Typer(pretty_exceptions_enable=False)
toy_app.command("toy")(command_from_config(ToyConfig, run_toy, run_stage))
toy_app.command("other")(lambda: None)
runner = CliRunner()


@pytest.fixture(autouse=True)
def _clear():
    seen.clear()


def test_defaults_and_cli_values(tmp_path):
    result = runner.invoke(toy_app, ["toy", "--out", str(tmp_path), "--lr", "0.1", "--rm", "a=x", "--rm", "b=y"])
    assert result.exit_code == 0, result.output
    assert seen[0] == ToyConfig(out=str(tmp_path), lr=0.1, steps=10, use_lora=False, rm=["a=x", "b=y"])


def test_config_file_then_command_line_overrides(tmp_path):
    config = tmp_path / "c.yaml"
    out = tmp_path / "run"  # its own directory: --out may not be one that holds other files
    config.write_text(f"out: {out}\nlr: 0.5\nuse-lora: true\nsteps: 7\n")
    result = runner.invoke(toy_app, ["toy", "--config", str(config), "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert seen[0].lr == 0.5 and seen[0].use_lora is True and seen[0].steps == 3
    saved = json.loads((out / RUN_CONFIG).read_text())
    assert saved["stage"] == "toy"
    assert saved["config"] == {"out": str(out), "lr": 0.5, "steps": 3, "use_lora": True, "rm": []}
    assert saved["versions"]["torch"] and saved["versions"]["transformers"]
    assert [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1, "loss": 0.5}
    ]


def test_unknown_config_key_lists_valid_ones(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("out: x\nlearning_rate: 0.5\n")
    result = runner.invoke(toy_app, ["toy", "--config", str(config)])
    assert result.exit_code == 2
    assert "learning_rate" in result.output and "valid: lr, out, rm, steps, use_lora" in result.output
    assert not seen


def test_missing_required_option():
    result = runner.invoke(toy_app, ["toy"])
    assert result.exit_code == 2
    assert "missing required option(s): --out" in result.output


def test_bad_input_is_one_line_and_exit_2():
    result = runner.invoke(toy_app, ["toy", "--out", "explode"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: input.jsonl:3: invalid JSON [with brackets]"
    assert "Traceback" not in result.output


def test_validate_runs_before_the_stage(tmp_path):
    result = runner.invoke(toy_app, ["toy", "--out", str(tmp_path), "--steps", "0"])
    assert result.exit_code == 2 and "--steps must be >= 1, got 0" in result.output
    assert not seen and not (tmp_path / RUN_CONFIG).exists()


def test_debug_shows_the_traceback():
    with pytest.raises(RlhfkitError):
        runner.invoke(toy_app, ["toy", "--out", "explode", "--debug"], catch_exceptions=False)


def test_build_config_is_the_python_api():
    cfg = build_config(ToyConfig, out="o", steps=2)
    assert cfg.steps == 2 and cfg.lr == 1e-5
    with pytest.raises(RlhfkitError, match="--out"):
        build_config(ToyConfig)


def test_help_lists_every_pipeline_stage():
    from rlhfkit.cli import app

    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for stage in ["annotate-import", "train-rm", "redistribute", "sft", "ppo", "evaluate", "critique-revise", "init-model", "launch"]:
        assert stage in result.output


def _stage_configs():
    import dataclasses
    import importlib

    from rlhfkit.cli import STAGES

    for name, (module, config_name, *_rest) in STAGES.items():
        yield name, dataclasses.fields(getattr(importlib.import_module(module), config_name))


def test_every_option_names_its_panel():
    # A new option without opt(panel=...) would land in the catch-all "Other" panel.
    from rlhfkit.config import PANELS

    unpanelled = [f"{stage} --{f.name.replace('_', '-')}" for stage, fields in _stage_configs() for f in fields
                  if not f.metadata["argument"] and f.metadata.get("panel") not in PANELS]
    assert unpanelled == []


def test_one_default_seed():
    from rlhfkit.config import DEFAULT_SEED

    seeds = {stage: f.default for stage, fields in _stage_configs() for f in fields if f.name == "seed"}
    assert len(seeds) >= 7 and set(seeds.values()) == {DEFAULT_SEED}, seeds


def _help(*args: str) -> str:
    from rlhfkit.cli import app

    return CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200"}).output


def test_help_opens_with_the_required_options_and_names_types():
    text = _help("ppo")
    panels = [line.split("─")[1].strip() for line in text.splitlines() if line.startswith("╭─")]
    assert panels[0] == "Required" and panels[-1] == "Other"
    required = text.split("╭─ Required")[1].split("╰")[0]
    assert [w for w in required.split() if w.startswith("--")] == ["--policy", "--prompts", "--out", "--rewards"]
    # Human type names, not Python's.
    assert "--steps" in text and "INTEGER" in text and "NUMBER" in text
    for stage in ("ppo", "sft", "train-rm", "evaluate", "critique-revise", "report"):
        assert "<str>" not in _help(stage) and "<list[str]>" not in _help(stage) and "<bool>" not in _help(stage)


def test_critique_revise_actions_have_their_own_help():
    train, run = _help("critique-revise", "train"), _help("critique-revise", "run")
    assert train != run
    assert "Usage: rlhfkit critique-revise train [OPTIONS]" in train and "Fine-tune a critique-and-revise model" in train
    assert "--data " in train and "--input " not in train and "--rounds" not in train
    assert "Usage: rlhfkit critique-revise run [OPTIONS]" in run and "--judge" in run
    assert "--input " in run and "--data " not in run and "--lora-r" not in run
