"""Record types exchanged between stages, and the one JSONL reader/writer they all use.

Every line of an rlhfkit artifact is one JSON object with a `type` (which record it is) and a
`schema_version`. Readers stream, validate every field, and name `file:line` in every error;
writers are atomic (temp file + rename). docs/schema.md documents each type with examples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, Optional, Union

import jsonlines

from rlhfkit.errors import RlhfkitError
from rlhfkit.io import atomic_write

SCHEMA_VERSION = 1


@dataclass
class Span:
    """An annotated character range `[start, end)` of a response."""

    start: int
    end: int
    label: str
    aspect: str
    explanation: str = ""


@dataclass
class PromptRecord:
    """A prompt to generate from; `references` are gold answers (for ROUGE), if known."""

    type_name: ClassVar[str] = "prompt"
    id: str
    prompt: str
    references: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


@dataclass
class Demonstration:
    """A response to imitate (SFT data)."""

    type_name: ClassVar[str] = "demonstration"
    id: str
    prompt: str
    response: str
    meta: dict = field(default_factory=dict)


@dataclass
class SpanFeedback:
    """Fine-grained feedback: labelled error spans on a response (offsets into `response`).

    A record with no spans is a positive example: an annotator read it and found no error.
    `aspects` lists the aspects the annotator judged, so "no span of aspect A" means "no
    error of aspect A" only when A is in `aspects`.
    """

    type_name: ClassVar[str] = "span_feedback"
    id: str
    prompt: str
    response: str
    spans: list[Span] = field(default_factory=list)
    aspects: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


@dataclass
class Preference:
    """A pairwise judgement. `tie` marks "no preference" (chosen/rejected order is arbitrary)."""

    type_name: ClassVar[str] = "preference"
    id: str
    prompt: str
    chosen: str
    rejected: str
    aspect: Optional[str] = None
    margin: Optional[float] = None
    tie: bool = False
    meta: dict = field(default_factory=dict)


@dataclass
class ScalarScore:
    """A scalar score of one response (regression reward-model data)."""

    type_name: ClassVar[str] = "score"
    id: str
    prompt: str
    response: str
    score: float
    aspect: Optional[str] = None
    meta: dict = field(default_factory=dict)


@dataclass
class Critique:
    """Natural-language feedback: a critique of `response` and the revision it leads to."""

    type_name: ClassVar[str] = "critique"
    id: str
    prompt: str
    response: str
    critique: str
    revision: str
    meta: dict = field(default_factory=dict)


@dataclass
class Generation:
    """A model's response to a prompt, optionally with per-token data aligned to `tokens`."""

    type_name: ClassVar[str] = "generation"
    id: str
    prompt: str
    response: str
    model: str = ""
    tokens: Optional[list[str]] = None
    token_logprobs: Optional[list[float]] = None
    token_rewards: Optional[list[float]] = None
    meta: dict = field(default_factory=dict)


Record = Union[PromptRecord, Demonstration, SpanFeedback, Preference, ScalarScore, Critique, Generation]
RECORD_TYPES: dict[str, type] = {
    cls.type_name: cls
    for cls in (PromptRecord, Demonstration, SpanFeedback, Preference, ScalarScore, Critique, Generation)
}


class RecordError(ValueError):
    """A record's content is invalid; the reader adds file and line."""


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_value(value: Any, expected: Any, where: str) -> Any:
    """Validate `value` against a type hint; returns the value (Spans built from dicts)."""
    origin = typing.get_origin(expected)
    if origin in (Union, types.UnionType):
        options = typing.get_args(expected)
        if value is None and type(None) in options:
            return None
        (inner,) = [opt for opt in options if opt is not type(None)]
        return _check_value(value, inner, where)
    if origin is list:
        if not isinstance(value, list):
            raise RecordError(f"'{where}' must be a list, got {type(value).__name__}")
        (item_type,) = typing.get_args(expected)
        return [_check_value(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    if expected is Span:
        if not isinstance(value, dict):
            raise RecordError(f"'{where}' must be an object with start, end, label, aspect")
        return _from_dict(Span, value, where)
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecordError(f"'{where}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise RecordError(f"'{where}' must be finite, got {value!r}")
        return float(value)
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecordError(f"'{where}' must be an integer, got {value!r}")
        return value
    if expected is dict:
        if not isinstance(value, dict):
            raise RecordError(f"'{where}' must be an object, got {type(value).__name__}")
        return value
    if not isinstance(value, expected):
        raise RecordError(f"'{where}' must be {expected.__name__}, got {type(value).__name__}")
    return value


def _from_dict(cls: type, data: dict, where: str = "") -> Any:
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names - {"type", "schema_version"})
    if unknown:
        raise RecordError(f"unknown field(s) {', '.join(unknown)}; {cls.__name__} has {', '.join(sorted(names))}")
    values = {}
    for f in dataclasses.fields(cls):
        label = f"{where}.{f.name}" if where else f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"missing field '{label}'")
            continue
        values[f.name] = _check_value(data[f.name], hints[f.name], label)
    return cls(**values)


def validate_record(record: Record) -> None:
    """Checks beyond types: spans inside the response, distinct preference pair."""
    if isinstance(record, SpanFeedback):
        for i, span in enumerate(record.spans):
            if span.start < 0 or span.end > len(record.response):
                raise RecordError(
                    f"span {i} [{span.start}, {span.end}) lies outside the response "
                    f"({len(record.response)} characters)"
                )
            if span.start >= span.end:
                raise RecordError(f"span {i} is empty or reversed: start {span.start} >= end {span.end}")
            if not span.aspect:
                raise RecordError(f"span {i} has no aspect")
    if isinstance(record, (PromptRecord, Demonstration, SpanFeedback, Preference, ScalarScore, Critique, Generation)) and not record.id:
        raise RecordError("empty 'id'")


def record_from_dict(data: Any, expected_type: Optional[str] = None) -> Record:
    """Build and validate one record from its JSON object (raises RecordError)."""
    if not isinstance(data, dict):
        raise RecordError(f"expected a JSON object, got {type(data).__name__}")
    type_name = data.get("type", expected_type)
    if not isinstance(type_name, str) or type_name not in RECORD_TYPES:
        raise RecordError(f"unknown record type {type_name!r}; known: {', '.join(RECORD_TYPES)}")
    if expected_type is not None and type_name != expected_type:
        raise RecordError(f"expected a '{expected_type}' record, found '{type_name}'")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise RecordError(f"schema_version {version!r} is not supported (this rlhfkit reads {SCHEMA_VERSION})")
    record = _from_dict(RECORD_TYPES[type_name], data)
    validate_record(record)
    return record


def record_to_dict(record: Record) -> dict:
    """The JSON object of a record: `type` and `schema_version` first, then the fields in order."""
    return {"type": record.type_name, "schema_version": SCHEMA_VERSION, **dataclasses.asdict(record)}


def _reject_non_finite(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# `\ud800`-`\udfff` escapes: JSON allows one alone, but half of a UTF-16 pair is no character,
# so the text could never be encoded (tokenisers and the UTF-8 writer fail on it).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _reject_lone_surrogates(data: Any) -> None:
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(
                    f"a lone surrogate \\u{ord(item[err.start]):04x} (half of a UTF-16 pair) is not text"
                ) from None


def parse_json(text: str) -> Any:
    """`json.loads`, refusing NaN and Infinity (Python accepts them, but they are not JSON and
    the writer refuses them), lone surrogates (`"\\ud800"`: valid JSON, but no text) and nesting
    deeper than Python's recursion limit. Raises json.JSONDecodeError, or ValueError for those."""
    try:
        data = json.loads(text, parse_constant=_reject_non_finite)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text):  # a paired escape (an emoji) passes the check
        _reject_lone_surrogates(data)
    return data


# A record line longer than this is refused before it is parsed or tokenised: tokenising a
# whole 50 MB text took 9-16 GB before truncation could apply. At ~4 characters a token
# (English, BPE) 1 MiB is ~250k tokens, more than any context the stages train or sample at,
# and tokenising it stays in the hundreds of MB. Raise it with the environment variable.
MAX_RECORD_ENV = "RLHFKIT_MAX_RECORD_BYTES"
DEFAULT_MAX_RECORD_BYTES = 1 << 20


def max_record_bytes() -> int:
    value = os.environ.get(MAX_RECORD_ENV, "")
    if not value:
        return DEFAULT_MAX_RECORD_BYTES
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise RlhfkitError(f"{MAX_RECORD_ENV}={value!r}: expected a positive number of bytes")
    return limit


def capped_lines(handle: IO[bytes], given: str) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a binary file. At most cap + 1 bytes of a line are read, so a
    line above the record cap (a 2 GB file without a newline) is refused naming `given:line`
    before it is held in memory."""
    limit = max_record_bytes()
    lineno = 0
    while raw := handle.readline(limit + 1):
        lineno += 1
        if len(raw) > limit:
            raise RlhfkitError(
                f"{given}:{lineno}: record longer than the {limit:,}-byte limit (set {MAX_RECORD_ENV} to raise it)"
            )
        yield lineno, raw


def check_record_size(record: Record) -> None:
    """RecordError if `record`'s JSONL line would be above the cap every reader applies."""
    size = len(_dumps(record_to_dict(record)).encode("utf-8")) + 1
    limit = max_record_bytes()
    if size > limit:
        raise RecordError(
            f"its {record.type_name} record would be {size:,} bytes, above the {limit:,}-byte limit every stage "
            f"reads (set {MAX_RECORD_ENV} to raise it)"
        )


def read_json_file(path: str | os.PathLike) -> Any:
    """The JSON value of a whole file (a config, a model's spec); anything wrong with the file
    is a one-line RlhfkitError naming it (and the line of a syntax error)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise RlhfkitError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise RlhfkitError(f"{path}: cannot read: {err.strerror}") from None
    try:
        return parse_json(text)
    except json.JSONDecodeError as err:
        raise RlhfkitError(f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
    except ValueError as err:
        raise RlhfkitError(f"{path}: invalid JSON: {err}") from None


def read_json_lines(path: str | os.PathLike, given: Optional[str] = None) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value) of each non-blank line of a JSONL file; a line that is too
    long, not UTF-8 or not JSON raises RlhfkitError naming `given:line` (`given` defaults to
    the path)."""
    path = Path(path)
    given = given or str(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed by the with below; open errors reported first)
    except OSError as err:
        raise RlhfkitError(f"{given}: cannot read: {err.strerror}") from None
    with handle:
        for lineno, raw in capped_lines(handle, given):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise RlhfkitError(f"{given}:{lineno}: not UTF-8 text (byte {err.start})") from None
            if not line.strip():
                continue
            try:
                yield lineno, parse_json(line)
            except json.JSONDecodeError as err:
                raise RlhfkitError(f"{given}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
            except ValueError as err:
                raise RlhfkitError(f"{given}:{lineno}: invalid JSON: {err}") from None


def check_data_file(path: str | os.PathLike, option: Optional[str] = None) -> None:
    """RlhfkitError, naming the command-line `option` that gave it, unless `path` is a file
    (`option` may end in `=`, as `--data-for ASPECT=` does)."""
    given = f"{option}{'' if option.endswith('=') else ' '}{path}" if option else str(path)
    if Path(path).is_dir():
        raise RlhfkitError(f"{given}: is a directory; give a JSONL file")
    if not Path(path).is_file():
        raise RlhfkitError(f"{given}: no such file")


def read_records(
    path: str | os.PathLike, expected_type: Optional[str] = None, *, option: Optional[str] = None
) -> Iterator[Record]:
    """Stream the records of a JSONL file; any problem raises RlhfkitError naming `file:line`
    (after the command-line `option` that gave the file, when there is one).

    `expected_type` also lets files written by other tools omit the `type` field.
    """
    path = Path(path)
    given = f"{option} {path}" if option else str(path)
    check_data_file(path, option)
    for lineno, data in read_json_lines(path, given):
        try:
            yield record_from_dict(data, expected_type)
        except RecordError as err:
            raise RlhfkitError(f"{given}:{lineno}: {err}") from None


def load_records(
    path: str | os.PathLike, expected_type: Optional[str] = None, *, option: Optional[str] = None
) -> list[Record]:
    """All records of a file as a list (see `read_records`); an empty file is an error."""
    records = list(read_records(path, expected_type, option=option))
    if not records:
        what = f"'{expected_type}' records" if expected_type else "records"
        raise RlhfkitError(f"{f'{option} ' if option else ''}{path}: no {what} (the file is empty)")
    return records


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


@contextlib.contextmanager
def record_writer(path: str | os.PathLike) -> Iterator[jsonlines.Writer]:
    """Write records to `path` atomically: `writer.write(record_to_dict(r))` for each."""
    with atomic_write(path) as handle, jsonlines.Writer(handle, dumps=_dumps, flush=False) as writer:
        yield writer


def write_records(path: str | os.PathLike, records: Iterable[Record]) -> int:
    """Write records atomically; returns how many were written."""
    count = 0
    with record_writer(path) as writer:
        for record in records:
            writer.write(record_to_dict(record))
            count += 1
    return count
