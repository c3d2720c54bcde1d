"""Stage configs are data: dataclasses whose fields are the command-line options.

Each stage declares one dataclass (defaults match the papers) with `opt(...)` fields. The CLI
builds its typer command from that dataclass, so the option names, a YAML `--config` file's
keys and the saved `config.json` can never disagree. Precedence: command line > `--config`
file > dataclass default.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import click
import typer
from rich.text import Text

from rlhfkit.console import console
from rlhfkit.errors import EnvironmentFailure, RlhfkitError, os_error_message
from rlhfkit.yamlfile import read_yaml_file


def opt(
    default: Any = None, help: str = "", *, argument: bool = False, flag_name: Optional[str] = None, panel: Optional[str] = None
) -> Any:
    """A config field that is also a CLI option (`argument=True`: a positional argument).

    `panel` is the `--help` panel it is listed in, one of PANELS: every option names one
    (tests/test_cli_conventions.py fails on one that does not); arguments are listed first,
    in their own panel."""
    metadata = {"help": help, "argument": argument, "flag_name": flag_name, "panel": panel}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


REQUIRED = ...
"""Default for a field the user must give (on the command line or in `--config`)."""

DEFAULT_SEED = 42
"""Every stage's default --seed: one value, so a pipeline run on defaults is seeded alike throughout."""

# `--help` lists the arguments, then the required options in their own panel, then the others
# in these panels, in this order. Every option names its panel: opt(panel=...).
PANELS = ("Data", "Model", "Rewards", "Training", "PPO", "Generation", "Distributed", "Output", "Other")
REQUIRED_PANEL = "Required"
OTHER_PANEL = "Other"  # --config, --debug and --help

# How --help names a value's type (instead of Python's <str>, <list[str]>).
TYPE_NAMES = {str: "TEXT", int: "INTEGER", float: "NUMBER", Path: "PATH", bool: ""}


def type_name(hint: Any) -> str:
    """The human name of an option's type: TEXT, INTEGER, NUMBER, PATH; a list is TEXT... (repeatable)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    if typing.get_origin(hint) is list:
        return type_name(typing.get_args(hint)[0]) + "..."
    return TYPE_NAMES.get(hint, "TEXT")


def load_config_file(path: str | Path, cfg_cls: type) -> dict:
    """Read a YAML/JSON config whose keys are option names (dashes or underscores)."""
    path = Path(path)
    if not path.is_file():
        raise RlhfkitError(f"{path}: config file not found")
    data = read_yaml_file(path, "config file") or {}
    if not isinstance(data, dict):
        raise RlhfkitError(f"{path}: a config file must be a mapping of option names to values")
    valid = {f.name for f in dataclasses.fields(cfg_cls)}
    values = {str(key).replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise RlhfkitError(
            f"{path}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
        )
    hints = typing.get_type_hints(cfg_cls)
    values = {name: check_option_type(value, hints[name], name, str(path)) for name, value in values.items()}
    warn_remote_code_from(values, str(path))
    return values


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


SCALAR_TYPES = {int: click.INT, float: click.FLOAT, bool: click.BOOL}


def check_option_type(value: Any, hint: Any, name: str, where: str) -> Any:
    """`value` checked against a config field's type hint (a single item becomes a list)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        return check_option_type(value, options[0], name, where)
    if origin is list:
        (item,) = typing.get_args(hint)
        items = value if isinstance(value, list) else [value]
        return [check_option_type(v, item, name, where) for v in items]
    if isinstance(value, str) and hint in SCALAR_TYPES:
        # YAML 1.1 reads "1e-5" as a string; click, which reads a stage's command line,
        # converts it, so a config file or recipe accepts what the command line accepts.
        try:
            value = SCALAR_TYPES[hint].convert(value, None, None)
        except click.BadParameter:
            raise RlhfkitError(f"{where}: option {name} must be {_type_name(hint)}, got {value!r}") from None
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise RlhfkitError(f"{where}: option {name} must be {_type_name(hint)}, got {value!r}")
    return value


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
    check_common_numbers(cfg)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


_REMOTE_CODE_WARNED: set[str] = set()
MODEL_OPTIONS = ("model", "policy", "reference_lm", "ref", "value_init")


def warn_remote_code(name_or_path: str, source: str = "") -> None:
    """trust_remote_code runs Python shipped with the model: say so, naming the model."""
    key = f"{name_or_path}|{source}"
    if key in _REMOTE_CODE_WARNED:
        return
    _REMOTE_CODE_WARNED.add(key)
    console.print(
        f"warning: trust_remote_code is on{f' ({source})' if source else ''}: the Python code in "
        f"{name_or_path} (its auto_map modules) will run with your permissions",
        style="yellow", soft_wrap=True, markup=False, highlight=False,
    )


def warn_remote_code_from(values: dict, source: str) -> None:
    """Warn when a config file or a plan (not the command line) turns trust_remote_code on."""
    if values.get("trust_remote_code") is not True:
        return
    models = [values[name] for name in MODEL_OPTIONS if isinstance(values.get(name), (str, list))]
    named = [str(m) for value in models for m in (value if isinstance(value, list) else [value])]
    warn_remote_code(", ".join(named) or "every model directory the run loads", f"set by {source}")


SEED_LIMIT = 2**64  # torch.manual_seed takes seeds below 2^64


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_common_numbers(cfg: Any) -> None:
    """Checks every stage shares, before anything loads: no float option is NaN (it would
    only show up after a rollout or an epoch), and a seed torch can take."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and math.isnan(value):
            raise RlhfkitError(f"{flag(f.name)} must be a number, got nan")
    seed = getattr(cfg, "seed", None)
    if isinstance(seed, int) and not 0 <= seed < SEED_LIMIT:
        raise RlhfkitError(f"--seed must be in [0, 2^64), got {seed}")


def check_numbers(cfg: Any, *, positive: Sequence[str] = (), at_least_one: Sequence[str] = (),
                  non_negative: Sequence[str] = (), unit: Sequence[str] = (), finite: Sequence[str] = ()) -> None:
    """Range checks of a config's numeric options, named by field: `positive` (finite, > 0),
    `at_least_one` (ints >= 1), `non_negative` (>= 0), `unit` (in (0, 1]), `finite`. A field
    that is None (an unset optional) is skipped."""

    def each(names: Sequence[str]):
        for name in names:
            value = getattr(cfg, name)
            if value is not None:
                yield name, value

    for name, value in each(finite):
        if not math.isfinite(value):
            raise RlhfkitError(f"{flag(name)} must be a finite number, got {value}")
    for name, value in each(positive):
        if not (math.isfinite(value) and value > 0):
            raise RlhfkitError(f"{flag(name)} must be a positive number, got {value}")
    for name, value in each(at_least_one):
        if value < 1:
            raise RlhfkitError(f"{flag(name)} must be >= 1, got {value}")
    for name, value in each(non_negative):
        if not value >= 0:
            raise RlhfkitError(f"{flag(name)} must be >= 0, got {value}")
    for name, value in each(unit):
        if not 0 < value <= 1:
            raise RlhfkitError(f"{flag(name)} must be in (0, 1], got {value}")


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Sampling options every generating stage shares."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise RlhfkitError(f"--temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise RlhfkitError(f"--top-k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise RlhfkitError(f"--top-p must be in (0, 1], got {top_p}")


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
        panel = meta.get("panel") or OTHER_PANEL
        if meta.get("argument"):
            info = typer.Argument(None if required else default, help=escape(meta.get("help", "")), show_default=not required,
                                  metavar=f.name.upper())
            order[f.name] = -2
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
                rich_help_panel=REQUIRED_PANEL if required else panel,
                metavar=type_name(annotation),
            )
            order[f.name] = -1 if required else PANELS.index(panel) if panel in PANELS else len(PANELS)
        if required:
            annotation = Optional[annotation]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation))
    # Arguments, then the required options, then the panels in PANELS's order; the sort is
    # stable, so the dataclass's order holds within each.
    params.sort(key=lambda p: order[p.name])
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
                rich_help_panel=OTHER_PANEL,
                metavar="PATH",
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
                rich_help_panel=OTHER_PANEL, metavar="",
            ),
        )
    )

    def command(**kwargs: Any) -> None:
        debug = kwargs.pop("debug")
        config_file = kwargs.pop("config")

        def make_config() -> Any:
            try:
                return build_config(cfg_cls, **kwargs)
            except RlhfkitError as err:
                raise type(err)(f"{err}{_named_in_config(str(err), config_file, cfg_cls, kwargs)}") from None

        runner(entry, make_config, debug)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = entry.__doc__
    return command


def _named_in_config(message: str, config_file: Optional[Path], cfg_cls: type, used: dict) -> str:
    """" (set in FILE)" when the error is about an option whose value came from the --config file."""
    if config_file is None:
        return ""
    given = load_config_file(config_file, cfg_cls)
    def same(a: Any, b: Any) -> bool:
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))

    from_file = [name for name, value in given.items() if same(used.get(name), value)]
    if any(re.search(re.escape(flag(name)) + r"\b", message) for name in from_file):
        return f" (set in --config {config_file})"
    return ""


def run_stage(entry: Callable[[Any], Any], make_config: Callable[[], Any], debug: bool) -> None:
    """Run one stage; bad input prints one line and exits 2 (a traceback only with --debug);
    a filesystem failure (disk full, read-only, permissions) prints one line and exits 1."""
    from rlhfkit.runs import abandon_unstarted_runs

    try:
        try:
            entry(make_config())
        finally:
            abandon_unstarted_runs()  # releases the locks; undoes runs that wrote nothing
    except RlhfkitError as err:
        if debug:
            raise
        _print_error(str(err))
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        console.print(Text("interrupted", style="bold red"))
        raise typer.Exit(130) from None
    except OSError as err:
        if debug:
            raise
        _print_error(f"{os_error_message(err)} (--debug shows the traceback)")
        raise typer.Exit(EnvironmentFailure.exit_code) from None


def _print_error(message: str) -> None:
    console.quiet = False  # every process reports its error, rank 0 or not
    console.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)
