"""The one way rlhfkit reads YAML (config files, recipe plans, label maps, `--set` values).

YAML is data here, so it is loaded with the safe loader, and two more things are refused in
one line naming the file (and line where YAML knows it) instead of a traceback:
- nesting deeper than Python's recursion limit (a line of 100,000 `[`);
- aliases that expand to more than `MAX_YAML_VALUES` values ("billion laughs": nine lines
  of `&a [*b, *b, ...]` stand for 10^9 values; the loader shares them, but every reader that
  walks the data, such as a plan's variable substitution, visits each one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from rlhfkit.errors import RlhfkitError

# The shipped plans and configs hold a few hundred values; a generous bound for hand-written
# files that still stops an alias bomb before anything walks it.
MAX_YAML_VALUES = 100_000

_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _AliasBomb(Exception):
    pass


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` stands for once every alias is expanded (memoised per node,
    so computing it costs one visit per distinct node)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(key, sizes) + _expanded_size(value, sizes) for key, value in node.value)
    if size > MAX_YAML_VALUES:
        raise _AliasBomb
    sizes[id(node)] = size
    return size


class _BoundedLoader(_SafeLoader):
    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {})
        return self.construct_document(node)


def parse_yaml(text: str, where: str, *, lines: bool = True) -> Any:
    """`text` as YAML data; anything wrong with it is a one-line RlhfkitError naming `where`
    (and the line, when `lines` and the text is a file's)."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if lines and mark is not None else ""
        raise RlhfkitError(f"{where}{line}: invalid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise RlhfkitError(f"{where}: invalid YAML: {' '.join(str(err).split())}") from None
    except RecursionError:
        raise RlhfkitError(f"{where}: invalid YAML: nested too deeply") from None
    except _AliasBomb:
        raise RlhfkitError(
            f"{where}: YAML aliases expand to more than {MAX_YAML_VALUES:,} values; write the values out"
        ) from None


def read_yaml_file(path: str | os.PathLike, what: str) -> Any:
    """The YAML data of the file `path` (`what` names the kind of file in a read error)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise RlhfkitError(f"{path}: cannot read the {what}: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RlhfkitError(f"{path}: not UTF-8 text (byte {err.start})") from None
    return parse_yaml(text, str(path))
