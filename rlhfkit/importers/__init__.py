"""Input formats for `rlhfkit annotate-import`: one module per format, shared reading here.

Every input (a local JSON list or JSONL file, a `.parquet` file, a directory written by
`datasets.save_to_disk`, or `hf:NAME` on the Hugging Face Hub) is read as a stream of `Row`s,
each knowing where it came from (`file:line`, `file: record N` or `source: row N`). A
format's `convert(row, options)` turns one row into schema records, or raises `RecordError`
for the stage to report with the row's location. Nothing here writes files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from rlhfkit.errors import EnvironmentFailure, RlhfkitError
from rlhfkit.schema import (
    PromptRecord,
    Record,
    RecordError,
    Span,
    SpanFeedback,
    capped_lines,
    parse_json,
)
from rlhfkit.yamlfile import read_yaml_file

HF_PREFIX = "hf:"
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Row:
    """One input record. `where` names it in messages; `key` names it in record ids."""

    where: str
    key: str
    data: Any
    error: str = ""
    """Why the row could not be read at all (an invalid JSON line); `data` is then None."""


@dataclass(frozen=True)
class Skipped:
    """A record left out because it carries no signal (not because it is invalid)."""

    where: str
    reason: str


@dataclass(frozen=True)
class LabelMap:
    """Maps annotation labels (error types, span tags) to feedback aspects.

    `closed`: every label must be listed (a label that is not is an error naming the known
    ones); otherwise an unlisted label's aspect is the label lowercased.
    """

    aspects: dict[str, str]
    closed: bool = True

    def aspect(self, label: str) -> str:
        if label in self.aspects:
            return self.aspects[label]
        if self.closed:
            raise RecordError(f"unknown label {label!r}; known labels: {', '.join(self.aspects)}")
        return label.lower()

    def judged_aspects(self) -> list[str]:
        """The aspects an annotator judges when using these labels ([] when not closed)."""
        return list(dict.fromkeys(self.aspects.values())) if self.closed else []


@dataclass(frozen=True)
class ImportOptions:
    """What a format's `convert` needs besides the row."""

    labels: Optional[LabelMap] = None
    fields: dict[str, str] = field(default_factory=dict)
    """Logical field name -> the field name in the input (defaults overridden by --field)."""
    pairs: str = "all"
    """Which preference pairs a format rating several responses makes (`--pairs`)."""


Converted = Iterator[Union[Record, Skipped]]


@dataclass(frozen=True)
class Importer:
    """One input format: how a row becomes records, and which options apply to it."""

    convert: Callable[[Row, ImportOptions], Converted]
    fields: dict[str, str] = field(default_factory=dict)
    """The field names `--field` may remap, with their defaults ({}: --field does not apply)."""
    labels: Optional[LabelMap] = None
    """The default label map (None: --label-map does not apply)."""
    finish: Optional[Callable[[list[Record]], None]] = None
    """Runs once over all records of an import, after every row converted."""
    pairs: tuple[str, ...] = ()
    """The `--pairs` choices this format offers, the default first (() : --pairs does not apply)."""


# ---------------------------------------------------------------------------------------
# Reading inputs


def source_names(specs: list[str]) -> list[str]:
    """Short names of the inputs for record ids: the file name, or the path if names clash."""
    names = [
        spec[len(HF_PREFIX) :] if spec.startswith(HF_PREFIX) else Path(spec).name for spec in specs
    ]
    return [spec if names.count(name) > 1 else name for spec, name in zip(specs, names)]


def read_rows(spec: str, name: str, split: str) -> Iterator[Row]:
    """The rows of one input; an input that cannot be opened at all raises RlhfkitError."""
    if spec.startswith(HF_PREFIX):
        yield from _dataset_rows(spec, name, split)
        return
    path = Path(spec)
    if path.is_dir() or path.suffix == ".parquet":
        yield from _dataset_rows(spec, name, split)
        return
    if not path.is_file():
        raise RlhfkitError(f"{spec}: no such file or directory")
    with open(path, "rb") as handle:
        head = handle.read(4096).removeprefix(UTF8_BOM).lstrip()
    if head.startswith(b"["):
        yield from _json_list_rows(spec, name)
    else:
        yield from _jsonl_rows(spec, name)


def _json_list_rows(spec: str, name: str) -> Iterator[Row]:
    try:
        text = Path(spec).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise RlhfkitError(f"{spec}: not UTF-8 text (byte {err.start})") from None
    try:
        records = parse_json(text)
    except json.JSONDecodeError as err:
        raise RlhfkitError(
            f"{spec}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})"
        ) from None
    except ValueError as err:
        raise RlhfkitError(f"{spec}: invalid JSON: {err}") from None
    if not isinstance(records, list):
        raise RlhfkitError(
            f"{spec}: expected a JSON list of records or JSONL (one object per line)"
        )
    for index, data in enumerate(records):
        yield Row(where=f"{spec}: record {index}", key=f"{name}:{index}", data=data)


def _jsonl_rows(spec: str, name: str) -> Iterator[Row]:
    with open(spec, "rb") as handle:
        for lineno, raw in capped_lines(handle, spec):
            data, error = None, ""
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                if not line.strip():
                    continue
                data = parse_json(line)
            except UnicodeDecodeError as err:
                error = f"not UTF-8 text (byte {err.start})"
            except json.JSONDecodeError as err:
                error = f"invalid JSON: {err.msg} (column {err.colno})"
            except ValueError as err:  # NaN or Infinity
                error = f"invalid JSON: {err}"
            yield Row(where=f"{spec}:{lineno}", key=f"{name}:{lineno}", data=data, error=error)


def _first_line(err: BaseException) -> str:
    """Why `datasets` could not load: its message's first line (they run to pages), or, for
    data files whose columns differ, which columns."""
    from datasets.exceptions import DatasetGenerationError
    from datasets.table import CastError

    if isinstance(err, DatasetGenerationError) and err.__cause__ is not None:
        err = err.__cause__
    if isinstance(err, CastError):
        return f"its data files have different columns: {err.details()}"
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _dataset_rows(spec: str, name: str, split: str) -> Iterator[Row]:
    """Rows of a Hugging Face dataset: `hf:NAME`, a save_to_disk directory, or a .parquet file."""
    import datasets

    repo, _, config = spec[len(HF_PREFIX) :].partition(":")
    if spec.startswith(HF_PREFIX) and not repo.strip():
        raise RlhfkitError(f"{spec}: no dataset after hf:; give hf:NAME or hf:NAME:CONFIG (e.g. hf:nvidia/HelpSteer3:edit)")
    try:
        if spec.startswith(HF_PREFIX):
            # `hf:NAME:CONFIG` picks a configuration (e.g. hf:nvidia/HelpSteer3:edit).
            dataset = datasets.load_dataset(repo, config or None, split=split)
        elif Path(spec).is_dir():
            dataset = datasets.load_from_disk(spec)
        elif Path(spec).is_file():
            dataset = datasets.Dataset.from_parquet(spec)
        else:
            raise RlhfkitError(f"{spec}: no such file or directory")
    except (ConnectionError, TimeoutError) as err:  # no network, or offline mode: the environment
        raise EnvironmentFailure(f"{spec}: cannot load the dataset: {_first_line(err)}") from None
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as err:
        raise RlhfkitError(f"{spec}: cannot load the dataset: {_first_line(err)}") from None
    label = spec
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise RlhfkitError(
                f"{spec}: no split {split!r}; splits: {', '.join(dataset)} (choose with --split)"
            )
        dataset = dataset[split]
        label, name = f"{spec}[{split}]", f"{name}:{split}"
    elif spec.startswith(HF_PREFIX):
        label, name = f"{spec}[{split}]", f"{name}:{split}"
    for index, data in enumerate(dataset):
        yield Row(where=f"{label}: row {index}", key=f"{name}:{index}", data=data)


# ---------------------------------------------------------------------------------------
# Options


def parse_label_map(value: Optional[str]) -> Optional[dict[str, str]]:
    """`--label-map`: `LABEL=ASPECT,LABEL=ASPECT` or a JSON/YAML file mapping labels to aspects."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        data = read_yaml_file(path, "label map")
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in data.items()
        ):
            raise RlhfkitError(
                f"{path}: a label map must map label names to aspect names (strings)"
            )
        return dict(data)
    mapping = {}
    for item in value.split(","):
        label, sep, aspect = item.rpartition("=")
        if not sep or not label.strip() or not aspect.strip():
            raise RlhfkitError(
                f"--label-map: {item!r} is not LABEL=ASPECT (give LABEL=ASPECT,... or a JSON/YAML file)"
            )
        mapping[label.strip()] = aspect.strip()
    return mapping


def parse_field_map(items: list[str], known: dict[str, str], format_name: str) -> dict[str, str]:
    """`--field NAME=SOURCE` (repeatable or comma-separated) over the format's default names."""
    if items and not known:
        raise RlhfkitError(
            f"--field does not apply to --format {format_name} (its field names are fixed)"
        )
    fields = dict(known)
    for item in (part for entry in items for part in entry.split(",")):
        name, sep, source = item.partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not source:
            raise RlhfkitError(f"--field: {item!r} is not NAME=INPUT_FIELD")
        if name not in known:
            raise RlhfkitError(
                f"--field: unknown field {name!r} for {format_name}; fields: {', '.join(known)}"
            )
        fields[name] = source
    return fields


def resolve_labels(
    user: Optional[dict[str, str]], default: Optional[LabelMap], format_name: str
) -> Optional[LabelMap]:
    """The label map an import uses: the format's default, with `--label-map` applied.

    A closed default (a fixed annotation scheme) may only be re-mapped, so a typo in a label
    name is an error; an open default (free-form tags) is replaced by the user's map, which
    then lists every allowed tag.
    """
    if user is None:
        return default
    if default is None:
        raise RlhfkitError(
            f"--label-map does not apply to --format {format_name} (it has no span labels)"
        )
    if not default.closed:
        return LabelMap(user, closed=True)
    unknown = [label for label in user if label not in default.aspects]
    if unknown:
        raise RlhfkitError(
            f"--label-map: unknown label(s) {', '.join(map(repr, unknown))} for {format_name}; "
            f"known labels: {', '.join(default.aspects)}"
        )
    return LabelMap({**default.aspects, **user}, closed=True)


# ---------------------------------------------------------------------------------------
# Field access and spans


def get_field(
    data: Any, name: str, expected: type | tuple[type, ...], *, optional: bool = False
) -> Any:
    """`data[name]` checked against `expected` (bools are not numbers); None if optional and absent."""
    if not isinstance(data, dict):
        raise RecordError(f"expected a JSON object, got {type(data).__name__}")
    if name not in data or (optional and data[name] is None):
        if optional:
            return None
        raise RecordError(f"missing field {name!r}")
    value = data[name]
    expected_types = expected if isinstance(expected, tuple) else (expected,)
    if (isinstance(value, bool) and bool not in expected_types) or not isinstance(
        value, expected_types
    ):
        names = " or ".join(t.__name__ for t in expected_types)
        raise RecordError(f"field {name!r} must be {names}, got {type(value).__name__}")
    return value


def get_rating(data: Any, name: str, low: int, high: int) -> int:
    """`data[name]` as an integer rating in `low..high` (RecordError naming the field if not)."""
    value = get_field(data, name, int)
    if not low <= value <= high:
        raise RecordError(f"field {name!r} must be in {low}..{high}, got {value}")
    return value


def unique_prompts(records: list[Record]) -> None:
    """Keep the first PromptRecord of each prompt text (formats with several rows per prompt)."""
    seen: set[str] = set()
    kept = []
    for record in records:
        if isinstance(record, PromptRecord):
            if record.prompt in seen:
                continue
            seen.add(record.prompt)
        kept.append(record)
    records[:] = kept


def checked_spans(spans: list[Span], text: str, what: str = "span") -> list[Span]:
    """Spans checked against `text` (in input order, so messages match the input), then sorted."""
    for i, span in enumerate(spans):
        for bound in (span.start, span.end):
            if isinstance(bound, bool) or not isinstance(bound, int):
                raise RecordError(f"{what} {i}: start and end must be integers, got {bound!r}")
        if span.start < 0 or span.end > len(text):
            raise RecordError(
                f"{what} {i} [{span.start}, {span.end}) lies outside the text ({len(text)} characters)"
            )
        if span.start >= span.end:
            raise RecordError(
                f"{what} {i} is empty or reversed: start {span.start} >= end {span.end}"
            )
    return sorted(spans, key=lambda s: (s.start, s.end, s.label))


def judge_every_seen_aspect(records: list[Record]) -> None:
    """For free-form tag sets: every annotator judged every tag seen anywhere in the import.

    A span-labelling project has one tag set, and the export does not list it; the tags used
    anywhere in the import are the best estimate, so a text with no spans counts as judged
    free of all of them.
    """
    feedback = [record for record in records if isinstance(record, SpanFeedback)]
    seen = sorted({span.aspect for record in feedback for span in record.spans})
    for record in feedback:
        if not record.aspects:
            record.aspects = list(seen)
