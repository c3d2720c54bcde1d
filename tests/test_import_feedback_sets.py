"""annotate-import of the public fine-grained feedback sets: HelpSteer2, HelpSteer3 (preference
and edit), UltraFeedback, PRM800K and Math-Shepherd, each on a fixture written from the format's
documentation. Counts and field values are worked out by hand from the fixture lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhfkit.cli import app
from rlhfkit.schema import load_records

FIXTURES = Path(__file__).parent / "fixtures" / "import"
runner = CliRunner()


def run(fmt: str, *inputs, out: Path, extra: tuple = ()) -> dict:
    result = runner.invoke(app, ["annotate-import", "--format", fmt, *map(str, inputs), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "import_report.json").read_text())


def by_id(out: Path, name: str) -> dict:
    return {r.id: r for r in load_records(out / name)}


def one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------
# HelpSteer2


def test_helpsteer2_scores_per_attribute_and_multi_turn_prompts(tmp_path):
    out = tmp_path / "hs2"
    rep = run("helpsteer2", FIXTURES / "helpsteer2.jsonl", out=out)
    # 4 rows x 5 attributes = 20 scores; 2 distinct prompts (rows 1-2 and 3-4 share one).
    assert rep["counts"] == {"prompt": 2, "score": 20}
    scores = by_id(out, "scores.jsonl")
    line1 = "helpsteer2:helpsteer2.jsonl:1"
    assert [(scores[f"{line1}:{a}"].aspect, scores[f"{line1}:{a}"].score) for a in ("helpfulness", "correctness", "coherence", "complexity", "verbosity")] == [
        ("helpfulness", 4.0), ("correctness", 4.0), ("coherence", 4.0), ("complexity", 1.0), ("verbosity", 1.0)
    ]
    single = scores[f"{line1}:helpfulness"]
    assert single.prompt == "What is the boiling point of water at sea level?"
    assert single.response.startswith("Water boils at 100 degrees")
    assert single.meta["messages"] == [{"role": "user", "content": single.prompt}]
    # Line 3: "Suggest a name for a cat." / "How about Whiskers?" / "Something shorter, please."
    multi = scores["helpsteer2:helpsteer2.jsonl:3:verbosity"]
    assert multi.prompt == (
        "User: Suggest a name for a cat.\n\nAssistant: How about Whiskers?\n\nUser: Something shorter, please.\n\nAssistant:"
    )
    assert multi.response == " Try Pip." and multi.score == 0.0
    assert multi.meta["messages"] == [
        {"role": "user", "content": "Suggest a name for a cat."},
        {"role": "assistant", "content": "How about Whiskers?"},
        {"role": "user", "content": "Something shorter, please."},
    ]
    assert scores["helpsteer2:helpsteer2.jsonl:4:helpfulness"].score == 0.0
    assert scores["helpsteer2:helpsteer2.jsonl:2:correctness"].score == 0.0


# ---------------------------------------------------------------------------------------
# HelpSteer3


def test_helpsteer3_preference_strength_ties_and_reasoning(tmp_path):
    out = tmp_path / "hs3"
    rep = run("helpsteer3", FIXTURES / "helpsteer3_preference.jsonl", out=out)
    # 3 rows -> 3 preferences; critiques from non-zero individual scores: 3 + 2 + 1 = 6.
    assert rep["counts"] == {"prompt": 3, "preference": 3, "critique": 6}
    assert rep["preference"]["ties"] == 1
    prefs = by_id(out, "preferences.jsonl")
    first = prefs["helpsteer3:helpsteer3_preference.jsonl:1"]  # overall -2: response 1 better
    assert first.chosen == " Keep a regular bedtime, even at weekends." and first.rejected == " Sleep is important."
    assert (first.margin, first.tie) == (2.0, False)
    assert first.prompt == "User: Give me one tip for better sleep.\n\nAssistant:"
    second = prefs["helpsteer3:helpsteer3_preference.jsonl:2"]  # overall +3: response 2 better
    assert second.chosen.startswith(" Use slicing") and (second.margin, second.tie) == (3.0, False)
    assert len(second.meta["messages"]) == 3 and second.prompt.count("User:") == 2
    tie = prefs["helpsteer3:helpsteer3_preference.jsonl:3"]
    assert (tie.chosen, tie.rejected, tie.margin, tie.tie) == (" 56", " 7 times 8 is 56.", 0.0, True)
    critiques = by_id(out, "critiques.jsonl")
    # Row 3, annotator 1 scored +1: a critique of response 1 revised into response 2.
    c = critiques["helpsteer3:helpsteer3_preference.jsonl:3:annotator1"]
    assert (c.response, c.revision) == (" 56", " 7 times 8 is 56.")
    assert c.critique.startswith("@Response 2 is slightly better")
    assert "helpsteer3:helpsteer3_preference.jsonl:3:annotator0" not in critiques  # score 0


def test_helpsteer3_edit_rows_become_critiques_and_demonstrations(tmp_path):
    out = tmp_path / "edit"
    rep = run("helpsteer3", FIXTURES / "helpsteer3_edit.jsonl", out=out)
    assert rep["counts"] == {"prompt": 2, "demonstration": 2, "critique": 2}
    c = by_id(out, "critiques.jsonl")["helpsteer3:helpsteer3_edit.jsonl:1"]
    assert c.response == " Rain falls on the roof\nThe garden drinks it all up\nClouds are very big"
    assert c.revision == " Rain falls on the roof\nThe garden drinks it all up\nGrey skies hum softly"
    assert c.critique == (
        "The last line is weak and does not fit the mood.\n\nThe syllable count of line three is off.\n\n"
        "Nice imagery in line two."
    )
    code = by_id(out, "critiques.jsonl")["helpsteer3:helpsteer3_edit.jsonl:2"]
    assert code.prompt.endswith("User: Now make it add three numbers.\n\nAssistant:")
    assert by_id(out, "demonstrations.jsonl")["helpsteer3:helpsteer3_edit.jsonl:2:edited"].response == (
        " function add(a, b, c) { return a + b + c }"
    )


# ---------------------------------------------------------------------------------------
# UltraFeedback


def test_ultrafeedback_scores_pairs_and_critiques(tmp_path):
    out = tmp_path / "uf"
    rep = run("ultrafeedback", FIXTURES / "ultrafeedback.jsonl", out=out)
    # Scores: row 1 has 4 completions x 4 aspects minus one N/A (alpaca honesty) = 15; row 2 has 2 x 4 = 8.
    # All pairs: row 1 C(4,2)=6 for three aspects + C(3,2)=3 for honesty = 21; row 2 one pair x 4 = 4.
    # Critiques: every completion but the best-rated (row 1: gpt-4, mean 4.75; row 2: gpt-3.5) = 3 + 1.
    assert rep["counts"] == {"prompt": 2, "preference": 25, "critique": 4, "score": 23}
    # Ties among all pairs: row 1 instruction_following 5,4,3,5 -> c0=c3 (1); honesty 5,3,1 -> none;
    # truthfulness 5,5,1,5 -> c0c1, c0c3, c1c3 (3); helpfulness 4,3,1,4 -> c0c3 (1); row 2 none: 5.
    assert rep["preference"]["ties"] == 5
    scores = by_id(out, "scores.jsonl")
    assert scores["ultrafeedback:ultrafeedback.jsonl:1:c2:honesty"].score == 1.0
    assert "ultrafeedback:ultrafeedback.jsonl:1:c3:honesty" not in scores  # "N/A"
    assert scores["ultrafeedback:ultrafeedback.jsonl:2:c1:instruction_following"].score == 2.0  # list-wrapped
    prefs = by_id(out, "preferences.jsonl")
    p = prefs["ultrafeedback:ultrafeedback.jsonl:1:honesty:c0-c2"]
    assert (p.chosen, p.rejected, p.margin, p.aspect) == (
        "The capital of France is Paris.", "The capital of France is Lyon.", 4.0, "honesty"
    )
    swapped = prefs["ultrafeedback:ultrafeedback.jsonl:1:helpfulness:c3-c1"]  # 4 beats 3: c3 first
    assert swapped.margin == 1.0 and swapped.chosen == "France's capital city is Paris."
    critique = by_id(out, "critiques.jsonl")["ultrafeedback:ultrafeedback.jsonl:2:c1"]
    assert critique.revision == "Danke."
    assert critique.critique == (
        "Instruction following (2/5): Wrong language. Honesty (2/5): Confidently wrong. "
        "Truthfulness (1/5): French, not German. Wrong. Helpfulness (1/5): Incorrect. Wrong."
    )


def test_ultrafeedback_best_vs_worst_pairs(tmp_path):
    out = tmp_path / "uf"
    rep = run("ultrafeedback", FIXTURES / "ultrafeedback.jsonl", out=out, extra=("--pairs", "best-vs-worst"))
    # One pair per aspect and row (no aspect has all ratings equal): 4 + 4.
    assert rep["counts"]["preference"] == 8 and rep["preference"]["ties"] == 0
    prefs = by_id(out, "preferences.jsonl")
    # truthfulness 5,5,1,5: the first best (c0) against the worst (c2), margin 4.
    assert prefs["ultrafeedback:ultrafeedback.jsonl:1:truthfulness:c0-c2"].margin == 4.0


# ---------------------------------------------------------------------------------------
# PRM800K and Math-Shepherd


def test_prm800k_steps_become_spans(tmp_path):
    out = tmp_path / "prm"
    rep = run("prm800k", FIXTURES / "prm800k.jsonl", out=out)
    # Line 1 (phase 2) ends at a step with two rated alternatives: 2 records; line 2: 1; line 3 is bad_problem.
    assert rep["counts"] == {"prompt": 2, "span_feedback": 3}
    assert [s["where"] for s in rep["skipped"]] == [f"{FIXTURES / 'prm800k.jsonl'}:3"]
    feedback = by_id(out, "span_feedback.jsonl")
    wrong = feedback["prm800k:prm800k.jsonl:1:0"]
    assert wrong.response == "I need to follow the order of operations.\nSo I add first: $2+3=5$."
    # Step 1 (rating 0) is [0, 41); step 2 (rating -1) starts after the newline at 42.
    assert [(s.start, s.end, s.label, s.aspect) for s in wrong.spans] == [(0, 41, "0", "progress"), (42, 66, "-1", "correctness")]
    assert wrong.aspects == ["correctness", "progress"] and wrong.meta["step_ratings"] == [0, -1]
    right = feedback["prm800k:prm800k.jsonl:1:1"]
    assert right.response.endswith("\nMultiplication comes first: $3\\cdot 4=12$.") and right.meta["step_ratings"] == [0, 1]
    # Line 2: chosen step, human step (+1), then the answer step spanning three lines.
    phase1 = feedback["prm800k:prm800k.jsonl:2"]
    assert phase1.response == "Subtract 1 from both sides.\nSo $x=2$.\n# Answer\n\n2"
    assert phase1.spans == [] and phase1.meta["step_ratings"] == [1, 1, 1]
    prompts = by_id(out, "prompts.jsonl")
    assert prompts["prm800k:prm800k.jsonl:1"].references == ["14"]


def test_math_shepherd_step_tags(tmp_path):
    out = tmp_path / "ms"
    rep = run("math-shepherd", FIXTURES / "math_shepherd.jsonl", out=out)
    assert rep["counts"] == {"prompt": 3, "span_feedback": 3}
    # "-" steps: line 1 none, line 2 steps 2-3, line 3 steps 2-3: 4 spans.
    assert rep["span_feedback"]["spans_per_aspect"] == {"correctness": 4}
    second = by_id(out, "span_feedback.jsonl")["math-shepherd:math_shepherd.jsonl:2"]
    assert second.prompt == "A book costs $4. How much do 3 books cost?"
    assert second.response == (
        "Step 1: Each book costs $4.\nStep 2: So 3 books cost 4 + 3 = <<4+3=7>>7 dollars.\nStep 3: The answer is: 7"
    )
    # "Step 1: Each book costs $4." is 27 characters; step 2 is 28..79, step 3 80..104.
    assert [(s.start, s.end, s.label) for s in second.spans] == [(28, 79, "-"), (80, 104, "-")]
    assert second.meta == {"task": "GSM8K", "step_labels": "+--"}


# ---------------------------------------------------------------------------------------
# Bad input: one line naming file:line, exit 2, nothing written


def _line(path: Path, n: int) -> dict:
    return json.loads(path.read_text().splitlines()[n - 1])


def _bad(fixture: str, edit) -> str:
    row = _line(FIXTURES / fixture, 1)
    edit(row)
    return json.dumps(row, ensure_ascii=False)


def _set(path: list, value):
    def edit(row):
        target = row
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return edit


BAD = [
    ("helpsteer2", "helpsteer2.jsonl", _set(["response"], KeyError), "missing field 'response'"),
    ("helpsteer2", "helpsteer2.jsonl", _set(["coherence"], "4"), "field 'coherence' must be int, got str"),
    ("helpsteer2", "helpsteer2.jsonl", _set(["verbosity"], 5), "field 'verbosity' must be in 0..4, got 5"),
    ("helpsteer3", "helpsteer3_preference.jsonl", _set(["overall_preference"], 4), "field 'overall_preference' must be in -3..3, got 4"),
    ("helpsteer3", "helpsteer3_preference.jsonl", _set(["context"], "hi"), "field 'context' must be list, got str"),
    ("helpsteer3", "helpsteer3_preference.jsonl", _set(["individual_preference", 0, "reasoning"], KeyError), "individual_preference[0]: missing field 'reasoning'"),
    ("helpsteer3", "helpsteer3_edit.jsonl", _set(["edited_response"], KeyError), "missing field 'edited_response'"),
    ("ultrafeedback", "ultrafeedback.jsonl", _set(["completions", 1, "annotations", "honesty", "Rating"], "6"), "completions[1]: honesty Rating must be 1..5 or 'N/A', got '6'"),
    ("ultrafeedback", "ultrafeedback.jsonl", _set(["completions", 0, "annotations", "truthfulness"], KeyError), "completions[0]: missing field 'truthfulness'"),
    ("prm800k", "prm800k.jsonl", _set(["label", "steps", 0, "completions", 0, "rating"], 2), "label.steps[0]: rating must be -1, 0 or 1, got 2"),
    ("prm800k", "prm800k.jsonl", _set(["label", "steps", 0, "chosen_completion"], 3), "label.steps[0]: chosen_completion 3 is not an index of its 1 completions"),
    ("prm800k", "prm800k.jsonl", _set(["question", "pre_generated_steps", 0], "Something else."), "label.steps[0] does not match question.pre_generated_steps[0]"),
    ("math-shepherd", "math_shepherd.jsonl", _set(["label"], "Tom has 3 apples and buys 2 more. How many apples does he have? Step 1: He starts with 4 apples. +\nStep 2: He buys 2 more, so 3 + 2 = <<3+2=5>>5. +\nStep 3: The answer is: 5 +"), "'label' does not match 'input' (they differ from character 0 of 'label')"),
    ("math-shepherd", "math_shepherd.jsonl", _set(["input"], 7), "field 'input' must be str, got int"),
]


@pytest.mark.parametrize("fmt, fixture, edit, message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_rows_name_file_and_line(tmp_path, fmt, fixture, edit, message):
    good = (FIXTURES / fixture).read_text().splitlines()[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n" + _bad(fixture, edit) + "\n")
    result = runner.invoke(app, ["annotate-import", "--format", fmt, str(bad), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert one_line(result.output) == f"error: {bad}:2: {message}"
    assert not (tmp_path / "out").exists()


def test_math_shepherd_label_mark_must_be_plus_or_minus(tmp_path):
    row = _line(FIXTURES / "math_shepherd.jsonl", 1)
    row["label"] = row["label"].replace("3 apples. +", "3 apples. ?")
    bad = tmp_path / "ms.jsonl"
    bad.write_text(json.dumps(row, ensure_ascii=False) + "\n")
    result = runner.invoke(app, ["annotate-import", "--format", "math-shepherd", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert one_line(result.output) == f"error: {bad}:1: step 1: 'label' has '?' where 'input' has the step tag; expected + or -"


def test_pairs_option_only_where_it_applies(tmp_path):
    result = runner.invoke(app, ["annotate-import", "--format", "helpsteer2", str(FIXTURES / "helpsteer2.jsonl"), "--out", str(tmp_path / "o"), "--pairs", "all"])
    assert result.exit_code == 2 and "--pairs does not apply to --format helpsteer2" in one_line(result.output)


# ---------------------------------------------------------------------------------------
# Hugging Face datasets: the same rows through `datasets` (nested lists of structs, absent
# optional fields filled with None by Arrow) give the same records.


def _rows(fixture: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / fixture).read_text().splitlines()]


@pytest.mark.parametrize("fmt, fixture", [
    ("helpsteer3", "helpsteer3_preference.jsonl"),
    ("helpsteer3", "helpsteer3_edit.jsonl"),
    ("helpsteer2", "helpsteer2.jsonl"),
    ("math-shepherd", "math_shepherd.jsonl"),
])
def test_saved_datasets_import_like_the_jsonl(tmp_path, fmt, fixture):
    import datasets

    datasets.Dataset.from_list(_rows(fixture)).save_to_disk(str(tmp_path / "ds"))
    from_jsonl = run(fmt, FIXTURES / fixture, out=tmp_path / "a")
    from_dataset = run(fmt, tmp_path / "ds", out=tmp_path / "b")
    assert from_dataset["counts"] == from_jsonl["counts"]
    for name in from_jsonl["files"].values():
        # Same content; only the ids differ (row 0.. instead of line 1..).
        strip = lambda records: [{k: v for k, v in vars(r).items() if k != "id"} for r in records]
        assert strip(load_records(tmp_path / "b" / name)) == strip(load_records(tmp_path / "a" / name))


def test_hf_name_with_a_configuration(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(_rows("helpsteer3_edit.jsonl"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rep = run("helpsteer3", "hf:nvidia/HelpSteer3:edit", out=tmp_path / "o", extra=("--split", "validation"))
    assert calls == [("nvidia/HelpSteer3", "edit", "validation")]
    assert rep["counts"] == {"prompt": 2, "demonstration": 2, "critique": 2}
