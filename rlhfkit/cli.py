"""The `rlhfkit` command line: one thin command per stage.

Each stage module has a config dataclass and one entry function; the command is built from
the dataclass (see config.py), so this file only says which stages exist. A stage's module
(and with it torch and transformers) is imported only when that stage runs, so `--help`
and quick commands start at once.
"""

from __future__ import annotations

import importlib
import sys
import typing
from difflib import get_close_matches

import click
import typer
from rich.markup import escape
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from rlhfkit import __version__
from rlhfkit.config import OTHER_PANEL, command_from_config, run_stage, type_name
from rlhfkit.console import console, quiet_libraries

# command -> (module, config class, entry function, one-line help); in pipeline order.
STAGES = {
    "annotate-import": ("rlhfkit.stages.annotate_import", "ImportConfig", "run_import",
                        "Convert human feedback (QA-Feedback, pairwise, critiques, doccano, Label Studio, HelpSteer2/3, UltraFeedback, PRM800K, Math-Shepherd) to rlhfkit JSONL."),
    "init-model": ("rlhfkit.stages.init_model", "InitModelConfig", "run_init_model",
                   "Build a tiny offline model and tokenizer (tests, demo, small recipes)."),
    "sft": ("rlhfkit.stages.sft", "SFTConfig", "run_sft",
            "Supervised fine-tuning on demonstrations (response tokens only)."),
    "train-rm": ("rlhfkit.stages.train_rm", "TrainRMConfig", "run_train_rm",
                 "Train the reward model of one feedback aspect (segment, preference or regression)."),
    "redistribute": ("rlhfkit.stages.redistribute", "RedistributeConfig", "run_redistribute",
                     "R3HF: spread a sequence RM's score over tokens; JSONL + HTML heat map."),
    "ppo": ("rlhfkit.stages.ppo", "PPOConfig", "run_ppo",
            "PPO with fine-grained dense rewards from several weighted reward models."),
    "evaluate": ("rlhfkit.stages.evaluate", "EvaluateConfig", "run_evaluate",
                 "Compare policies/generations: rewards, error rates, ROUGE-L, distinct-n, perplexity, win rates."),
    "critique-revise": ("rlhfkit.stages.critique_revise", "CritiqueReviseConfig", "run_critique_revise",
                        "Critique-and-revise with natural-language feedback: train | run (Jin et al. 2023)."),
    "compare": ("rlhfkit.stages.compare", "CompareConfig", "run_compare",
                "Compare runs side by side: metric curves (PNG) or first/last figures (markdown)."),
    "report": ("rlhfkit.stages.report", "ReportConfig", "run_report",
               "One self-contained HTML report of runs: config, curves, rollout heat maps, tables."),
    "recipe": ("rlhfkit.recipes", "RecipeConfig", "run_recipe",
               "Run a paper-table recipe (an ordered plan of stage runs), or --dry-run to validate it."),
    "launch": ("rlhfkit.stages.launch", "LaunchConfig", "run_launch",
               "Run a stage in one process per GPU on one or more nodes (DeepSpeed launcher)."),
}

# Shown under each stage's --help.
EXAMPLES = {
    "annotate-import": [
        "rlhfkit annotate-import --format qa-feedback data/qa_feedback/feedback.json --out runs/import",
        "rlhfkit annotate-import --format pairwise prefs.jsonl --out runs/import-pairs",
    ],
    "init-model": [
        "rlhfkit init-model --out models/tiny",
        "rlhfkit init-model --arch t5 --max-positions 512 --out models/tiny-t5",
    ],
    "sft": [
        "rlhfkit sft --model models/tiny --data runs/import/demonstrations.jsonl --out runs/sft",
        "rlhfkit sft --model gpt2 --data demos.jsonl --out runs/sft --lora-r 16 --report-to tensorboard",
        "rlhfkit sft --config recipes/qa_feedback/tiny/sft.yaml --model models/tiny --data demos.jsonl --out runs/sft",
    ],
    "train-rm": [
        "rlhfkit train-rm --aspect factuality --data runs/import/span_feedback.jsonl --model models/tiny --out runs/rm-fact",
        "rlhfkit train-rm --aspect completeness --data runs/import/preferences.jsonl --model models/tiny --out runs/rm-comp",
        "rlhfkit train-rm --aspect factuality --eval-only --model runs/rm-fact --data heldout.jsonl --out runs/rm-fact-eval",
        (
            "rlhfkit train-rm --aspect factuality,relevance,completeness --shared-backbone --data runs/import/span_feedback.jsonl "
            "--data-for completeness=runs/import/preferences.jsonl --model models/tiny --out runs/rm-fg"
        ),
    ],
    "redistribute": [
        "rlhfkit redistribute --rm runs/rm-comp --input runs/ppo/rollouts.jsonl --out runs/tokens.jsonl --html runs/tokens.html",
    ],
    "ppo": [
        "rlhfkit ppo --policy runs/sft --prompts runs/import/prompts.jsonl --out runs/ppo --rewards fact=0.5,rel=0.3 --rm fact=runs/rm-fact --rm rel=runs/rm-rel",
        "rlhfkit ppo --policy runs/sft --prompts runs/import/prompts.jsonl --out runs/ppo-holistic --rewards pref=1.0 --rm pref=runs/rm-pref --report-to tensorboard,wandb",
        "rlhfkit ppo --policy runs/sft --prompts runs/import/prompts.jsonl --out runs/ppo-r3hf --rewards pref=1.0 --rm pref=runs/rm-pref --redistribute pref",
    ],
    "evaluate": [
        "rlhfkit evaluate --policy SFT=runs/sft --policy PPO=runs/ppo --prompts runs/import/prompts.jsonl --rm fact=runs/rm-fact --out runs/eval",
    ],
    "critique-revise": [
        "rlhfkit critique-revise train --data runs/import/critiques.jsonl --model models/tiny --out runs/cr",
        "rlhfkit critique-revise run --model runs/cr --input runs/eval/generations.jsonl --rounds 3 --judge runs/rm-comp --out runs/cr-run",
    ],
    "compare": [
        "rlhfkit compare runs/ppo-fine-grained runs/ppo-holistic --out compare.png",
        "rlhfkit compare runs/ppo-fine-grained runs/ppo-holistic --metric reward/total --metric kl --out compare.md",
    ],
    "report": [
        "rlhfkit report runs/demo --out runs/demo/report.html",
        "rlhfkit report runs/ppo-fine-grained runs/ppo-holistic --out ppo.html",
    ],
    "recipe": [
        "rlhfkit recipe recipes/demo.yaml --set out=runs/demo",
        "rlhfkit recipe recipes/qa_feedback/tiny.yaml --dry-run",
    ],
    "launch": [
        "rlhfkit launch --gpus 8 -- ppo --config recipes/qa_feedback/paper/ppo_fine_grained.yaml --deepspeed zero2",
        "rlhfkit launch --dry-run --gpus 8 -- sft --model gpt2 --data demos.jsonl --out runs/sft --deepspeed zero2",
    ],
}

# Stages whose issues have not landed yet: listed so `rlhfkit --help` shows the whole pipeline.
PLANNED = {}


class StageCommand(TyperCommand):
    """A stage's command: --help is listed last, with --config and --debug, so the panels
    open with the required options. A stage with actions (its module's ACTION_HELP:
    `critique-revise train|run`) shows `STAGE ACTION --help` for that action alone."""

    action_help: typing.ClassVar[dict[str, tuple[str, set[str]]]] = {}

    def get_help_option(self, ctx: click.Context) -> click.Option | None:
        option = super().get_help_option(ctx)
        if option is not None:
            option.rich_help_panel = OTHER_PANEL
            option.metavar = ""
        return option

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        action = next((arg for arg in args if not arg.startswith("-")), None)
        if action in self.action_help and any(arg in ("--help", "-h") for arg in args):
            description, not_taken = self.action_help[action]
            self.help = escape(description)
            if self.epilog:  # the action's own examples
                heading, *examples = self.epilog.split("\n\n")
                self.epilog = "\n\n".join([heading, *(e for e in examples if f" {ctx.info_name} {action} " in e)])
            ctx.info_name = f"{ctx.info_name} {action}"
            for param in self.params:  # the action is given: its argument is not listed either
                param.hidden = param.hidden or param.name in not_taken or param.param_type_name == "argument"
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [piece for param in self.get_params(ctx) if not param.hidden for piece in param.get_usage_pieces(ctx)]


def stage_command(name: str) -> click.Command:
    """Import one stage and build its click command from its config dataclass."""
    module_name, config_name, entry_name, help_text = STAGES[name]
    module = importlib.import_module(module_name)
    cfg_cls, entry = getattr(module, config_name), getattr(module, entry_name)
    # "rich" markup mode groups the options in panels; help texts are escaped (config.py).
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")
    long_help = escape((entry.__doc__ or help_text).strip())
    examples = "\n\n".join(escape(example) for example in EXAMPLES.get(name, []))
    epilog = f"[bold]Examples[/bold]\n\n{examples}" if examples else None
    single.command(name=name, help=long_help, epilog=epilog, cls=StageCommand)(command_from_config(cfg_cls, entry, run_stage))
    command = typer.main.get_command(single)
    command.action_help = getattr(module, "ACTION_HELP", {})  # an instance's own, set once
    hints = typing.get_type_hints(cfg_cls)
    for param in command.params:
        if param.param_type_name == "argument" and param.name in hints:  # its type by name, as options show theirs
            shown = type_name(hints[param.name])
            param.display_type_rich = lambda ctx, shown=shown: shown
    return command


def planned_command(name: str) -> click.Command:
    @click.command(name=name, help=PLANNED[name], context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def planned(args: tuple[str, ...]) -> None:
        console.print(Text(f"error: `rlhfkit {name}` is not implemented yet", style="bold red"))
        sys.exit(1)

    return planned


class LazyStages(TyperGroup):
    """A group whose subcommands are built on demand from STAGES and PLANNED."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(STAGES) + list(PLANNED)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        # Before the stage's module imports transformers/DeepSpeed, which read the settings
        # then; `--debug` keeps the libraries' own output.
        if "--debug" not in args:
            quiet_libraries()
        if args and not args[0].startswith("-") and args[0] not in self.list_commands(ctx):
            close = get_close_matches(args[0], self.list_commands(ctx), n=2)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            ctx.fail(f"No such command '{args[0]}'.{hint}")
        return super().resolve_command(ctx, args)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in STAGES:
            return stage_command(name)
        if name in PLANNED:
            return planned_command(name)
        return None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, spec[3]) for name, spec in STAGES.items()] + list(PLANNED.items())
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _version_callback(value: bool) -> None:
    if value:
        print(f"rlhfkit {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="rlhfkit",
    cls=LazyStages,
    help="Train language models from fine-grained human feedback.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version."),
) -> None:
    """Train language models from fine-grained human feedback."""


def main() -> None:
    app(prog_name="rlhfkit")


if __name__ == "__main__":
    sys.exit(main())
