"""UltraFeedback (openbmb/UltraFeedback): GPT-4 ratings of several completions per instruction.

Each row has `instruction` and `completions`, each completion a `response` with
`annotations` for four aspects: `instruction_following`, `honesty`, `truthfulness` and
`helpfulness`. An aspect's annotation is an object (or, in some copies, a list holding one
object) with `Rating` ("1".."5", or "N/A" when the aspect does not apply) and `Rationale`
(truthfulness and helpfulness add `Rationale For Rating` and `Type`). A row becomes:

- a PromptRecord of the instruction (every record's `meta.messages` is the instruction as one
  user turn, as helpsteer2's single-turn prompts are);
- per completion and aspect rated 1..5, a ScalarScore (aspect = the annotation's name);
- per aspect, Preferences between completions with different responses (margin = the rating
  difference): `--pairs all` makes every pair (equal ratings give ties; a row may then have
  at most MAX_ALL_PAIRS_COMPLETIONS completions, since n completions make n(n-1)/2 pairs per
  aspect), `--pairs best-vs-worst` one pair, the first highest-rated against the first
  lowest-rated (none when they are rated the same);
- per completion that is not the best rated (highest mean over its rated aspects; the first
  on equal means), a Critique made of its rationales ("Helpfulness (2/5): ...") whose
  revision is the best-rated completion.
"""

from __future__ import annotations

import itertools

from rlhfkit.chat import MESSAGES_KEY
from rlhfkit.importers import (
    Converted,
    Importer,
    ImportOptions,
    Row,
    Skipped,
    get_field,
    unique_prompts,
)
from rlhfkit.schema import Critique, Preference, PromptRecord, RecordError, ScalarScore

NAME = "ultrafeedback"
ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
NOT_APPLICABLE = "N/A"
RATINGS = ("1", "2", "3", "4", "5")
PAIRS = ("all", "best-vs-worst")
# UltraFeedback rows have 4 completions (6 pairs per aspect). Every pair of 1,000 completions
# was 2.0M preferences (1.5 GB of memory, 539 MB written) from one 240 KB row; 16 make at most
# 4 x 120 = 480 preferences per row.
MAX_ALL_PAIRS_COMPLETIONS = 16


def _annotation(annotations: dict, aspect: str) -> dict:
    value = get_field(annotations, aspect, (dict, list))
    if isinstance(value, list):
        if len(value) != 1:
            raise RecordError(f"annotation {aspect!r} must be one object, got a list of {len(value)}")
        value = value[0]
    if not isinstance(value, dict):
        raise RecordError(f"annotation {aspect!r} must be an object, got {type(value).__name__}")
    return value


def _rating(annotation: dict, aspect: str) -> int | None:
    rating = get_field(annotation, "Rating", (str, int))
    if rating == NOT_APPLICABLE:
        return None
    if str(rating).strip() not in RATINGS:
        raise RecordError(f"{aspect} Rating must be 1..5 or 'N/A', got {rating!r}")
    return int(str(rating).strip())


def _rationale(annotation: dict) -> str:
    parts = [get_field(annotation, "Rationale", str)]
    extra = get_field(annotation, "Rationale For Rating", str, optional=True)
    if extra:
        parts.append(extra)
    return " ".join(part.strip() for part in parts if part.strip())


def _pairs(ratings: list[tuple[int, int]], mode: str) -> list[tuple[int, int]]:
    """(i, j) index pairs, each with the higher-rated completion first (ties keep input order)."""
    if mode == "best-vs-worst":
        best = max(ratings, key=lambda r: r[1])  # max and min return the first on equal ratings
        worst = min(ratings, key=lambda r: r[1])
        return [] if best[1] == worst[1] else [(best[0], worst[0])]
    ordered = []
    for (i, a), (j, b) in itertools.combinations(ratings, 2):
        ordered.append((j, i) if b > a else (i, j))
    return ordered


def convert(row: Row, options: ImportOptions) -> Converted:
    data = row.data
    prompt = get_field(data, "instruction", str)
    completions = get_field(data, "completions", list)
    if options.pairs == "all" and len(completions) > MAX_ALL_PAIRS_COMPLETIONS:
        n = len(completions)
        raise RecordError(
            f"{n:,} completions: --pairs all would make {n * (n - 1) // 2:,} preferences per aspect; it takes at most "
            f"{MAX_ALL_PAIRS_COMPLETIONS} completions per row (use --pairs best-vs-worst)"
        )
    responses, scores, rationales = [], [], []
    for c, completion in enumerate(completions):
        try:
            responses.append(get_field(completion, "response", str))
            annotations = get_field(completion, "annotations", dict)
            rated, notes = {}, {}
            for aspect in ASPECTS:
                annotation = _annotation(annotations, aspect)
                rating = _rating(annotation, aspect)
                if rating is not None:
                    rated[aspect] = rating
                    notes[aspect] = _rationale(annotation)
            scores.append(rated)
            rationales.append(notes)
        except RecordError as err:
            raise RecordError(f"completions[{c}]: {err}") from None

    base = f"{NAME}:{row.key}"
    # The instruction is one user turn, as helpsteer2 gives a single-turn prompt: with a chat
    # template, every stage renders the same question the same way whichever set it came from.
    conversation = {MESSAGES_KEY: [{"role": "user", "content": prompt}]}
    yield PromptRecord(id=base, prompt=prompt, meta=conversation)
    for c, (response, rated) in enumerate(zip(responses, scores)):
        for aspect, rating in rated.items():
            yield ScalarScore(
                id=f"{base}:c{c}:{aspect}", prompt=prompt, response=response, score=float(rating), aspect=aspect,
                meta=conversation,
            )
    for aspect in ASPECTS:
        ratings = [(c, rated[aspect]) for c, rated in enumerate(scores) if aspect in rated]
        for i, j in _pairs(ratings, options.pairs) if len(ratings) > 1 else []:
            if responses[i] == responses[j]:
                yield Skipped(row.where, f"completions {i} and {j} are identical: no {aspect} preference")
                continue
            margin = scores[i][aspect] - scores[j][aspect]
            yield Preference(
                id=f"{base}:{aspect}:c{i}-c{j}",
                prompt=prompt,
                chosen=responses[i],
                rejected=responses[j],
                aspect=aspect,
                margin=float(margin),
                tie=margin == 0,
                meta={"chosen_completion": i, "rejected_completion": j, **conversation},
            )
    means = [sum(rated.values()) / len(rated) if rated else None for rated in scores]
    rated_ones = [c for c, mean in enumerate(means) if mean is not None]
    if not rated_ones:
        return
    best = max(rated_ones, key=lambda c: means[c])
    for c in rated_ones:
        if c == best or responses[c] == responses[best]:
            continue
        critique = " ".join(
            f"{aspect.replace('_', ' ').capitalize()} ({scores[c][aspect]}/5): {note}"
            for aspect, note in rationales[c].items()
        )
        yield Critique(
            id=f"{base}:c{c}",
            prompt=prompt,
            response=responses[c],
            critique=critique,
            revision=responses[best],
            meta={"revision_completion": best, **conversation},
        )


IMPORTER = Importer(convert=convert, finish=unique_prompts, pairs=PAIRS)
