"""Published result tables to print beside measured ones (`evaluate --paper TABLE.json`, the
recipes' table steps):

    {"source": "Wu et al. 2023, Table 2", "rows": [{"system": "FG-RLHF", "metrics":
     {"rouge_l": 0.492, "error_rate/relevance": 0.128}}]}

Metric names are evaluate's metrics.json keys, values on the same scale (fractions, not
percentages), so a column of the same name means the same measure.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhfkit.errors import RlhfkitError
from rlhfkit.rewards.sources import canonical_name


def load_paper_table(path: str) -> dict:
    """The --paper JSON, checked: {"source": str, "rows": [{"system": str, "metrics": {name: number}}]}."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RlhfkitError(f"{path}: invalid JSON: {err}") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise RlhfkitError(f'{path}: expected {{"source": "...", "rows": [{{"system": "...", "metrics": {{...}}}}]}}')
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("system"), str) or not isinstance(row.get("metrics"), dict):
            raise RlhfkitError(f"{path}: rows[{i}] needs a 'system' string and a 'metrics' object")
        for key, value in row["metrics"].items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise RlhfkitError(f"{path}: rows[{i}].metrics.{key} must be a number or null, got {value!r}")
    source = data.get("source", "")
    if not isinstance(source, str):
        raise RlhfkitError(f"{path}: 'source' must be a string")
    return {"source": source, "rows": [{**row, "metrics": {metric_key(k): v for k, v in row["metrics"].items()}} for row in rows]}


def metric_key(key: str) -> str:
    """`reward/fact` -> `reward/raw/factuality`: RM names in metric keys as --rm resolves them,
    and a reward named without its kind is a score in the RM's units (evaluate's reward/raw/)."""
    prefix, sep, name = key.partition("/")
    if not sep:
        return key
    kind, sep_kind, source = name.partition("/")
    if prefix == "reward" and name != "total":
        return f"reward/{kind}/{canonical_name(source)}" if sep_kind else f"reward/raw/{canonical_name(name)}"
    return f"{prefix}/{canonical_name(name)}"
