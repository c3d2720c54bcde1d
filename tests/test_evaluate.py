"""`rlhfkit evaluate` on tiny models and hand-made generations: every metric, alignment, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit.config import build_config
from rlhfkit.generation import SamplingConfig, generate
from rlhfkit.metrics import perplexity
from rlhfkit.models import load_policy
from rlhfkit.rewards.reward_model import load_reward_model
from rlhfkit.schema import Generation, PromptRecord, load_records, write_records

N_PROMPTS = 2


@pytest.fixture(scope="module")
def qa_records(tmp_path_factory, repo_root) -> Path:
    """The shipped QA-Feedback sample imported (prompts with references, preferences, spans)."""
    from rlhfkit.stages.annotate_import import ImportConfig, run_import

    out = tmp_path_factory.mktemp("qa-import")
    run_import(build_config(ImportConfig, format="qa-feedback", inputs=[str(repo_root / "data/qa_feedback/feedback.json")], out=str(out)))
    return out


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory, qa_records, make_tiny_model) -> dict[str, Path]:
    """A preference RM and a factuality (segment) RM, one optimizer step each on a few records."""
    from rlhfkit.stages.train_rm import TrainRMConfig, run_train_rm

    root = tmp_path_factory.mktemp("rms")
    backbone = str(make_tiny_model("gpt2"))
    subsets = {"preference": "preferences.jsonl", "factuality": "span_feedback.jsonl"}
    out = {}
    for aspect, name in subsets.items():
        data = root / name
        data.write_text("".join((qa_records / name).read_text().splitlines(keepends=True)[:8]))
        out[aspect] = root / aspect
        run_train_rm(build_config(TrainRMConfig, aspect=aspect, data=str(data), model=backbone, out=str(out[aspect]),
                                  max_steps=1, eval_fraction=0, device="cpu"))
    return out


@pytest.fixture(scope="module")
def qa_prompts(tmp_path_factory, qa_records) -> Path:
    """The shortest few QA prompts (with their references), to keep generation fast."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    records = sorted(load_records(qa_records / "prompts.jsonl", "prompt"), key=lambda r: len(r.prompt))
    write_records(path, records[:N_PROMPTS])
    return path


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


METRIC_KEYS = {
    "n", "reward/raw/preference", "reward/raw/factuality", "error_rate/factuality", "rouge_l",
    "distinct_1", "distinct_2", "distinct_3", "mean_length", "perplexity",
}


def test_two_systems_get_every_metric_and_a_pairwise_table(tmp_path, run_cli, tiny_model_dir, reward_models, qa_prompts):
    prompts = load_records(qa_prompts, "prompt")
    gold = tmp_path / "gold.jsonl"
    write_records(gold, [Generation(id=f"gold-{p.id}", prompt=p.prompt, response=p.references[0], model="gold") for p in prompts])
    paper = tmp_path / "paper.json"
    paper.write_text(json.dumps({"source": "Wu et al. 2023, Table 2", "rows": [{"system": "FG-RLHF", "metrics": {"rouge_l": 0.492, "error_rate/fact": 0.1}}]}))
    out = tmp_path / "eval"
    result = run_cli(
        "evaluate", "--policy", f"tiny={tiny_model_dir}", "--generations", gold, "--prompts", qa_prompts, "--out", out,
        "--rm", f"pref={reward_models['preference']}", "--rm", f"fact={reward_models['factuality']}",
        "--reference-lm", tiny_model_dir, "--paper", paper,
        "--max-new-tokens", 8, "--max-prompt-length", 1024, "--device", "cpu",
    )
    assert result.exit_code == 0, result.output
    metrics = read_json(out / "metrics.json")
    systems = metrics["systems"]
    assert list(systems) == ["tiny", "gold"]
    for name in systems:
        assert METRIC_KEYS <= set(systems[name]), name
        assert systems[name]["n"] == N_PROMPTS

    records = load_records(out / "generations.jsonl", "generation")
    by_system = {name: [r for r in records if r.model == name] for name in systems}
    assert [r.prompt for r in by_system["tiny"]] == [r.prompt for r in by_system["gold"]] == [p.prompt for p in prompts]

    # the policy's responses are exactly greedy generation with the same settings
    model, tokenizer, is_ed = load_policy(tiny_model_dir, device="cpu")
    rollout = generate(model, tokenizer, [p.prompt for p in prompts], SamplingConfig(max_new_tokens=8, do_sample=False),
                       max_prompt_length=1024, is_encoder_decoder=is_ed)
    assert [r.response for r in by_system["tiny"]] == rollout.texts

    # a system that answers with the reference has ROUGE-L 1; its length is the references' in words
    assert systems["gold"]["rouge_l"] == pytest.approx(1.0)
    assert systems["gold"]["mean_length"] == pytest.approx(sum(len(p.references[0].split()) for p in prompts) / N_PROMPTS)

    # rewards and error rates are those the reward models give these responses directly
    pref = load_reward_model(reward_models["preference"], device="cpu")
    fact = load_reward_model(reward_models["factuality"], device="cpu")
    scores = {}
    for name, rows in by_system.items():
        pairs = ([r.prompt for r in rows], [r.response for r in rows])
        scores[name] = [s.values[0] for s in pref.score(*pairs)]
        assert systems[name]["reward/raw/preference"] == pytest.approx(sum(scores[name]) / N_PROMPTS, abs=1e-5)
        assert [r.meta["rewards"]["preference"] for r in rows] == pytest.approx(scores[name], abs=1e-5)
        segment_rewards = fact.score(*pairs)
        assert systems[name]["reward/raw/factuality"] == pytest.approx(sum(sum(s.values) for s in segment_rewards) / N_PROMPTS)
        probs = [p for s in segment_rewards for p in s.error_probs]
        # a response with no sentence has no segment to flag (the tiny policy's may have none)
        expected_rate = sum(p > 0.5 for p in probs) / len(probs) if probs else 0.0
        assert systems[name]["error_rate/factuality"] == pytest.approx(expected_rate)
        assert name != "gold" or probs
        # each response's [flagged, all] segments, for intervals over prompts (the pretrained-policy table)
        assert [r.meta["error_flags"]["factuality"] for r in rows] == [
            [sum(p > 0.5 for p in s.error_probs), len(s.error_probs)] for s in segment_rewards]
        assert systems[name]["perplexity"] == pytest.approx(perplexity(model, tokenizer, pairs[1]), rel=1e-5)

    # judge: the first sequence RM; tiny vs gold counted from the scores
    pairwise = metrics["pairwise"]
    assert pairwise["judge"] == "preference"
    wins = sum(a > b for a, b in zip(scores["tiny"], scores["gold"]))
    losses = sum(a < b for a, b in zip(scores["tiny"], scores["gold"]))
    (row,) = pairwise["pairs"]
    assert (row["a"], row["b"]) == ("tiny", "gold")
    assert row["win"] == pytest.approx(wins / N_PROMPTS) and row["loss"] == pytest.approx(losses / N_PROMPTS)
    ties = N_PROMPTS - wins - losses
    assert row["win_rate"] == pytest.approx((wins + ties / 2) / N_PROMPTS)
    # 2 prompts: a resample is (p1, p1), (p1, p2), (p2, p1) or (p2, p2), so the interval's ends
    # are the win rates of one prompt drawn twice: the lower and the higher of the two outcomes.
    outcomes = sorted(1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(scores["tiny"], scores["gold"]))
    assert row["win_rate_ci95"] == pytest.approx(outcomes, abs=1e-12)
    expected_verdict = ("tiny clearly better" if outcomes[0] > 0.5 else "gold clearly better" if outcomes[1] < 0.5
                        else "no clear difference")
    assert row["verdict"] == expected_verdict
    intervals = metrics["intervals"]["systems"]
    # gold answers with the references: ROUGE-L 1 on every resample
    assert intervals["gold"]["rouge_l"] == pytest.approx([1.0, 1.0])
    assert set(intervals["tiny"]) >= METRIC_KEYS - {"n"}

    table = (out / "results.md").read_text()
    header = "| system | preference score (judge) | factuality errors | factuality reward | ROUGE-L | length (words) |"
    assert table.splitlines()[6] == header
    tiny_row = next(line for line in table.splitlines() if line.startswith("| tiny |"))
    expected_rate = systems["tiny"]["error_rate/factuality"]
    # error rates as percentages, with the interval (none where no resample has a segment:
    # the tiny policy's responses may have no sentence)
    bounds = intervals["tiny"]["error_rate/factuality"]
    cell = f"{expected_rate:.1%}" + (f" [{bounds[0]:.1%}, {bounds[1]:.1%}]" if bounds else "")
    assert tiny_row.split(" | ")[2] == cell
    assert table.splitlines()[11].startswith("Best system per column (lowest error rate; highest reward")
    assert "; ROUGE-L: gold (1.0000, " in table.splitlines()[11]  # gold answers with the references
    assert f"| tiny | {N_PROMPTS} |" in table and f"| gold | {N_PROMPTS} |" in table  # other metrics: n first
    # the paper's rows in their own table, the RM alias resolved to the same column name
    published = table.split("## Published numbers")[1]
    assert "| system | ROUGE-L | factuality errors |" in published
    assert "| FG-RLHF | 0.4920 | 10.0% |" in published  # 0.1 as a percentage
    assert "Pairwise win rates (judge: preference" in table
    rate = f"{row['win_rate']:.1%} [{outcomes[0]:.1%}, {outcomes[1]:.1%}]"
    assert (f"| tiny | gold | {row['win']:.1%} | {row['tie']:.1%} | {row['loss']:.1%} | {rate} | {expected_verdict} |"
            in table.splitlines())


def write_prompts(path: Path) -> Path:
    write_records(path, [
        PromptRecord(id="p1", prompt="Where is the cat?", references=["the cat is on the mat"]),
        PromptRecord(id="p2", prompt="Letters?", references=["a c"]),
    ])
    return path


def test_generations_are_matched_by_prompt_and_scored_by_hand(tmp_path, run_cli):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    write_records(tmp_path / "runs.jsonl", [
        Generation(id="1", prompt="Where is the cat?", response="the cat sat on the mat", model="alpha"),
        Generation(id="2", prompt="Letters?", response="a b c d", model="alpha"),
    ])
    # no model field: the system is named after the file; records in another order
    write_records(tmp_path / "beta.jsonl", [
        Generation(id="2", prompt="Letters?", response="a c"),
        Generation(id="1", prompt="Where is the cat?", response="the cat is on the mat"),
    ])
    out = tmp_path / "eval"
    result = run_cli("evaluate", "--generations", tmp_path / "runs.jsonl", "--generations", tmp_path / "beta.jsonl",
                     "--prompts", prompts, "--out", out)
    assert result.exit_code == 0, result.output
    systems = read_json(out / "metrics.json")["systems"]
    alpha, beta = systems["alpha"], systems["beta"]
    # alpha: ROUGE-L F 5/6 and 2/3 (see test_metrics) -> 0.75; words: "the cat sat on the mat"
    # + "a b c d" = 10, distinct 9; mean length (6 + 4) / 2
    assert alpha["rouge_l"] == pytest.approx(0.75)
    assert alpha["distinct_1"] == pytest.approx(0.9)
    assert alpha["mean_length"] == 5.0
    # bigrams: 5 + 3 = 8, all distinct; trigrams 4 + 2 = 6, all distinct
    assert alpha["distinct_2"] == 1.0 and alpha["distinct_3"] == 1.0
    # beta answers with the references: ROUGE-L 1; words 6 + 2 = 8, distinct 7 (the x2)
    assert beta["rouge_l"] == pytest.approx(1.0)
    assert beta["distinct_1"] == pytest.approx(7 / 8)
    assert beta["mean_length"] == 4.0
    assert "no pairwise win rates" in result.output
    records = load_records(out / "generations.jsonl", "generation")
    assert [(r.model, r.prompt) for r in records] == [
        ("alpha", "Where is the cat?"), ("alpha", "Letters?"), ("beta", "Where is the cat?"), ("beta", "Letters?"),
    ]


def test_systems_with_different_prompts_are_refused(tmp_path, run_cli):
    write_records(tmp_path / "a.jsonl", [
        Generation(id="1", prompt="Where is the cat?", response="x", model="alpha"),
        Generation(id="2", prompt="Letters?", response="y", model="alpha"),
    ])
    write_records(tmp_path / "b.jsonl", [
        Generation(id="1", prompt="Where is the cat?", response="x"),
        Generation(id="3", prompt="Something else?", response="z"),
    ])
    result = run_cli("evaluate", "--generations", tmp_path / "a.jsonl", "--generations", tmp_path / "b.jsonl", "--out", tmp_path / "o")
    assert result.exit_code == 2
    assert "'b'" in result.output and "has 1 prompt(s) that 'alpha'" in result.output and "lacks 1 of its 2" in result.output


def test_judge_must_be_a_known_sequence_reward_model(tmp_path, run_cli, reward_models):
    write_records(tmp_path / "a.jsonl", [Generation(id="1", prompt="q", response="x", model="alpha")])
    base = ["evaluate", "--generations", tmp_path / "a.jsonl", "--out", tmp_path / "o",
            "--rm", f"pref={reward_models['preference']}", "--rm", f"fact={reward_models['factuality']}"]
    result = run_cli(*base, "--judge", "fact")
    assert result.exit_code == 2
    assert "the factuality reward model is a segment model; a judge must be a preference or regression model" in result.output
    result = run_cli(*base, "--judge", "comp")
    assert result.exit_code == 2
    assert "--judge comp: no --rm of that name; valid: preference, factuality" in result.output


def test_bad_options_are_one_line_errors(tmp_path, run_cli, tiny_model_dir):
    result = run_cli("evaluate", "--policy", tiny_model_dir, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "--policy needs --prompts" in result.output
    paper = tmp_path / "paper.json"
    paper.write_text(json.dumps({"rows": [{"system": "x", "metrics": {"rouge_l": "high"}}]}))
    write_records(tmp_path / "a.jsonl", [Generation(id="1", prompt="q", response="x")])
    result = run_cli("evaluate", "--generations", tmp_path / "a.jsonl", "--out", tmp_path / "o", "--paper", paper)
    assert result.exit_code == 2 and "rows[0].metrics.rouge_l must be a number" in result.output
    assert not (tmp_path / "o").exists()


def test_results_table_is_short_and_says_what_it_shows():
    from rlhfkit.stages.evaluate import render_results

    table = {
        "SFT": {"n": 2, "reward/raw/factuality": 0.5, "error_rate/factuality": 0.25, "reward/raw/preference": -0.5,
                "rouge_l": 0.3, "distinct_1": 0.5, "distinct_2": 0.75, "distinct_3": 1.0, "mean_length": 10.0},
        "PPO": {"n": 2, "reward/raw/factuality": 1.5, "error_rate/factuality": 0.125, "reward/raw/preference": -0.5,
                "rouge_l": 0.25, "distinct_1": 0.5, "distinct_2": 0.5, "distinct_3": 0.5, "mean_length": 12.5},
    }
    paper = {"source": "a paper", "rows": [{"system": "FG", "metrics": {"rouge_l": 0.49, "fact (their RM)": 0.8}}]}
    text = render_results(table, [], "preference", 0.0, paper, "2 prompts.")
    assert text.split("\n## Other metrics")[0] == (
        "# rlhfkit evaluate\n\n2 prompts.\n\n"
        "| system | factuality errors | factuality reward | preference score (judge) | ROUGE-L | length (words) |\n"
        "|---|---:|---:|---:|---:|---:|\n"
        "| SFT | 25.0% | +0.5000 | -0.5000 | 0.3000 | 10.0 |\n"
        "| PPO | 12.5% | +1.5000 | -0.5000 | 0.2500 | 12.5 |\n\n"
        # lowest error rate 12.5% (PPO); highest reward 1.5 (PPO); scores equal; ROUGE-L 0.3 (SFT)
        "Best system per column (lowest error rate; highest reward, score and ROUGE-L): factuality errors: PPO (12.5%); "
        "factuality reward: PPO (+1.5000); preference score (judge): all tie (-0.5000); ROUGE-L: SFT (0.3000).\n"
    )
    assert "| system | ROUGE-L | fact (their RM) |\n|---|---:|---:|\n| FG | 0.4900 | 0.8000 |" in text


def scored_system(name: str, scores: list[float]):
    from rlhfkit.stages.evaluate import System

    records = [Generation(id=str(i), prompt=f"p{i}", response="x", model=name) for i in range(len(scores))]
    return System(name, "test", records, scores={"judge": scores})


def test_pairwise_win_rate_intervals_and_verdicts():
    from rlhfkit.stages.evaluate import pairwise_win_rates

    # A beats B on all 6 prompts: every resample's win rate is 1, so [1, 1]: clearly better.
    [row] = pairwise_win_rates([scored_system("A", [1.0] * 6), scored_system("B", [0.0] * 6)], "judge", 0.0, seed=0)
    assert (row["win_rate"], row["win_rate_ci95"], row["verdict"]) == (1.0, [1.0, 1.0], "A clearly better")
    # 3 wins and 3 losses: a resample's win rate is X / 6, X ~ Binomial(6, 1/2); P(X = 0) = 1/64
    # < 2.5% < P(X <= 1) = 7/64, so the 2.5th percentile is 1/6 and, by symmetry, the 97.5th
    # is 5/6 (1,000 seeded resamples; P(X = 0) would need 25 of them, 2.4 sd above its 15.6).
    [row] = pairwise_win_rates([scored_system("A", [1.0, 0.0] * 3), scored_system("B", [0.0, 1.0] * 3)], "judge", 0.0, seed=0)
    assert row["win_rate"] == 0.5 and row["win_rate_ci95"] == pytest.approx([1 / 6, 5 / 6], abs=1e-12)
    assert row["verdict"] == "no clear difference"
    # B ahead on every prompt: the verdict names B.
    [row] = pairwise_win_rates([scored_system("A", [0.0] * 4), scored_system("B", [2.0] * 4)], "judge", 1.0, seed=0)
    assert (row["win_rate"], row["verdict"]) == (0.0, "B clearly better")


def test_a_penalised_source_is_best_where_it_is_lowest_and_the_lead_is_tested():
    from rlhfkit.metrics import ratio_statistic
    from rlhfkit.stages.evaluate import best_systems_sentence, clearly_best

    prompts = ["p1", "p2", "p3", "p4"]
    scores = {"SFT": {"helpfulness": [1.0, 1.0, 0.0, 0.0], "verbosity": [3.0, 3.0, 3.0, 3.0]},
              "PPO": {"helpfulness": [0.0, 0.0, 1.0, 0.9], "verbosity": [1.0, 1.0, 1.0, 1.0]}}
    table = {name: {f"reward/raw/{k}": sum(v) / 4 for k, v in by.items()} for name, by in scores.items()}
    statistics = {name: {f"reward/raw/{k}": ratio_statistic(prompts, v, [1.0] * 4) for k, v in by.items()}
                  for name, by in scores.items()}
    weights = {"helpfulness": 1.0, "verbosity": -0.2}
    columns = ["reward/raw/helpfulness", "reward/raw/verbosity"]
    clearly = clearly_best(table, statistics, columns, weights, seed=0)
    # helpfulness: SFT 0.5 vs PPO 0.475, per-prompt differences 1, 1, -1, -0.9: the interval
    # of the mean difference spans 0. verbosity: PPO lower by 2 on every prompt: [-2, -2], clearly.
    assert clearly == {"reward/raw/helpfulness": False, "reward/raw/verbosity": True}
    sentence = best_systems_sentence(table, columns, None, weights, clearly)
    assert "helpfulness reward: SFT (+0.5000, not clearly)" in sentence
    assert "verbosity reward (penalised): PPO (+1.0000, clearly)" in sentence  # lowest, not SFT's 3.0
    # without weights the highest verbosity is best, as before
    assert "verbosity reward: SFT (+3.0000)" in best_systems_sentence(table, columns, None)


def test_reward_weights_must_name_a_reward_model(tmp_path, run_cli, reward_models):
    write_records(tmp_path / "a.jsonl", [Generation(id="1", prompt="q", response="x", model="alpha")])
    result = run_cli("evaluate", "--generations", tmp_path / "a.jsonl", "--out", tmp_path / "o",
                     "--rm", f"pref={reward_models['preference']}", "--rewards", "pref=1,verbosity=-0.1")
    assert result.exit_code == 2
    assert "--rewards names verbosity, which no --rm is; valid: preference" in result.output


def test_weights_give_weighted_values_and_a_total(tmp_path, run_cli, reward_models):
    write_records(tmp_path / "a.jsonl", [Generation(id="1", prompt="Where is the cat?", response="On the mat. It sleeps.", model="alpha"),
                                         Generation(id="2", prompt="Letters?", response="A and c.", model="alpha")])
    out = tmp_path / "eval"
    result = run_cli("evaluate", "--generations", tmp_path / "a.jsonl", "--out", out, "--device", "cpu",
                     "--rm", f"pref={reward_models['preference']}", "--rm", f"fact={reward_models['factuality']}",
                     "--rewards", "pref=1,fact=-0.5")
    assert result.exit_code == 0, result.output
    alpha = read_json(out / "metrics.json")["systems"]["alpha"]
    # weighted = weight x raw; total = their sum (float64 sums of two values: exact to 1e-12)
    assert alpha["reward/weighted/preference"] == pytest.approx(alpha["reward/raw/preference"], abs=1e-12)
    assert alpha["reward/weighted/factuality"] == pytest.approx(-0.5 * alpha["reward/raw/factuality"], abs=1e-12)
    assert alpha["reward/total"] == pytest.approx(alpha["reward/raw/preference"] - 0.5 * alpha["reward/raw/factuality"], abs=1e-12)
    assert "factuality reward (penalised)" in (out / "results.md").read_text()


def test_published_reward_columns_use_todays_names(tmp_path):
    from rlhfkit.paper_tables import load_paper_table

    # a paper's reward/NAME is a score in its RM's units: evaluate's reward/raw/NAME, aliases resolved
    paper = tmp_path / "paper.json"
    paper.write_text(json.dumps({"rows": [{"system": "FG", "metrics": {
        "reward/fact": 0.5, "reward/weighted/comp": 1.0, "reward/total": 2.0, "error_rate/rel": 0.1}}]}))
    [row] = load_paper_table(paper)["rows"]
    assert row["metrics"] == {"reward/raw/factuality": 0.5, "reward/weighted/completeness": 1.0, "reward/total": 2.0,
                              "error_rate/relevance": 0.1}
