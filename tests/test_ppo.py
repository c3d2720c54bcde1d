"""`rlhfkit ppo` and `rlhfkit redistribute` end to end on tiny offline models.

Reward models are trained for a couple of steps with `train-rm` (their quality does not
matter here: these tests check the wiring, the artifacts, resume and bad input).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.models import MODEL_SUBDIR, model_dir
from rlhfkit.rewards.reward_model import load_reward_model
from rlhfkit.schema import Generation, Preference, PromptRecord, Span, SpanFeedback, write_records

QUESTIONS = [
    "Who wrote the album Bloom?",
    "When was the bridge opened?",
    "Where is the river Nile?",
    "What is the capital of France?",
    "Who painted the famous ceiling?",
    "When did the war end?",
]
RESPONSES = [
    "Bloom was written by Troye Sivan. It was released in 2018.",
    "The bridge opened in 1937. It is red.",
    "The Nile is in Africa. It is long.",
    "Paris is the capital. The city is old.",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ppo-data")
    write_records(d / "prompts.jsonl", [PromptRecord(id=f"p{i}", prompt=f"question: {q} answer:") for i, q in enumerate(QUESTIONS)])
    spans = []
    for i in range(16):
        response = RESPONSES[i % 4]
        first_end = response.index(".") + 1
        span_list = []
        if i % 2:
            span_list.append(Span(0, first_end, "Unverifiable", "factuality"))
        if i % 3 == 0:
            span_list.append(Span(first_end + 1, len(response), "Irrelevant", "relevance"))
        spans.append(SpanFeedback(id=f"s{i}", prompt=f"question: {QUESTIONS[i % 6]} answer:", response=response,
                                  spans=span_list, aspects=["factuality", "relevance"]))
    write_records(d / "spans.jsonl", spans)
    prefs = [
        Preference(id=f"q{i}", prompt=f"question: {QUESTIONS[i % 6]} answer:", chosen=RESPONSES[i % 4],
                   rejected=RESPONSES[i % 4].split(".")[0] + ".", aspect="preference")
        for i in range(12)
    ]
    write_records(d / "prefs.jsonl", prefs)
    return d


@pytest.fixture(scope="module")
def reward_models(tiny_model_dir, data_dir, tmp_path_factory) -> dict[str, Path]:
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    root = tmp_path_factory.mktemp("rms")
    out = {}
    for aspect, data in (("factuality", "spans.jsonl"), ("relevance", "spans.jsonl"), ("completeness", "prefs.jsonl")):
        result = CliRunner().invoke(app, [
            "train-rm", "--aspect", aspect, "--data", str(data_dir / data), "--model", str(tiny_model_dir),
            "--out", str(root / aspect), "--max-steps", "2", "--batch-size", "4", "--max-length", "128",
            "--eval-fraction", "0",
        ], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        out[aspect] = root / aspect
    return out


def ppo_args(policy: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "ppo", "--policy", str(policy), "--prompts", str(data_dir / "prompts.jsonl"), "--out", str(out),
        "--steps", "2", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--minibatch-size", "2",
        "--ppo-epochs", "1", "--max-new-tokens", "12", "--max-prompt-length", "64", "--save-every", "1",
        "--lr", "1e-4", "--seed", "3", *extra,
    ]


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def logged_rollouts(out: Path, step: int) -> list[dict]:
    rows = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    return [r for r in rows if r["meta"]["step"] == step]


# rollouts.jsonl rounds each token reward to 6 decimals: a sum over the <= 13 tokens of a
# response (12 new tokens + EOS) is off by at most 13 * 0.5e-6 = 6.5e-6.
ROUNDED_SUM_TOL = 1e-5
# A policy that has not moved: the same weights give the same log-probs up to float32
# rounding of a forward pass on a differently padded batch (|logp| < log 1024 ~ 6.9, a few
# ulps of that ~ 1e-6), and the KL, approx_kl and clip fraction are then all 0.
UNMOVED_TOL = 1e-6


def test_fine_grained_ppo_with_three_reward_models(run_cli, tiny_model_dir, data_dir, reward_models, tmp_path):
    out = tmp_path / "run"
    result = run_cli(*ppo_args(
        tiny_model_dir, data_dir, out,
        "--rewards", "rel=0.3,fact=0.5,comp=0.3",  # the paper's w (FG-RLHF sec. 4.2)
        "--rm", f"fact={reward_models['factuality']}", "--rm", f"rel={reward_models['relevance']}",
        "--rm", f"comp={reward_models['completeness']}",
        "--eval-prompts", str(data_dir / "prompts.jsonl"), "--eval-every", "1",
    ))
    assert result.exit_code == 0, result.output
    rows = metric_rows(out)
    train = [r for r in rows if "reward/total" in r]
    assert [r["step"] for r in train] == [1, 2]
    weights = {"factuality": 0.5, "relevance": 0.3, "completeness": 0.3}
    for row in train:
        # The total task reward is the sum of the three weighted sources, and each weighted
        # value is its weight x the RM's raw score (no --normalize-rewards: no normalised
        # key): float32 sums of <= 13 terms of size <= 1, error << 1e-5.
        parts = sum(row[f"reward/weighted/{name}"] for name in weights)
        assert row["reward/total"] == pytest.approx(parts, abs=1e-5)
        for name, weight in weights.items():
            assert row[f"reward/weighted/{name}"] == pytest.approx(weight * row[f"reward/raw/{name}"], abs=1e-5)
        assert not [key for key in row if key.startswith("reward/normalized/")]
        for key in ("entropy", "policy_loss", "value_loss", "response_length"):
            assert key in row, key
    # The policy starts as the reference (dropout off): no KL on the first rollout.
    assert abs(train[0]["kl"]) <= UNMOVED_TOL and abs(train[0]["kl_penalty"]) <= UNMOVED_TOL
    assert train[1]["kl"] != 0  # ... and one update (lr 1e-4) later it has moved

    # Step 1 logs its 4 rollouts (--log-rollouts 4 = 2 prompts x 2 samples) with their
    # per-token rewards; the KL being 0 there, these are the task rewards alone, so their
    # sums average to reward/total.
    rollouts = logged_rollouts(out, 1)
    assert len(rollouts) == 4
    completeness_rm = load_reward_model(reward_models["completeness"], device="cpu")
    sums = [sum(r["token_rewards"]) for r in rollouts]
    assert sum(sums) / 4 == pytest.approx(train[0]["reward/total"], abs=ROUNDED_SUM_TOL)
    for rollout in rollouts:
        assert len(rollout["tokens"]) == len(rollout["token_rewards"])
        # The segment RMs emit +-1, weighted once by --rewards: a token before the last can
        # only hold a factuality (+-0.5) and/or a relevance (+-0.3) reward, so one of 0,
        # +-0.3, +-0.5, +-0.8, +-0.2 (not 0.25 or 0.09: weights applied twice). The
        # completeness score lands on the last token only.
        allowed = [0.0, 0.3, -0.3, 0.5, -0.5, 0.8, -0.8, 0.2, -0.2]
        for value in rollout["token_rewards"][:-1]:
            assert min(abs(value - a) for a in allowed) <= 1e-6, rollout["token_rewards"]
        # The last token holds 0.3 x the completeness RM's score of the response (scored here
        # on its own), plus the last segment's factuality/relevance rewards (one of `allowed`);
        # rounding to 6 decimals and float32 scores: 1e-5.
        [completeness] = completeness_rm.score([rollout["prompt"]], [rollout["response"]])
        rest = rollout["token_rewards"][-1] - 0.3 * completeness.values[0]
        assert min(abs(rest - a) for a in allowed) <= 1e-5, (rollout["token_rewards"], completeness.values)

    assert any("eval/reward/total" in r and "eval/reward/raw/completeness" in r for r in rows)
    assert (out / "checkpoints" / "step-1" / "training_state.pt").is_file()
    assert (out / "reward_curves.png").stat().st_size > 1000
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model_dir(out))
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["config"]["rewards"] == "rel=0.3,fact=0.5,comp=0.3"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir(path) / "model.safetensors"))


def test_resume_gives_the_same_policy_as_an_uninterrupted_run(run_cli, tiny_model_dir, data_dir, tmp_path, monkeypatch):
    from rlhfkit.stages import ppo

    judge = ["--rewards", "judge=1", "--rm", "judge=py:tests.judges:count_letters_e"]
    straight = tmp_path / "straight"
    assert run_cli(*ppo_args(tiny_model_dir, data_dir, straight, *judge, "--steps", "3")).exit_code == 0

    # The same run, killed during step 3 (after the step-2 checkpoint), then resumed.
    real_iteration = ppo.ppo_iteration

    def crash_at_step_3(*args, **kwargs):
        if args[-1] == 3:
            raise KeyboardInterrupt
        return real_iteration(*args, **kwargs)

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(ppo, "ppo_iteration", crash_at_step_3)
    assert run_cli(*ppo_args(tiny_model_dir, data_dir, interrupted, *judge, "--steps", "3")).exit_code == 130
    assert not (interrupted / MODEL_SUBDIR).exists()
    monkeypatch.setattr(ppo, "ppo_iteration", real_iteration)
    result = run_cli(*ppo_args(tiny_model_dir, data_dir, interrupted, *judge, "--steps", "3", "--resume"))
    assert result.exit_code == 0, result.output
    a, b = _weights(straight), _weights(interrupted)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def e_share(text: str) -> float:
    """tests.judges.count_letters_e, by hand: the share of the letter e in the response."""
    return text.count("e") / max(len(text), 1)


def assert_policy_unmoved(rows: list[dict]) -> None:
    """--lr 0: every step's rollout policy is the reference and the update's is the rollout's."""
    for row in rows:
        for key in ("kl", "kl_penalty", "approx_kl", "clipfrac"):
            assert abs(row[key]) <= UNMOVED_TOL, (row["step"], key, row[key])


def assert_same_weights(a: Path, b: Path, names=None) -> None:
    wa, wb = _weights(a), _weights(b)
    for name in names if names is not None else wa.keys() & wb.keys():
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=0, msg=name)


def capture_group_advantages(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record (advantages, mask) each time PPO computes critic-free advantages."""
    from rlhfkit.stages import ppo

    captured = []
    real = ppo.group_token_returns

    def recording(token_rewards, mask, *args, **kwargs):
        advantages = real(token_rewards, mask, *args, **kwargs)
        captured.append((advantages.detach().cpu(), mask.detach().cpu().bool()))
        return advantages

    monkeypatch.setattr(ppo, "group_token_returns", recording)
    return captured


JUDGE = ["--rewards", "judge=1", "--rm", "judge=py:tests.judges:count_letters_e"]


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_group_advantages_compare_the_samples_of_a_prompt(run_cli, tiny_model_dir, data_dir, tmp_path, monkeypatch, kind):
    """--lr 0 keeps the policy where it is, so the rollout of step 1 can be checked by hand."""
    captured = capture_group_advantages(monkeypatch)
    out = tmp_path / "run"
    result = run_cli(*ppo_args(tiny_model_dir, data_dir, out, *JUDGE, "--steps", "1", "--lr", "0", "--advantage", kind))
    assert result.exit_code == 0, result.output
    assert_policy_unmoved(metric_rows(out))
    assert_same_weights(tiny_model_dir, out)
    (advantages, mask), = captured
    rollouts = logged_rollouts(out, 1)  # all 4, in rollout order: prompt 1's 2 samples, then prompt 2's
    scores = [e_share(r["response"]) for r in rollouts]
    # One reward per response (at its last token), gamma 1: every token of a response has
    # the response's sequence advantage, computed here from the two samples of its prompt.
    for i, score in enumerate(scores):
        other = scores[i ^ 1]
        if kind == "grpo":
            # (r - mean) / (std + 1e-6) with the Bessel std of 2 values: |r1 - r2| / sqrt(2),
            # so +-1/sqrt(2) whenever the two samples differ.
            expected = (score - (score + other) / 2) / (abs(score - other) / math.sqrt(2) + 1e-6)
        else:
            expected = score - other  # RLOO: minus the mean of the other sample(s) of the prompt
        row = advantages[i][mask[i]]
        assert len(row) == len(rollouts[i]["tokens"])
        torch.testing.assert_close(row, torch.full_like(row, expected), rtol=0, atol=1e-6)
    # Each prompt's two samples' advantages sum to 0.
    first = advantages[:, 0]
    assert abs(first[0] + first[1]) <= 1e-6 and abs(first[2] + first[3]) <= 1e-6
    assert any(abs(s - scores[i ^ 1]) > 1e-3 for i, s in enumerate(scores))  # not all-zero by accident


def test_shared_value_head_trains_a_head_on_the_policy(run_cli, tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli(*ppo_args(tiny_model_dir, data_dir, out, *JUDGE, "--value-model", "shared", "--lr", "0"))
    assert result.exit_code == 0, result.output
    rows = metric_rows(out)
    assert_policy_unmoved(rows)
    # A value loss is trained and logged, with no value backbone of its own (only a head).
    assert all(row["value_loss"] > 0 for row in rows)
    state = torch.load(out / "checkpoints" / "step-2" / "training_state.pt", weights_only=True)
    assert state["value_backbone"] is None and state["value_head"]


def test_lora_trains_adapters_and_leaves_the_base_weights(run_cli, tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli(*ppo_args(tiny_model_dir, data_dir, out, *JUDGE, "--lora-r", "4", "--lr", "1e-3", "--steps", "1"))
    assert result.exit_code == 0, result.output
    # The saved policy has the adapters merged in: W + (alpha / r) * B @ A on the adapted
    # layers (peft's default for GPT-2: attn.c_attn), the base weights everywhere else.
    base, trained = _weights(tiny_model_dir), _weights(out)
    adapted = {name for name in trained if ".attn.c_attn.weight" in name}
    assert len(adapted) == 2  # one per layer of the tiny model
    assert_same_weights(tiny_model_dir, out, sorted((base.keys() & trained.keys()) - adapted))
    for name in adapted:
        assert not torch.equal(trained[name], base[name]), name  # B starts at 0; one Adam step moved it


def test_encoder_decoder_policy(run_cli, tiny_t5_dir, data_dir, tmp_path):
    """T5 (the paper's policy): with --lr 0 and every dropout off (T5's functional attention
    dropout included) the policy, its reference and its update agree at every step."""
    out = tmp_path / "t5"
    result = run_cli(*ppo_args(tiny_t5_dir, data_dir, out, "--rewards", "judge=1",
                               "--rm", "judge=py:tests.judges:sentence_rewards", "--lr", "0"))
    assert result.exit_code == 0, result.output
    rows = metric_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert_policy_unmoved(rows)
    assert_same_weights(tiny_t5_dir, out)
    from transformers import AutoModelForSeq2SeqLM

    AutoModelForSeq2SeqLM.from_pretrained(model_dir(out))


def test_redistributed_preference_reward(run_cli, tiny_model_dir, data_dir, reward_models, tmp_path):
    """R3HF: the per-token rewards of a response telescope to score(x, y) - score(x)."""
    from rlhfkit.rewards.reward_model import load_reward_model, sequence_scores

    out = tmp_path / "r3hf"
    result = run_cli(*ppo_args(tiny_model_dir, data_dir, out, "--rewards", "comp=1",
                               "--rm", f"comp={reward_models['completeness']}", "--redistribute", "comp", "--steps", "1"))
    assert result.exit_code == 0, result.output
    rollouts = logged_rollouts(out, 1)
    assert len(rollouts) == 4
    # Both scores read independently of the redistribution code: the RM's normalised score
    # of the whole text, and of the prompt alone (the causal RM's score at the token before
    # the response, i.e. the pair's ids cut after that token).
    rm = load_reward_model(reward_models["completeness"], device="cpu")
    norm = rm.spec["normalization"]
    for rollout in rollouts:
        (full,) = rm.score([rollout["prompt"]], [rollout["response"]])
        pair = rm.encode(rollout["prompt"], rollout["response"])
        prompt_ids = torch.tensor([pair.input_ids[: pair.prompt_position + 1]])
        with torch.no_grad():
            raw_prompt = sequence_scores(rm.model, prompt_ids, torch.ones_like(prompt_ids)).item()
        prompt_score = (raw_prompt - norm["mean"]) / norm["std"]
        # Step 1: the policy is the reference, so the logged rewards are the task rewards.
        assert sum(rollout["token_rewards"]) == pytest.approx(full.values[0] - prompt_score, abs=ROUNDED_SUM_TOL)
        # Dense: every token that adds text changes the prefix score (a tie to 1e-6 of two
        # float32 scores of a random RM is not expected).
        text_tokens = [r for r, t in zip(rollout["token_rewards"], rollout["tokens"]) if t]
        assert sum(1 for r in text_tokens if r != 0) >= len(text_tokens) - 1


def test_redistribute_stage_sums_to_sequence_minus_prompt_score(run_cli, data_dir, reward_models, tmp_path):
    from rlhfkit.rewards.reward_model import load_reward_model

    generations = tmp_path / "gens.jsonl"
    write_records(generations, [Generation(id=f"g{i}", prompt=f"question: {QUESTIONS[i]} answer:", response=r, model="m")
                                for i, r in enumerate(RESPONSES)])
    out = tmp_path / "token_rewards.jsonl"
    html = tmp_path / "report.html"
    result = run_cli("redistribute", "--rm", reward_models["completeness"], "--input", generations, "--out", out, "--html", html)
    assert result.exit_code == 0, result.output
    # Issue 13: success says so (it printed nothing).
    assert f"redistribute: {len(RESPONSES)} record(s), mean sequence score" in " ".join(result.output.split())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    rm = load_reward_model(reward_models["completeness"], device="cpu")
    sequence = rm.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    for row, scored in zip(rows, sequence):
        assert "".join(row["tokens"]) == row["response"]
        total = sum(row["token_rewards"])
        assert total == pytest.approx(scored.values[0] - row["meta"]["prompt_score"], abs=1e-4)
    page = html.read_text()
    assert page.count('<div class="rollout"') == len(RESPONSES) and 'class="t"' in page


def test_reward_placement_on_policy_tokens(tiny_model_dir):
    """Written token ids, one byte-level token per character, then EOS: segment rewards on the
    token that ends each sentence, a sequence reward on EOS (or, cut off, the last token)."""
    from rlhfkit.generation import token_char_spans
    from rlhfkit.models import load_tokenizer
    from rlhfkit.rewards.sources import PythonFunctionSource

    tokenizer = load_tokenizer(str(tiny_model_dir))
    text = "Paris is old. The tower is big."
    # GPT-2's byte-level alphabet writes a space as "Ġ"; every byte is in the vocabulary.
    ids = tokenizer.convert_tokens_to_ids(["Ġ" if c == " " else c for c in text]) + [tokenizer.eos_token_id]
    # Characters 0..30 are tokens 0..30: "Paris is old." ends with the "." at index 12,
    # "The tower is big." with the "." at index 30; EOS is token 31.
    assert len(text) == 31 and len(ids) == 32 and ids[31] == tokenizer.eos_token_id
    decoded, spans = token_char_spans(tokenizer, ids)
    assert decoded == text and spans[31] == (31, 31)

    def placed(judge, token_ids):
        text_, spans_ = token_char_spans(tokenizer, token_ids)
        rewards = PythonFunctionSource("judge", f"tests.judges:{judge}").token_rewards(["q"], [text_], [spans_])
        values, given = rewards.padded(len(token_ids))
        return values[0], given[0].nonzero().flatten().tolist()

    # sentence_rewards: +0.5 for a sentence without "big", -0.5 with it.
    values, given = placed("sentence_rewards", ids)
    expected = torch.zeros(32)
    expected[12], expected[30] = 0.5, -0.5
    torch.testing.assert_close(values, expected, rtol=0, atol=0)
    assert given == [12, 30]
    # count_letters_e: "The" and "tower" hold the 2 e's of 31 characters: 2/31 on EOS ...
    values, given = placed("count_letters_e", ids)
    expected = torch.zeros(32)
    expected[31] = 2 / 31
    torch.testing.assert_close(values, expected)
    assert given == [31]
    # ... and on token 30 when the response was cut off before its EOS.
    values, given = placed("count_letters_e", ids[:31])
    expected = torch.zeros(31)
    expected[30] = 2 / 31
    torch.testing.assert_close(values, expected)
    assert given == [30]


@pytest.mark.parametrize("args, message", [
    (["--rewards", "fact=0.3,oops=1", "--rm", "fact=py:tests.judges:count_letters_e"],
     "--rewards names oops but no reward model is given for it"),
    (["--rewards", "fact=high", "--rm", "fact=py:tests.judges:count_letters_e"],
     "the weight of 'fact' is not a number: 'high'"),
    (["--rewards", "judge=1", "--rm", "judge=py:tests.judges:count_letters_e", "--advantage", "ppo2"],
     "--advantage must be one of gae, grpo, rloo"),
    (["--rewards", "judge=1", "--rm", "judge=py:tests.judges:count_letters_e", "--minibatch-size", "3"],
     "--minibatch-size 3 must divide the rollouts per step"),
    (["--rewards", "judge=1", "--rm", "judge=py:tests.judges:count_letters_e", "--truncation-side", "top"],
     "--truncation-side must be one of right, left, middle, got 'top'"),
    (["--rewards", "judge=1", "--rm", "judge=py:tests.judges:count_letters_e", "--max-prompt-length", "4000"],
     "exceeds the 2048 positions the policy allows"),
])
def test_bad_input(run_cli, tiny_model_dir, data_dir, tmp_path, args, message):
    result = run_cli(*ppo_args(tiny_model_dir, data_dir, tmp_path / "x", *args))
    assert result.exit_code == 2
    assert message in result.output.replace("\n", " ")


def test_rm_directory_of_the_wrong_kind(run_cli, tiny_model_dir, data_dir, reward_models, tmp_path):
    result = run_cli(*ppo_args(tiny_model_dir, data_dir, tmp_path / "x", "--rewards", "fact=1", "--rm", f"fact={tiny_model_dir}"))
    assert result.exit_code == 2 and "is not an rlhfkit reward model" in result.output.replace("\n", " ")
    result = run_cli(*ppo_args(tiny_model_dir, data_dir, tmp_path / "y", "--rewards", "fact=1",
                               "--rm", f"fact={reward_models['factuality']}", "--redistribute", "fact"))
    assert result.exit_code == 2 and "is a segment reward model, which is already dense" in result.output.replace("\n", " ")


def test_reward_curves_plot_the_raw_scores(tmp_path):
    # With --normalize-rewards the normalised and weighted values (and their total) are ~0 at
    # every step by construction: the reward curves are the reward models' raw scores only.
    from rlhfkit.plots import ppo_panels
    from rlhfkit.runs import read_metric_series
    from rlhfkit.stages.ppo import plot_reward_curves

    rows = [{"step": s, "reward/total": 1e-7 * s, "reward/raw/helpfulness": 2.0 + s, "reward/normalized/helpfulness": -1e-7 * s,
             "reward/weighted/helpfulness": -1e-7 * s, "kl": 0.1 * s} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    panels = ppo_panels(read_metric_series(tmp_path))
    drawn = [(panel.title, [(line.label, list(line.y)) for line in panel.series]) for panel in panels]
    assert drawn == [("reward, raw (each source's own units)", [("helpfulness", [3.0, 4.0])]),
                     ("KL(policy || reference)", [("kl", [0.1, 0.2])])]
    plot_reward_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png", "ppo: run")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # without normalisation the total is in raw units too, and is drawn with the weighted sources
    for row in rows:
        del row["reward/normalized/helpfulness"]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    titles = [(panel.title, [line.label for line in panel.series]) for panel in ppo_panels(read_metric_series(tmp_path))]
    assert titles == [("reward, weighted (enters the total)", ["total", "helpfulness"]),
                      ("reward, raw (each source's own units)", ["helpfulness"]), ("KL(policy || reference)", ["kl"])]
