"""`rlhfkit critique-revise`: round bookkeeping and the degenerate-revision guard with scripted
generators; train then run on the shipped QA-Feedback critiques with tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit.config import build_config
from rlhfkit.errors import RlhfkitError
from rlhfkit.models import MODEL_SUBDIR, load_tokenizer
from rlhfkit.rewards.reward_model import load_reward_model
from rlhfkit.schema import Critique, Generation, load_records, write_records
from rlhfkit.stages.critique_revise import (
    DEFAULT_CRITIQUE_TEMPLATE,
    DEFAULT_REVISION_TEMPLATE,
    Completion,
    CritiqueReviseConfig,
    ModelGenerator,
    RevisionGuard,
    Templates,
    check_template,
    critique_and_revise,
    demonstrations_from_critiques,
    round_counts,
    round_win_rates,
    run_rounds,
)


class ScriptedGenerator:
    """Critique = "crit[<response>]"; revision = a scripted text per (input, round), else
    "<response>+". Records every call."""

    def __init__(self, revisions: dict[tuple[int, int], Completion] | None = None):
        self.revisions = revisions or {}
        self.calls: list[tuple[str, list[dict]]] = []
        self.round = 0

    def __call__(self, task: str, fields: list[dict]) -> list[Completion]:
        self.calls.append((task, fields))
        if task == "critique":
            self.round += 1
            return [Completion(f"crit[{f['response']}] ", True) for f in fields]
        return [self.revisions.get((i, self.round), Completion(f["response"] + "+", True)) for i, f in enumerate(fields)]


# --- rounds -------------------------------------------------------------------------------


def test_each_round_critiques_and_revises_the_previous_rounds_response():
    generator = ScriptedGenerator()
    history = critique_and_revise([("q1", "r1"), ("q2", "r2")], 3, generator, RevisionGuard())
    assert [(h.round, h.critique, h.revision, h.flag, h.response) for h in history[0]] == [
        (1, "crit[r1]", "r1+", None, "r1+"),
        (2, "crit[r1+]", "r1++", None, "r1++"),
        (3, "crit[r1++]", "r1+++", None, "r1+++"),
    ]
    assert history[1][-1].response == "r2+++"
    # critique, then revision given that same round's (stripped) critique; 2 calls a round
    assert [task for task, _ in generator.calls] == ["critique", "revision"] * 3
    assert generator.calls[2] == ("critique", [{"prompt": "q1", "response": "r1+"}, {"prompt": "q2", "response": "r2+"}])
    assert generator.calls[3][1][0] == {"prompt": "q1", "response": "r1+", "critique": "crit[r1+]"}
    assert round_counts(history) == [{"round": k, "accepted": 2, "flagged": {}} for k in (1, 2, 3)]


def test_degenerate_revisions_are_flagged_and_the_previous_response_kept():
    response = "The album came out in 2018."  # 27 characters
    scripted = {
        (0, 1): Completion("   ", True),  # empty
        (0, 2): Completion("A long revision that was cut off", False),  # truncated
        (1, 1): Completion("The  album came out\nin 2018. ", True),  # the input again, whitespace aside
        (1, 2): Completion("2018.", True),  # 5 < 0.5 * 27 characters
    }
    history = critique_and_revise([("q", response), ("q", response)], 3, ScriptedGenerator(scripted), RevisionGuard())
    assert [h.flag for h in history[0]] == ["empty", "truncated", None]
    assert [h.flag for h in history[1]] == ["repeats_input", "too_short", None]
    # flagged rounds keep the response they revised; the flagged text is still recorded
    assert [h.response for h in history[0]] == [response, response, response + "+"]
    assert history[0][1].revision == "A long revision that was cut off" and history[0][1].revision_finished is False
    assert [h.response for h in history[1]] == [response, response, response + "+"]
    # round 2 critiques the kept response, not the flagged revision
    assert history[1][1].critique == f"crit[{response}]"
    assert round_counts(history) == [
        {"round": 1, "accepted": 0, "flagged": {"empty": 1, "repeats_input": 1}},
        {"round": 2, "accepted": 0, "flagged": {"truncated": 1, "too_short": 1}},
        {"round": 3, "accepted": 2, "flagged": {}},
    ]


def test_inputs_that_do_not_fit_flag_the_revision_and_keep_the_response():
    class TooLong(ScriptedGenerator):
        """Item 0's critique input does not fit in round 1; item 1's revision input in round 2."""

        def __call__(self, task, fields):
            out = super().__call__(task, fields)
            if (task, self.round) == ("critique", 1):
                out[0] = Completion("", False, input_fits=False)
            if (task, self.round) == ("revision", 2):
                out[1] = Completion("", False, input_fits=False)
            return out

    generator = TooLong()
    history = critique_and_revise([("q", "r0"), ("q", "r1")], 2, generator, RevisionGuard())
    # Round 1 revises only item 1: item 0 has no critique to revise from.
    assert generator.calls[1] == ("revision", [{"prompt": "q", "response": "r1", "critique": "crit[r1]"}])
    assert [(h.flag, h.response) for h in history[0]] == [("input_too_long", "r0"), (None, "r0+")]
    assert [(h.flag, h.response) for h in history[1]] == [(None, "r1+"), ("input_too_long", "r1+")]
    assert round_counts(history) == [
        {"round": 1, "accepted": 1, "flagged": {"input_too_long": 1}},
        {"round": 2, "accepted": 1, "flagged": {"input_too_long": 1}},
    ]


def test_guard_thresholds_are_configurable():
    previous = "x" * 20
    default = RevisionGuard()
    # 0.5 * 20 = 10 characters: 10 passes, 9 is too short
    assert default.flag(previous, Completion("y" * 10, True)) is None
    assert default.flag(previous, Completion("y" * 9, True)) == "too_short"
    assert RevisionGuard(min_length_ratio=0).flag(previous, Completion("y", True)) is None
    assert default.flag(previous, Completion("y" * 30, False)) == "truncated"
    assert RevisionGuard(accept_truncated=True).flag(previous, Completion("y" * 30, False)) is None
    # empty stays empty whatever the thresholds
    assert RevisionGuard(min_length_ratio=0, accept_truncated=True).flag(previous, Completion("\n", False)) == "empty"


def test_win_rates_per_round_against_the_originals():
    # judge score = response length. Originals: "aaaa" (4), "bb" (2), "cccccc" (6).
    items = [("q1", "aaaa"), ("q2", "bb"), ("q3", "cccccc")]
    scripted = {
        (0, 1): Completion("a", True),  # round 1: too short -> stays "aaaa" (4 = 4: tie)
        (1, 1): Completion("bbbbbbb", True),  # round 1: 7 > 2: win
        (2, 1): Completion("ccc", True),  # round 1: 3 < 6: loss
    }
    history = critique_and_revise(items, 2, ScriptedGenerator(scripted), RevisionGuard())
    # round 2 appends "+": "aaaa+" (5 > 4 win), "bbbbbbb+" (8 > 2 win), "ccc+" (4 < 6 loss)
    scored: list[tuple[str, str]] = []

    def score(prompts, responses):
        scored.extend(zip(prompts, responses))
        return [float(len(r)) for r in responses]

    rows = round_win_rates(score, items, history, tie_margin=0.0)
    assert [(r["round"], r["win"], r["tie"], r["loss"]) for r in rows] == [
        (1, pytest.approx(1 / 3), pytest.approx(1 / 3), pytest.approx(1 / 3)),
        (2, pytest.approx(2 / 3), 0.0, pytest.approx(1 / 3)),
    ]
    assert rows[0]["mean_score"] == pytest.approx((4 + 7 + 3) / 3)
    # the paper's win rate, win + tie / 2: 1/3 + 1/6 = 1/2 and 2/3 + 0
    assert [r["win_rate"] for r in rows] == [pytest.approx(1 / 2), pytest.approx(2 / 3)]
    assert [r["paper_win_rate"] for r in rows] == [0.566, None]
    # every distinct (prompt, response) scored once: 3 originals, 2 new in round 1, 3 in round 2
    assert len(scored) == len(set(scored)) == 8
    # a margin of 1 turns the 5-vs-4 win of round 2 into a tie
    rows = round_win_rates(score, items, history, tie_margin=1.0)
    assert (rows[1]["win"], rows[1]["tie"]) == (pytest.approx(1 / 3), pytest.approx(1 / 3))


def test_run_with_a_scripted_generator_writes_every_round(tmp_path):
    inputs = tmp_path / "in.jsonl"
    write_records(inputs, [Generation(id="g1", prompt="q1", response="first answer", meta={"k": 1}),
                           Generation(id="g2", prompt="q2", response="second answer")])
    cfg = build_config(CritiqueReviseConfig, action="run", model=str(tmp_path / "no-model"), input=str(inputs),
                       out=str(tmp_path / "out"), rounds=2, device="cpu")
    summary = run_rounds(cfg, generator=ScriptedGenerator({(1, 2): Completion("", True)}))
    assert summary["rounds"] == [
        {"round": 1, "accepted": 2, "flagged": {}},
        {"round": 2, "accepted": 1, "flagged": {"empty": 1}},
    ]
    records = load_records(tmp_path / "out" / "revisions.jsonl", "generation")
    assert [(r.id, r.prompt, r.response) for r in records] == [("g1", "q1", "first answer++"), ("g2", "q2", "second answer+")]
    rounds = records[1].meta["rounds"]
    assert records[1].meta["original_response"] == "second answer" and records[0].meta["input_meta"] == {"k": 1}
    assert rounds[1] == {"round": 2, "critique": "crit[second answer+]", "critique_finished": True, "revision": "",
                         "revision_finished": True, "flag": "empty", "response": "second answer+"}
    assert "| 2 | 1 | empty 1 |" in (tmp_path / "out" / "results.md").read_text()


# --- templates and training data ----------------------------------------------------------


def test_training_demonstrations_for_both_tasks():
    records = [
        Critique(id="c1", prompt="Q?", response="A.", critique=" Too short. ", revision=" A, longer. "),
        Critique(id="c2", prompt="Q2?", response="B.", critique="Wrong.", revision="  "),
    ]
    demos, counts = demonstrations_from_critiques(records, Templates())
    assert counts == {"critique": 2, "revision": 1}
    assert [(d.id, d.response) for d in demos] == [("c1:critique", "Too short."), ("c1:revision", "A, longer."), ("c2:critique", "Wrong.")]
    assert demos[0].prompt == DEFAULT_CRITIQUE_TEMPLATE.format(prompt="Q?", response="A.")
    assert demos[1].prompt == DEFAULT_REVISION_TEMPLATE.format(prompt="Q?", response="A.", critique="Too short.")
    assert demos[1].prompt.endswith("Critique: Too short.\n\nRewrite the response so that it addresses the critique.\nRevised response:")
    custom = Templates(critique="C|{response}|{prompt}", revision="R|{critique}|{response}")
    demos, _ = demonstrations_from_critiques(records[:1], custom)
    assert [d.prompt for d in demos] == ["C|A.|Q?", "R|Too short.|A."]


def test_templates_are_checked():
    check_template("revision", "{prompt} {response} {critique} {{literal}}")
    with pytest.raises(RlhfkitError, match=r"unknown field\(s\) \{critique\}; valid: \{prompt\}, \{response\}"):
        check_template("critique", "{prompt} {response} {critique}")
    with pytest.raises(RlhfkitError, match=r"must include \{response\}"):
        check_template("critique", "{prompt}")
    with pytest.raises(RlhfkitError, match="not a valid format string"):
        check_template("critique", "{response")


def test_long_inputs_lose_the_left_of_their_prompt(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = None  # the plain format: this test is about cutting the prompt
    generator = ModelGenerator(None, tokenizer, False, Templates(), None, max_prompt_length=60, batch_size=1, seed=0)
    prompt = "question: " + " ".join(f"word{i}" for i in range(80)) + " END"
    fields = {"prompt": prompt, "response": "The answer is here."}
    assert generator.n_tokens(Templates().format("critique", fields)) > 60
    text = generator.fit("critique", fields)
    assert generator.n_tokens(text) <= 60
    assert text.endswith("END\n\nResponse: The answer is here.\n\nWhat is wrong or missing in this response?\nCritique:")
    assert "question:" not in text and generator.prompts_cut == 1
    short = {"prompt": "q?", "response": "a"}
    assert generator.fit("critique", short) == Templates().format("critique", short)
    # A response that alone overflows the budget cannot be fitted: None, counted, no error
    # (one such input must not end a run of many rounds; its revision is flagged).
    assert generator.fit("critique", {"prompt": "q", "response": "long " * 80}) is None
    assert generator.inputs_too_long == 1


def test_inputs_are_one_user_turn_of_the_chat_template(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)  # init-model's tokenizer has the simple template
    generator = ModelGenerator(None, tokenizer, False, Templates(), None, max_prompt_length=200, batch_size=1, seed=0)
    prompt = "question: " + " ".join(f"word{i}" for i in range(200)) + " END"
    fields = {"prompt": prompt, "response": "The answer is here."}
    text = generator.fit("critique", fields)
    assert generator.n_tokens(text) <= 200  # the template's own tokens count against the limit
    assert text.startswith("<|user|>\n") and "question:" not in text
    assert text.endswith("END\n\nResponse: The answer is here.\n\nWhat is wrong or missing in this response?\nCritique:<|end|>\n<|assistant|>\n")


# --- options ------------------------------------------------------------------------------


def test_option_errors(tmp_path, run_cli):
    inputs = tmp_path / "in.jsonl"
    write_records(inputs, [Generation(id="g", prompt="q", response="r")])
    base = ["critique-revise", "run", "--model", "m", "--input", inputs, "--out", tmp_path / "o"]
    result = run_cli(*base, "--rounds", 0)
    assert result.exit_code == 2 and "--rounds must be >= 1, got 0" in result.output
    segment_rm = tmp_path / "rm"
    segment_rm.mkdir()
    (segment_rm / "rlhfkit_rm.json").write_text(json.dumps({"aspect": "factuality", "kind": "segment", "max_length": 64, "granularity": "sentence",
                                                              "positive_reward": 1.0, "negative_reward": -1.0}))
    result = run_cli(*base, "--judge", segment_rm)
    assert result.exit_code == 2 and "is a segment reward model; a judge must be a preference or regression model" in result.output
    result = run_cli(*base, "--data", inputs)
    assert result.exit_code == 2 and "--data is an option of `critique-revise train`, not `run`" in result.output
    result = run_cli("critique-revise", "train", "--model", "m", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "`critique-revise train` needs --data" in result.output
    result = run_cli("critique-revise", "fix", "--model", "m", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "unknown action 'fix'; valid: train, run" in result.output
    result = run_cli(*base, "--critique-template", "{question}: {response}")
    assert result.exit_code == 2 and "unknown field(s) {question}" in result.output
    assert not (tmp_path / "o").exists()


# --- end to end on tiny models ------------------------------------------------------------


@pytest.fixture(scope="module")
def qa_import(tmp_path_factory, repo_root) -> Path:
    from rlhfkit.stages.annotate_import import ImportConfig, run_import

    out = tmp_path_factory.mktemp("qa-import")
    run_import(build_config(ImportConfig, format="qa-feedback", inputs=[str(repo_root / "data/qa_feedback/feedback.json")], out=str(out)))
    return out


@pytest.fixture(scope="module")
def preference_rm(tmp_path_factory, qa_import, make_tiny_model) -> Path:
    """A preference RM after one optimizer step on 8 pairs: a judge whose scores are junk but real."""
    from rlhfkit.stages.train_rm import TrainRMConfig, run_train_rm

    root = tmp_path_factory.mktemp("rm")
    data = root / "preferences.jsonl"
    data.write_text("".join((qa_import / "preferences.jsonl").read_text().splitlines(keepends=True)[:8]))
    run_train_rm(build_config(TrainRMConfig, aspect="preference", data=str(data), model=str(make_tiny_model("gpt2")),
                              out=str(root / "rm"), max_steps=1, eval_fraction=0, device="cpu"))
    return root / "rm"


@pytest.fixture(scope="module")
def short_critiques(tmp_path_factory, qa_import) -> Path:
    """The six shipped critique records with the shortest prompts (two have no revision)."""
    records = sorted(load_records(qa_import / "critiques.jsonl", "critique"), key=lambda r: len(r.prompt))[:6]
    path = tmp_path_factory.mktemp("critiques") / "critiques.jsonl"
    write_records(path, records)
    return path


def test_train_then_run_three_rounds_with_a_judge(tmp_path, run_cli, tiny_model_dir, short_critiques, preference_rm):
    records = load_records(short_critiques, "critique")
    without_revision = sum(1 for r in records if not r.revision.strip())
    assert without_revision == 2
    model_dir = tmp_path / "cr-model"
    result = run_cli("critique-revise", "train", "--data", short_critiques, "--model", tiny_model_dir, "--out", model_dir,
                     "--max-steps", 2, "--batch-size", 2, "--max-length", 256, "--save-every", 0, "--eval-fraction", 0,
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "6 critique and 4 revision demonstrations (2 without a revision)" in result.output
    saved = json.loads((model_dir / MODEL_SUBDIR / "critique_revise.json").read_text())
    assert (saved["critique_template"], saved["revision_template"]) == (DEFAULT_CRITIQUE_TEMPLATE, DEFAULT_REVISION_TEMPLATE)
    assert saved["demonstrations"] == {"critique": 6, "revision": 4}
    assert len(load_records(model_dir / "critique_revise_data.jsonl", "demonstration")) == 10
    assert json.loads((model_dir / "sft_metrics.json").read_text())["steps"] == 2
    assert (model_dir / MODEL_SUBDIR / "config.json").is_file()

    # the responses to improve: the critiqued responses themselves (any prompt+response record)
    out = tmp_path / "run"
    result = run_cli("critique-revise", "run", "--model", model_dir, "--input", short_critiques, "--max-inputs", 3,
                     "--rounds", 3, "--judge", preference_rm, "--out", out, "--max-new-tokens", 8,
                     "--max-prompt-length", 256, "--accept-truncated", "--min-length-ratio", 0, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "self-critique" not in result.output
    revised = load_records(out / "revisions.jsonl", "generation")
    assert [r.id for r in revised] == [r.id for r in records[:3]]
    for record, original in zip(revised, records[:3]):
        rounds = record.meta["rounds"]
        assert [h["round"] for h in rounds] == [1, 2, 3]
        previous = original.response
        for h in rounds:
            assert h["response"] == (h["revision"] if h["flag"] is None else previous)
            previous = h["response"]
        assert record.response == previous and record.meta["original_response"] == original.response

    # win rates recomputed from the judge's own scores of the originals and each round
    judge = load_reward_model(preference_rm, device="cpu")
    prompts = [r.prompt for r in revised]
    original_scores = [s.values[0] for s in judge.score(prompts, [r.meta["original_response"] for r in revised])]
    winrates = json.loads((out / "winrates.json").read_text())
    assert winrates["inputs"] == 3 and len(winrates["rounds"]) == 3
    for k, row in enumerate(winrates["rounds"]):
        responses = [r.meta["rounds"][k]["response"] for r in revised]
        scores = [s.values[0] for s in judge.score(prompts, responses)]
        wins = sum(1 for s, o, resp, r in zip(scores, original_scores, responses, revised)
                   if resp != r.meta["original_response"] and s > o)
        losses = sum(1 for s, o, resp, r in zip(scores, original_scores, responses, revised)
                     if resp != r.meta["original_response"] and s < o)
        assert row["round"] == k + 1 and row["win"] == pytest.approx(wins / 3) and row["loss"] == pytest.approx(losses / 3)
        assert row["win_rate"] == pytest.approx((wins + (3 - wins - losses) / 2) / 3)
    assert (out / "winrates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "| round | accepted | flagged | win | tie | loss | win rate | paper win rate |" in table
    assert table.count("56.6%") == 1 and "| 3 |" in table


def test_self_critique_uses_the_default_templates_and_flags_cut_off_revisions(tmp_path, run_cli, tiny_model_dir, short_critiques):
    out = tmp_path / "run"
    result = run_cli("critique-revise", "run", "--model", tiny_model_dir, "--input", short_critiques, "--max-inputs", 2,
                     "--rounds", 1, "--out", out, "--max-new-tokens", 4, "--max-prompt-length", 256, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "self-critique with the default templates" in result.output
    cut_off = 0
    for record in load_records(out / "revisions.jsonl", "generation"):
        (h,) = record.meta["rounds"]
        # a random model rarely ends within 4 tokens: such revisions are flagged and not used
        if not h["revision_finished"] and h["revision"]:
            cut_off += 1
            assert h["flag"] == "truncated" and record.response == record.meta["original_response"]
    assert cut_off >= 1
    assert not (out / "winrates.json").exists()
