"""The `rlhfkit` command line: one thin command per stage.

Each stage module has a config dataclass and one entry function; the command is built from
the dataclass (see config.py), so this file only says which stages exist and how errors look.
"""

from __future__ import annotations

import importlib
import sys
import typer
from rich.text import Text

from rlhfkit import __version__
from rlhfkit.config import command_from_config, run_stage
from rlhfkit.console import console

app = typer.Typer(
    name="rlhfkit",
    help="Train language models from fine-grained human feedback.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# (command, module, config class, entry function); order is the pipeline's order.
STAGES = [
    ("annotate-import", "rlhfkit.stages.annotate_import", "ImportConfig", "run_import"),
    ("init-model", "rlhfkit.stages.init_model", "InitModelConfig", "run_init_model"),
    ("sft", "rlhfkit.stages.sft", "SFTConfig", "run_sft"),
    ("train-rm", "rlhfkit.stages.train_rm", "TrainRMConfig", "run_train_rm"),
]

# Stages whose issues have not landed yet: listed so `rlhfkit --help` shows the whole pipeline.
PLANNED = {
    "redistribute": "R3HF token-level reward redistribution (not implemented yet).",
    "ppo": "PPO with fine-grained, multi-reward-model dense rewards (not implemented yet).",
    "evaluate": "Evaluate policies with the papers' metrics (not implemented yet).",
    "critique-revise": "Critique-and-revise with natural-language feedback (not implemented yet).",
    "launch": "Start a stage under the DeepSpeed launcher (not implemented yet).",
}


def _register_stage(name: str, module_name: str, config_name: str, entry_name: str) -> None:
    module = importlib.import_module(module_name)
    cfg_cls, entry = getattr(module, config_name), getattr(module, entry_name)
    help_text = (entry.__doc__ or "").strip().split("\n\n")[0]
    app.command(name=name, help=help_text)(command_from_config(cfg_cls, entry, run_stage))


def _register_planned(name: str, help_text: str) -> None:
    def planned(args: list[str] = typer.Argument(None, hidden=True)) -> None:
        console.print(Text(f"error: `rlhfkit {name}` is not implemented yet", style="bold red"))
        raise typer.Exit(1)

    app.command(name=name, help=help_text, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})(planned)


for _stage in STAGES:
    _register_stage(*_stage)
for _name, _help in PLANNED.items():
    _register_planned(_name, _help)


def _version_callback(value: bool) -> None:
    if value:
        print(f"rlhfkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version."),
) -> None:
    """Train language models from fine-grained human feedback."""


def main() -> None:
    app(prog_name="rlhfkit")


if __name__ == "__main__":
    sys.exit(main())
