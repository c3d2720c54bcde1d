"""PRM800K (openai/prm800k): human step-level ratings of model solutions to MATH problems.

Each JSONL line is one labelled solution: `question` (`problem`, `ground_truth_answer`, and
in phase 2 `pre_generated_steps`, the solution the labeler rated) and `label` (`steps`,
`finish_reason`). Each step has `completions` (candidate steps, each `{text, rating,
flagged}` with rating -1, 0 or +1), `chosen_completion` (the index the trajectory continues
with, or null) and `human_completion` (phase 1: a labeler-written step, used when
`chosen_completion` is null).

The trajectory is the chosen (or human-written) step of each step in turn. A step where
neither is set ends the labelling (phase 2 stops at the first error): each of its rated
completions ends one solution, so such a line gives one SpanFeedback per rated alternative.
An unrated step (rating null) also ends the labelled part. Steps are joined by newlines
(see importers/steps.py); a step rated -1 is a span of aspect `correctness` (label "-1"), a
step rated 0 (correct but no progress) one of aspect `progress` (label "0"); +1 steps have
no span. Both aspects are judged on every record. In phase 2 the chosen steps must be the
pre-generated ones, in order (a mismatch is an error: the steps do not match the text). Lines
whose `finish_reason` is `bad_problem` are skipped. Each problem also becomes a PromptRecord
with its ground-truth answer as reference.
"""

from __future__ import annotations

from rlhfkit.importers import (
    Converted,
    Importer,
    ImportOptions,
    Row,
    Skipped,
    get_field,
    unique_prompts,
)
from rlhfkit.importers.steps import join_steps, step_spans
from rlhfkit.schema import PromptRecord, RecordError, SpanFeedback

NAME = "prm800k"
RATING_ASPECTS = {-1: "correctness", 0: "progress"}
ASPECTS = ["correctness", "progress"]
RATINGS = (-1, 0, 1)


def _rating(completion: dict) -> int | None:
    rating = get_field(completion, "rating", int, optional=True)
    if rating is not None and rating not in RATINGS:
        raise RecordError(f"rating must be -1, 0 or 1, got {rating}")
    return rating


def _completion(completion: object) -> tuple[str, int | None]:
    return get_field(completion, "text", str), _rating(completion)


def _human_step(human: object) -> tuple[str, int | None]:
    """A labeler-written step: its text (a string, or an object with `text` and maybe `rating`)."""
    if isinstance(human, str):
        return human, 1  # the instructions let labelers write only a +1 step
    text = get_field(human, "text", str)
    rating = _rating(human)
    return text, 1 if rating is None else rating


def trajectories(steps: list) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(the chosen (step text, rating) path, the rated alternatives that end it; see the top)."""
    path: list[tuple[str, int]] = []
    for i, step in enumerate(steps):
        try:
            completions = get_field(step, "completions", list)
            chosen = get_field(step, "chosen_completion", int, optional=True)
            human = step.get("human_completion")
            if chosen is not None:
                if not 0 <= chosen < len(completions):
                    raise RecordError(f"chosen_completion {chosen} is not an index of its {len(completions)} completions")
                text, rating = _completion(completions[chosen])
            elif human is not None:
                text, rating = _human_step(human)
            else:
                if i != len(steps) - 1:
                    raise RecordError("no chosen or human completion, but later steps follow")
                ends = [_completion(c) for c in completions]
                return path, [(text, rating) for text, rating in ends if rating is not None]
        except RecordError as err:
            raise RecordError(f"label.steps[{i}]: {err}") from None
        if rating is None:
            break
        path.append((text, rating))
    return path, []


def convert(row: Row, options: ImportOptions) -> Converted:
    data = row.data
    question = get_field(data, "question", dict)
    problem = get_field(question, "problem", str)
    answer = get_field(question, "ground_truth_answer", str, optional=True)
    pre_generated = get_field(question, "pre_generated_steps", list, optional=True)
    label = get_field(data, "label", dict)
    steps = get_field(label, "steps", list)
    finish = get_field(label, "finish_reason", str, optional=True)
    if finish == "bad_problem":
        yield Skipped(row.where, "finish_reason is bad_problem: the labeler reported the problem as broken")
        return
    path, ends = trajectories(steps)
    if pre_generated is not None:
        for i, (text, _) in enumerate(path):
            if i >= len(pre_generated) or text != pre_generated[i]:
                raise RecordError(f"label.steps[{i}] does not match question.pre_generated_steps[{i}]")
    solutions = [path + [end] for end in ends] or [path]
    base = f"{NAME}:{row.key}"
    yield PromptRecord(id=base, prompt=problem, references=[answer] if answer else [])
    meta = {"finish_reason": finish, "labeler": data.get("labeler"), "generation": data.get("generation")}
    for k, solution in enumerate(solutions):
        if not solution:
            yield Skipped(row.where, "no rated step: nothing to learn from")
            continue
        response, bounds = join_steps([text for text, _ in solution])
        ratings = [rating for _, rating in solution]
        yield SpanFeedback(
            id=base if len(solutions) == 1 else f"{base}:{k}",
            prompt=problem,
            response=response,
            spans=step_spans(bounds, ratings, RATING_ASPECTS),
            aspects=list(ASPECTS),
            meta={**meta, "step_ratings": ratings},
        )


IMPORTER = Importer(convert=convert, finish=unique_prompts)
