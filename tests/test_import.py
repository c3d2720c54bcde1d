"""`rlhfkit annotate-import`: every format on small fixtures, the shipped QA-Feedback sample
checked against counts and spans read off the raw data by hand, bad input, determinism and
Hugging Face dataset inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhfkit.cli import app
from rlhfkit.config import build_config
from rlhfkit.errors import RlhfkitError
from rlhfkit.importers.label_studio import utf16_to_python_offset
from rlhfkit.importers.qa_feedback import NO_ERROR_CRITIQUE, policy_input
from rlhfkit.runs import RUN_CONFIG
from rlhfkit.schema import load_records
from rlhfkit.stages.annotate_import import ImportConfig, run_import

REPO = Path(__file__).resolve().parents[1]
QA_FEEDBACK = REPO / "data" / "qa_feedback" / "feedback.json"
QA_FEEDBACK_HELD_OUT = REPO / "data" / "qa_feedback" / "feedback_heldout.json"
QA_DEV = REPO / "data" / "qa_feedback" / "qa_dev.json"
FIXTURES = Path(__file__).parent / "fixtures" / "import"
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["annotate-import", *map(str, args)])


def one_line(output: str) -> str:
    """The CLI's message with rich's line wrapping undone."""
    return " ".join(output.split())


def records(out: Path, name: str) -> list:
    return load_records(out / name)


def by_id(items: list) -> dict:
    return {item.id: item for item in items}


def report(out: Path) -> dict:
    return json.loads((out / "import_report.json").read_text())


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def qa_subset(tmp_path: Path, indexes: list[int], name: str = "subset.json") -> Path:
    raw = json.loads(QA_FEEDBACK.read_text())
    path = tmp_path / name
    path.write_text(json.dumps([raw[i] for i in indexes]))
    return path


@pytest.fixture(scope="module")
def qa_import(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qa") / "import"
    result = invoke("--format", "qa-feedback", QA_FEEDBACK, "--out", out)
    assert result.exit_code == 0, result.output
    return out


# ---------------------------------------------------------------------------------------
# QA-Feedback, the shipped sample


def test_qa_feedback_writes_every_record_type_with_counts(qa_import):
    rep = report(qa_import)
    # 400 records; 10 have an empty corrected-prediction (records 4, 7, 29, 73, 108, 144,
    # 145, 340, 359, 382), so no demonstration; 6 judgements each and no identical pair.
    assert rep["counts"] == {
        "prompt": 400,
        "demonstration": 390,
        "span_feedback": 400,
        "preference": 2400,
        "critique": 400,
    }
    for type_name, file_name in rep["files"].items():
        assert len(records(qa_import, file_name)) == rep["counts"][type_name]
    # Error types counted in the raw file: relevance = 736 + 105 + 13, factuality = 124 + 119.
    assert rep["span_feedback"]["spans_per_label"] == {
        "Incoherent": 13,
        "Irrelevant": 736,
        "Redundant": 105,
        "Unverifiable": 119,
        "Wrong-Grounding": 124,
    }
    assert rep["span_feedback"]["spans_per_aspect"] == {"factuality": 243, "relevance": 854}
    assert rep["preference"] == {"per_aspect": {"preference": 2400}, "ties": 314}
    assert [s["where"] for s in rep["skipped"]][:2] == [
        f"{QA_FEEDBACK}: record 4",
        f"{QA_FEEDBACK}: record 7",
    ]
    assert len(rep["skipped"]) == 10 and rep["invalid"] == []
    assert (qa_import / RUN_CONFIG).is_file()


def test_qa_feedback_record_0_spans_and_preferences(qa_import):
    raw = json.loads(QA_FEEDBACK.read_text())[0]
    feedback = by_id(records(qa_import, "span_feedback.jsonl"))["qa-feedback:feedback.json:0:pred1"]
    assert feedback.response == raw["prediction 1"]
    assert feedback.aspects == ["relevance", "factuality"]
    # Three Irrelevant spans (given as 283-401, 489-572, 152-282; written sorted).
    assert [(s.start, s.end, s.label, s.aspect) for s in feedback.spans] == [
        (152, 282, "Irrelevant", "relevance"),
        (283, 401, "Irrelevant", "relevance"),
        (489, 572, "Irrelevant", "relevance"),
    ]
    assert [feedback.response[s.start : s.end] for s in feedback.spans] == [
        (
            "The album follows up his 2015 debut studio album, Blue Neighbourhood, and features guest "
            "appearances from Gordi and Ariana Grande."
        ),
        (
            "The lead single from the album was released on 10 January 2018, accompanied by a music "
            "video directed by Grant Singer."
        ),
        "American singer Ariana Grande was released on 13 June as the album's fourth single.",
    ]
    assert feedback.meta == {"missing_info": []}

    # preference [0, 1, 2, 1, 0, 2] over pairs 1v2, 1v3, 1v4, 2v3, 2v4, 3v4.
    prefs = by_id(records(qa_import, "preferences.jsonl"))
    expected = {
        "pred1-pred2": (1, 2, True),
        "pred1-pred3": (1, 3, False),
        "pred1-pred4": (4, 1, False),
        "pred2-pred3": (2, 3, False),
        "pred2-pred4": (2, 4, True),
        "pred3-pred4": (4, 3, False),
    }
    for pair, (chosen, rejected, tie) in expected.items():
        pref = prefs[f"qa-feedback:feedback.json:0:{pair}"]
        assert (
            pref.chosen == raw[f"prediction {chosen}"]
            and pref.rejected == raw[f"prediction {rejected}"]
        )
        assert pref.tie is tie and pref.aspect == "preference"

    prompt = by_id(records(qa_import, "prompts.jsonl"))["qa-feedback:feedback.json:0"]
    assert prompt.references == [raw["gold"]]
    assert prompt.prompt.startswith(
        "question: When does bloom by troye sivan come out? context: wikipage: Bloom (Troye Sivan album) "
        "text: Bloom (Troye Sivan album)\n\nBloom is the second studio album"
    )
    critique = by_id(records(qa_import, "critiques.jsonl"))["qa-feedback:feedback.json:0:pred1"]
    assert critique.critique == (
        '"The album follows up his 2015 debut studio album, Blue Neighbourhood, and features guest '
        'appearances from Gordi and Ariana Grande." is irrelevant to the question. "The lead single from '
        "the album was released on 10 January 2018, accompanied by a music video directed by Grant "
        'Singer." is irrelevant to the question. "American singer Ariana Grande was released on 13 June '
        "as the album's fourth single.\" is irrelevant to the question."
    )
    assert critique.revision == raw["feedback"]["corrected-prediction"]
    demo = by_id(records(qa_import, "demonstrations.jsonl"))[
        "qa-feedback:feedback.json:0:corrected"
    ]
    assert demo.response == raw["feedback"]["corrected-prediction"] and demo.prompt == prompt.prompt


def test_qa_feedback_record_1_redundant_span_and_missing_info(qa_import):
    feedback = by_id(records(qa_import, "span_feedback.jsonl"))["qa-feedback:feedback.json:1:pred1"]
    # 3 Irrelevant + 1 Redundant, all relevance.
    assert [(s.start, s.end, s.label) for s in feedback.spans] == [
        (60, 82, "Irrelevant"),
        (83, 250, "Irrelevant"),
        (251, 419, "Irrelevant"),
        (460, 504, "Redundant"),
    ]
    assert feedback.response[460:504] == "and takes place in Pasadenadena, California."
    assert {s.aspect for s in feedback.spans} == {"relevance"}
    # missing-info: passage 2 sentences 8 and 10 (passage[8], passage[10]: index 0 is the title).
    missing = feedback.meta["missing_info"]
    assert [(m["error_type"], m["passage_id"], m["sentence_id"]) for m in missing] == [
        ("Missing-Major-Auxiliary", 2, [8]),
        ("Missing-Answer", 2, [10]),
    ]
    assert missing[0]["sentences"][0].startswith(
        "In 1969, in Pasadena, a couple seeks the aid of the medium"
    )
    assert missing[1]["sentences"] == [
        "In present-day Los Angeles, bank loan officer Christine is in competition for a promotion with Stu Rubin."
    ]
    critique = by_id(records(qa_import, "critiques.jsonl"))[
        "qa-feedback:feedback.json:1:pred1"
    ].critique
    assert (
        '"and takes place in Pasadenadena, California." repeats what the answer already says.'
        in critique
    )
    assert critique.endswith(
        '"In present-day Los Angeles, bank loan officer Christine is in competition for a promotion with Stu Rubin.".'
    )


def test_qa_feedback_record_5_factuality_spans_and_critique(qa_import):
    feedback = by_id(records(qa_import, "span_feedback.jsonl"))["qa-feedback:feedback.json:5:pred1"]
    factual = [
        (feedback.response[s.start : s.end], s.label)
        for s in feedback.spans
        if s.aspect == "factuality"
    ]
    assert factual == [
        ("Miles Richardson plays Bonnie Langford.", "Unverifiable"),
        ("Audrey Langford plays Bonnie Blue Butler.", "Wrong-Grounding"),
    ]
    assert sum(s.label == "Irrelevant" for s in feedback.spans) == 2
    critique = by_id(records(qa_import, "critiques.jsonl"))[
        "qa-feedback:feedback.json:5:pred1"
    ].critique
    assert (
        '"Miles Richardson plays Bonnie Langford." is not supported by the passages (unverifiable).'
        in critique
    )
    # The Wrong-Grounding explanation cites passage 2 sentence 4.
    assert (
        '"Audrey Langford plays Bonnie Blue Butler." contradicts the passages (wrong grounding). The passages say: '
        '"Darius Danesh and Jill Paice starred as Rhett Butler and Scarlett O\'Hara respectively.".'
        in critique
    )
    # missing-info cites passage 2 sentences [0, 2] (0 = the title) and [8].
    assert (
        'The answer misses: "Gone with the Wind (musical)"; "It began previews on 5 April 2008'
        in critique
    )


def test_qa_feedback_empty_correction_and_error_free_answer(qa_import):
    critiques = by_id(records(qa_import, "critiques.jsonl"))
    demos = by_id(records(qa_import, "demonstrations.jsonl"))
    # Record 382: one Unverifiable sentence, deleted by the annotator.
    assert "qa-feedback:feedback.json:382:corrected" not in demos
    assert critiques["qa-feedback:feedback.json:382:pred1"].revision == ""
    assert critiques["qa-feedback:feedback.json:382:pred1"].critique == (
        '"A short time later, in 1945, the uk declared war on germany." is not supported by the passages (unverifiable).'
    )
    # Record 70: no error, nothing missing.
    feedback = by_id(records(qa_import, "span_feedback.jsonl"))[
        "qa-feedback:feedback.json:70:pred1"
    ]
    assert feedback.spans == [] and feedback.aspects == ["relevance", "factuality"]
    assert critiques["qa-feedback:feedback.json:70:pred1"].critique == NO_ERROR_CRITIQUE


def test_qa_feedback_prompt_matches_the_released_policy_input(qa_import):
    dev = {item["question"]: item["text"] for item in json.loads(QA_DEV.read_text())}
    raw = json.loads(QA_FEEDBACK.read_text())
    prompts = by_id(records(qa_import, "prompts.jsonl"))
    exact, near = 0, 0
    for index, item in enumerate(raw):
        ours, theirs = prompts[f"qa-feedback:feedback.json:{index}"].prompt, dev[item["question"]]
        if ours == theirs:
            exact += 1
        elif ours.replace(" ", "") == theirs.replace(" ", ""):
            near += 1
    # The other 9 differ only where the released sentence splitter cut text with no space.
    assert (exact, near) == (391, 9)


def test_qa_feedback_held_out_records_share_no_question_with_the_sample():
    # SOURCE.md: dev_feedback.json's 500 records split 400 (feedback.json) / 100
    # (feedback_heldout.json); each of its questions once, so the two files together hold
    # exactly the 500 questions of dev.json (qa_dev.json) and none twice.
    sample = [r["question"] for r in json.loads(QA_FEEDBACK.read_text())]
    held_out = [r["question"] for r in json.loads(QA_FEEDBACK_HELD_OUT.read_text())]
    assert (len(sample), len(held_out)) == (400, 100)
    assert len(set(sample)) == 400 and len(set(held_out)) == 100
    assert set(sample).isdisjoint(held_out)
    assert set(sample) | set(held_out) == {r["question"] for r in json.loads(QA_DEV.read_text())}


def test_qa_feedback_held_out_file_imports_with_its_counts(tmp_path):
    # Counted in the raw file: 100 records, 3 with an empty corrected-prediction (records 32,
    # 36, 45), so 97 demonstrations; 6 judgements each (70 of the 600 ties, no identical
    # pair); relevance spans 173 Irrelevant + 28 Redundant + 3 Incoherent, factuality 39
    # Wrong-Grounding + 33 Unverifiable.
    result = invoke("--format", "qa-feedback", QA_FEEDBACK_HELD_OUT, "--out", tmp_path / "import")
    assert result.exit_code == 0, result.output
    rep = report(tmp_path / "import")
    assert rep["counts"] == {"prompt": 100, "demonstration": 97, "span_feedback": 100, "preference": 600, "critique": 100}
    assert rep["span_feedback"]["spans_per_aspect"] == {"factuality": 72, "relevance": 204}
    assert rep["preference"] == {"per_aspect": {"preference": 600}, "ties": 70}


def test_policy_input_form():
    passages = [["T1", "T1\n\n", "A.", "B."], ["T2", "C."]]
    assert (
        policy_input("q?", passages)
        == "question: q? context: wikipage: T1 text: T1\n\nA. B. | wikipage: T2 text: C."
    )


def test_qa_feedback_label_map_inline_and_file(tmp_path):
    subset = qa_subset(tmp_path, [0, 1])  # 7 Irrelevant + 1 Redundant
    out = tmp_path / "inline"
    result = invoke(
        "--format",
        "qa-feedback",
        subset,
        "--out",
        out,
        "--label-map",
        "Redundant=factuality,Irrelevant=relevance",
    )
    assert result.exit_code == 0, result.output
    assert report(out)["span_feedback"]["spans_per_aspect"] == {"factuality": 1, "relevance": 6}
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"Irrelevant": "off_topic"}))
    out = tmp_path / "file"
    assert (
        invoke("--format", "qa-feedback", subset, "--out", out, "--label-map", mapping).exit_code
        == 0
    )
    assert report(out)["span_feedback"]["spans_per_aspect"] == {"off_topic": 6, "relevance": 1}
    assert records(out, "span_feedback.jsonl")[0].aspects == [
        "off_topic",
        "relevance",
        "factuality",
    ]


def test_qa_feedback_unknown_label_in_label_map(tmp_path):
    result = invoke(
        "--format",
        "qa-feedback",
        QA_FEEDBACK,
        "--out",
        tmp_path / "out",
        "--label-map",
        "Redundnat=relevance",
    )
    assert result.exit_code == 2
    assert (
        "--label-map: unknown label(s) 'Redundnat' for qa-feedback; known labels: Irrelevant, Redundant, "
        "Incoherent, Wrong-Grounding, Unverifiable" in one_line(result.output)
    )
    assert not (tmp_path / "out").exists()


def test_qa_feedback_identical_predictions_are_skipped_and_ties_kept(tmp_path):
    raw = json.loads(QA_FEEDBACK.read_text())[0]  # preference [0, 1, 2, 1, 0, 2]
    raw["prediction 3"] = raw["prediction 1"]
    path = tmp_path / "one.json"
    path.write_text(json.dumps([raw]))
    rep = run_import(
        build_config(
            ImportConfig, format="qa-feedback", inputs=[str(path)], out=str(tmp_path / "out")
        )
    )
    assert rep["counts"]["preference"] == 5
    assert rep["preference"]["ties"] == 2
    assert rep["skipped"] == [
        {
            "where": f"{path}: record 0",
            "reason": "prediction 1 and prediction 3 are identical: their preference carries no signal",
        }
    ]
    assert "qa-feedback:one.json:0:pred1-pred3" not in by_id(
        records(tmp_path / "out", "preferences.jsonl")
    )


def test_qa_feedback_from_parquet_matches_json(tmp_path):
    import datasets

    subset = qa_subset(tmp_path, [0, 1, 5])
    parquet = tmp_path / "subset.parquet"
    datasets.Dataset.from_list(json.loads(subset.read_text())).to_parquet(str(parquet))
    assert invoke("--format", "qa-feedback", subset, "--out", tmp_path / "json").exit_code == 0
    result = invoke("--format", "qa-feedback", parquet, "--out", tmp_path / "parquet")
    assert result.exit_code == 0, result.output
    for name in [
        "prompts.jsonl",
        "span_feedback.jsonl",
        "preferences.jsonl",
        "critiques.jsonl",
        "demonstrations.jsonl",
    ]:
        from_json, from_parquet = (
            records(tmp_path / "json", name),
            records(tmp_path / "parquet", name),
        )
        assert [r.id.replace("subset.json", "subset.parquet") for r in from_json] == [
            r.id for r in from_parquet
        ]
        for a, b in zip(from_json, from_parquet):
            a.id = b.id
        assert from_json == from_parquet
    assert records(tmp_path / "parquet", "prompts.jsonl")[2].id == "qa-feedback:subset.parquet:2"


# ---------------------------------------------------------------------------------------
# The other formats


def test_pairwise_strings_dialogues_and_messages(tmp_path):
    out = tmp_path / "out"
    result = invoke("--format", "pairwise", FIXTURES / "pairwise.jsonl", "--out", out)
    assert result.exit_code == 0, result.output
    prefs = records(out, "preferences.jsonl")
    got = [(p.id, p.prompt, p.chosen, p.rejected, p.aspect, p.margin, p.tie) for p in prefs]
    assert got == [
        ("pairwise:pairwise.jsonl:1", "The sky is", " blue.", " green.", None, 2.0, False),
        (
            "pairwise:pairwise.jsonl:2",
            "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a colour.\n\nAssistant:",
            " Blue.",
            " I won't.",
            None,
            None,
            False,
        ),
        (
            "pairwise:pairwise.jsonl:3",
            "User: What is 2+2?\n\nAssistant:",
            " 4",
            " 5",
            "correctness",
            None,
            False,
        ),
        (
            "pairwise:pairwise.jsonl:4",
            "System: Be brief.\n\nUser: Capital of France?\n\nAssistant:",
            " Paris.",
            " Lyon.",
            None,
            None,
            True,
        ),
    ]
    rep = report(out)
    assert rep["skipped"] == [
        {
            "where": f"{FIXTURES / 'pairwise.jsonl'}:6",
            "reason": "chosen and rejected are identical: the preference carries no signal",
        }
    ]
    assert rep["preference"] == {"per_aspect": {"(none)": 3, "correctness": 1}, "ties": 1}
    assert sorted(p.name for p in out.iterdir()) == [
        "import_report.json",
        "preferences.jsonl",
        RUN_CONFIG,
    ]


def test_pairwise_field_names_are_mappable(tmp_path):
    out = tmp_path / "out"
    args = [
        "--field",
        "prompt=question,chosen=good",
        "--field",
        "rejected=bad",
        "--field",
        "margin=diff",
    ]
    result = invoke(
        "--format", "pairwise", FIXTURES / "pairwise_renamed.jsonl", "--out", out, *args
    )
    assert result.exit_code == 0, result.output
    (pref,) = records(out, "preferences.jsonl")
    assert (pref.prompt, pref.chosen, pref.rejected, pref.margin) == ("2+2?", "4", "5", 1.5)

    result = invoke(
        "--format",
        "pairwise",
        FIXTURES / "pairwise_renamed.jsonl",
        "--out",
        out,
        "--field",
        "answer=good",
    )
    assert result.exit_code == 2
    assert (
        "--field: unknown field 'answer' for pairwise; fields: prompt, chosen, rejected, margin, tie, aspect"
        in one_line(result.output)
    )


def test_critique_format(tmp_path):
    out = tmp_path / "out"
    assert invoke("--format", "critique", FIXTURES / "critique.jsonl", "--out", out).exit_code == 0
    first, second = records(out, "critiques.jsonl")
    assert first.id == "critique:critique.jsonl:1"
    assert first.critique == "The author is wrong: Hamlet is by Shakespeare."
    assert first.revision == "Hamlet was written by Shakespeare."
    assert (second.response, second.revision) == ("9", "9")

    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text(json.dumps({"q": "p", "a": "r", "feedback": "c", "fixed": "v"}) + "\n")
    out = tmp_path / "renamed"
    fields = "prompt=q,response=a,critique=feedback,revision=fixed"
    assert invoke("--format", "critique", renamed, "--out", out, "--field", fields).exit_code == 0
    (item,) = records(out, "critiques.jsonl")
    assert (item.prompt, item.response, item.critique, item.revision) == ("p", "r", "c", "v")


def test_doccano_tags_lowercased_and_every_seen_tag_judged(tmp_path):
    out = tmp_path / "out"
    assert invoke("--format", "doccano", FIXTURES / "doccano.jsonl", "--out", out).exit_code == 0
    first, second, third = records(out, "span_feedback.jsonl")
    assert first.prompt == "Tell me about Paris." and second.prompt == ""
    assert [(s.start, s.end, s.label, s.aspect) for s in first.spans] == [
        (22, 47, "Unverifiable", "unverifiable")
    ]
    assert first.response[22:47] == "It has 90 million people."
    assert [(s.start, s.end, s.aspect) for s in second.spans] == [
        (0, 4, "unverifiable"),
        (18, 35, "redundant"),
    ]
    assert second.response[18:35] == "Rome is in Italy."
    assert third.spans == [] and third.aspects == ["redundant", "unverifiable"]
    assert first.meta == {"source_id": 11} and third.id == "doccano:doccano.jsonl:3"


def test_doccano_label_map_file(tmp_path):
    out = tmp_path / "out"
    result = invoke(
        "--format",
        "doccano",
        FIXTURES / "doccano.jsonl",
        "--out",
        out,
        "--label-map",
        FIXTURES / "label_map.yaml",
    )
    assert result.exit_code == 0, result.output
    second = records(out, "span_feedback.jsonl")[1]
    assert [s.aspect for s in second.spans] == ["factuality", "relevance"]
    assert second.aspects == ["factuality", "relevance"]


def test_doccano_entities_form(tmp_path):
    path = tmp_path / "entities.jsonl"
    path.write_text(
        json.dumps(
            {
                "text": "abc def",
                "entities": [{"id": 1, "label": "X", "start_offset": 4, "end_offset": 7}],
            }
        )
        + "\n"
    )
    rep = run_import(
        build_config(ImportConfig, format="doccano", inputs=[str(path)], out=str(tmp_path / "out"))
    )
    assert rep["span_feedback"]["spans_per_label"] == {"X": 1}
    assert records(tmp_path / "out", "span_feedback.jsonl")[0].spans[0].start == 4


def test_label_studio_annotations_utf16_offsets_and_skips(tmp_path):
    out = tmp_path / "out"
    result = invoke("--format", "label-studio", FIXTURES / "label_studio.json", "--out", out)
    assert result.exit_code == 0, result.output
    items = by_id(records(out, "span_feedback.jsonl"))
    assert list(items) == [
        "label-studio:label_studio.json:0:ann0",
        "label-studio:label_studio.json:0:ann2",
        "label-studio:label_studio.json:1:ann0",
    ]
    moon = items["label-studio:label_studio.json:0:ann0"]
    # The export says [17, 36) in UTF-16 units; the emoji is one Python character.
    assert [(s.start, s.end, s.label, s.aspect) for s in moon.spans] == [
        (16, 35, "Unverifiable", "unverifiable")
    ]
    assert moon.response[16:35] == "The moon is cheese."
    assert moon.prompt == "Tell me about the moon."
    assert moon.meta == {"task_id": 101, "annotation_id": 1, "annotator": 7}
    assert items["label-studio:label_studio.json:0:ann2"].spans == []
    water = items["label-studio:label_studio.json:1:ann0"]
    assert [(s.start, s.end, s.label) for s in water.spans] == [
        (35, 48, "Irrelevant"),
        (35, 48, "Redundant"),
    ]
    assert water.aspects == ["irrelevant", "redundant", "unverifiable"]
    source = FIXTURES / "label_studio.json"
    assert report(out)["skipped"] == [
        {"where": f"{source}: record 0 annotations[1]", "reason": "annotation was cancelled"},
        {"where": f"{source}: record 2", "reason": "no annotations"},
    ]


def test_utf16_offsets():
    assert utf16_to_python_offset("a👍b", 1) == 1
    assert utf16_to_python_offset("a👍b", 3) == 2
    assert utf16_to_python_offset("a👍b", 4) == 3


# ---------------------------------------------------------------------------------------
# Bad input: exit 2, a message naming file and line (or record), and no output


DOCCANO_OK = json.dumps({"text": "Fine text.", "label": []})
QA_RECORD_0 = json.loads(QA_FEEDBACK.read_text())[0]
LABEL_MAP = str(FIXTURES / "label_map.yaml")


def qa_record(**changes):
    """Record 0 of the sample with fields replaced (None: removed)."""
    record = json.loads(json.dumps(QA_RECORD_0))
    for key, value in changes.items():
        if value is None:
            del record[key]
        else:
            record[key] = value
    return record


def qa_errors(*errors):
    return qa_record(feedback={**QA_RECORD_0["feedback"], "errors": list(errors)})


BAD_INPUTS = {
    "invalid-json-jsonl": (
        "doccano",
        "bad.jsonl",
        DOCCANO_OK + '\n{"text": "x", "label": [}\n',
        None,
        "bad.jsonl:2: invalid JSON: Expecting value",
    ),
    "missing-field": (
        "doccano",
        "bad.jsonl",
        '{"label": []}\n',
        None,
        "bad.jsonl:1: missing field 'text'",
    ),
    "span-outside": (
        "doccano",
        "bad.jsonl",
        DOCCANO_OK
        + "\n"
        + DOCCANO_OK
        + "\n"
        + json.dumps({"text": "short", "label": [[0, 50, "X"]]})
        + "\n",
        None,
        "bad.jsonl:3: label 0 [0, 50) lies outside the text (5 characters)",
    ),
    "reversed-span": (
        "doccano",
        "bad.jsonl",
        json.dumps({"text": "some text", "label": [[0, 4, "X"], [6, 2, "X"]]}) + "\n",
        None,
        "bad.jsonl:1: label 1 is empty or reversed: start 6 >= end 2",
    ),
    "unknown-label": (
        "doccano",
        "bad.jsonl",
        json.dumps({"text": "some text", "label": [[0, 4, "Bogus"]]}) + "\n",
        LABEL_MAP,
        "bad.jsonl:1: label[0]: unknown label 'Bogus'; known labels: Unverifiable, Redundant",
    ),
    "invalid-json-list": (
        "qa-feedback",
        "bad.json",
        '[\n  {"question": "q",\n  oops\n]',
        None,
        "bad.json:3: invalid JSON",
    ),
    "qa-missing-field": (
        "qa-feedback",
        "bad.json",
        json.dumps([qa_record(), qa_record(**{"prediction 3": None})]),
        None,
        "bad.json: record 1: missing field 'prediction 3'",
    ),
    "qa-span-outside": (
        "qa-feedback",
        "bad.json",
        json.dumps(
            [qa_errors({"error type": "Irrelevant", "explanation": "", "start": 500, "end": 900})]
        ),
        None,
        "bad.json: record 0: errors 0 [500, 900) lies outside the text (572 characters)",
    ),
    "qa-reversed-span": (
        "qa-feedback",
        "bad.json",
        json.dumps(
            [qa_errors({"error type": "Irrelevant", "explanation": "", "start": 50, "end": 10})]
        ),
        None,
        "bad.json: record 0: errors 0 is empty or reversed: start 50 >= end 10",
    ),
    "qa-unknown-label": (
        "qa-feedback",
        "bad.json",
        json.dumps(
            [qa_errors({"error type": "Irelevant", "explanation": "", "start": 0, "end": 10})]
        ),
        None,
        (
            "bad.json: record 0: errors[0]: unknown label 'Irelevant'; known labels: Irrelevant, Redundant, "
            "Incoherent, Wrong-Grounding, Unverifiable"
        ),
    ),
    "pairwise-missing-field": (
        "pairwise",
        "bad.jsonl",
        '{"prompt": "p", "chosen": "a"}\n',
        None,
        "bad.jsonl:1: missing field 'rejected'",
    ),
    "critique-wrong-type": (
        "critique",
        "bad.jsonl",
        json.dumps({"prompt": "p", "response": "r", "critique": 3, "revision": "v"}) + "\n",
        None,
        "bad.jsonl:1: field 'critique' must be str, got int",
    ),
    "label-studio-reversed": (
        "label-studio",
        "bad.json",
        json.dumps(
            [
                {
                    "data": {"text": "abcdef"},
                    "annotations": [
                        {
                            "result": [
                                {"type": "labels", "value": {"start": 4, "end": 1, "labels": ["X"]}}
                            ]
                        }
                    ],
                }
            ]
        ),
        None,
        "bad.json: record 0: annotations[0] span 0 is empty or reversed: start 4 >= end 1",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exit_2_names_the_place_and_writes_nothing(tmp_path, monkeypatch, case):
    format_name, file_name, content, label_map, message = BAD_INPUTS[case]
    monkeypatch.chdir(tmp_path)  # relative names keep the message short
    Path(file_name).write_text(content)
    extra = ["--label-map", label_map] if label_map else []
    result = invoke("--format", format_name, file_name, "--out", "out", *extra)
    assert result.exit_code == 2, result.output
    assert one_line(result.output).startswith(f"error: {message}")
    assert not Path("out").exists()
    cfg = build_config(
        ImportConfig, format=format_name, inputs=[file_name], out="out", label_map=label_map
    )
    with pytest.raises(RlhfkitError) as err:
        run_import(cfg)
    assert str(err.value).startswith(message)
    assert not Path("out").exists()


def test_failed_import_leaves_an_existing_output_unchanged(tmp_path):
    out = tmp_path / "out"
    assert invoke("--format", "doccano", FIXTURES / "doccano.jsonl", "--out", out).exit_code == 0
    before = snapshot(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(DOCCANO_OK + "\n" + json.dumps({"text": "abc", "label": [[2, 9, "X"]]}) + "\n")
    result = invoke("--format", "doccano", bad, "--out", out)
    assert result.exit_code == 2
    assert snapshot(out) == before


def test_skip_invalid_lists_every_bad_row(tmp_path):
    bad = tmp_path / "mixed.jsonl"
    bad.write_text(
        "\n".join(
            [
                DOCCANO_OK,
                '{"text": "x", "label": [}',
                '{"label": []}',
                json.dumps({"text": "abc", "label": [[3, 1, "X"]]}),
                json.dumps({"text": "abc", "label": [[0, 3, "X"]]}),
            ]
        )
        + "\n"
    )
    out = tmp_path / "out"
    result = invoke("--format", "doccano", bad, "--out", out, "--skip-invalid")
    assert result.exit_code == 0, result.output
    rep = report(out)
    assert rep["invalid"] == [
        {"where": f"{bad}:2", "reason": "invalid JSON: Expecting value (column 25)"},
        {"where": f"{bad}:3", "reason": "missing field 'text'"},
        {"where": f"{bad}:4", "reason": "label 0 is empty or reversed: start 3 >= end 1"},
    ]
    assert rep["counts"] == {"span_feedback": 2}
    assert [r.id for r in records(out, "span_feedback.jsonl")] == [
        "doccano:mixed.jsonl:1",
        "doccano:mixed.jsonl:5",
    ]


def test_nothing_valid_is_an_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"label": []}\n')
    result = invoke("--format", "doccano", bad, "--out", tmp_path / "out", "--skip-invalid")
    assert result.exit_code == 2
    assert "no records to import (1 invalid; first invalid:" in one_line(result.output)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--format", "csv"],
            "unknown --format 'csv'; valid formats: qa-feedback, pairwise, critique, doccano, label-studio",
        ),
        (
            ["--format", "pairwise", "--label-map", "A=b"],
            "--label-map does not apply to --format pairwise",
        ),
        (
            ["--format", "qa-feedback", "--field", "gold=answer"],
            "--field does not apply to --format qa-feedback",
        ),
        (
            ["--format", "doccano", "--label-map", "Xrelevance"],
            "--label-map: 'Xrelevance' is not LABEL=ASPECT",
        ),
        (
            ["--format", "doccano", "--out", "{out}", "missing.jsonl"],
            "missing.jsonl: no such file or directory",
        ),
    ],
)
def test_bad_options(tmp_path, args, message):
    args = [a.replace("{out}", str(tmp_path / "o")) for a in args]
    if "--out" not in args:
        args += [str(FIXTURES / "doccano.jsonl"), "--out", str(tmp_path / "o")]
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in one_line(result.output)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------
# Determinism, re-import, Hugging Face inputs


def test_reimport_is_byte_identical(tmp_path, qa_import):
    out = tmp_path / "again"
    assert invoke("--format", "qa-feedback", QA_FEEDBACK, "--out", out).exit_code == 0
    first, second = snapshot(qa_import), snapshot(out)
    assert first.keys() == second.keys()
    for name in first:
        if name != RUN_CONFIG:
            assert first[name] == second[name], name
    # Re-importing into the same directory (--overwrite: it holds a run) rewrites the same bytes too.
    assert invoke("--format", "qa-feedback", QA_FEEDBACK, "--out", out).exit_code == 2
    assert invoke("--format", "qa-feedback", QA_FEEDBACK, "--out", out, "--overwrite").exit_code == 0
    assert {k: v for k, v in snapshot(out).items() if k != RUN_CONFIG} == {
        k: v for k, v in second.items() if k != RUN_CONFIG
    }


def test_reimport_of_another_format_removes_stale_record_files(tmp_path):
    out = tmp_path / "out"
    assert invoke("--format", "doccano", FIXTURES / "doccano.jsonl", "--out", out).exit_code == 0
    assert invoke("--format", "critique", FIXTURES / "critique.jsonl", "--out", out, "--overwrite").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "critiques.jsonl",
        "import_report.json",
        RUN_CONFIG,
    ]


def test_several_inputs_keep_their_order_and_distinct_ids(tmp_path):
    other = tmp_path / "sub" / "doccano.jsonl"
    other.parent.mkdir()
    shutil.copy(FIXTURES / "doccano.jsonl", other)
    out = tmp_path / "out"
    assert (
        invoke("--format", "doccano", FIXTURES / "doccano.jsonl", other, "--out", out).exit_code
        == 0
    )
    ids = [r.id for r in records(out, "span_feedback.jsonl")]
    assert len(ids) == len(set(ids)) == 6
    assert ids[0] == f"doccano:{FIXTURES / 'doccano.jsonl'}:1" and ids[3] == f"doccano:{other}:1"
    assert [i["rows"] for i in report(out)["inputs"]] == [3, 3]


PAIRWISE_ROWS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "margin": 2.0},
    {"prompt": "Grass is", "chosen": " green.", "rejected": " red.", "margin": None},
]


def test_dataset_saved_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_list(PAIRWISE_ROWS).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "out"
    result = invoke("--format", "pairwise", tmp_path / "ds", "--out", out)
    assert result.exit_code == 0, result.output
    prefs = records(out, "preferences.jsonl")
    assert [(p.id, p.prompt, p.chosen, p.margin) for p in prefs] == [
        ("pairwise:ds:0", "The sky is", " blue.", 2.0),
        ("pairwise:ds:1", "Grass is", " green.", None),
    ]


def test_dataset_dict_split(tmp_path):
    import datasets

    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(PAIRWISE_ROWS[:1]),
            "test": datasets.Dataset.from_list(PAIRWISE_ROWS[1:]),
        }
    ).save_to_disk(str(tmp_path / "dd"))
    out = tmp_path / "out"
    assert (
        invoke("--format", "pairwise", tmp_path / "dd", "--out", out, "--split", "test").exit_code
        == 0
    )
    assert [p.id for p in records(out, "preferences.jsonl")] == ["pairwise:dd:test:0"]
    result = invoke(
        "--format", "pairwise", tmp_path / "dd", "--out", tmp_path / "o2", "--split", "validation"
    )
    assert result.exit_code == 2
    assert "no split 'validation'; splits: train, test (choose with --split)" in one_line(
        result.output
    )


def test_parquet_rows_name_their_row_in_errors(tmp_path):
    import datasets

    rows = [
        dict(PAIRWISE_ROWS[0]),
        {"prompt": "p", "chosen": "a", "rejected": None, "margin": None},
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "prefs.parquet"))
    out = tmp_path / "out"
    result = invoke("--format", "pairwise", tmp_path / "prefs.parquet", "--out", out)
    assert result.exit_code == 2
    assert (
        f"{tmp_path / 'prefs.parquet'}: row 1: field 'rejected' must be str or list, got NoneType"
        in one_line(result.output)
    )
    assert (
        invoke(
            "--format", "pairwise", tmp_path / "prefs.parquet", "--out", out, "--skip-invalid"
        ).exit_code
        == 0
    )
    assert [p.id for p in records(out, "preferences.jsonl")] == ["pairwise:prefs.parquet:0"]
