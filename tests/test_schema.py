"""Record types and the one JSONL reader/writer: round trips, file:line errors, atomic writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rlhfkit.errors import RlhfkitError
from rlhfkit.schema import (
    RECORD_TYPES,
    SCHEMA_VERSION,
    Critique,
    Demonstration,
    Generation,
    Preference,
    PromptRecord,
    ScalarScore,
    Span,
    SpanFeedback,
    load_records,
    record_from_dict,
    record_to_dict,
    write_records,
)

ONE_OF_EACH = [
    PromptRecord(
        id="p1", prompt="question: q context: c", references=["gold"], meta={"split": "dev"}
    ),
    Demonstration(id="d1", prompt="Q", response="A ünïcode answer.", meta={"source": "corrected"}),
    SpanFeedback(
        id="s1",
        prompt="Q",
        response="Paris is in France. It is big.",
        spans=[
            Span(0, 19, "Unverifiable", "factuality", "no passage says so"),
            Span(20, 30, "Irrelevant", "relevance"),
        ],
        aspects=["relevance", "factuality"],
        meta={"missing_info": [{"sentences": ["x"]}]},
    ),
    Preference(
        id="r1",
        prompt="Q",
        chosen=" yes",
        rejected=" no",
        aspect="preference",
        margin=1.5,
        tie=False,
    ),
    ScalarScore(id="c1", prompt="Q", response="A", score=-0.25, aspect="helpfulness"),
    Critique(id="k1", prompt="Q", response="A", critique="Too short.", revision="A longer answer."),
    Generation(
        id="g1",
        prompt="Q",
        response="ab",
        model="tiny",
        tokens=["a", "b"],
        token_logprobs=[-0.5, -1.0],
        token_rewards=[0.0, 1.0],
    ),
]


def test_one_of_each_covers_every_record_type():
    assert sorted(r.type_name for r in ONE_OF_EACH) == sorted(RECORD_TYPES)


def test_round_trip_of_every_record_type(tmp_path):
    path = tmp_path / "all.jsonl"
    assert write_records(path, ONE_OF_EACH) == len(ONE_OF_EACH)
    assert load_records(path) == ONE_OF_EACH
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(ONE_OF_EACH)
    first = json.loads(lines[1])
    assert list(first)[:3] == ["type", "schema_version", "id"]
    assert first["type"] == "demonstration" and first["schema_version"] == SCHEMA_VERSION
    assert "ünïcode" in lines[1]  # written as UTF-8, not \u escapes


def test_expected_type_lets_other_tools_omit_type(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"id": "x", "prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    (pref,) = load_records(path, "preference")
    assert pref == Preference(id="x", prompt="p", chosen="a", rejected="b")
    typed = tmp_path / "typed.jsonl"
    typed.write_text(
        json.dumps({"type": "preference", "id": "x", "prompt": "p", "chosen": "a", "rejected": "b"})
        + "\n"
    )
    with pytest.raises(
        RlhfkitError, match=r"typed.jsonl:1: expected a 'critique' record, found 'preference'"
    ):
        load_records(typed, "critique")


GOOD = json.dumps({"type": "prompt", "id": "a", "prompt": "p"})


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            [GOOD, '{"type": "prompt", "id": "b", "prompt": "p"'],
            r"bad.jsonl:2: invalid JSON: Expecting ',' delimiter",
        ),
        (
            [GOOD, GOOD, json.dumps({"type": "prompt", "id": "c", "prompt": 5})],
            r"bad.jsonl:3: 'prompt' must be str, got int",
        ),
        ([json.dumps({"type": "prompt", "prompt": "p"})], r"bad.jsonl:1: missing field 'id'"),
        (
            [
                json.dumps(
                    {"type": "demonstration", "id": "d", "prompt": "p", "response": "r", "extra": 1}
                )
            ],
            r"bad.jsonl:1: unknown field\(s\) extra",
        ),
        (
            [
                json.dumps(
                    {
                        "type": "span_feedback",
                        "id": "s",
                        "prompt": "p",
                        "response": "abc",
                        "spans": [{"start": 1, "end": 9, "label": "x", "aspect": "y"}],
                    }
                )
            ],
            r"bad.jsonl:1: span 0 \[1, 9\) lies outside the response \(3 characters\)",
        ),
        (
            [
                json.dumps(
                    {
                        "type": "span_feedback",
                        "id": "s",
                        "prompt": "p",
                        "response": "abc",
                        "spans": [{"start": 2, "end": 1, "label": "x", "aspect": "y"}],
                    }
                )
            ],
            r"bad.jsonl:1: span 0 is empty or reversed: start 2 >= end 1",
        ),
        (
            [
                json.dumps(
                    {"type": "score", "id": "s", "prompt": "p", "response": "r", "score": True}
                )
            ],
            r"'score' must be a number",
        ),
        (
            [json.dumps({"type": "prompt", "id": "a", "prompt": "p", "schema_version": 2})],
            r"bad.jsonl:1: schema_version 2 is not supported",
        ),
        (
            [GOOD, json.dumps({"type": ["prompt"], "id": "a", "prompt": "p"})],
            r"bad.jsonl:2: unknown record type \['prompt'\]",
        ),
        (
            [GOOD, '{"type": "prompt", "id": "a", "prompt": "p", "meta": {"x": NaN}}'],
            r"bad.jsonl:2: invalid JSON: NaN is not valid JSON",
        ),
    ],
)
def test_reader_errors_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RlhfkitError, match=message):
        load_records(path)


def test_reader_error_on_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"type": "prompt", "id": "a", "prompt": "\xff"}\n')
    with pytest.raises(RlhfkitError, match=r"bad.jsonl:2: not UTF-8 text"):
        load_records(path)


def test_blank_lines_are_skipped_and_empty_file_is_an_error(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text(GOOD + "\n\n" + GOOD + "\n")
    assert len(load_records(path)) == 2
    path.write_text("\n")
    with pytest.raises(RlhfkitError, match="gaps.jsonl: no records"):
        load_records(path)
    with pytest.raises(RlhfkitError, match="missing.jsonl: no such file"):
        load_records(tmp_path / "missing.jsonl")


def test_writer_that_raises_midway_leaves_no_file(tmp_path):
    path = tmp_path / "out.jsonl"

    def failing():
        yield ONE_OF_EACH[0]
        yield ONE_OF_EACH[1]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_records(path, failing())
    assert list(tmp_path.iterdir()) == []


def test_writer_that_raises_keeps_the_previous_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_records(path, ONE_OF_EACH[:1])
    before = path.read_bytes()

    def failing():
        yield ONE_OF_EACH[1]
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_records(path, failing())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_writer_refuses_non_finite_numbers_without_leaving_a_file(tmp_path):
    path = tmp_path / "nan.jsonl"
    with pytest.raises(ValueError):
        write_records(
            path, [Demonstration(id="d", prompt="p", response="r", meta={"x": float("nan")})]
        )
    assert not path.exists()


def test_record_to_dict_is_plain_json():
    data = record_to_dict(ONE_OF_EACH[2])
    assert data["spans"][0] == {
        "start": 0,
        "end": 19,
        "label": "Unverifiable",
        "aspect": "factuality",
        "explanation": "no passage says so",
    }
    assert json.loads(json.dumps(data)) == data


def test_docs_show_a_valid_example_of_every_record_type():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "schema.md").read_text(encoding="utf-8")
    examples = [block.strip() for block in re.findall(r"```json\n(.*?)```", docs, flags=re.DOTALL)]
    records = [record_from_dict(json.loads(example)) for example in examples]
    assert sorted(r.type_name for r in records) == sorted(RECORD_TYPES)
    feedback = next(r for r in records if isinstance(r, SpanFeedback))
    assert [feedback.response[s.start : s.end] for s in feedback.spans] == [
        "Miles Richardson plays Bonnie Langford.",
        "Audrey Langford plays Bonnie Blue Butler.",
    ]
