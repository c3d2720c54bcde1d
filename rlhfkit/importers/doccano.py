"""doccano sequence-labelling export (JSONL): `text`, `label: [[start, end, tag], ...]`.

Each line becomes a SpanFeedback on `text` (the response), with the optional `prompt` field
as its prompt ("" without one). doccano's newer `entities` form (objects with
`start_offset`, `end_offset`, `label`) is read too. A tag's aspect is the tag lowercased,
unless `--label-map` maps tags to aspects; the map then lists every allowed tag.
"""

from __future__ import annotations

from rlhfkit.importers import (
    Converted,
    Importer,
    ImportOptions,
    LabelMap,
    Row,
    checked_spans,
    get_field,
    judge_every_seen_aspect,
)
from rlhfkit.schema import RecordError, Span, SpanFeedback

NAME = "doccano"
FIELDS = {"text": "text", "label": "label", "prompt": "prompt"}


def _tagged_range(item: object, i: int, field_name: str) -> tuple[object, object, object]:
    if isinstance(item, list) and len(item) == 3:
        return item[0], item[1], item[2]
    if isinstance(item, dict) and {"start_offset", "end_offset", "label"} <= item.keys():
        return item["start_offset"], item["end_offset"], item["label"]
    raise RecordError(
        f"{field_name}[{i}] must be [start, end, tag] or {{start_offset, end_offset, label}}"
    )


def convert(row: Row, options: ImportOptions) -> Converted:
    fields, data = options.fields, row.data
    text = get_field(data, fields["text"], str)
    label_field = fields["label"]
    if label_field == FIELDS["label"] and label_field not in data and "entities" in data:
        label_field = "entities"
    items = get_field(data, label_field, list)
    prompt = get_field(data, fields["prompt"], str, optional=True) or ""
    spans = []
    for i, item in enumerate(items):
        start, end, tag = _tagged_range(item, i, label_field)
        if not isinstance(tag, str):
            raise RecordError(f"{label_field}[{i}]: the tag must be a string, got {tag!r}")
        try:
            aspect = options.labels.aspect(tag)
        except RecordError as err:
            raise RecordError(f"{label_field}[{i}]: {err}") from None
        spans.append(Span(start, end, tag, aspect))
    source_id = data.get("id")
    yield SpanFeedback(
        id=f"{NAME}:{row.key}",
        prompt=prompt,
        response=text,
        spans=checked_spans(spans, text, what=label_field),
        aspects=options.labels.judged_aspects(),
        meta={} if source_id is None else {"source_id": source_id},
    )


IMPORTER = Importer(
    convert=convert,
    fields=FIELDS,
    labels=LabelMap({}, closed=False),
    finish=judge_every_seen_aspect,
)
