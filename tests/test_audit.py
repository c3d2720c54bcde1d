"""The reward-hacking audit (rlhfkit.audit, `evaluate --audit-rm`) on a hand-built rollout file.

Stand-in RMs with known verdicts and the `tests.judges:audit_truth` judge ('bad' marks a
false sentence) make every expected accuracy countable by hand (worked out in comments).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit.audit import SegmentCounts, audit_runs, load_judge, pairwise_agreement, read_rollouts
from rlhfkit.rewards.reward_model import SegmentRewards
from rlhfkit.schema import Generation, write_records
from rlhfkit.segment import segment

EXACT = 1e-12  # the accuracies are ratios of small integer counts: only float rounding separates them


class WordyRM:
    """A stand-in preference RM that loves length: score = number of words."""

    kind, aspect = "preference", "preference"

    def score(self, prompts, responses, batch_size=8):
        return [SegmentRewards([float(len(r.split()))], [len(r)]) for r in responses]


class BigIsFalseRM:
    """A stand-in factuality segment RM: a sentence with 'big' is an error (P = 0.9), else P = 0.1."""

    kind, aspect = "segment", "factuality"

    def error_probabilities(self, prompts, responses, batch_size=8):
        out = []
        for response in responses:
            sentences = segment(response, "sentence")
            out.append((sentences, [0.9 if "big" in s.text else 0.1 for s in sentences]))
        return out


# step 0, prompt P: r1 "A big cat. A bad dog.", r2 "A cat."
# step 1, prompt P: r3 "A big bad cat.", r4 "A dog. A cow."
#         prompt Q: r5 "Hello there.", r6 "A bad one here now.", r7 "Fine words are many here."
ROLLOUTS = [
    (0, "P", "A big cat. A bad dog."),
    (0, "P", "A cat."),
    (1, "P", "A big bad cat."),
    (1, "P", "A dog. A cow."),
    (1, "Q", "Hello there."),
    (1, "Q", "A bad one here now."),
    (1, "Q", "Fine words are many here."),
]


@pytest.fixture
def rollouts_file(tmp_path) -> Path:
    path = tmp_path / "run" / "rollouts.jsonl"
    path.parent.mkdir()
    write_records(path, [Generation(id=f"r{i + 1}", prompt=p, response=r, meta={"step": s}) for i, (s, p, r) in enumerate(ROLLOUTS)])
    return path


def test_pairwise_agreement_by_hand():
    # (RM, judge): the pair (3, 1) vs (1, 0) is ordered alike; (1, 0) vs (2, 0) is a judge tie
    # (left out); (3, 1) vs (2, 0) alike; the second group's only pair is an RM tie (one half).
    # 3 pairs counted: (1 + 1 + 0.5) / 3.
    result = pairwise_agreement([[(3, 1), (1, 0), (2, 0)], [(5, 2), (5, 1)]])
    assert result["pairs"] == 3 and result["concordant"] == 2 and result["rm_ties"] == 1
    assert result["accuracy"] == pytest.approx(2.5 / 3, abs=EXACT)
    assert pairwise_agreement([[(1, 0), (2, 0)]])["accuracy"] is None  # only judge ties: undefined


def test_segment_counts_by_hand():
    counts = SegmentCounts()
    counts.add([True, False, False, True], [True, True, False, False])
    # agree at 0 and 2 -> 2/4; true errors at 0, 1 -> rate 2/4, the RM caught 1 of them -> recall 1/2.
    assert counts.metrics() == {"accuracy": 0.5, "segments": 4, "true_error_rate": 0.5, "rm_error_rate": 0.5, "error_recall": 0.5}


def test_audit_on_a_hand_built_rollout_file(rollouts_file):
    judge = load_judge("py:tests.judges:audit_truth")
    runs = {"run": (str(rollouts_file), read_rollouts(rollouts_file))}
    [audit] = audit_runs({"fact": BigIsFalseRM(), "pref": WordyRM()}, judge, runs)
    assert audit.steps == [0, 1]
    fact0, fact1 = audit.by_rm["fact"]
    # Step 0: "A big cat." RM error, judge none (disagree); "A bad dog." RM none, judge error
    # (disagree); "A cat." both none (agree): 1/3; the one true error is missed: recall 0.
    assert fact0["segments"] == 3 and fact0["accuracy"] == pytest.approx(1 / 3, abs=EXACT)
    assert fact0["error_recall"] == 0.0 and fact0["true_error_rate"] == pytest.approx(1 / 3, abs=EXACT)
    # Step 1: r3 one sentence, both error (agree); r4 two sentences, both none (agree 2); r5
    # agree; r6 "A bad one here now." judge error, RM none (disagree); r7 agree: 5/6. True
    # errors r3, r6 (2 of 6), the RM flags r3 only (1 of 6): recall 1/2.
    assert fact1["segments"] == 6 and fact1["accuracy"] == pytest.approx(5 / 6, abs=EXACT)
    assert fact1["true_error_rate"] == pytest.approx(2 / 6, abs=EXACT)
    assert fact1["rm_error_rate"] == pytest.approx(1 / 6, abs=EXACT)
    assert fact1["error_recall"] == pytest.approx(0.5, abs=EXACT)
    pref0, pref1 = audit.by_rm["pref"]
    # Step 0, prompt P: r1 6 words, judge -1; r2 2 words, judge 0: the RM orders them the
    # wrong way round: 0 of 1. Mean RM score (6 + 2) / 2 = 4, judge (-1 + 0) / 2 = -0.5.
    assert (pref0["pairs"], pref0["accuracy"], pref0["rm_score"], pref0["judge_score"]) == (1, 0.0, 4.0, -0.5)
    # Step 1, P: r3 (4 words, -1) vs r4 (4 words, 0): an RM tie, 1/2. Q: r5 (2, 0) vs r6 (5, -1)
    # wrong way round; r5 vs r7 (5, 0) a judge tie, left out; r6 vs r7 an RM tie, 1/2.
    # 3 pairs: (0.5 + 0 + 0.5) / 3 = 1/3.
    assert pref1["pairs"] == 3 and pref1["rm_ties"] == 2
    assert pref1["accuracy"] == pytest.approx(1 / 3, abs=EXACT)


def _rm_dir(path: Path, aspect: str, kind: str) -> str:
    path.mkdir()
    # A whole spec: evaluate checks every field before the stand-in RM replaces the model.
    fields = ({"granularity": "sentence", "positive_reward": 1.0, "negative_reward": -1.0} if kind == "segment"
              else {"normalization": {"mean": 0.0, "std": 1.0}})
    (path / "rlhfkit_rm.json").write_text(json.dumps({"aspect": aspect, "kind": kind, "max_length": 64, **fields}))
    return str(path)


def test_evaluate_audit_writes_json_markdown_and_plot(tmp_path, run_cli, rollouts_file, monkeypatch):
    import rlhfkit.audit

    stand_ins = {"factuality": BigIsFalseRM(), "preference": WordyRM()}
    monkeypatch.setattr(rlhfkit.audit, "load_named_reward_models",
                        lambda paths, **_: {name: stand_ins[Path(path).name] for name, path in paths.items()})
    fact, pref = _rm_dir(tmp_path / "factuality", "factuality", "segment"), _rm_dir(tmp_path / "preference", "preference", "preference")
    out = tmp_path / "audit"
    result = run_cli("evaluate", "--audit-rm", f"fact={fact}", "--audit-rm", f"pref={pref}",
                     "--audit-judge", "py:tests.judges:audit_truth", "--rollouts", f"arm={rollouts_file}", "--out", out)
    assert result.exit_code == 0, result.output
    audit = json.loads((out / "audit.json").read_text())
    steps = audit["runs"]["arm"]["rms"]
    # The same counts as the test above, through the CLI (names canonical: fact -> factuality).
    assert [s["accuracy"] for s in steps["factuality"]] == pytest.approx([1 / 3, 5 / 6], abs=EXACT)
    assert [s["accuracy"] for s in steps["preference"]] == pytest.approx([0.0, 1 / 3], abs=EXACT)
    markdown = (out / "audit.md").read_text()
    assert "| factuality | segment accuracy | 0.333 | 0.833 |" in markdown
    assert "| preference | pairwise accuracy | 0.000 | 0.333 |" in markdown
    assert (out / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_audit_inputs_are_one_line_errors(tmp_path, run_cli, rollouts_file):
    fact = _rm_dir(tmp_path / "factuality", "factuality", "segment")
    no_step = tmp_path / "no_step.jsonl"
    write_records(no_step, [Generation(id="a", prompt="P", response="A cat.")])
    out = tmp_path / "out"
    result = run_cli("evaluate", "--audit-rm", f"fact={fact}", "--audit-judge", "py:tests.judges:audit_truth",
                     "--rollouts", str(no_step), "--out", out)
    assert result.exit_code == 2 and f"{no_step}:1: a rollout needs an integer meta.step" in result.output
    result = run_cli("evaluate", "--audit-rm", f"fact={fact}", "--rollouts", str(rollouts_file), "--out", out)
    assert result.exit_code == 2 and "the audit needs all of" in result.output
    result = run_cli("evaluate", "--audit-rm", f"fact={fact}", "--audit-judge", "tests.judges:audit_truth",
                     "--rollouts", str(rollouts_file), "--out", out)
    assert result.exit_code == 2 and "expected py:module:function" in result.output
    assert not out.exists()
