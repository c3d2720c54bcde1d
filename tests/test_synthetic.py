"""The synthetic task: knowledge base checks, the annotator against hand-judged responses,
the feedback it writes (spans on the right sentences, preferences), the task files, the
annotator as a reward, and the report's numbers."""

from __future__ import annotations

import json
import random

import pytest

from rlhfkit.errors import RlhfkitError
from rlhfkit.schema import Generation, load_records, write_records
from rlhfkit.segment import label_segments, segment
from rlhfkit.tasks.synthetic import (
    DEFAULT_KB,
    Noise,
    TrueMetrics,
    annotate,
    audit_judge,
    audit_summary,
    critique,
    fine_grained_reward,
    goal_verdicts,
    holistic_reward,
    judge,
    judge_revisions,
    load_knowledge_base,
    make_task,
    noisy_response,
    report,
    revision,
)

# Two entities, two attributes: small enough to judge every sentence by hand.
SMALL_KB = {
    "questions": ["Tell me about {entity}.", "Who is {entity}?"],
    "prompt_format": "Q: {question} A:",
    "attributes": {
        "city": {"template": "{entity} lives in {value}.", "values": ["Oslo", "Rome", "Lima"]},
        "pet": {"template": "{entity} has a {value}.", "values": ["cat", "dog"]},
    },
    "entities": {"Ann": {"city": "Oslo", "pet": "cat"}, "Bob": {"city": "Rome", "pet": "dog"}},
}
# sentence:          1 correct            2 false         3 about Bob          4 repeats 1         5 no fact
RESPONSE = "Ann lives in Oslo. Ann has a dog. Bob lives in Rome. Ann lives in Oslo. Hello."


@pytest.fixture
def small_kb(tmp_path):
    path = tmp_path / "kb.json"
    path.write_text(json.dumps(SMALL_KB))
    return str(path)


def test_annotator_judges_each_sentence(small_kb):
    kb = load_knowledge_base(small_kb)
    prompt = kb.prompt("Ann")
    assert prompt == "Q: Tell me about Ann. A:"
    j = judge(kb, prompt, RESPONSE)
    assert j.entity == "Ann"
    assert [(s.start, s.end) for s in j.sentences] == [(0, 18), (19, 33), (34, 52), (53, 71), (72, 78)]
    assert [s.factual_error for s in j.sentences] == [None, "Wrong-Grounding", None, None, None]
    assert [s.relevance_error for s in j.sentences] == [None, None, "Irrelevant", "Redundant", "Incoherent"]
    assert [s.covers for s in j.sentences] == ["city", None, None, None, None]
    # Ann's city is stated once correctly, her pet wrongly: 1 of 2 attributes covered.
    assert j.completeness == 0.5
    # completeness - (1 factual + 3 relevance errors) / 2 attributes = 0.5 - 2.0
    assert j.holistic == -1.5


def test_annotator_critiques_and_revises_a_written_response(small_kb):
    kb = load_knowledge_base(small_kb)
    j = judge(kb, kb.prompt("Ann"), RESPONSE)
    # Sentence 2 gives Ann's pet wrongly, 3 is about Bob, 4 repeats 1, 5 states no fact; her
    # pet is not stated correctly anywhere, so it is missing.
    assert critique(kb, j) == ("Sentence 2 is false. Sentence 3 is about someone else. Sentence 4 is repeated. "
                               "Sentence 5 is not a fact. Missing: pet.")
    # Kept in order: 1 (city, true), 2 (pet, corrected to cat); 3, 4 and 5 dropped.
    assert revision(kb, j) == "Ann lives in Oslo. Ann has a cat."
    assert judge(kb, kb.prompt("Ann"), revision(kb, j)).holistic == 1.0
    # A wrong fact about another entity is false and off topic; nothing stated: all missing,
    # and the revision states every fact in the knowledge base's order.
    bob = judge(kb, kb.prompt("Ann"), "Bob has a cat.")
    assert critique(kb, bob) == "Sentence 1 is false and about someone else. Missing: city, pet."
    assert revision(kb, bob) == "Ann lives in Oslo. Ann has a cat."
    perfect = judge(kb, kb.prompt("Ann"), "Ann has a cat. Ann lives in Oslo.")
    assert critique(kb, perfect) == "Nothing is wrong or missing."
    assert revision(kb, perfect) == "Ann has a cat. Ann lives in Oslo."
    # The audit judge: the same spans, and the holistic score / completeness per sequence aspect.
    [verdict] = audit_judge([kb.prompt("Ann")], [RESPONSE], kb=small_kb)
    assert verdict["spans"] == j.spans() and verdict["scores"] == {"preference": -1.5, "completeness": 0.5}


def test_unknown_entity_is_a_factual_and_a_relevance_error(small_kb):
    kb = load_knowledge_base(small_kb)
    j = judge(kb, kb.prompt("Bob", 1), "Zed lives in Lima. Bob has a dog. Bob lives in Rome.")
    assert [(s.factual_error, s.relevance_error) for s in j.sentences] == [("Unverifiable", "Irrelevant"), (None, None), (None, None)]
    assert j.completeness == 1.0 and j.holistic == 0.0  # 1 - 2 errors / 2 attributes


def test_empty_response_scores_zero(small_kb):
    kb = load_knowledge_base(small_kb)
    j = judge(kb, kb.prompt("Ann"), "  ")
    assert j.sentences == [] and j.completeness == 0.0 and j.holistic == 0.0


def test_span_feedback_lands_on_the_right_sentences(small_kb):
    kb = load_knowledge_base(small_kb)
    feedback, _ = annotate(kb, kb.prompt("Ann"), [RESPONSE, "Ann lives in Oslo. Ann has a cat."], "k")
    first = feedback[0]
    assert first.aspects == ["relevance", "factuality"]
    assert [(s.start, s.end, s.label, s.aspect) for s in first.spans] == [
        (19, 33, "Wrong-Grounding", "factuality"),
        (34, 52, "Irrelevant", "relevance"),
        (53, 71, "Redundant", "relevance"),
        (72, 78, "Incoherent", "relevance"),
    ]
    assert RESPONSE[19:33] == "Ann has a dog."
    # What train-rm makes of them: the reward models' segment labels.
    sentences = segment(RESPONSE, "sentence")
    assert label_segments(sentences, first.spans, "factuality") == [False, True, False, False, False]
    assert label_segments(segment(RESPONSE, "subsentence"), first.spans, "relevance") == [False, False, True, True, True]
    assert feedback[1].spans == [] and feedback[1].meta == {"completeness": 1.0, "holistic": 1.0}


def test_preferences_follow_the_holistic_score_and_completeness(small_kb):
    kb = load_knowledge_base(small_kb)
    perfect = "Ann lives in Oslo. Ann has a cat."  # completeness 1, holistic 1
    half = "Ann lives in Oslo."  # completeness 0.5, holistic 0.5
    padded = "Ann lives in Oslo. Ann has a cat. Bob has a dog."  # completeness 1, holistic 0.5
    _, preferences = annotate(kb, kb.prompt("Ann"), [perfect, half, padded], "k")
    by_id = {p.id: p for p in preferences}
    assert len(preferences) == 6  # 3 pairs x (holistic, completeness)
    assert (by_id["k:r0-r1:preference"].chosen, by_id["k:r0-r1:preference"].tie) == (perfect, False)
    assert (by_id["k:r0-r2:preference"].chosen, by_id["k:r0-r2:preference"].tie) == (perfect, False)
    assert by_id["k:r1-r2:preference"].tie  # 0.5 vs 0.5
    assert by_id["k:r0-r2:completeness"].tie  # 1 vs 1
    assert by_id["k:r1-r2:completeness"].chosen == padded and not by_id["k:r1-r2:completeness"].tie
    assert {p.aspect for p in preferences} == {"preference", "completeness"}


def test_noisy_responses_follow_the_noise_settings(small_kb):
    kb = load_knowledge_base(small_kb)
    rng = random.Random(0)
    clean = [noisy_response(kb, "Ann", Noise(false=0, off_topic=0, repeat=0, min_sentences=2, max_sentences=2), rng) for _ in range(5)]
    assert all(judge(kb, kb.prompt("Ann"), r).holistic == 1.0 for r in clean)
    false = [noisy_response(kb, "Ann", Noise(false=1, off_topic=0, repeat=0, min_sentences=1, max_sentences=2), rng) for _ in range(5)]
    assert all(all(s.factual_error == "Wrong-Grounding" for s in judge(kb, kb.prompt("Ann"), r).sentences) for r in false)
    off = noisy_response(kb, "Ann", Noise(false=0, off_topic=1, repeat=0, min_sentences=2, max_sentences=2), rng)
    assert off.count("Bob") == 2 and "Ann" not in off


def test_make_task_writes_consistent_deterministic_files(tmp_path, small_kb):
    summary = make_task(str(tmp_path / "a"), kb=small_kb, demonstrations_per_prompt=3, feedback_per_prompt=4,
                        responses_per_comparison=2, seed=1)
    make_task(str(tmp_path / "b"), kb=small_kb, demonstrations_per_prompt=3, feedback_per_prompt=4,
              responses_per_comparison=2, seed=1)
    # 2 entities x 2 questions = 4 prompts; 3 demonstrations and 4 judged responses each.
    assert (summary["prompts"], summary["demonstrations"], summary["span_feedback"]) == (4, 12, 16)
    for name in ("prompts.jsonl", "demonstrations.jsonl", "span_feedback.jsonl", "preferences.jsonl", "critiques.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    kb = load_knowledge_base(small_kb)
    for record in load_records(tmp_path / "a" / "span_feedback.jsonl"):
        expected = judge(kb, record.prompt, record.response).spans()
        assert record.spans == expected
    critiques = load_records(tmp_path / "a" / "critiques.jsonl", "critique")
    assert [c.response for c in critiques] == [r.response for r in load_records(tmp_path / "a" / "span_feedback.jsonl")]
    assert all(judge(kb, c.prompt, c.revision).holistic == 1.0 for c in critiques)
    prompts = load_records(tmp_path / "a" / "prompts.jsonl")
    assert [p.meta["entity"] for p in prompts] == ["Ann", "Ann", "Bob", "Bob"]


def test_rewards_are_the_annotator(small_kb, monkeypatch):
    kb = load_knowledge_base(small_kb)
    prompts = [kb.prompt("Ann")] * 2
    responses = [RESPONSE, "Ann lives in Oslo. Ann has a cat."]
    dense = fine_grained_reward(prompts, responses, kb=small_kb)
    # +1/2 for the new fact, -1/2 per error: sentence 3 is only irrelevant (true about Bob).
    assert dense[0] == [(18, 0.5), (33, -0.5), (52, -0.5), (71, -0.5), (78, -0.5)]
    assert dense[1] == [(18, 0.5), (33, 0.5)]
    assert holistic_reward(prompts, responses, kb=small_kb) == [sum(v for _, v in d) for d in dense] == [-1.5, 1.0]


def test_knowledge_base_errors_name_the_file(tmp_path):
    bad = dict(SMALL_KB, entities={"Ann": {"city": "Paris", "pet": "cat"}})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(RlhfkitError, match=r"bad\.json: Ann\.city = 'Paris' is not one of"):
        load_knowledge_base(str(path))
    missing = dict(SMALL_KB, entities={"Ann": {"city": "Oslo"}})
    path.write_text(json.dumps(missing))
    load_knowledge_base.cache_clear()
    with pytest.raises(RlhfkitError, match="exactly the attributes city, pet"):
        load_knowledge_base(str(path))


def test_shipped_knowledge_base_loads():
    kb = load_knowledge_base(DEFAULT_KB)
    assert len(kb.entities) == 20 and len(kb.attributes) == 6
    name = next(iter(kb.entities))
    truth = " ".join(kb.sentence(name, a, v) for a, v in kb.entities[name].items())
    assert judge(kb, kb.prompt(name, 2), truth).holistic == 1.0


def test_report_tables_the_truth(tmp_path, small_kb):
    kb = load_knowledge_base(small_kb)
    prompt = kb.prompt("Ann")
    good, bad = "Ann lives in Oslo. Ann has a cat.", "Ann lives in Rome."
    generations = [Generation(id="s", prompt=prompt, response=bad, model="SFT")]
    for seed, response in ((0, good), (1, bad)):
        generations.append(Generation(id=f"g{seed}", prompt=prompt, response=response, model=f"dense-seed{seed}"))
        run = tmp_path / f"ppo-dense-seed{seed}"
        write_records(run / "rollouts.jsonl", [
            Generation(id=f"{step}", prompt=prompt, response=bad if step == 1 else response, meta={"step": step})
            for step in (1, 2, 3, 4)
        ])
    write_records(tmp_path / "generations.jsonl", generations)
    result = report(str(tmp_path / "r.md"), str(tmp_path / "c.png"), {"greedy": str(tmp_path / "generations.jsonl")},
                    str(tmp_path / "ppo-{condition}-seed{seed}"), ["dense"], [0, 1], kb=small_kb)
    finals = result["conditions"]["dense"]["final"]["greedy"]
    assert [f["holistic"] for f in finals] == [1.0, -0.5]  # bad: 0 covered, 1 factual error / 2
    assert result["baseline"]["greedy"]["factual_error_rate"] == 1.0
    assert [m["holistic"] for m in result["conditions"]["dense"]["curves"][0]] == [-0.5, 1.0, 1.0, 1.0]
    text = (tmp_path / "r.md").read_text()
    # mean 0.25, sample std of (1.0, -0.5) = 1.0607
    assert "| dense | 0.500 ± 0.707 | 0.000 ± 0.000 | 0.500 ± 0.707 | 0.250 ± 1.061 |" in text
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_true_metrics_pool_sentences(small_kb):
    kb = load_knowledge_base(small_kb)
    prompt = kb.prompt("Ann")
    m = TrueMetrics.of([judge(kb, prompt, RESPONSE), judge(kb, prompt, "Ann has a cat.")])
    assert m.factual_error_rate == pytest.approx(1 / 6)  # 1 false of 6 sentences
    assert m.relevance_error_rate == pytest.approx(3 / 6)
    assert m.completeness == pytest.approx((0.5 + 0.5) / 2)


def test_goals_need_the_whole_seed_spread_and_the_baseline():
    scores = {"dense": [0.5, 0.6, 0.7], "sparse": [0.3, 0.4, 0.45], "overlapping": [0.2, 0.55, 0.3]}
    met, overlap = goal_verdicts([{"better": "dense", "than": "sparse", "above_baseline": True},
                                  {"better": "dense", "than": "overlapping"}], scores, 0.2, "SFT")
    [below] = goal_verdicts([{"better": "dense", "than": "sparse", "above_baseline": True}], scores, 0.42, "SFT")
    assert met["met"]  # worst dense seed 0.5 > best sparse seed 0.45; means 0.6 and 0.383 >= 0.2
    assert not overlap["met"]  # worst dense seed 0.5 < best overlapping seed 0.55
    assert not below["met"] and "sparse below SFT" in below["measured"]  # sparse mean 0.383 < 0.42


def test_revisions_are_judged_against_their_originals(tmp_path, small_kb):
    kb = load_knowledge_base(small_kb)
    prompt = kb.prompt("Ann")
    # Original holistic scores: "Ann lives in Rome." -0.5; "Ann lives in Oslo." 0.5.
    # Input a: round 1 perfect (1.0, win), round 2 flagged (keeps 1.0, win).
    # Input b: round 1 "Ann has a dog." (-0.5, loss), round 2 unchanged original text (0.5, tie).
    def round_(k, response, flag=None):
        return {"round": k, "response": response, "flag": flag}
    records = [
        Generation(id="a", prompt=prompt, response="Ann lives in Oslo. Ann has a cat.",
                   meta={"original_response": "Ann lives in Rome.",
                         "rounds": [round_(1, "Ann lives in Oslo. Ann has a cat."), round_(2, "Ann lives in Oslo. Ann has a cat.", "repeats_input")]}),
        Generation(id="b", prompt=prompt, response="Ann lives in Oslo.",
                   meta={"original_response": "Ann lives in Oslo.",
                         "rounds": [round_(1, "Ann has a dog."), round_(2, "Ann lives in Oslo.")]}),
    ]
    write_records(tmp_path / "revisions.jsonl", records)
    result = judge_revisions(kb, str(tmp_path / "revisions.jsonl"))
    first, second = result["rounds"]
    assert (first["win"], first["tie"], first["loss"]) == (0.5, 0.0, 0.5)
    assert (second["win"], second["tie"], second["loss"]) == (0.5, 0.5, 0.0)
    # the paper's win rate, win + tie / 2: 0.5 + 0 and 0.5 + 0.25
    assert (first["win_rate"], second["win_rate"]) == (0.5, 0.75)
    assert first["holistic"] == 0.25 and second["holistic"] == 0.75  # (1.0 - 0.5) / 2, (1.0 + 0.5) / 2
    assert second["accepted"] == 0.5  # a's round-2 revision was flagged
    assert result["originals"] == 0.0  # (-0.5 + 0.5) / 2
    above_half, rising = result["goals"]
    assert not above_half["met"]  # round 1's win rate is 50%, not above it
    assert rising["met"]  # 0.5 -> 0.75 (wins alone stay at 50%: the tie counts half)


def test_audit_summary_takes_the_first_and_last_quarter_over_seeds():
    def steps(accuracies, truth, flagged):
        return [{"accuracy": a, "true_error_rate": t, "rm_error_rate": f} for a, t, f in zip(accuracies, truth, flagged)]
    # 4 steps -> quarters of one step: "first" is step 1, "last" step 4.
    audited = {"kinds": {"relevance": "segment"}, "runs": {
        "fg-seed0": {"rms": {"relevance": steps([0.5, 0.9, 0.9, 0.8], [0.2, 0, 0, 0.1], [0.1, 0, 0, 0.1])}},
        "fg-seed1": {"rms": {"relevance": steps([0.7, 0.9, 0.9, 1.0], [0.4, 0, 0, 0.3], [0.3, 0, 0, 0.3])}},
    }}
    [row] = [line for line in audit_summary(audited, ["fg"], [0, 1]) if line.startswith("| fg |")]
    # accuracy first: mean(0.5, 0.7) = 0.6, sample std = 0.1414; last: mean(0.8, 1.0) = 0.9, std 0.1414;
    # truth 0.3 ± 0.1414 -> 0.2 ± 0.1414; flagged 0.2 ± 0.1414 -> 0.2 ± 0.1414.
    assert row == ("| fg | relevance | 0.600 ± 0.141 | 0.900 ± 0.141 | 0.300 ± 0.141 → 0.200 ± 0.141 | "
                   "0.200 ± 0.141 → 0.200 ± 0.141 |")
