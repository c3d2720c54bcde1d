"""Natural-language feedback: JSONL with `prompt`, `response`, `critique`, `revision`.

Each line becomes one Critique; `--field` renames the four fields (e.g. `--field
critique=feedback`).
"""

from __future__ import annotations

from rlhfkit.importers import Converted, Importer, ImportOptions, Row, get_field
from rlhfkit.schema import Critique

NAME = "critique"
FIELDS = {name: name for name in ("prompt", "response", "critique", "revision")}


def convert(row: Row, options: ImportOptions) -> Converted:
    values = {name: get_field(row.data, source, str) for name, source in options.fields.items()}
    yield Critique(id=f"{NAME}:{row.key}", **values)


IMPORTER = Importer(convert=convert, fields=FIELDS)
