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
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import click
import typer
import yaml
from rich.text import Text

from rlhfkit.console import console
from rlhfkit.errors import EnvironmentFailure, RlhfkitError, os_error_message


def opt(default: Any = None, help: str = "", *, argument: bool = False, flag_name: Optional[str] = None) -> Any:
    """A config field that is also a CLI option (`argument=True`: a positional argument)."""
    metadata = {"help": help, "argument": argument, "flag_name": flag_name}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


REQUIRED = ...
"""Default for a field the user must give (on the command line or in `--config`)."""


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
    check_common_numbers(cfg)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


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
        raise RlhfkitError(f"--temperature must be > 0, got {temperature} (for greedy decoding leave sampling off)")
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
    hints = typing.get_type_hints(cfg_cls)
    params = []
    for f in dataclasses.fields(cfg_cls):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        annotation = hints[f.name]
        required = default is REQUIRED
        if meta.get("argument"):
            info = typer.Argument(None if required else default, help=meta.get("help", ""), show_default=not required)
        else:
            flag = meta.get("flag_name") or "--" + f.name.replace("_", "-")
            decls = [flag]
            if annotation is bool:
                decls = [f"{flag}/--no-{flag[2:]}"]
            info = typer.Option(
                None if required else default,
                *decls,
                help=meta.get("help", "") + (" [required]" if required else ""),
                show_default=not required,
            )
        if required:
            annotation = Optional[annotation]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation))
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
                callback=_config_file_callback(cfg_cls),
            ),
        )
    )
    params.append(
        inspect.Parameter(
            "debug",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(False, "--debug", help="Show full tracebacks on errors."),
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
    """Run one stage; bad input prints one line and exits 2 (a traceback only with --debug);
    a filesystem failure (disk full, read-only, permissions) prints one line and exits 1."""
    from rlhfkit.runs import abandon_unstarted_runs

    try:
        try:
            entry(make_config())
        except BaseException:
            abandon_unstarted_runs()
            raise
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
