"""`rlhfkit recipe`: run a paper-table recipe (an ordered plan of stage runs), or check it.

A plan is a YAML file (recipes/<table>/<scale>.yaml):

    description: Fine-Grained RLHF long-form QA, tiny offline models
    vars:                                # ${name} in the steps' strings; --set NAME=VALUE
      out: runs/qa_feedback
    requires:                            # inputs another recipe makes (checked before running)
      runs/qa_feedback/paper: recipes/qa_feedback/paper.yaml
    steps:
      - stage: sft                       # an `rlhfkit` stage ...
        config: tiny/sft.yaml            # ... its options, as for `rlhfkit sft --config`
        with: {data: "${out}/import/demonstrations.jsonl", out: "${out}/sft"}
      - stage: ppo
        name: ppo-seed${seed}
        foreach: {seed: [0, 1, 2]}       # one step per value (several keys: every combination;
                                         # a list variable works too: {seed: "${seeds}"})
        with: {seed: "${seed}", out: "${out}/ppo-seed${seed}"}
      - call: rlhfkit.recipes:collect_results   # a Python step: function(**with)
        with: {out: results/qa.md, title: QA, sections: ["${out}/eval/results.md"]}

`${plan_dir}` is the plan file's directory. `config` paths are relative to it and hold hyper-parameters only (each is a valid
`rlhfkit STAGE --config` file on its own); `with` holds the paths and seeds that tie the steps
together and overrides the file. A string that is exactly `${name}` takes the variable's value
with its type (`seed: "${seed}"` is an int); elsewhere variables are spliced into the text.

Every step is resolved before anything runs: the options are type-checked against the
stage's config dataclass and its `validate()` runs, so an unknown option, a bad value or a
missing input fails at once with the plan file and step in the message. With `--dry-run`
nothing runs: the resolved plan is printed as the equivalent `rlhfkit` command lines. A check
that needs an earlier step's output (a file it will write) waits until the step runs, and the
dry run says so.

Also here: the small data steps the recipes share (`prompts_from_rows`, `preference_sft_data`)
and the step that joins result tables (`collect_results`). A task's own steps live with the
task (rlhfkit.tasks: `qa_feedback:qa_answer_records`, `qa_feedback:shorten_prompts`,
`detox:toxicity_table`, `synthetic:make_task`, `synthetic:report`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import itertools
import math
import os
import re
import string
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfkit.config import REQUIRED, build_config, check_option_type, opt, warn_remote_code_from
from rlhfkit.console import console
from rlhfkit.errors import RlhfkitError
from rlhfkit.io import write_json, write_text
from rlhfkit.yamlfile import parse_yaml, read_yaml_file

PLAN_KEYS = ("description", "vars", "requires", "steps")
STEP_KEYS = ("stage", "call", "name", "config", "with", "foreach")
RUN_RECORD = "recipe_run.json"
# A plan expands to at most this many steps: a `foreach` over huge lists (10^6 values) would
# otherwise hang even --dry-run. The shipped paper plans have under 40.
MAX_PLAN_STEPS = 1000

# --- the functions a plan may call ------------------------------------------------------------
# A plan is data, not code: a `call` step may only name a function rlhfkit registers here
# with @recipe_function, never an arbitrary module:function (os:system, shutil:rmtree).

RECIPE_FUNCTIONS: dict[str, Callable] = {}
# What each registered function reads and writes: {function key: {argument: role}}.
RECIPE_PATH_ARGUMENTS: dict[str, dict[str, str]] = {}
# rlhfkit's own `py:` functions (rewards, scorers, judges of the shipped tasks): a plan may
# name these without --allow-python, as it names rlhfkit stages.
RECIPE_PYTHON_FUNCTIONS: dict[str, Callable] = {}


def _key(function: Callable) -> str:
    return f"{function.__module__}:{function.__qualname__}"


def recipe_function(
    *, reads: Sequence[str] = (), writes: Sequence[str] = (), makes: Sequence[str] = ()
) -> Callable[[Callable], Callable]:
    """Register a function as callable from a plan's `call: module:function` step, naming
    its arguments that are paths (a string, or a list or mapping of them): files or
    directories it `reads`, files it `writes` (a data file: .md, .json, ...) and directories
    it `makes` (filled with files of fixed names). A plan's values for them are checked by
    `confine_paths` before the function runs."""

    def register(function: Callable) -> Callable:
        RECIPE_FUNCTIONS[_key(function)] = function
        RECIPE_PATH_ARGUMENTS[_key(function)] = {
            **{name: "read" for name in reads}, **{name: "write" for name in writes}, **{name: "make" for name in makes},
        }
        return function

    return register


def recipe_python_function(function: Callable) -> Callable:
    """Register one of rlhfkit's own `py:` functions: a plan may name it without --allow-python."""
    RECIPE_PYTHON_FUNCTIONS[_key(function)] = function
    return function


# The rlhfkit modules that register recipe functions; a plan's `call` imports nothing else.
RECIPE_MODULES = ("rlhfkit.recipes", "rlhfkit.tasks.qa_feedback", "rlhfkit.tasks.synthetic", "rlhfkit.tasks.detox")


def _register_recipe_modules() -> None:
    for module_name in RECIPE_MODULES:
        importlib.import_module(module_name)  # rlhfkit's own modules: they register their functions


# --- what a plan may touch -------------------------------------------------------------------
# The files a plan's function steps write are data: a report, a table, records. A name with
# another suffix (evil.py, x.pth, Makefile) could be run later by Python, make or a shell.
DATA_SUFFIXES = (".md", ".json", ".jsonl", ".png", ".html", ".csv", ".txt")
# Python runs the .pth files of these directories at every start.
_SITE_DIRECTORIES = ("site-packages", "dist-packages")
_PYTHON_NAME = re.compile(r"(?:^|=)py:(\S+)")
# What a stage step writes (its --out; redistribute's --html): in the plan's roots too.
STAGE_OUTPUT_OPTIONS = ("out", "html")


@dataclass(frozen=True)
class PlanRoots:
    """The directories a plan's function steps may read and write in, and its stage steps
    write in (resolved): the plan's folder, the working directory, and an output tree given
    on the command line (--set out=)."""

    plan: Path
    roots: tuple[Path, ...]

    @classmethod
    def of(cls, plan_path: Path, overrides: dict[str, Any]) -> PlanRoots:
        roots = [plan_path.parent.resolve(), Path.cwd().resolve()]
        if isinstance(overrides.get("out"), str) and overrides["out"]:
            roots.append(Path(overrides["out"]).resolve())
        return cls(plan_path, tuple(dict.fromkeys(roots)))

    def check(self, value: str, role: str, where: str) -> None:
        """Refuse a path outside the roots (after symlinks and `..` are resolved), below a
        hidden directory of one (.git, .venv, .ssh), inside a Python site directory, or, to
        be written, a file that is not data; a directory to be read, when a symlink in it
        (at any depth) leads to such a place."""
        offender, refusal = value, self._refusal(Path(os.path.realpath(value)), role)
        if refusal is None and role == "read" and os.path.isdir(value):
            offender, refusal = self._symlink_escape(value)
        if refusal:
            target = os.path.realpath(offender)
            shown = offender if target == offender else f"{offender} (= {target})"
            raise RlhfkitError(
                f"{where}: {shown} {refusal}; a plan's steps read and write only in the plan's folder, "
                "the working directory and --set out (see docs/security.md)"
            )

    def _refusal(self, target: Path, role: str) -> str | None:
        inside = [root for root in self.roots if target == root or root in target.parents]
        if not inside:
            return "lies outside the plan's folder, the working directory and --set out"
        if all(any(part.startswith(".") for part in target.relative_to(root).parts) for root in inside):
            return "lies in a hidden directory"
        if role != "read" and any(part in _SITE_DIRECTORIES for part in target.parts):
            return "lies in a Python site directory"
        if role == "write" and target.suffix not in DATA_SUFFIXES:
            return f"is not a data file ({', '.join(DATA_SUFFIXES)})"
        return None

    def _symlink_escape(self, directory: str) -> tuple[str, str | None]:
        """The first symlink under `directory` that leads out of the roots, and why."""
        seen: set[str] = set()
        for folder, dirs, files in os.walk(directory, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:  # a symlink loop, or a directory reached twice
                dirs.clear()
                continue
            seen.add(real)
            dirs[:] = [name for name in dirs if not name.startswith(".")]  # never read: not walked
            for name in dirs + files:
                entry = os.path.join(folder, name)
                if os.path.islink(entry):
                    refusal = self._refusal(Path(os.path.realpath(entry)), "read")
                    if refusal:
                        return entry, refusal
        return directory, None


def confine_paths(step: Step) -> None:
    """Check every path a call step's function reads or writes (RECIPE_PATH_ARGUMENTS)."""
    for argument, role in RECIPE_PATH_ARGUMENTS[step.call].items():
        value = step.values.get(argument)
        paths = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        for path in paths:
            if not isinstance(path, str):
                continue
            if path.startswith("hf:"):  # a hub data set, or a local directory of data files
                path = path[3:]
                if not Path(path).exists():
                    continue
            step.roots.check(path, role, f"{step.where}: {argument}")


def check_python_names(value: Any, where: str, allow_python: bool) -> None:
    """Refuse a `py:module:function` anywhere in `value` (a plan's variables or a step's
    options) unless it is one of rlhfkit's own or the user passed --allow-python."""
    if allow_python:
        return
    if isinstance(value, dict):
        for item in value.values():
            check_python_names(item, where, allow_python)
    elif isinstance(value, list):
        for item in value:
            check_python_names(item, where, allow_python)
    elif isinstance(value, str):
        for target in _PYTHON_NAME.findall(value):
            if target not in RECIPE_PYTHON_FUNCTIONS:
                raise RlhfkitError(
                    f"{where}: py:{target} is Python code, which would run with your permissions; "
                    "run the plan with --allow-python if you trust it (see docs/security.md)"
                )


@dataclass
class RecipeConfig:
    plan: str = opt(REQUIRED, "Recipe plan YAML, e.g. recipes/qa_feedback/tiny.yaml.", argument=True, panel="Data")
    dry_run: bool = opt(False, "Resolve and validate every step and print the plan as rlhfkit command lines; run nothing.", panel="Output")
    overrides: list[str] = opt([], "Set a plan variable: NAME=VALUE (repeatable), e.g. --set out=runs/mine.", flag_name="--set", panel="Output")
    from_step: str | None = opt(None, "Start at this step (by name); earlier steps' outputs must already exist, and OUT/recipe_run.json keeps their earlier times.", panel="Output")
    overwrite: bool = opt(False, "Replace the outputs of an earlier run of the plan: --overwrite for every stage step that has it.", panel="Output")
    allow_python: bool = opt(
        False, "Let the plan name py:module:function code other than rlhfkit's own (rewards, scorers, judges): "
        "that code runs with your permissions. Without it such a plan is refused.", panel="Output",
    )

    def validate(self) -> None:
        if not Path(self.plan).is_file():
            raise RlhfkitError(f"{self.plan}: recipe plan not found")
        parse_assignments(self.overrides)


# --- the plan ------------------------------------------------------------------------------


@dataclass
class Step:
    """One step of an expanded plan: a stage run or a function call, with its raw options."""

    number: int
    name: str
    stage: str | None
    call: str | None
    config_file: Path | None
    values: dict[str, Any]
    where: str
    roots: PlanRoots | None = None  # where its function may read and write (call steps)

    @property
    def kind(self) -> str:
        return self.stage or f"call {self.call}"

    def output(self) -> str | None:
        """What the step writes (its `out` option): later steps may read it."""
        out = self.values.get("out")
        return str(out) if isinstance(out, str) else None


@dataclass
class Plan:
    path: Path
    description: str
    variables: dict[str, Any]
    steps: list[Step]
    requires: dict[str, str] = field(default_factory=dict)  # input made elsewhere -> by what
    roots: PlanRoots | None = None


@dataclass
class ResolvedStep:
    step: Step
    config: Any = None  # the stage's validated config; None for call steps and deferred ones
    deferred: str | None = None  # why validation waits: the earlier step whose output it reads
    command: str = ""


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """`NAME=VALUE` items as {name: value}; values are read as YAML scalars (3 -> int)."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise RlhfkitError(f"--set {item!r} is not NAME=VALUE")
        out[name.strip()] = parse_yaml(value, f"--set {item}", lines=False) if value.strip() else ""
    return out


_WHOLE_VARIABLE = re.compile(r"^\$\{(\w+)\}$")


def substitute(value: Any, variables: dict[str, Any], where: str) -> Any:
    """Put the plan variables into `value` (strings, and strings inside lists and mappings)."""
    if isinstance(value, str):
        whole = _WHOLE_VARIABLE.match(value)
        if whole and whole.group(1) in variables:
            return variables[whole.group(1)]
        try:
            return string.Template(value).substitute({k: str(v) for k, v in variables.items()})
        except KeyError as err:
            known = ", ".join(sorted(variables)) or "none"
            raise RlhfkitError(f"{where}: unknown variable ${{{err.args[0]}}}; defined: {known}") from None
        except ValueError as err:
            raise RlhfkitError(f"{where}: bad $-placeholder in {value!r} ({err}); write a literal $ as $$") from None
    if isinstance(value, list):
        return [substitute(v, variables, where) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, variables, where) for k, v in value.items()}
    return value


def load_plan(path: str | Path, overrides: dict[str, Any] | None = None) -> Plan:
    """Read a plan file and expand it: variables set, `foreach` steps multiplied out."""
    path = Path(path)
    data = read_yaml_file(path, "recipe plan")
    if not isinstance(data, dict):
        raise RlhfkitError(f"{path}: a recipe plan is a mapping with keys {', '.join(PLAN_KEYS)}")
    unknown = sorted(set(data) - set(PLAN_KEYS))
    if unknown:
        raise RlhfkitError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(PLAN_KEYS)}")
    roots = PlanRoots.of(path, overrides or {})
    variables = {"plan_dir": str(path.parent), **(data.get("vars") or {})}
    for name, value in (overrides or {}).items():
        if name not in variables:
            known = ", ".join(sorted(variables)) or "none"
            raise RlhfkitError(f"--set {name}: {path} has no variable {name!r}; its variables: {known}")
        variables[name] = value
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise RlhfkitError(f"{path}: 'steps' must be a non-empty list of steps")

    steps: list[Step] = []
    for index, raw in enumerate(raw_steps, start=1):
        where = f"{path}: steps[{index}]"
        if not isinstance(raw, dict):
            raise RlhfkitError(f"{where}: a step is a mapping with keys {', '.join(STEP_KEYS)}")
        unknown = sorted(set(raw) - set(STEP_KEYS))
        if unknown:
            raise RlhfkitError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(STEP_KEYS)}")
        if ("stage" in raw) == ("call" in raw):
            raise RlhfkitError(f"{where}: give exactly one of 'stage' (an rlhfkit stage) or 'call' (module:function)")
        foreach = raw.get("foreach") or {}
        if isinstance(foreach, dict):
            foreach = {name: substitute(values, variables, where) for name, values in foreach.items()}
        if not isinstance(foreach, dict) or not all(isinstance(v, list) and v for v in foreach.values()):
            raise RlhfkitError(f"{where}: 'foreach' maps variable names to non-empty lists of values")
        count = math.prod(len(v) for v in foreach.values())
        if len(steps) + count > MAX_PLAN_STEPS:
            raise RlhfkitError(
                f"{where}: 'foreach' expands to {count:,} steps, which takes the plan past the limit of "
                f"{MAX_PLAN_STEPS:,} steps; split it into several plans"
            )
        for combination in itertools.product(*foreach.values()):
            scope = {**variables, **dict(zip(foreach, combination))}
            steps.append(_expand_step(raw, scope, path, where, len(steps) + 1, roots))
    names = [s.name for s in steps]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RlhfkitError(f"{path}: step name(s) {', '.join(twice)} used twice; give the steps distinct 'name's")
    description = substitute(str(data.get("description", "")), variables, f"{path}: description")
    requires = data.get("requires") or {}
    if not isinstance(requires, dict):
        raise RlhfkitError(f"{path}: 'requires' maps inputs made elsewhere to what makes them")
    requires = {str(substitute(k, variables, f"{path}: requires")): str(v) for k, v in requires.items()}
    return Plan(path, description, variables, steps, requires, roots)


def _expand_step(raw: dict, scope: dict[str, Any], path: Path, where: str, number: int, roots: PlanRoots) -> Step:
    stage = raw.get("stage")
    call = raw.get("call")
    if stage is not None:
        stage_spec(stage, where)
    elif not isinstance(call, str) or ":" not in call:
        raise RlhfkitError(f"{where}: 'call' must be module:function, got {call!r}")
    name = substitute(str(raw.get("name") or stage or call.rpartition(":")[2]), scope, where)
    where = f"{path}: step {number} ({name})"
    config_file = None
    values: dict[str, Any] = {}
    if raw.get("config") is not None:
        if stage is None:
            raise RlhfkitError(f"{where}: 'config' applies to stage steps; give a call step its arguments in 'with'")
        config_file = path.parent / substitute(str(raw["config"]), scope, where)
    overrides = raw.get("with") or {}
    if not isinstance(overrides, dict):
        raise RlhfkitError(f"{where}: 'with' must be a mapping of option names to values")
    values = {str(k).replace("-", "_"): substitute(v, scope, where) for k, v in overrides.items()}
    return Step(number, name, stage, call, config_file, values, where, roots)


def stage_spec(stage: str, where: str) -> tuple[str, str, str]:
    """(module, config class, entry function) of an rlhfkit stage (cli.STAGES)."""
    from rlhfkit.cli import STAGES

    runnable = {name: spec for name, spec in STAGES.items() if name != "recipe"}
    if stage not in runnable:
        from difflib import get_close_matches

        close = get_close_matches(stage, list(runnable), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RlhfkitError(f"{where}: unknown stage {stage!r}{hint}; stages: {', '.join(runnable)}")
    module, config_name, entry_name, _ = runnable[stage]
    return module, config_name, entry_name


# --- resolving steps -----------------------------------------------------------------------


def stage_values(step: Step, cfg_cls: type) -> dict[str, Any]:
    """The step's options: its config file's, then `with` over them, names and types checked."""
    from rlhfkit.config import load_config_file

    values: dict[str, Any] = {}
    if step.config_file is not None:
        try:
            values.update(load_config_file(step.config_file, cfg_cls))
        except RlhfkitError as err:
            raise RlhfkitError(f"{step.where}: {err}") from None
    valid = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(step.values) - valid)
    if unknown:
        raise RlhfkitError(f"{step.where}: unknown option(s) {', '.join(unknown)} in 'with'; valid: {', '.join(sorted(valid))}")
    values.update(step.values)
    hints = typing.get_type_hints(cfg_cls)
    source = f"{step.where}" + (f" (config {step.config_file})" if step.config_file else "")
    return {name: check_option_type(value, hints[name], name, source) for name, value in values.items()}


def command_line(stage: str, cfg_cls: type, values: dict[str, Any]) -> str:
    """The `rlhfkit` command for these option values (those equal to the default left out)."""
    import shlex

    parts = ["rlhfkit", stage]
    for f in dataclasses.fields(cfg_cls):
        if f.name not in values:
            continue
        value = values[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if value == default and default is not REQUIRED:
            continue
        if f.metadata.get("argument"):
            parts += [str(v) for v in (value if isinstance(value, list) else [value])]
            continue
        flag = f.metadata.get("flag_name") or "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            for item in value:
                parts += [flag, str(item)]
        elif value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _waits_for(message: str, outputs: dict[str, Step]) -> Step | None:
    """The earlier step whose output an error message names (that check must wait for it);
    when outputs nest (runs/x/dev and runs/x/dev/short), the longest one named."""
    named = [
        output for output in outputs
        if re.search(re.escape(output.rstrip("/")) + r"(?=$|[/\s:'\",)])", message)
    ]
    return outputs[max(named, key=len)] if named else None


def resolve_step(step: Step, outputs: dict[str, Step], allow_python: bool = False) -> ResolvedStep:
    """Build and validate the step's config (or check a call's arguments and paths); a
    failure that names an earlier step's output is deferred, any other raises RlhfkitError."""
    if step.call is not None:
        function = call_target(step)
        try:
            inspect.signature(function).bind(**step.values)
        except TypeError as err:
            raise RlhfkitError(f"{step.where}: {step.call}: {err}") from None
        check_python_names(step.values, step.where, allow_python)
        confine_paths(step)
        args = ", ".join(f"{k}={v!r}" for k, v in step.values.items())
        return ResolvedStep(step, command=f"python: {step.call}({args})")
    module, config_name, _ = stage_spec(step.stage, step.where)
    cfg_cls = getattr(importlib.import_module(module), config_name)
    values = stage_values(step, cfg_cls)
    check_python_names(values, step.where, allow_python)
    for option in STAGE_OUTPUT_OPTIONS:
        if isinstance(values.get(option), str):
            step.roots.check(values[option], "make", f"{step.where}: {option}")
    warn_remote_code_from(values, step.where)
    try:
        cfg = build_config(cfg_cls, **values)
    except RlhfkitError as err:
        producer = _waits_for(str(err), outputs)
        if producer is None:
            raise RlhfkitError(f"{step.where}: {err}") from None
        return ResolvedStep(
            step,
            deferred=f"checked when it runs: reads {_producer(producer)}: {err}",
            command=command_line(step.stage, cfg_cls, values),
        )
    return ResolvedStep(step, cfg, command=command_line(step.stage, cfg_cls, dataclasses.asdict(cfg)))


def _producer(step: Step) -> str:
    return f"an input {step.name}" if step.number == 0 else f"the output of step {step.number} ({step.name})"


def call_target(step: Step) -> Callable:
    """The registered recipe function a call step names; nothing outside rlhfkit is imported."""
    _register_recipe_modules()
    function = RECIPE_FUNCTIONS.get(step.call)
    if function is None:
        raise RlhfkitError(
            f"{step.where}: call {step.call!r} is not a recipe function; a plan may call only "
            f"rlhfkit stages and these functions: {', '.join(sorted(RECIPE_FUNCTIONS))}"
        )
    return function


def resolve_plan(plan: Plan, allow_python: bool = False) -> list[ResolvedStep]:
    """Every step resolved in order; checks on earlier steps' outputs are deferred. A `py:`
    name other than rlhfkit's own is refused without `allow_python`."""
    _register_recipe_modules()
    check_python_names(plan.variables, f"{plan.path}: vars", allow_python)
    outputs: dict[str, Step] = {
        made: Step(0, f"made by {maker}", None, None, None, {}, str(plan.path)) for made, maker in plan.requires.items()
    }
    resolved = []
    for step in plan.steps:
        resolved.append(resolve_step(step, outputs, allow_python))
        if step.output():
            outputs[step.output()] = step
    return resolved


def render_plan(plan: Plan, resolved: list[ResolvedStep]) -> str:
    lines = [f"# {plan.path}", f"# {plan.description}".rstrip()] if plan.description else [f"# {plan.path}"]
    if plan.variables:
        lines.append("# vars: " + ", ".join(f"{k}={v}" for k, v in plan.variables.items()))
    for item in resolved:
        status = "deferred" if item.deferred else "ok"
        lines.append(f"[{item.step.number}] {item.step.name}: {status}")
        lines.append(f"    {item.command}")
        if item.deferred:
            lines.append(f"    ({item.deferred})")
    return "\n".join(lines) + "\n"


# --- running -------------------------------------------------------------------------------


def run_step(item: ResolvedStep, allow_python: bool = False) -> Any:
    step = item.step
    if step.call is not None:
        confine_paths(step)  # again: earlier steps have written since the plan was resolved
        return call_target(step)(**step.values)
    # Resolved again now: the inputs of a deferred step exist by now.
    resolved = resolve_step(step, {}, allow_python) if item.deferred else item
    module, _, entry_name = stage_spec(step.stage, step.where)
    return getattr(importlib.import_module(module), entry_name)(resolved.config)


def run_recipe(cfg: RecipeConfig) -> list[dict]:
    """Run a recipe plan (recipes/<table>/<scale>.yaml): every step in order.

    Every step is resolved and validated before the first one runs. --dry-run prints the
    resolved plan as rlhfkit command lines and runs nothing; --set NAME=VALUE overrides a
    plan variable (e.g. the output root); --from-step NAME resumes part-way.
    """
    plan = load_plan(cfg.plan, parse_assignments(cfg.overrides))
    if cfg.overwrite:
        for step in plan.steps:
            if step.stage is not None:
                module, config_name, _ = stage_spec(step.stage, step.where)
                names = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), config_name))}
                if "overwrite" in names:
                    step.values.setdefault("overwrite", True)
    resolved = resolve_plan(plan, cfg.allow_python)
    if cfg.dry_run:
        print(render_plan(plan, resolved), end="")
        return [{"step": r.step.name, "stage": r.step.kind, "deferred": r.deferred} for r in resolved]
    missing = {made: maker for made, maker in plan.requires.items() if not Path(made).exists()}
    if missing:
        raise RlhfkitError(f"{plan.path} needs " + "; ".join(f"{made} (made by {maker})" for made, maker in missing.items())
                           + ": run that first, or --set the variable that names it")
    names = [s.name for s in plan.steps]
    start = 0
    if cfg.from_step is not None:
        if cfg.from_step not in names:
            raise RlhfkitError(f"--from-step {cfg.from_step}: no such step in {plan.path}; steps: {', '.join(names)}")
        start = names.index(cfg.from_step)

    record: list[dict] = []
    record_path = Path(str(plan.variables["out"])) / RUN_RECORD if "out" in plan.variables else None
    if start and record_path is not None and record_path.is_file():
        # A resumed run keeps the earlier run's record of the steps it skips (same plan file),
        # so recipe_run.json still times the whole plan: the table steps print it.
        from rlhfkit.schema import read_json_file

        try:
            earlier = read_json_file(record_path)
        except RlhfkitError as err:  # a damaged record only loses the earlier times, never the run
            console.print(f"[yellow]recipe: {err}; the new {RUN_RECORD} starts from --from-step[/]")
            earlier = None
        if isinstance(earlier, dict) and earlier.get("plan") == str(plan.path) and isinstance(earlier.get("steps"), list):
            record = [dict(s, earlier_run=True) for s in earlier["steps"] if isinstance(s, dict)
                      and s.get("step") in names[:start] and isinstance(s.get("seconds"), (int, float))]
    kept = sum(s["seconds"] for s in record)
    started = time.perf_counter()
    for item in resolved[start:]:
        step = item.step
        console.rule(f"[bold]recipe step {step.number}/{len(plan.steps)}: {step.name}[/] ({step.kind})")
        step_started = time.perf_counter()
        try:
            run_step(item, cfg.allow_python)
        except RlhfkitError as err:
            raise type(err)(f"recipe step {step.number} ({step.name}): {err}") from None
        seconds = time.perf_counter() - step_started
        record.append({"step": step.name, "stage": step.kind, "seconds": round(seconds, 1), "command": item.command})
        console.print(f"recipe: {step.name} done in {seconds:.0f}s")
        if record_path is not None:
            write_json(record_path, {"plan": str(plan.path), "vars": plan.variables, "steps": record,
                                     "seconds": round(kept + time.perf_counter() - started, 1)})
    ran = [s for s in record if not s.get("earlier_run")]
    total = time.perf_counter() - started
    console.print(f"recipe: {plan.path}: {len(ran)} step(s) in {total / 60:.1f} min" +
                  (f"; timings in {record_path}" if record_path else ""))
    return ran


# --- data steps the recipes share ------------------------------------------------------------


def _dotted(data: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


@recipe_function(reads=["inputs"], writes=["out"])
def prompts_from_rows(inputs: list[str], out: str, field: str = "prompt", split: str = "train",
                      limit: int | None = None, repeat: int = 1, skip: int = 0) -> int:
    """Prompt records from any rows annotate-import reads (files, parquet, hf:NAME): the text
    at `field` (dotted for nested fields, e.g. RealToxicityPrompts' `prompt.text`), rows
    `skip` .. `skip + limit`, each written `repeat` times (k samples per prompt)."""
    from rlhfkit.importers import read_rows, source_names
    from rlhfkit.schema import PromptRecord, write_records

    if repeat < 1:
        raise RlhfkitError(f"prompts_from_rows: repeat must be >= 1, got {repeat}")
    records = []
    seen = 0
    for spec, name in zip(inputs, source_names(inputs)):
        for row in read_rows(spec, name, split):
            if row.error:
                raise RlhfkitError(f"{row.where}: {row.error}")
            seen += 1
            if seen <= skip:
                continue
            text = _dotted(row.data, field)
            if not isinstance(text, str) or not text.strip():
                raise RlhfkitError(f"{row.where}: no text at field {field!r}")
            records += [PromptRecord(id=f"{row.key}" + (f":{k}" if repeat > 1 else ""), prompt=text) for k in range(repeat)]
            if limit is not None and seen - skip >= limit:
                break
    if not records:
        raise RlhfkitError(f"{', '.join(inputs)}: no rows after skipping {skip}")
    write_records(out, records)
    console.print(f"prompts: {len(records)} prompt records -> {out}")
    return len(records)


@recipe_function(reads=["preferences"], makes=["out"])
def preference_sft_data(preferences: str, out: str, limit: int | None = None) -> dict:
    """From pairwise preferences (annotate-import's preferences.jsonl): `demonstrations.jsonl`
    (each chosen response, the SFT data of a preference-only data set such as HH-RLHF) and
    `prompts.jsonl` (each distinct prompt once, for PPO and evaluation); ties are left out."""
    from rlhfkit.schema import Demonstration, PromptRecord, load_records, write_records

    records = [r for r in load_records(preferences, "preference") if not r.tie][: limit or None]
    demonstrations = [Demonstration(id=r.id, prompt=r.prompt, response=r.chosen) for r in records]
    prompts = [PromptRecord(id=f"prompt-{i}", prompt=p) for i, p in enumerate(dict.fromkeys(r.prompt for r in records))]
    write_records(Path(out) / "demonstrations.jsonl", demonstrations)
    write_records(Path(out) / "prompts.jsonl", prompts)
    console.print(f"preference-sft-data: {len(demonstrations)} demonstrations, {len(prompts)} prompts -> {out}")
    return {"demonstrations": len(demonstrations), "prompts": len(prompts)}


# --- result tables -----------------------------------------------------------------------------


def _demote_headings(markdown: str) -> str:
    return re.sub(r"^(#+) ", r"#\1 ", markdown, flags=re.MULTILINE)


@recipe_function(reads=["sections"], writes=["out"])
def collect_results(out: str, title: str, sections: list[str], notes: str = "", images: Sequence[str] = (),
                    links: Sequence[str] = ()) -> str:
    """Join result files (markdown written by evaluate, critique-revise, ...) into one report
    at `out`, print it, and return it. `images` are shown and `links` (e.g. the HTML report)
    linked under the title, by paths relative to `out`."""
    parts = [f"# {title}", ""]
    for link in links:
        if not Path(link).is_file():
            raise RlhfkitError(f"collect_results: {link}: no such file (did the step that writes it run?)")
        parts += [f"Everything in one page: [{Path(link).name}]({_relative(link, Path(out).parent)})", ""]
    if notes:
        parts += [notes.strip(), ""]
    for section in sections:
        path = Path(section)
        if not path.is_file():
            raise RlhfkitError(f"collect_results: {section}: no such file (did the step that writes it run?)")
        parts += [f"<!-- from {section} -->", _demote_headings(path.read_text(encoding="utf-8")).strip(), ""]
    for image in images:
        parts += [f"![{Path(image).name}]({_relative(image, Path(out).parent)})", ""]
    report = "\n".join(parts).rstrip() + "\n"
    write_text(out, report)
    console.print(report, markup=False, highlight=False, soft_wrap=True)
    console.print(f"results: {out}")
    return report


def _relative(target: str, base: Path) -> str:
    import os

    return os.path.relpath(Path(target).resolve(), base.resolve())
