"""Stage configs are data: dataclasses whose fields are the command-line options.

Each stage declares one dataclass (defaults match the papers) with `opt(...)` fields. The CLI
builds its typer command from that dataclass, so the option names, a YAML `--config` file's
keys and the saved `config.json` can never disagree. Precedence: command line > `--config`
file > dataclass default.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import click
import typer
import yaml
from rich.text import Text

from rlhfkit.console import console
from rlhfkit.errors import RlhfkitError


def opt(
    default: Any = None, help: str = "", *, argument: bool = False, flag_name: Optional[str] = None, panel: Optional[str] = None
) -> Any:
    """A config field that is also a CLI option (`argument=True`: a positional argument).

    `panel` is the `--help` group it is listed in (default: by its name, see PANEL_OF)."""
    metadata = {"help": help, "argument": argument, "flag_name": flag_name, "panel": panel}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


REQUIRED = ...
"""Default for a field the user must give (on the command line or in `--config`)."""

# `--help` groups options in these panels, in this order (required options first in each).
PANELS = ("Data", "Model", "Rewards", "Training", "PPO", "Generation", "Distributed", "Output", "Options")
_PANEL_FIELDS = {
    "Data": "data prompts eval_prompts input inputs corpus generations format label_map include exclude field split "
    "skip_invalid max_inputs max_prompts normalize_on limit eval_fraction runs plan critique_template revision_template",
    "Model": "model policy ref value_init value_model arch vocab_size n_layer n_embd n_head max_positions lora_r "
    "lora_alpha lora_dropout lora_target_modules merge_lora trust_remote_code dtype reference_lm",
    "Rewards": "rewards rm redistribute truncation_penalty judge aspect kind granularity positive_reward "
    "negative_reward error_class_weight ties rm_batch_size whiten_rewards",
    "Training": "epochs max_steps batch_size grad_accum lr lr_scheduler warmup_ratio warmup_steps weight_decay "
    "max_grad_norm max_length eval_every resume seed eval_only",
    "PPO": "advantage steps prompts_per_step samples_per_prompt minibatch_size ppo_epochs value_lr kl_coef target_kl "
    "kl_horizon kl_stop gamma lam clip value_clip vf_coef entropy_coef",
    "Generation": "max_new_tokens max_prompt_length temperature top_k top_p sample rounds min_length_ratio "
    "accept_truncated tie_margin",
    "Distributed": "deepspeed offload_optimizer offload_params device gpus num_nodes hostfile master_addr master_port",
    "Output": "out save_every keep_checkpoints log_rollouts report_to html paper labels metric dry_run from_step overrides",
}
PANEL_OF = {name: panel for panel, names in _PANEL_FIELDS.items() for name in names.split()}
"""The panel of an option by its name, unless its `opt(panel=...)` says otherwise."""


def config_to_dict(cfg: Any) -> dict:
    """The resolved config as plain JSON-able data (paths become strings)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def load_config_file(path: str | Path, cfg_cls: type) -> dict:
    """Read a YAML/JSON config whose keys are option names (dashes or underscores)."""
    path = Path(path)
    if not path.is_file():
        raise RlhfkitError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise RlhfkitError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RlhfkitError(f"{path}: a config file must be a mapping of option names to values")
    valid = {f.name for f in dataclasses.fields(cfg_cls)}
    values = {str(key).replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise RlhfkitError(
            f"{path}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
        )
    return values


def build_config(cfg_cls: type, **values: Any) -> Any:
    """Build a stage config from keyword values (the Python API; the CLI goes the same way)."""
    missing = [
        f.name
        for f in dataclasses.fields(cfg_cls)
        if f.default is REQUIRED and values.get(f.name, REQUIRED) in (REQUIRED, None, [])
    ]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise RlhfkitError(f"missing required option(s): {flags}")
    cfg = cfg_cls(**values)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def _config_file_callback(cfg_cls: type) -> Callable:
    def callback(ctx: click.Context, param: click.Parameter, value: Optional[Path]) -> Optional[Path]:
        if value is None:
            return value
        try:
            values = load_config_file(value, cfg_cls)
        except RlhfkitError as err:
            console.print(Text("error: ", style="bold red") + Text(str(err)), soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        # Click consults default_map for every option the command line leaves out, so the
        # file's values sit between the command line and the dataclass defaults.
        ctx.default_map = {**(ctx.default_map or {}), **values}
        return value

    return callback


def command_from_config(cfg_cls: type, entry: Callable[[Any], Any], runner: Callable) -> Callable:
    """A typer-ready function whose options are `cfg_cls`'s fields, plus --config and --debug.

    `runner(entry, cfg_factory, debug)` runs the stage (error handling lives there).
    """
    from rich.markup import escape  # help texts are shown as rich markup; their [brackets] are text

    hints = typing.get_type_hints(cfg_cls)
    params = []
    order = {}
    for f in dataclasses.fields(cfg_cls):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        annotation = hints[f.name]
        required = default is REQUIRED
        panel = meta.get("panel") or PANEL_OF.get(f.name, "Options")
        if meta.get("argument"):
            info = typer.Argument(None if required else default, help=escape(meta.get("help", "")), show_default=not required)
            order[f.name] = (-1, 0)
        else:
            flag = meta.get("flag_name") or "--" + f.name.replace("_", "-")
            decls = [flag]
            if annotation is bool:
                decls = [f"{flag}/--no-{flag[2:]}"]
            info = typer.Option(
                None if required else default,
                *decls,
                help=escape(meta.get("help", "") + (" [required]" if required else "")),
                show_default=not required,
                rich_help_panel=panel,
            )
            order[f.name] = (PANELS.index(panel) if panel in PANELS else len(PANELS), 0 if required else 1)
        if required:
            annotation = Optional[annotation]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation))
    # Panels with a required option come first, and required options first in each panel;
    # the sort is stable, so the dataclass's order holds within that.
    panels_with_required = {key[0] for key in order.values() if key[1] == 0}
    params.sort(key=lambda p: (order[p.name][0] not in panels_with_required, *order[p.name]))
    params.append(
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Optional[Path],
            default=typer.Option(
                None,
                "--config",
                help="YAML file whose keys are this command's option names; command-line options override it.",
                is_eager=True,
                rich_help_panel="Options",
                callback=_config_file_callback(cfg_cls),
            ),
        )
    )
    params.append(
        inspect.Parameter(
            "debug",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(
                False, "--debug", help="Show full tracebacks on errors, and the libraries' own logging and warnings.",
                rich_help_panel="Options",
            ),
        )
    )

    def command(**kwargs: Any) -> None:
        debug = kwargs.pop("debug")
        kwargs.pop("config")
        runner(entry, lambda: build_config(cfg_cls, **kwargs), debug)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = entry.__doc__
    return command


def run_stage(entry: Callable[[Any], Any], make_config: Callable[[], Any], debug: bool) -> None:
    """Run one stage; bad input prints one line and exits 2 (a traceback only with --debug)."""
    try:
        entry(make_config())
    except RlhfkitError as err:
        if debug:
            raise
        console.quiet = False  # every process reports its error, rank 0 or not
        console.print(Text("error: ", style="bold red") + Text(str(err)), soft_wrap=True)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        console.print(Text("interrupted", style="bold red"))
        raise typer.Exit(130) from None
