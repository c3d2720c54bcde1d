"""Math-Shepherd (peiyi9979/Math-Shepherd): automatically labelled step-by-step math solutions.

Each row has `input`, the problem followed by a solution whose steps ("Step 1: ...") each end
with the step tag "ки", `label`, the same text with each tag replaced by "+" (the step can
still reach the right answer) or "-" (it cannot), and `task` ("GSM8K" or "MATH"). A row
becomes a SpanFeedback whose prompt is the problem (the text before "Step 1:") and whose
response is the steps joined by newlines (importers/steps.py), with a span of aspect
`correctness` (label "-") over each "-" step, and a PromptRecord of the problem. `label`
must be `input` with exactly its tags replaced (anything else is an error: the steps do not
match the text).
"""

from __future__ import annotations

from rlhfkit.importers import Converted, Importer, ImportOptions, Row, get_field, unique_prompts
from rlhfkit.importers.steps import join_steps, step_spans
from rlhfkit.schema import PromptRecord, RecordError, SpanFeedback

NAME = "math-shepherd"
STEP_TAG = "ки"
FIRST_STEP = "Step 1:"
STEP_LABELS = ("+", "-")
LABEL_ASPECTS = {"-": "correctness"}


def step_labels(text: str, labelled: str) -> list[str]:
    """The "+"/"-" that `labelled` puts where `text` has step tags (RecordError where they differ)."""
    pieces = text.split(STEP_TAG)
    labels, cursor = [], 0
    for k, piece in enumerate(pieces):
        if not labelled.startswith(piece, cursor):
            raise RecordError(f"'label' does not match 'input' (they differ from character {cursor} of 'label')")
        cursor += len(piece)
        if k == len(pieces) - 1:
            break
        mark = labelled[cursor : cursor + 1]
        if mark not in STEP_LABELS:
            raise RecordError(f"step {k + 1}: 'label' has {mark!r} where 'input' has the step tag; expected + or -")
        labels.append(mark)
        cursor += 1
    if cursor != len(labelled):
        raise RecordError(f"'label' does not match 'input' (it has {len(labelled) - cursor} more characters)")
    return labels


def convert(row: Row, options: ImportOptions) -> Converted:
    data = row.data
    text = get_field(data, "input", str)
    labelled = get_field(data, "label", str)
    task = get_field(data, "task", str, optional=True)
    start = text.find(FIRST_STEP)
    if start < 0:
        raise RecordError(f"'input' has no {FIRST_STEP!r}: cannot tell the problem from the solution")
    labels = step_labels(text, labelled)
    if not labels:
        raise RecordError(f"'input' has no step tag {STEP_TAG!r}")
    *steps, tail = text[start:].split(STEP_TAG)
    if tail.strip():
        raise RecordError(f"'input' has text after its last step tag: {tail.strip()[:40]!r}")
    if STEP_TAG in text[:start]:
        raise RecordError(f"'input' has a step tag before {FIRST_STEP!r}")
    prompt = text[:start].strip()
    response, bounds = join_steps(steps)
    base = f"{NAME}:{row.key}"
    yield PromptRecord(id=base, prompt=prompt)
    yield SpanFeedback(
        id=base,
        prompt=prompt,
        response=response,
        spans=step_spans(bounds, labels, LABEL_ASPECTS),
        aspects=["correctness"],
        meta={"task": task, "step_labels": "".join(labels)},
    )


IMPORTER = Importer(convert=convert, finish=unique_prompts)
