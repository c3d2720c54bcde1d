"""QA-Feedback (Fine-Grained RLHF, Wu et al. 2023): a JSON list of annotated questions.

Each record has `question`, `passages` ([title, sentence, ...] lists), `gold`, `prediction 1`
.. `prediction 4`, fine-grained `feedback` on prediction 1 (error spans, missing information,
a corrected answer) and 6 pairwise `preference` judgements among the 4 predictions. One
record becomes: a PromptRecord (the policy input, with the gold answer as reference), a
SpanFeedback and a Critique of prediction 1, a Demonstration (the corrected answer) and up
to 6 Preferences. The mapping is documented in docs/schema.md.
"""

from __future__ import annotations

import json

from rlhfkit.importers import (
    Converted,
    Importer,
    ImportOptions,
    LabelMap,
    Row,
    Skipped,
    checked_spans,
    get_field,
)
from rlhfkit.schema import (
    Critique,
    Demonstration,
    Preference,
    PromptRecord,
    RecordError,
    Span,
    SpanFeedback,
)

NAME = "qa-feedback"

# The paper's reward models (section 4.1): C1 relevance covers irrelevant, repetitive and
# incoherent text; C2 factuality covers inconsistent ("Wrong-Grounding") and unverifiable facts.
ERROR_ASPECTS = {
    "Irrelevant": "relevance",
    "Redundant": "relevance",
    "Incoherent": "relevance",
    "Wrong-Grounding": "factuality",
    "Unverifiable": "factuality",
}

NUM_PREDICTIONS = 4
PREFERENCE_PAIRS = [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]
"""The order of the 6 judgements in `preference`."""

CRITIQUE_OF_ERROR = {
    "Irrelevant": '"{text}" is irrelevant to the question.',
    "Redundant": '"{text}" repeats what the answer already says.',
    "Incoherent": '"{text}" is incoherent.',
    "Wrong-Grounding": '"{text}" contradicts the passages (wrong grounding).',
    "Unverifiable": '"{text}" is not supported by the passages (unverifiable).',
}
NO_ERROR_CRITIQUE = (
    "The answer is relevant, supported by the passages and complete; it needs no changes."
)


def policy_input(question: str, passages: list[list[str]]) -> str:
    """The paper's T5 policy input: `question: Q context: wikipage: T text: S S ... | wikipage: ...`.

    Sentences are joined by a space except after one that already ends in whitespace (a
    title sentence ends in "\\n\\n"), which reproduces the `text` field of the released
    dev.json for 391 of the 400 shipped records; the other 9 differ by one space where the
    released sentence splitter cut text that had no space at all.
    """
    pages = []
    for title, *sentences in passages:
        text = ""
        for sentence in sentences:
            if text and not text[-1].isspace():
                text += " "
            text += sentence
        pages.append(f"wikipage: {title} text: {text}")
    return f"question: {question} context: " + " | ".join(pages)


def _passage_sentences(
    passages: list[list[str]], passage_id: object, sentence_ids: object
) -> list[str]:
    """The sentences `passage_id` (1-based) / `sentence_ids` (indexes into [title, s1, s2, ...]) name."""
    if (
        isinstance(passage_id, bool)
        or not isinstance(passage_id, int)
        or not 1 <= passage_id <= len(passages)
    ):
        raise RecordError(f"passage_id {passage_id!r} is not one of 1..{len(passages)}")
    passage = passages[passage_id - 1]
    if not isinstance(sentence_ids, list):
        sentence_ids = [sentence_ids]
    for sid in sentence_ids:
        if isinstance(sid, bool) or not isinstance(sid, int) or not 0 <= sid < len(passage):
            raise RecordError(
                f"sentence_id {sid!r} is not one of 0..{len(passage) - 1} in passage {passage_id}"
            )
    return [passage[sid] for sid in sentence_ids]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _grounding_sentences(explanation: str, passages: list[list[str]]) -> list[str]:
    """The passage sentences a Wrong-Grounding explanation (`{"passage_id":..,"sentence_id":[..]}`) cites."""
    try:
        cited = json.loads(explanation)
        return _passage_sentences(passages, cited["passage_id"], cited["sentence_id"])
    except (ValueError, TypeError, KeyError, RecordError):
        return []


def render_critique(
    response: str, spans: list[Span], missing: list[dict], passages: list[list[str]]
) -> str:
    """The feedback in words: one sentence per error span, then the missing information."""
    parts = []
    for span in spans:
        part = CRITIQUE_OF_ERROR[span.label].format(text=_one_line(response[span.start : span.end]))
        if span.label == "Wrong-Grounding":
            cited = _grounding_sentences(span.explanation, passages)
            if cited:
                part += " The passages say: " + "; ".join(f'"{_one_line(s)}"' for s in cited) + "."
        parts.append(part)
    missed = list(dict.fromkeys(_one_line(s) for info in missing for s in info["sentences"]))
    if missed:
        parts.append("The answer misses: " + "; ".join(f'"{s}"' for s in missed) + ".")
    return " ".join(parts) if parts else NO_ERROR_CRITIQUE


def _passages(data: dict) -> list[list[str]]:
    passages = get_field(data, "passages", list)
    for i, passage in enumerate(passages):
        if (
            not isinstance(passage, list)
            or not passage
            or not all(isinstance(s, str) for s in passage)
        ):
            raise RecordError(f"passages[{i}] must be a list [title, sentence, ...] of strings")
    return passages


def convert(row: Row, options: ImportOptions) -> Converted:
    data = row.data
    question = get_field(data, "question", str)
    passages = _passages(data)
    gold = get_field(data, "gold", str)
    predictions = {
        k: get_field(data, f"prediction {k}", str) for k in range(1, NUM_PREDICTIONS + 1)
    }
    feedback = get_field(data, "feedback", dict)
    errors = get_field(feedback, "errors", list)
    missing_info = get_field(feedback, "missing-info", list)
    corrected = get_field(feedback, "corrected-prediction", str)
    judgements = get_field(data, "preference", list)
    if len(judgements) != len(PREFERENCE_PAIRS) or any(
        isinstance(v, bool) or v not in (0, 1, 2) for v in judgements
    ):
        raise RecordError(
            f"'preference' must be {len(PREFERENCE_PAIRS)} judgements in 0, 1, 2 "
            f"(pairs 1v2, 1v3, 1v4, 2v3, 2v4, 3v4), got {judgements!r}"
        )

    response = predictions[1]
    spans = []
    for i, error in enumerate(errors):
        label = get_field(error, "error type", str)
        try:
            aspect = options.labels.aspect(label)
        except RecordError as err:
            raise RecordError(f"errors[{i}]: {err}") from None
        explanation = get_field(error, "explanation", str, optional=True) or ""
        spans.append(
            Span(
                get_field(error, "start", int),
                get_field(error, "end", int),
                label,
                aspect,
                explanation,
            )
        )
    spans = checked_spans(spans, response, what="errors")

    missing = []
    for i, info in enumerate(missing_info):
        try:
            passage_id = get_field(info, "passage_id", int)
            sentence_ids = get_field(info, "sentence_id", (list, int))
            missing.append(
                {
                    "error_type": get_field(info, "error type", str),
                    "passage_id": passage_id,
                    "sentence_id": sentence_ids,
                    "sentences": _passage_sentences(passages, passage_id, sentence_ids),
                }
            )
        except RecordError as err:
            raise RecordError(f"missing-info[{i}]: {err}") from None

    base = f"{NAME}:{row.key}"
    prompt = policy_input(question, passages)
    yield PromptRecord(id=base, prompt=prompt, references=[gold])
    yield SpanFeedback(
        id=f"{base}:pred1",
        prompt=prompt,
        response=response,
        spans=spans,
        aspects=options.labels.judged_aspects(),
        meta={"missing_info": missing},
    )
    if corrected.strip():
        yield Demonstration(id=f"{base}:corrected", prompt=prompt, response=corrected)
    else:
        yield Skipped(
            row.where,
            "corrected-prediction is empty (the annotator deleted the whole answer): no demonstration",
        )
    yield Critique(
        id=f"{base}:pred1",
        prompt=prompt,
        response=response,
        critique=render_critique(response, spans, missing, passages),
        revision=corrected,
    )
    for (a, b), judgement in zip(PREFERENCE_PAIRS, judgements):
        if predictions[a] == predictions[b]:
            yield Skipped(
                row.where,
                f"prediction {a} and prediction {b} are identical: their preference carries no signal",
            )
            continue
        chosen, rejected = (b, a) if judgement == 2 else (a, b)
        yield Preference(
            id=f"{base}:pred{a}-pred{b}",
            prompt=prompt,
            chosen=predictions[chosen],
            rejected=predictions[rejected],
            aspect="preference",
            tie=judgement == 0,
            meta={"chosen_prediction": chosen, "rejected_prediction": rejected},
        )


IMPORTER = Importer(convert=convert, labels=LabelMap(ERROR_ASPECTS, closed=True))
