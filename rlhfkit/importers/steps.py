"""Step-labelled solutions (PRM800K, Math-Shepherd) as span feedback whose segments are steps.

A solution is its steps joined by newlines, the way both data sets render them, so the
`step` granularity of rlhfkit/segment.py (one segment per line) cuts it back into its steps.
A step's label becomes a span over the whole step, so every line of a step that spans
several lines (PRM800K's final "# Answer" step) carries the step's label.
"""

from __future__ import annotations

from rlhfkit.schema import RecordError, Span

STEP_SEPARATOR = "\n"


def join_steps(steps: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The solution text and each step's `[start, end)` in it (steps stripped of edge whitespace)."""
    text, bounds = "", []
    for i, step in enumerate(steps):
        step = step.strip()
        if not step:
            raise RecordError(f"step {i} is empty")
        if text:
            text += STEP_SEPARATOR
        bounds.append((len(text), len(text) + len(step)))
        text += step
    return text, bounds


def step_spans(bounds: list[tuple[int, int]], labels: list, aspect_of: dict) -> list[Span]:
    """A span over each step whose label is in `aspect_of` (label -> aspect)."""
    return [
        Span(start, end, str(label), aspect_of[label])
        for (start, end), label in zip(bounds, labels)
        if label in aspect_of
    ]
