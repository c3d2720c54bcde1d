"""The layout the code shows (STYLE.md, "A layout that shows the architecture"): stages call
the core and never each other, nothing in the core calls a stage, the RL math
(rlhfkit/rl/) is pure: torch, the standard library and other rlhfkit.rl modules only, and no
two modules need each other (no import cycle, however long, inside rlhfkit/).

Every file is parsed with `ast` (nothing is imported), so an import inside a function counts
as much as one at the top, and so does importlib.import_module("...") of a literal name.
rlhfkit/cli.py is left out: it registers the stage commands (its STAGES table names each
stage's module, imported by name when the command runs).

These checks can fail: run on the tree before the reward models, metrics and tasks got
their own modules, test_the_core_imports_no_stage named rlhfkit/recipes.py importing
rlhfkit.stages.evaluate (load_paper_table, inside toxicity_table); checked by hand, and
test_each_rule_names_a_breach breaks each rule in a made-up package. test_no_import_cycles
named three cycles on the tree of issue 23 (config <-> runs; importers/qa_feedback <->
tasks/qa_feedback; rewards/presets -> reward_model -> shared_backbone -> presets).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rlhfkit"
STAGES = "rlhfkit.stages"
RL = "rlhfkit.rl"
RL_MAY_IMPORT = {"torch", "__future__", "typing"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names taken from it) of every import in `path`, at any depth in the file;
    relative imports resolved, `import M` and import_module("M") take no names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((module, [alias.name for alias in node.names]))
        elif (
            isinstance(node, ast.Call)
            and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) in ("import_module", "__import__"))
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.args[0].value, []))
    return found


def imported_modules(path: Path) -> set[str]:
    """The modules `path` imports; `from M import a` gives M and M.a, as a may be a
    submodule (`from rlhfkit.stages import ppo`)."""
    return {m for module, names in imports(path) for m in [module, *(f"{module}.{n}" for n in names)]}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def sources(*under: str) -> list[Path]:
    return sorted(PACKAGE.joinpath(*under).rglob("*.py"))


def relative(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def test_the_core_imports_no_stage():
    offending = [
        f"{relative(path)} imports {module}"
        for path in sources()
        if not within(module_name(path), STAGES) and path != PACKAGE / "cli.py"
        for module in sorted(imported_modules(path))
        if within(module, STAGES)
    ]
    assert not offending, "move what both need into the core: " + "; ".join(offending)


def test_no_stage_imports_another_stage():
    offending = []
    for path in sources("stages"):
        own = module_name(path)
        for module in sorted(imported_modules(path)):
            other = ".".join(module.split(".")[:3])  # rlhfkit.stages.NAME
            if within(module, STAGES) and module != STAGES and other != own:
                offending.append(f"{relative(path)} imports {module}")
    assert not offending, "stages call the core, never each other: " + "; ".join(offending)


def test_rl_imports_only_torch_and_the_standard_library():
    allowed = RL_MAY_IMPORT | set(sys.stdlib_module_names)
    found = {
        (relative(path), module)
        for path in sources("rl")
        for module, _ in imports(path)
        if module.split(".")[0] not in allowed and not within(module, RL)
    }
    assert not found, f"rlhfkit/rl/ is pure tensor math, torch and the standard library only: {sorted(found)}"


def import_cycles() -> list[list[str]]:
    """Each import cycle among rlhfkit's modules found by a depth-first search, as the modules
    around it (first == last); an import inside a function counts (it runs, and then it
    needs the other module as much)."""
    modules = {module_name(path): path for path in sources()}
    graph = {name: sorted(m for m in imported_modules(path) if m in modules and m != name) for name, path in modules.items()}
    state: dict[str, str] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for other in graph[name]:
            if state.get(other) == "open":
                cycles.append(stack[stack.index(other):] + [other])
            elif other not in state:
                visit(other)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    return cycles


def test_no_import_cycles():
    found = [" -> ".join(cycle) for cycle in import_cycles()]
    assert not found, "modules that need each other (move the shared piece down): " + "; ".join(found)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def f():\n    from rlhfkit.stages.evaluate import load_paper_table\n", {"rlhfkit.stages.evaluate"}),
        ("from rlhfkit.stages import ppo\n", {"rlhfkit.stages", "rlhfkit.stages.ppo"}),
        ("from . import ppo\n", {"rlhfkit.stages", "rlhfkit.stages.ppo"}),
        ("import importlib\nimportlib.import_module('rlhfkit.stages.sft')\n", {"importlib", "rlhfkit.stages.sft"}),
    ],
)
def test_imports_are_found_inside_functions_and_in_every_spelling(tmp_path, monkeypatch, source, expected):
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "rlhfkit")
    path = tmp_path / "rlhfkit" / "stages" / "launch.py"
    path.parent.mkdir(parents=True)
    path.write_text(source)
    assert expected <= imported_modules(path)


def made_up_package(tmp_path, monkeypatch, files: dict[str, str]) -> None:
    """The rules read `files` ({path in the package: source}) as the package."""
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "rlhfkit")
    for name, text in files.items():
        (tmp_path / "rlhfkit" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "rlhfkit" / name).write_text(text)


def test_each_rule_names_a_breach(tmp_path, monkeypatch):
    """A made-up package that breaks each rule once: every rule fails, naming the file and the import."""
    made_up_package(tmp_path, monkeypatch, {
        "recipes.py": "def table():\n    from rlhfkit.stages.evaluate import load_paper_table\n",
        "cli.py": "import rlhfkit.stages.ppo\n",  # registers the stages: allowed
        "stages/ppo.py": "from rlhfkit.stages import evaluate\n",
        "stages/evaluate.py": "from rlhfkit.metrics import rouge_l\n",
        "rl/advantages.py": "import numpy\nimport torch\n",
        "rl/losses.py": "from rlhfkit.rl.advantages import whiten\n",
    })
    for rule, breach in [
        (test_the_core_imports_no_stage, "rlhfkit/recipes.py imports rlhfkit.stages.evaluate"),
        (test_no_stage_imports_another_stage, "rlhfkit/stages/ppo.py imports rlhfkit.stages.evaluate"),
    ]:
        with pytest.raises(AssertionError, match=breach):
            rule()
    with pytest.raises(AssertionError, match="numpy"):
        test_rl_imports_only_torch_and_the_standard_library()


def test_a_cycle_through_a_function_level_import_is_named(tmp_path, monkeypatch):
    made_up_package(tmp_path, monkeypatch, {
        "__init__.py": "",
        "config.py": "from rlhfkit.runs import RunDir\n",
        "runs.py": "def load():\n    from rlhfkit import config\n",
        "io.py": "import json\n",
    })
    with pytest.raises(AssertionError, match="rlhfkit.config -> rlhfkit.runs -> rlhfkit.config"):
        test_no_import_cycles()
