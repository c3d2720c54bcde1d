"""Segmentation: exact offsets worked out by hand, the reference sub-sentence rule, and the
coverage invariant on the shipped QA-Feedback predictions."""

from __future__ import annotations

import json

import pytest
from pysbd.utils import TextSpan

from rlhfkit import segment as segment_module
from rlhfkit.errors import RlhfkitError
from rlhfkit.schema import Span
from rlhfkit.segment import Segment, label_segments, segment, split_sentences, split_subsentences

PARIS = "Paris is the capital of France. It has 2 million people, and many museums."


def spans_of(segments: list[Segment]) -> list[tuple[int, int]]:
    return [(s.start, s.end) for s in segments]


def assert_covers(text: str, segments: list[Segment]) -> None:
    """Each non-whitespace character in exactly one segment, in order; exact, trimmed slices."""
    owner = [0] * len(text)
    previous_end = 0
    for seg in segments:
        assert seg.text == text[seg.start : seg.end]
        assert seg.text and seg.text == seg.text.strip()
        assert seg.start >= previous_end
        previous_end = seg.end
        for i in range(seg.start, seg.end):
            owner[i] += 1
    for i, ch in enumerate(text):
        assert owner[i] == 1 or (ch.isspace() and owner[i] == 0), (
            f"character {i} ({ch!r}) in {owner[i]} segments"
        )


def test_sentences_by_hand():
    # "Paris is the capital of France." is 31 characters, then one space at 31; the second
    # sentence "It has 2 million people, and many museums." is 42 characters: [32, 74).
    segments = split_sentences(PARIS)
    assert spans_of(segments) == [(0, 31), (32, 74)]
    assert [s.text for s in segments] == [
        "Paris is the capital of France.",
        "It has 2 million people, and many museums.",
    ]


def test_sentences_exclude_surrounding_whitespace():
    text = "  Hello there.\n\nGeneral Kenobi!  "
    # 2 leading spaces; "Hello there." = 12 chars → [2, 14); "\n\n" at 14-15;
    # "General Kenobi!" = 15 chars → [16, 31); 2 trailing spaces.
    assert spans_of(split_sentences(text)) == [(2, 14), (16, 31)]


def test_abbreviations_do_not_end_sentences():
    text = "Dr. Smith arrived at 5 p.m. on Monday. He left."
    # "Dr. Smith arrived at 5 p.m. on Monday." = 38 chars; "He left." = [39, 47).
    assert spans_of(split_sentences(text)) == [(0, 38), (39, 47)]


def test_empty_and_blank_text_have_no_segments():
    for granularity in ("sentence", "subsentence", "response"):
        assert segment("", granularity) == []
        assert segment(" \n\t ", granularity) == []


def test_response_granularity_is_one_trimmed_segment():
    assert segment("  Yes. It is.\n", "response") == [Segment(2, 13, "Yes. It is.")]


def test_unknown_granularity_lists_valid_ones():
    with pytest.raises(RlhfkitError, match="valid: sentence, subsentence, step, response"):
        segment(PARIS, "paragraph")


def test_subsentence_split_after_clause_punctuation():
    text = "Paris, the capital, is large; it has many museums, parks and old bridges."
    # Words: Paris,(0) the capital,(2) is large;(4) it(5) has many museums,(8) parks and old bridges.(12)
    # After "Paris," and "capital," the first piece would have 1 and 3 words (< 5): no split.
    # After "large;" it has 5 words and 8 words remain (> 5): split before "it" (offset 30).
    # After "museums," only 4 words remain: no split.
    # "Paris, the capital, is large;" = 6+1+3+1+8+1+2+1+6 = 29 chars.
    segments = split_subsentences(text)
    assert spans_of(segments) == [(0, 29), (30, 73)]
    assert segments[1].text == "it has many museums, parks and old bridges."


def test_short_subsentence_joins_the_one_before():
    text = "The band formed in Texas, toured often, and released five albums over ten years."
    # Words: The band formed in Texas,(4) toured(5) often,(6) and(7) ... years.(13); 14 words.
    # "Texas," closes a 5-word piece → split before "toured" (word 5). "often," would close a
    # 2-word piece, so that piece joins the one before and the split moves before "and".
    # "The band formed in Texas, toured often," = 3+1+4+1+6+1+2+1+6+1+6+1+6 = 39 chars.
    assert spans_of(split_subsentences(text)) == [(0, 39), (40, 80)]


def test_short_clause_at_the_end_is_not_split():
    # "people," is word 4 of 7: only 2 words follow (the rule wants more than 5).
    assert split_subsentences(PARIS) == split_sentences(PARIS)


def test_subsentences_keep_offsets_into_the_whole_text():
    text = "Short one. The band formed in Texas, toured often, and released five albums over ten years."
    # The second sentence starts at 11, so its sub-sentences are the previous test's, shifted by 11.
    assert spans_of(split_subsentences(text)) == [(0, 10), (11, 50), (51, 91)]


def test_colon_is_not_a_subsentence_boundary():
    # The reference code splits only after , ; ! ? — a colon keeps the clause together.
    # Split at "singles:" there would be 5 words before and 9 after, enough for a split.
    text = "The album has three singles: Bloom and Animal and Dance to This by Troye Sivan."
    assert split_subsentences(text) == split_sentences(text)


def test_pysbd_overlapping_spans_are_cut_without_overlap():
    text = "He stopped there .... Then, after a pause, he went on."
    # pysbd 0.3.4 returns spans [0, 18), [17, 20), [22, 54): the second overlaps the first
    # and the fourth dot (offset 20) is in none. Re-locating each sentence after the previous
    # one gives "..." at [18, 21) instead.
    segments = split_sentences(text)
    assert spans_of(segments) == [(0, 18), (18, 21), (22, 54)]
    assert_covers(text, segments)


class FakeSplitter:
    """Stands in for pysbd to reproduce its offset quirks deterministically."""

    def __init__(self, spans: list[TextSpan]):
        self.spans = spans

    def segment(self, text: str) -> list[TextSpan]:
        return self.spans


def test_quirky_splitter_output_still_gives_exact_offsets(monkeypatch):
    text = "One two. Three four. Five six. Seven."
    quirky = [
        TextSpan("One two. ", 0, 9),
        TextSpan("Three four.", 0, 11),  # wrong start (pysbd issue #49)
        TextSpan(
            "Fyve six.", 21, 30
        ),  # text altered: cannot be found, so its words join "Three four."
        TextSpan("Seven.", 28, 37),  # overlaps the previous span
    ]
    monkeypatch.setattr(segment_module, "_sentence_splitter", lambda: FakeSplitter(quirky))
    segments = split_sentences(text)
    assert spans_of(segments) == [(0, 8), (9, 30), (31, 37)]
    assert [s.text for s in segments] == ["One two.", "Three four. Five six.", "Seven."]


def test_label_segments_overlap_rules():
    segments = split_sentences(PARIS)  # [0, 31) and [32, 74)
    spans = [
        Span(
            31, 32, "Irrelevant", "relevance"
        ),  # only the space between: touches both, overlaps neither
        Span(0, 74, "Unverifiable", "factuality"),  # another aspect: ignored
        Span(40, 40, "Irrelevant", "relevance"),  # empty: overlaps nothing
    ]
    assert label_segments(segments, spans, "relevance") == [False, False]
    assert label_segments(segments, [Span(30, 32, "Irrelevant", "relevance")], "relevance") == [
        True,
        False,
    ]
    assert label_segments(segments, [Span(31, 33, "Irrelevant", "relevance")], "relevance") == [
        False,
        True,
    ]
    assert label_segments(segments, [Span(25, 40, "Redundant", "relevance")], "relevance") == [
        True,
        True,
    ]
    assert label_segments(segments, spans, "factuality") == [True, True]
    assert label_segments(segments, [], "relevance") == [False, False]


def test_coverage_on_all_shipped_predictions(repo_root):
    records = json.loads((repo_root / "data/qa_feedback/feedback.json").read_text(encoding="utf-8"))
    assert len(records) == 400
    for record in records:
        text = record["prediction 1"]
        sentences = split_sentences(text)
        subsentences = split_subsentences(text)
        assert_covers(text, sentences)
        assert_covers(text, subsentences)
        assert len(subsentences) >= len(sentences)
        # Sub-sentences refine sentences: every sentence boundary is a sub-sentence boundary.
        assert {s.start for s in sentences} <= {s.start for s in subsentences}
        assert {s.end for s in sentences} <= {s.end for s in subsentences}
        start = len(text) - len(text.lstrip())
        assert segment(text, "response") == [
            Segment(start, start + len(text.strip()), text.strip())
        ]


def test_first_shipped_record_by_hand(repo_root):
    record = json.loads((repo_root / "data/qa_feedback/feedback.json").read_text(encoding="utf-8"))[
        0
    ]
    text = record["prediction 1"]
    # Its annotated errors are whole sentences: [152, 282), [283, 401) and [489, 572).
    sentences = spans_of(split_sentences(text))
    assert (152, 282) in sentences and (283, 401) in sentences and (489, 572) in sentences
    spans = [
        Span(e["start"], e["end"], e["error type"], "relevance")
        for e in record["feedback"]["errors"]
    ]
    assert label_segments(split_sentences(text), spans, "relevance") == [
        False,
        True,
        True,
        False,
        True,
    ]


def test_segmentation_is_memoised_and_callers_get_their_own_lists():
    text = "Memo one is here. Memo two, which follows it closely, is longer than the first."
    first = split_sentences(text)
    first.append(Segment(0, 1, "M"))  # a caller changing its list changes nobody else's
    assert split_sentences(text) == first[:-1]
    assert segment_module._sentences.cache_info().hits >= 1
    assert segment(text, "subsentence") == split_subsentences(text)


def test_step_granularity_is_one_segment_per_line():
    from rlhfkit.segment import Segment, segment

    text = "Step 1: a.\nStep 2: b.\n\n# Answer\n\n2\n  \n"
    # "Step 1: a." is 10 characters [0, 10); "\n" at 10; "Step 2: b." [11, 21); "\n\n" at 21-22;
    # "# Answer" [23, 31); "\n\n" at 31-32; "2" [33, 34); the blank line "  " gives nothing.
    assert segment(text, "step") == [
        Segment(0, 10, "Step 1: a."),
        Segment(11, 21, "Step 2: b."),
        Segment(23, 31, "# Answer"),
        Segment(33, 34, "2"),
    ]
    assert segment("  one step, no newline ", "step") == [Segment(2, 22, "one step, no newline")]


def test_step_labels_follow_step_spans():
    from rlhfkit.schema import Span
    from rlhfkit.segment import label_segments, segment

    # PRM800K-style: the second step (a wrong one) spans two lines, both carry its label.
    text = "Add 2.\nSo x = 5\nwhich is odd.\nDone."
    steps = segment(text, "step")
    assert [s.text for s in steps] == ["Add 2.", "So x = 5", "which is odd.", "Done."]
    wrong = [Span(7, 29, "-1", "correctness")]  # "So x = 5\nwhich is odd." is [7, 29)
    assert label_segments(steps, wrong, "correctness") == [False, True, True, False]
