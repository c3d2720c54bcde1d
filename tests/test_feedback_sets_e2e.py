"""End to end on the importer fixtures, tiny models and a few steps each:

- HelpSteer2 -> three regression RMs (`train-rm --aspect a,b,c`) -> ppo with three weighted
  attribute rewards, normalised per source, on chat-templated prompts;
- PRM800K -> a step segment RM (a process reward model) -> ppo with it as a dense source;
- HelpSteer3 edit -> critique-revise train + run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit.models import model_dir
from rlhfkit.schema import load_records

FIXTURES = Path(__file__).parent / "fixtures" / "import"
ATTRIBUTES = ("helpfulness", "correctness", "verbosity")


def imported(run_cli, fmt: str, fixture: str, out: Path) -> Path:
    result = run_cli("annotate-import", "--format", fmt, FIXTURES / fixture, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def ppo_args(policy: Path, prompts: Path, out: Path, *extra) -> list:
    return [
        "ppo", "--policy", policy, "--prompts", prompts, "--out", out,
        "--steps", "1", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--minibatch-size", "2",
        "--ppo-epochs", "1", "--max-new-tokens", "10", "--max-prompt-length", "96", "--save-every", "1",
        "--seed", "3", "--device", "cpu", *extra,
    ]


def rm_args(data: Path, model: Path, out: Path, *extra) -> list:
    return [
        "train-rm", "--data", data, "--model", model, "--out", out, "--max-steps", "2", "--batch-size", "4",
        "--max-length", "128", "--eval-fraction", "0", "--device", "cpu", *extra,
    ]


def test_helpsteer2_three_attribute_rms_then_weighted_ppo(run_cli, tiny_model_dir, tmp_path):
    data = imported(run_cli, "helpsteer2", "helpsteer2.jsonl", tmp_path / "hs2")
    rms = tmp_path / "rms"
    result = run_cli(*rm_args(data / "scores.jsonl", tiny_model_dir, rms, "--aspect", ",".join(ATTRIBUTES), "--kind", "regression"))
    assert result.exit_code == 0, result.output
    for aspect in ATTRIBUTES:
        spec = json.loads((model_dir(rms / aspect) / "rlhfkit_rm.json").read_text())
        assert (spec["aspect"], spec["kind"]) == (aspect, "regression")
        # Each RM trained on its own attribute's 4 score records.
        assert json.loads((rms / aspect / "run_config.json").read_text())["config"]["aspect"] == aspect

    out = tmp_path / "ppo"
    result = run_cli(*ppo_args(
        tiny_model_dir, data / "prompts.jsonl", out,
        "--rewards", "helpfulness=0.5,correctness=0.3,verbosity=-0.1",
        *[arg for aspect in ATTRIBUTES for arg in ("--rm", f"{aspect}={rms / aspect}")],
        "--normalize-rewards", "per-source",
    ))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    [train] = [r for r in rows if "reward/total" in r]
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 4  # the whole step: 2 prompts x 2 samples

    # Each RM's own score of the 4 logged responses, and by hand: raw = their mean; the
    # normalised value z = (score - mean) / population std per response, whose mean is 0;
    # each response's last token holds sum_k w_k z_k (a regression RM rewards the last token
    # only; at step 1 the policy is the reference, so no KL in the logged rewards).
    # Tolerances: float32 scores and 6-decimal rounding in rollouts.jsonl, < 1e-5; a z-score
    # divides by std + 1e-8, so 1e-4 for z when the std is >= 1e-3 (checked).
    from rlhfkit.rewards.reward_model import load_reward_model

    weights = {"helpfulness": 0.5, "correctness": 0.3, "verbosity": -0.1}
    z = {}
    for aspect in ATTRIBUTES:
        rm = load_reward_model(rms / aspect, device="cpu")
        scores = [s.values[0] for s in rm.score([r["prompt"] for r in rollouts], [r["response"] for r in rollouts])]
        mean = sum(scores) / 4
        std = (sum((s - mean) ** 2 for s in scores) / 4) ** 0.5
        assert std >= 1e-3, scores
        z[aspect] = [(s - mean) / std for s in scores]
        assert train[f"reward/raw/{aspect}"] == pytest.approx(mean, abs=1e-5)  # not ~0: the RM's own units
        assert train[f"reward/normalized/{aspect}"] == pytest.approx(0.0, abs=1e-5)
        assert train[f"reward/weighted/{aspect}"] == pytest.approx(0.0, abs=1e-5)
    for i, rollout in enumerate(rollouts):
        expected = sum(w * z[aspect][i] for aspect, w in weights.items())
        assert rollout["token_rewards"][-1] == pytest.approx(expected, abs=1e-4)
        assert all(value == 0 for value in rollout["token_rewards"][:-1])
    # The tiny tokenizer has a chat template: prompts are templated and end with the generation prompt.
    assert all(r["prompt"].startswith("<|user|>\n") and r["prompt"].endswith("<|assistant|>\n") for r in rollouts)

    # evaluate generates from the templated prompts; the records keep the plain prompt (the
    # key that joins systems and references) and the conversation.
    result = run_cli("evaluate", "--policy", f"ppo={out}", "--prompts", data / "prompts.jsonl", "--out", tmp_path / "eval",
                     "--rm", f"helpfulness={rms / 'helpfulness'}", "--max-new-tokens", "6", "--device", "cpu")
    assert result.exit_code == 0, result.output
    generations = load_records(tmp_path / "eval" / "generations.jsonl", "generation")
    assert [g.prompt for g in generations] == [p.prompt for p in load_records(data / "prompts.jsonl", "prompt")]
    assert generations[1].meta["messages"][1] == {"role": "assistant", "content": "How about Whiskers?"}


def test_prm800k_step_rm_is_a_dense_ppo_source(run_cli, tiny_model_dir, tmp_path):
    data = imported(run_cli, "prm800k", "prm800k.jsonl", tmp_path / "prm")
    rm = tmp_path / "step-rm"
    result = run_cli(*rm_args(data / "span_feedback.jsonl", tiny_model_dir, rm,
                              "--aspect", "correctness", "--kind", "segment", "--granularity", "step"))
    assert result.exit_code == 0, result.output
    assert json.loads((model_dir(rm) / "rlhfkit_rm.json").read_text())["granularity"] == "step"

    # A reward at the end of each step: a three-line response gets three rewards, on the
    # tokens that end "a", "bb" and "c" (one token per character here: "a\nbb\nc").
    from transformers import AutoTokenizer

    from rlhfkit.rewards.reward_model import load_reward_model
    from rlhfkit.rewards.sources import RewardModelSource

    source = RewardModelSource("step", load_reward_model(rm, device="cpu"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "a\nbb\nc"
    offsets = [tuple(span) for span in tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]]
    values, given = source.token_rewards(["Solve it."], [text], [offsets]).padded(len(offsets))
    ends = [i for i, (_, end) in enumerate(offsets) if end in (1, 4, 6)]
    assert given[0].nonzero().flatten().tolist() == ends
    # Each step's reward is the RM's verdict: +1 where P(error) <= 0.5, -1 where it is above
    # (the segment defaults), in step order.
    [scored] = load_reward_model(rm, device="cpu").score(["Solve it."], [text])
    assert len(scored.error_probs) == 3
    assert values[0, ends].tolist() == [-1.0 if p > 0.5 else 1.0 for p in scored.error_probs]
    # Both verdicts occur here (seeded: 0.53, 0.42, 0.39), so a constant sign would fail.
    assert {-1.0, 1.0} <= set(values[0, ends].tolist())

    out = tmp_path / "ppo"
    result = run_cli(*ppo_args(tiny_model_dir, data / "prompts.jsonl", out, "--rewards", "step=1", "--rm", f"step={rm}"))
    assert result.exit_code == 0, result.output
    assert any("reward/total" in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())


def test_helpsteer3_edit_critique_revise_train_and_run(run_cli, tiny_model_dir, tmp_path):
    data = imported(run_cli, "helpsteer3", "helpsteer3_edit.jsonl", tmp_path / "edit")
    model = tmp_path / "cr"
    result = run_cli("critique-revise", "train", "--data", data / "critiques.jsonl", "--model", tiny_model_dir,
                     "--out", model, "--max-steps", 2, "--batch-size", 2, "--max-length", 256, "--save-every", 0,
                     "--eval-fraction", 0, "--device", "cpu")
    assert result.exit_code == 0, result.output
    # 2 edit rows: a critique and a revision demonstration each, each a user turn for the template.
    demos = load_records(model / "critique_revise_data.jsonl", "demonstration")
    assert len(demos) == 4 and all(d.meta["messages"][0]["role"] == "user" for d in demos)

    out = tmp_path / "run"
    result = run_cli("critique-revise", "run", "--model", model, "--input", data / "critiques.jsonl", "--out", out,
                     "--max-new-tokens", 8, "--max-prompt-length", 256, "--accept-truncated",
                     "--min-length-ratio", 0, "--device", "cpu")
    assert result.exit_code == 0, result.output
    revised = load_records(out / "revisions.jsonl", "generation")
    assert [r.id for r in revised] == ["helpsteer3:helpsteer3_edit.jsonl:1", "helpsteer3:helpsteer3_edit.jsonl:2"]


@pytest.mark.parametrize("bad, message", [
    (["--aspect", "helpfulness,helpfulness", "--kind", "regression"], "names an aspect twice"),
    (["--aspect", "helpfulness,correctness"], "has no preset; give --kind"),
    (["--aspect", "helpfulness,corectness", "--kind", "regression"], "no score record has aspect 'corectness'"),
])
def test_multi_aspect_options_are_checked_before_training(run_cli, tiny_model_dir, tmp_path, bad, message):
    data = imported(run_cli, "helpsteer2", "helpsteer2.jsonl", tmp_path / "hs2")
    result = run_cli(*rm_args(data / "scores.jsonl", tiny_model_dir, tmp_path / "rms", *bad))
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert not (tmp_path / "rms").exists()
