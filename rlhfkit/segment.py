"""Sentence, sub-sentence and step segmentation of responses, with exact character offsets.

Fine-grained rewards are given per segment: the paper's relevance reward model scores
sub-sentences, the factuality one sentences, completeness the whole response; a process
reward model (PRM800K, Math-Shepherd) scores reasoning steps, one per line. Segments are
character ranges `[start, end)` of the response, so annotated error spans (also character
ranges) map onto them by overlap.

Invariant: the segments of a text cover each of its non-whitespace characters exactly once,
in order, and no segment starts or ends with whitespace. Sentence boundaries come from
pysbd; we only take where each sentence *starts* from it and cut the original text there
ourselves, so pysbd's known offset quirks (overlapping spans after "....", sentences it
silently drops) cannot break the invariant.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import pysbd

from rlhfkit.errors import RlhfkitError

GRANULARITIES = ("sentence", "subsentence", "step", "response")
SEGMENT_RM_GRANULARITIES = ("sentence", "subsentence", "step")
"""The granularities a segment reward model can score (one reward at the end of each segment)."""

# Sub-sentence rule of the Fine-Grained RLHF reference code (allenai/FineGrainedRLHF,
# tasks/qa_feedback/reward_modeling/create_rel_fact_rm_files.py, `get_subsentence_starts`,
# used to build the relevance reward model's data, and fgrlhf/reward_utils.py at PPO time):
# within a sentence, a whitespace-separated word ending in one of , ; ! ? may end a
# sub-sentence, but only if more than MIN_SUBSENTENCE_WORDS words follow it, and a piece
# shorter than MIN_SUBSENTENCE_WORDS words is merged into the piece before it (the first
# piece of a sentence is never split off while it is short). ':' is not a boundary there.
SUBSENTENCE_END_CHARS = ",;!?"
MIN_SUBSENTENCE_WORDS = 5


@dataclass(frozen=True)
class Segment:
    """A piece `text == response[start:end]` of a response (end exclusive, no edge whitespace)."""

    start: int
    end: int
    text: str


class _ErrorSpan(Protocol):
    start: int
    end: int
    aspect: str


@functools.lru_cache(maxsize=1)
def _sentence_splitter() -> pysbd.Segmenter:
    return pysbd.Segmenter(language="en", clean=False, char_span=True)


def _stripped_segment(text: str, start: int, end: int) -> Segment | None:
    """`text[start:end]` without leading/trailing whitespace, or None if nothing is left."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if start == end:
        return None
    return Segment(start, end, text[start:end])


def _cut(text: str, start: int, end: int, cuts: Iterable[int]) -> list[Segment]:
    """Cut `text[start:end]` at the increasing positions `cuts`; each character lands in one piece."""
    bounds = [start, *[c for c in cuts if start < c < end], end]
    pieces = (_stripped_segment(text, a, b) for a, b in itertools.pairwise(bounds))
    return [piece for piece in pieces if piece is not None]


# Segmentation is memoised: in PPO every segment reward model (factuality per sentence,
# relevance per sub-sentence) and sentence-level redistribution segment the same responses,
# and pysbd is the expensive part. The cached values are tuples of frozen Segments, so no
# caller can change them; the public functions hand out fresh lists. The sentence splitter
# is part of the key, so a different splitter (tests swap in a fake one) never gets results
# cached for another.
_CACHE_SIZE = 4096


def split_sentences(text: str) -> list[Segment]:
    """Sentences of `text` (pysbd's English rules), with exact offsets into `text`."""
    return list(_sentences(text, _sentence_splitter()))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _sentences(text: str, splitter) -> tuple[Segment, ...]:
    if not text.strip():
        return ()
    starts = []
    cursor = 0
    for span in splitter.segment(text):
        sentence = span.sent.strip()
        # Re-locate each sentence after the previous one instead of trusting span.start:
        # pysbd's spans can overlap (e.g. "reste ...." gives "reste ." then "..."), and a
        # sentence it cannot find in the original it drops; its characters then stay with
        # the sentence before, which is what `_cut` does.
        found = text.find(sentence, cursor) if sentence else -1
        if found < 0:
            continue
        starts.append(found)
        cursor = found + len(sentence)
    return tuple(_cut(text, 0, len(text), starts))


def _subsentence_starts(words: list[re.Match]) -> list[int]:
    """Indices of the words that start a sub-sentence (the reference code's rule, see top)."""
    starts = [0]
    for i in range(1, len(words)):
        ends_clause = words[i - 1].group()[-1] in SUBSENTENCE_END_CHARS
        if not ends_clause or i + MIN_SUBSENTENCE_WORDS >= len(words):
            continue
        if i - starts[-1] >= MIN_SUBSENTENCE_WORDS:
            starts.append(i)
        elif starts[-1] > 0:
            # The piece that would end here is too short: join it to the piece before it.
            starts[-1] = i
    return starts


def split_subsentences(text: str) -> list[Segment]:
    """Sentences further cut after clause punctuation, as the Fine-Grained RLHF paper does."""
    return list(_subsentences(text, _sentence_splitter()))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _subsentences(text: str, splitter) -> tuple[Segment, ...]:
    pieces = []
    for sentence in _sentences(text, splitter):
        words = list(re.finditer(r"\S+", sentence.text))
        cuts = [sentence.start + words[i].start() for i in _subsentence_starts(words)]
        pieces.extend(_cut(text, sentence.start, sentence.end, cuts))
    return tuple(pieces)


def split_steps(text: str) -> list[Segment]:
    """Reasoning steps: one per line (steps are separated by newlines, as PRM800K and
    Math-Shepherd render their solutions and the step importers join them). Blank lines
    separate nothing more, so a step written over several lines counts as several steps;
    the importers label each of those lines with the step's label."""
    return list(_steps(text))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _steps(text: str) -> tuple[Segment, ...]:
    cuts = [match.end() for match in re.finditer("\n", text)]
    return tuple(_cut(text, 0, len(text), cuts))


def segment(text: str, granularity: str) -> list[Segment]:
    """Segments of `text` at `granularity`: "sentence", "subsentence", "step" or "response"."""
    if granularity == "sentence":
        return split_sentences(text)
    if granularity == "subsentence":
        return split_subsentences(text)
    if granularity == "step":
        return split_steps(text)
    if granularity == "response":
        whole = _stripped_segment(text, 0, len(text))
        return [whole] if whole is not None else []
    raise RlhfkitError(
        f"unknown segment granularity {granularity!r}; valid: {', '.join(GRANULARITIES)}"
    )


def label_segments(segments: list[Segment], spans: Iterable[_ErrorSpan], aspect: str) -> list[bool]:
    """For each segment, whether an error span of `aspect` overlaps it.

    Ranges are half-open, so a span that ends exactly where a segment starts (or starts where
    it ends) does not overlap it; an empty span overlaps nothing.
    """
    ranges = [
        (span.start, span.end) for span in spans if span.aspect == aspect and span.start < span.end
    ]
    return [any(start < seg.end and seg.start < end for start, end in ranges) for seg in segments]


@dataclass(frozen=True)
class SegmentLabelRules:
    """How span annotations become per-segment training labels (Fine-Grained RLHF's rules).

    The reference (`create_rel_fact_rm_files.py`) applies two rules that plain overlap misses:
    - spans of `min_span_aspects` with fewer than `min_span_words` whitespace words are dropped
      (QA-Feedback: irrelevance/redundancy/incoherence spans under 5 words, paper App. D);
    - a segment with no error of the trained aspect but an error of one of
      `ignore_with_aspects` is left out of training, not labelled "no error" (QA-Feedback's
      annotators did not mark factual errors inside text they had marked irrelevant).
    """

    min_span_words: int = 0
    min_span_aspects: tuple[str, ...] = ()
    ignore_with_aspects: tuple[str, ...] = ()

    def kept_spans(self, spans: Iterable[_ErrorSpan], text: str) -> list[_ErrorSpan]:
        return [
            span for span in spans
            if not (span.aspect in self.min_span_aspects and len(text[span.start:span.end].split()) < self.min_span_words)
        ]

    def labels(self, segments: list[Segment], spans: Iterable[_ErrorSpan], text: str, aspect: str) -> list[bool | None]:
        """Per segment: True (an error of `aspect`), False (none) or None (left out of training)."""
        spans = self.kept_spans(spans, text)
        errors = label_segments(segments, spans, aspect)
        others = [label_segments(segments, spans, other) for other in self.ignore_with_aspects if other != aspect]
        return [True if error else (None if any(o[i] for o in others) else False) for i, error in enumerate(errors)]

    def to_dict(self) -> dict:
        return {
            "min_span_words": self.min_span_words,
            "min_span_aspects": list(self.min_span_aspects),
            "ignore_with_aspects": list(self.ignore_with_aspects),
        }

    @classmethod
    def from_dict(cls, data: dict | None) -> SegmentLabelRules:
        data = data or {}
        return cls(
            int(data.get("min_span_words", 0)),
            tuple(data.get("min_span_aspects", ())),
            tuple(data.get("ignore_with_aspects", ())),
        )
