"""Label Studio JSON export: a list of tasks, each with `data` and `annotations`.

Every annotation of a task becomes one SpanFeedback on `data.text` (the response; the
optional `data.prompt` is the prompt), one span per label of each `"type": "labels"` result
(`value: {start, end, text, labels}`); other result types are ignored. Cancelled
annotations and tasks without annotations are skipped and reported. Tags map to aspects as
in the doccano format (lowercased, or through `--label-map`).

Label Studio counts offsets in UTF-16 code units (JavaScript strings), which differ from
Python's character offsets after any character outside the Basic Multilingual Plane (most
emoji); when `value.text` shows that, the offsets are converted.
"""

from __future__ import annotations

from rlhfkit.importers import (
    Converted,
    Importer,
    ImportOptions,
    LabelMap,
    Row,
    Skipped,
    checked_spans,
    get_field,
    judge_every_seen_aspect,
)
from rlhfkit.schema import RecordError, Span, SpanFeedback

NAME = "label-studio"
FIELDS = {"text": "text", "prompt": "prompt"}
"""Keys inside each task's `data`."""


def utf16_to_python_offset(text: str, offset: int) -> int:
    """The character index of the UTF-16 code-unit `offset` in `text`."""
    units = 0
    for index, char in enumerate(text):
        if units >= offset:
            return index
        units += 2 if ord(char) > 0xFFFF else 1
    return len(text)


def _region_offsets(value: dict, text: str) -> tuple[int, int]:
    start, end = get_field(value, "start", int), get_field(value, "end", int)
    selected = get_field(value, "text", str, optional=True)
    if selected is None or text[start:end] == selected:
        return start, end
    start16, end16 = utf16_to_python_offset(text, start), utf16_to_python_offset(text, end)
    if text[start16:end16] == selected:
        return start16, end16
    if not 0 <= start < end <= len(text):
        return start, end  # out of range or reversed: checked_spans says so
    raise RecordError(
        f"text[{start}:{end}] is {text[start:end]!r}, but the region's text is {selected!r}"
    )


def convert(row: Row, options: ImportOptions) -> Converted:
    task = row.data
    data = get_field(task, "data", dict)
    text = get_field(data, options.fields["text"], str)
    prompt = get_field(data, options.fields["prompt"], str, optional=True) or ""
    annotations = get_field(task, "annotations", list)
    if not annotations:
        yield Skipped(row.where, "no annotations")
    for a, annotation in enumerate(annotations):
        where = f"annotations[{a}]"
        if not isinstance(annotation, dict):
            raise RecordError(f"{where} must be an object")
        if annotation.get("was_cancelled"):
            yield Skipped(f"{row.where} {where}", "annotation was cancelled")
            continue
        spans = []
        for r, result in enumerate(get_field(annotation, "result", list)):
            if not isinstance(result, dict) or result.get("type") != "labels":
                continue
            value = get_field(result, "value", dict)
            region = f"{where}.result[{r}]"
            try:
                start, end = _region_offsets(value, text)
                labels = get_field(value, "labels", list)
                for label in labels:
                    if not isinstance(label, str):
                        raise RecordError(f"labels must be strings, got {label!r}")
                    spans.append(Span(start, end, label, options.labels.aspect(label)))
            except RecordError as err:
                raise RecordError(f"{region}: {err}") from None
        meta = {
            "task_id": task.get("id"),
            "annotation_id": annotation.get("id"),
            "annotator": annotation.get("completed_by"),
        }
        yield SpanFeedback(
            id=f"{NAME}:{row.key}:ann{a}",
            prompt=prompt,
            response=text,
            spans=checked_spans(spans, text, what=f"{where} span"),
            aspects=options.labels.judged_aspects(),
            meta={key: value for key, value in meta.items() if value is not None},
        )


IMPORTER = Importer(
    convert=convert,
    fields=FIELDS,
    labels=LabelMap({}, closed=False),
    finish=judge_every_seen_aspect,
)
