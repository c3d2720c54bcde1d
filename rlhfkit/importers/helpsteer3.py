"""HelpSteer3 (nvidia/HelpSteer3): its `preference` and `edit` configurations.

Both carry `context`, the conversation so far (`[{"role", "content"}, ...]`, one or more
turns, the last the user's); the prompt is that conversation in the plain dialogue format
(`meta["messages"]` keeps the messages for chat templates) and each response starts with a
space after the `Assistant:` cue.

- preference rows (`response1`, `response2`, `overall_preference` in -3..3, negative when
  response 1 is better, and `individual_preference`, a list of `{score, reasoning}` from each
  annotator) become one Preference: chosen is the better response, `margin` the strength
  |overall_preference|, and 0 is a tie (margin 0, chosen = response 1). Each annotator's
  reasoning for a non-tied preference becomes a Critique of the response that annotator
  rejected, whose revision is the response they preferred.
- edit rows (`original_response`, `feedback`, a list of the annotators' written feedback,
  and `edited_response`, the original revised to address it) become a Critique (response,
  the feedback joined by blank lines, revision) and a Demonstration of the edited response.

The configuration is recognised by its fields (`hf:nvidia/HelpSteer3:edit` loads the edit
configuration from the Hub).
"""

from __future__ import annotations

from rlhfkit.chat import MESSAGES_KEY, checked_messages, plain_prompt
from rlhfkit.importers import (
    Converted,
    Importer,
    ImportOptions,
    Row,
    Skipped,
    get_field,
    get_rating,
    unique_prompts,
)
from rlhfkit.schema import Critique, Demonstration, Preference, PromptRecord, RecordError

NAME = "helpsteer3"
MAX_STRENGTH = 3


def _context(data: dict) -> tuple[str, dict]:
    messages = checked_messages(get_field(data, "context", list), "context")
    if messages[-1]["role"] != "user":
        raise RecordError(f"the context's last turn is {messages[-1]['role']!r}; it must be the user's")
    return plain_prompt(messages), {MESSAGES_KEY: messages}


def _preference(row: Row, base: str) -> Converted:
    data = row.data
    prompt, meta = _context(data)
    responses = {1: " " + get_field(data, "response1", str), 2: " " + get_field(data, "response2", str)}
    overall = get_rating(data, "overall_preference", -MAX_STRENGTH, MAX_STRENGTH)
    annotators = get_field(data, "individual_preference", list, optional=True) or []
    reasons = []
    for i, item in enumerate(annotators):
        try:
            reasons.append((get_rating(item, "score", -MAX_STRENGTH, MAX_STRENGTH), get_field(item, "reasoning", str)))
        except RecordError as err:
            raise RecordError(f"individual_preference[{i}]: {err}") from None
    yield PromptRecord(id=base, prompt=prompt, meta=meta)
    if responses[1] == responses[2]:
        yield Skipped(row.where, "response1 and response2 are identical: the preference carries no signal")
        return
    chosen, rejected = (2, 1) if overall > 0 else (1, 2)
    yield Preference(
        id=base,
        prompt=prompt,
        chosen=responses[chosen],
        rejected=responses[rejected],
        aspect="preference",
        margin=float(abs(overall)),
        tie=overall == 0,
        meta={**meta, "overall_preference": overall, "chosen_response": chosen},
    )
    for i, (score, reasoning) in enumerate(reasons):
        if score == 0 or not reasoning.strip():
            continue
        better, worse = (2, 1) if score > 0 else (1, 2)
        yield Critique(
            id=f"{base}:annotator{i}",
            prompt=prompt,
            response=responses[worse],
            critique=reasoning,
            revision=responses[better],
            meta={**meta, "score": score},
        )


def _edit(row: Row, base: str) -> Converted:
    data = row.data
    prompt, meta = _context(data)
    original = get_field(data, "original_response", str)
    edited = get_field(data, "edited_response", str)
    feedback = get_field(data, "feedback", (list, str))
    notes = [feedback] if isinstance(feedback, str) else feedback
    for i, note in enumerate(notes):
        if not isinstance(note, str):
            raise RecordError(f"feedback[{i}] must be str, got {type(note).__name__}")
    critique = "\n\n".join(note.strip() for note in notes if note.strip())
    if not critique:
        raise RecordError("field 'feedback' has no text")
    yield PromptRecord(id=base, prompt=prompt, meta=meta)
    yield Critique(id=base, prompt=prompt, response=" " + original, critique=critique, revision=" " + edited, meta=meta)
    yield Demonstration(id=f"{base}:edited", prompt=prompt, response=" " + edited, meta=meta)


def convert(row: Row, options: ImportOptions) -> Converted:
    base = f"{NAME}:{row.key}"
    if isinstance(row.data, dict) and "original_response" in row.data:
        yield from _edit(row, base)
    elif isinstance(row.data, dict) and "response1" in row.data:
        yield from _preference(row, base)
    else:
        raise RecordError(
            "neither a preference row (context, response1, response2, overall_preference) "
            "nor an edit row (context, original_response, feedback, edited_response)"
        )


IMPORTER = Importer(convert=convert, finish=unique_prompts)
