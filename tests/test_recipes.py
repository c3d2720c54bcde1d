"""The recipe runner: every shipped plan resolves (the paper-scale ones are what CI checks),
plan errors name the file and step, variables and foreach expand, steps run in order, and
the shared data and table steps do what they say on hand-made inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit.config import build_config
from rlhfkit.errors import RlhfkitError
from rlhfkit.recipes import (
    RUN_RECORD,
    RecipeConfig,
    collect_results,
    load_plan,
    prompts_from_rows,
    resolve_plan,
    run_recipe,
)
from rlhfkit.schema import Demonstration, Generation, PromptRecord, load_records, write_records
from rlhfkit.tasks.detox import toxicity_table
from rlhfkit.tasks.qa_feedback import (
    qa_answer_records,
    rm_held_out_table,
    shorten_prompts,
    shorten_qa_prompt,
)

REPO = Path(__file__).resolve().parent.parent
PLANS = sorted((REPO / "recipes").glob("**/*.yaml"))
PLANS = [p for p in PLANS if p.parent.name not in ("tiny", "paper")]  # stage configs live there
PAPER_PLANS = [p for p in PLANS if p.name == "paper.yaml"]


def test_every_recipe_folder_has_a_tiny_and_a_paper_plan_and_a_readme():
    folders = sorted(p for p in (REPO / "recipes").iterdir() if p.is_dir())
    assert [f.name for f in folders] == ["critique_revise", "detox", "qa_feedback", "r3hf", "synthetic"]
    for folder in folders:
        assert (folder / "tiny.yaml").is_file() and (folder / "paper.yaml").is_file() and (folder / "README.md").is_file()


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_plan_resolves(plan, monkeypatch):
    """The dry run of every plan: each step's options are known, typed right and validated;
    only checks that read an earlier step's output wait (CI runs this for the paper plans)."""
    monkeypatch.chdir(REPO)
    loaded = load_plan(plan.relative_to(REPO))
    resolved = resolve_plan(loaded)
    assert len(resolved) == len(loaded.steps) >= 3
    for item in resolved:
        if item.deferred:
            assert item.deferred.startswith("checked when it runs: reads "), item.deferred
        elif item.step.stage:
            assert item.config is not None
        assert item.command


def dry_run_through_the_cli(plan, run_cli, monkeypatch) -> str:
    """`rlhfkit recipe PLAN --dry-run` from the repository root: every step resolves; the output."""
    monkeypatch.chdir(REPO)
    result = run_cli("recipe", plan.relative_to(REPO), "--dry-run")
    assert result.exit_code == 0, result.output
    steps = [line for line in result.output.splitlines() if line.startswith("[")]
    assert len(steps) == len(load_plan(plan.relative_to(REPO)).steps)
    assert all(line.endswith((": ok", ": deferred")) for line in steps)
    return result.output


@pytest.mark.parametrize("plan", PAPER_PLANS, ids=lambda p: p.parent.name)
def test_paper_plans_dry_run_through_the_cli(plan, run_cli, monkeypatch, capsys):
    dry_run_through_the_cli(plan, run_cli, monkeypatch)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_unknown_option_in_a_stage_config_names_the_file_and_step(tmp_path):
    write(tmp_path / "cfg/ppo.yaml", "steps: 3\nlearning_rate: 0.1\n")
    plan = write(tmp_path / "plan.yaml", "steps:\n  - stage: ppo\n    config: cfg/ppo.yaml\n    with: {policy: p, prompts: q, out: o, rewards: a=1}\n")
    with pytest.raises(RlhfkitError) as err:
        resolve_plan(load_plan(plan))
    message = str(err.value)
    assert f"{plan}: step 1 (ppo)" in message and f"{tmp_path / 'cfg/ppo.yaml'}: unknown option(s) learning_rate" in message
    assert "valid: " in message and "lr" in message


def test_unknown_option_in_with_names_the_plan_and_step(tmp_path):
    plan = write(tmp_path / "plan.yaml", "steps:\n  - stage: sft\n    name: warm-up\n    with: {model: m, data: d, out: o, epoch: 2}\n")
    with pytest.raises(RlhfkitError, match=r"plan\.yaml: step 1 \(warm-up\): unknown option\(s\) epoch in 'with'; valid: .*epochs"):
        resolve_plan(load_plan(plan))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("steps:\n  - stage: spf\n", r"steps\[1\]: unknown stage 'spf' \(did you mean 'sft'\?\); stages: annotate-import, .*sft"),
        ("steps:\n  - stage: sft\n    call: a:b\n", "give exactly one of 'stage'"),
        ("steps:\n  - stage: sft\n    with: {out: '${nowhere}/x'}\n", r"unknown variable \$\{nowhere\}; defined: plan_dir"),
        ("stepz: []\n", "unknown key.* stepz; valid: description, vars, requires, steps"),
        ("steps:\n  - stage: sft\n    colour: red\n", r"steps\[1\]: unknown key\(s\) colour"),
        ("steps:\n  - stage: ppo\n  - stage: ppo\n", "step name.* ppo used twice"),
        ("steps:\n  - call: rlhfkit.tasks.qa_feedback:shorten_prompts\n    with: {inputs: x, out: y, passagez: 2}\n",
         r"step 1 \(shorten_prompts\): rlhfkit.tasks.qa_feedback:shorten_prompts: got an unexpected keyword argument 'passagez'"),
        ("steps:\n  - call: rlhfkit.recipes:no_such_function\n",
         "call 'rlhfkit.recipes:no_such_function' is not a recipe function; a plan may call only rlhfkit stages"),
    ],
)
def test_plan_errors(tmp_path, body, message):
    plan = write(tmp_path / "plan.yaml", body)
    with pytest.raises(RlhfkitError, match=message):
        resolve_plan(load_plan(plan))


def test_option_types_are_checked(tmp_path):
    plan = write(tmp_path / "plan.yaml", "steps:\n  - stage: ppo\n    with: {policy: p, prompts: q, out: o, rewards: a=1, steps: ten}\n")
    with pytest.raises(RlhfkitError, match=r"step 1 \(ppo\): option steps must be int, got 'ten'"):
        resolve_plan(load_plan(plan))


def test_stage_validation_errors_carry_the_step(tmp_path):
    plan = write(tmp_path / "plan.yaml", "steps:\n  - stage: ppo\n    with: {policy: p, prompts: q, out: o, rewards: a=1, advantage: vtrace}\n")
    with pytest.raises(RlhfkitError, match=r"step 1 \(ppo\): --advantage must be one of gae, grpo, rloo"):
        resolve_plan(load_plan(plan))


def test_variables_foreach_and_overrides(tmp_path):
    plan = write(tmp_path / "plan.yaml", """
vars: {out: runs/x, steps: 4}
steps:
  - stage: ppo
    name: ppo-seed${seed}
    foreach: {seed: [1, 2]}
    with: {policy: p, prompts: q, rewards: a=1, out: "${out}/s${seed}", seed: "${seed}", steps: "${steps}"}
""")
    loaded = load_plan(plan, {"out": "elsewhere"})
    assert [s.name for s in loaded.steps] == ["ppo-seed1", "ppo-seed2"]
    configs = [r.config for r in resolve_plan(loaded)]
    # A whole-string variable keeps its type; a spliced one becomes text.
    assert [(c.seed, c.steps, c.out) for c in configs] == [(1, 4, "elsewhere/s1"), (2, 4, "elsewhere/s2")]
    with pytest.raises(RlhfkitError, match="--set colour: .* has no variable 'colour'; its variables: out, plan_dir, steps"):
        load_plan(plan, {"colour": "red"})


def test_checks_on_an_earlier_steps_output_wait(tmp_path):
    plan = write(tmp_path / "plan.yaml", f"""
steps:
  - call: rlhfkit.tasks.qa_feedback:shorten_prompts
    name: short
    with: {{inputs: {tmp_path}/in, out: {tmp_path}/data}}
  - stage: sft
    with: {{model: m, data: {tmp_path}/data/demonstrations.jsonl, out: {tmp_path}/sft}}
  - stage: sft
    name: sft-missing
    with: {{model: m, data: {tmp_path}/nowhere.jsonl, out: {tmp_path}/sft2}}
""")
    with pytest.raises(RlhfkitError, match=r"step 3 \(sft-missing\): --data .*nowhere.jsonl: no such file"):
        resolve_plan(load_plan(plan))
    write(plan, plan.read_text().rsplit("  - stage: sft\n    name: sft-missing", 1)[0])
    resolved = resolve_plan(load_plan(plan))
    assert resolved[1].deferred.startswith("checked when it runs: reads the output of step 1 (short)")


def test_run_recipe_runs_steps_in_order_and_records_them(tmp_path, capsys):
    write_records(tmp_path / "in/prompts.jsonl", [PromptRecord(id="1", prompt="question: Q? context: wikipage: A text: a b c d | wikipage: B text: e")])
    write(tmp_path / "note.md", "# Note\n\nhello\n")
    plan = write(tmp_path / "plan.yaml", f"""
vars: {{out: {tmp_path}/run}}
steps:
  - call: rlhfkit.tasks.qa_feedback:shorten_prompts
    with: {{inputs: {tmp_path}/in, out: "${{out}}/short", max_words: 2}}
  - call: rlhfkit.recipes:collect_results
    with: {{out: "${{out}}/report.md", title: T, sections: ["{tmp_path}/note.md"]}}
""")
    assert run_recipe(build_config(RecipeConfig, plan=str(plan), dry_run=True))[0]["deferred"] is None
    assert not (tmp_path / "run").exists()
    record = run_recipe(build_config(RecipeConfig, plan=str(plan)))
    assert [r["step"] for r in record] == ["shorten_prompts", "collect_results"]
    assert load_records(tmp_path / "run/short/prompts.jsonl")[0].prompt == "question: Q? context: wikipage: A text: a b"
    assert (tmp_path / "run/report.md").read_text() == "# T\n\n<!-- from " + f"{tmp_path}/note.md" + " -->\n## Note\n\nhello\n"
    saved = json.loads((tmp_path / "run" / RUN_RECORD).read_text())
    assert [s["step"] for s in saved["steps"]] == ["shorten_prompts", "collect_results"]
    again = run_recipe(build_config(RecipeConfig, plan=str(plan), from_step="collect_results"))
    assert [r["step"] for r in again] == ["collect_results"]
    # The resumed run's record keeps the skipped step's entry from the first run (marked), so it
    # still times the whole plan; the total is the kept seconds plus the resumed run's (each rounded
    # to 0.1 s, hence the 0.1 slack).
    resumed = json.loads((tmp_path / "run" / RUN_RECORD).read_text())
    assert [(s["step"], s.get("earlier_run", False)) for s in resumed["steps"]] == [("shorten_prompts", True), ("collect_results", False)]
    assert resumed["steps"][0]["seconds"] == saved["steps"][0]["seconds"]
    assert resumed["seconds"] >= saved["steps"][0]["seconds"] + resumed["steps"][1]["seconds"] - 0.1
    # A damaged record loses only the earlier times: the resumed run goes on and writes a new one.
    write(tmp_path / "run" / RUN_RECORD, '{"steps": [')
    assert [r["step"] for r in run_recipe(build_config(RecipeConfig, plan=str(plan), from_step="collect_results"))] == ["collect_results"]
    assert [s["step"] for s in json.loads((tmp_path / "run" / RUN_RECORD).read_text())["steps"]] == ["collect_results"]
    with pytest.raises(RlhfkitError, match="--from-step nope: no such step .* steps: shorten_prompts, collect_results"):
        run_recipe(build_config(RecipeConfig, plan=str(plan), from_step="nope"))


def test_cli_reports_a_bad_plan_in_one_line(tmp_path, run_cli):
    write(tmp_path / "cfg.yaml", "epoch: 3\n")
    plan = write(tmp_path / "plan.yaml", "steps:\n  - stage: sft\n    config: cfg.yaml\n    with: {model: m, data: d, out: o}\n")
    result = run_cli("recipe", plan, "--dry-run")
    assert result.exit_code == 2
    assert "cfg.yaml: unknown option(s) epoch" in result.output and "step 1 (sft)" in result.output


def test_shorten_qa_prompt():
    prompt = "question: Who? context: wikipage: A text: one two three four | wikipage: B text: five six | wikipage: C text: x"
    assert shorten_qa_prompt(prompt) == "question: Who? context: wikipage: A text: one two three four"
    assert shorten_qa_prompt(prompt, passages=2, max_words=3) == (
        "question: Who? context: wikipage: A text: one two three | wikipage: B text: five six"
    )
    assert shorten_qa_prompt("plain prompt | wikipage: x", 1, 1) == "plain prompt | wikipage: x"


def test_shorten_prompts_cuts_every_record_type_alike(tmp_path):
    prompt = "question: Q? context: wikipage: A text: a b c | wikipage: B text: d"
    write_records(tmp_path / "in/demonstrations.jsonl", [Demonstration(id="d", prompt=prompt, response="r")])
    write_records(tmp_path / "in/prompts.jsonl", [PromptRecord(id="p", prompt=prompt, references=["g"])])
    report = shorten_prompts(str(tmp_path / "in"), str(tmp_path / "out"))
    assert load_records(tmp_path / "out/demonstrations.jsonl")[0].prompt == load_records(tmp_path / "out/prompts.jsonl")[0].prompt
    assert load_records(tmp_path / "out/prompts.jsonl")[0].references == ["g"]
    assert report["files"]["prompts.jsonl"] == {"records": 1, "mean_prompt_words_before": 14.0, "mean_prompt_words_after": 9.0}
    with pytest.raises(RlhfkitError, match="no .jsonl record files"):
        shorten_prompts(str(tmp_path / "empty"), str(tmp_path / "o"))


def test_qa_answer_records_reads_the_shipped_dev_file(tmp_path):
    counts = qa_answer_records([str(REPO / "data/qa_feedback/qa_dev.json")], str(tmp_path), limit=2)
    assert counts == {"prompts": 2, "demonstrations": 2}
    dev = json.loads((REPO / "data/qa_feedback/qa_dev.json").read_text())
    prompts = load_records(tmp_path / "prompts.jsonl")
    assert [p.prompt for p in prompts] == [dev[0]["text"], dev[1]["text"]]
    assert prompts[0].references == dev[0]["answer"]


def test_qa_answer_records_builds_the_prompt_from_passages(tmp_path):
    write(tmp_path / "a.json", json.dumps([{"question": "Q?", "passages": [["T", "S1.", "S2."]], "gold": "G"}]))
    qa_answer_records([str(tmp_path / "a.json")], str(tmp_path / "o"))
    assert load_records(tmp_path / "o/demonstrations.jsonl")[0].prompt == "question: Q? context: wikipage: T text: S1. S2."
    write(tmp_path / "b.json", json.dumps([{"question": "Q?"}]))
    with pytest.raises(RlhfkitError, match=r"b.json: record 0: expected a QA record"):
        qa_answer_records([str(tmp_path / "b.json")], str(tmp_path / "o"))


def test_prompts_from_rows_dotted_field_repeat_and_skip(tmp_path):
    rows = [{"prompt": {"text": f"p{i}"}} for i in range(5)]
    write(tmp_path / "rtp.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    n = prompts_from_rows([str(tmp_path / "rtp.jsonl")], str(tmp_path / "p.jsonl"), field="prompt.text", skip=1, limit=2, repeat=3)
    records = load_records(tmp_path / "p.jsonl")
    assert n == 6 and [r.prompt for r in records] == ["p1"] * 3 + ["p2"] * 3
    with pytest.raises(RlhfkitError, match="no text at field 'prompt.txt'"):
        prompts_from_rows([str(tmp_path / "rtp.jsonl")], str(tmp_path / "q.jsonl"), field="prompt.txt")


def test_toxicity_table_takes_the_max_per_prompt_then_the_mean(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # A stand-in scorer: the share of the words that are "bad".
    write(tmp_path / "scorer_for_test.py",
          "def score(prompts, responses):\n    return [r.split().count('bad') / len(r.split()) for r in responses]\n")
    samples = {("A", "p1"): ["good good", "bad good"], ("A", "p2"): ["good", "good"], ("B", "p1"): ["bad", "good"], ("B", "p2"): ["bad bad", "good"]}
    write_records(tmp_path / "eval/generations.jsonl", [
        Generation(id=f"{s}{p}{i}", prompt=p, response=r, model=s) for (s, p), rs in samples.items() for i, r in enumerate(rs)
    ])
    write(tmp_path / "eval/metrics.json", json.dumps({"systems": {"A": {"distinct_2": 0.5}}}))
    write(tmp_path / "paper.json", json.dumps({"source": "Somebody 2023", "rows": [{"system": "X", "metrics": {"avg_max_toxicity": 0.1}}]}))
    rows = toxicity_table(str(tmp_path / "eval/generations.jsonl"), "py:scorer_for_test:score", str(tmp_path / "t.md"), "T",
                          paper=str(tmp_path / "paper.json"))
    # A: max per prompt (0.5, 0) -> mean 0.25, one prompt at >= 0.5; B: (1, 1) -> 1.0, both.
    assert (rows["A"]["avg_max_toxicity"], rows["A"]["toxicity_probability"]) == (0.25, 0.5)
    assert (rows["B"]["avg_max_toxicity"], rows["B"]["toxicity_probability"]) == (1.0, 1.0)
    table = (tmp_path / "t.md").read_text()
    assert "| A | 0.250 | 0.500 | – | 0.500 | – |" in table and "| X (paper) | 0.100 |" in table


def test_collect_results_links_images_relative_to_the_report(tmp_path):
    write(tmp_path / "a.md", "# A\n")
    write(tmp_path / "runs/x/curve.png", "png")
    text = collect_results(str(tmp_path / "results/r.md"), "R", [str(tmp_path / "a.md")], notes="n", images=[str(tmp_path / "runs/x/curve.png")])
    assert text.endswith("![curve.png](../runs/x/curve.png)\n")
    with pytest.raises(RlhfkitError, match="nothing.md: no such file"):
        collect_results(str(tmp_path / "r.md"), "R", [str(tmp_path / "nothing.md")])


def test_requires_names_inputs_made_by_another_recipe(tmp_path):
    plan = write(tmp_path / "plan.yaml", f"""
vars: {{other: {tmp_path}/other}}
requires: {{"${{other}}/sft": other.yaml (the SFT policy)}}
steps:
  - stage: sft
    with: {{model: m, data: "${{other}}/sft/demonstrations.jsonl", out: {tmp_path}/o}}
""")
    resolved = resolve_plan(load_plan(plan))
    assert resolved[0].deferred.startswith("checked when it runs: reads an input made by other.yaml (the SFT policy)")
    with pytest.raises(RlhfkitError, match=r"plan.yaml needs .*/other/sft \(made by other.yaml \(the SFT policy\)\): run that first"):
        run_recipe(build_config(RecipeConfig, plan=str(plan)))


def test_foreach_takes_a_list_variable(tmp_path):
    plan = write(tmp_path / "plan.yaml", """
vars: {seeds: [3, 5]}
steps:
  - call: rlhfkit.recipes:shorten_qa_prompt
    name: s${seed}
    foreach: {seed: "${seeds}"}
    with: {prompt: "p${seed}", passages: "${seed}"}
""")
    steps = load_plan(plan).steps
    assert [(s.name, s.values) for s in steps] == [("s3", {"prompt": "p3", "passages": 3}), ("s5", {"prompt": "p5", "passages": 5})]


def write_held_out_run(root: Path, aspect: str, kind: str, held_out: dict, clearly: bool) -> Path:
    """A trained RM's files and its `train-rm --eval-only` run, as the stage writes them."""
    trained, scored = root / f"rm-{aspect}", root / f"held-out-{aspect}"
    write(trained / "rm_metrics.json", json.dumps({"train_records": 400, "train_seconds": 690.0}))
    write(trained / "run_config.json", json.dumps({"config": {"lr": 5e-5, "epochs": 2, "max_steps": None, "batch_size": 8}}))
    write(trained / "rlhfkit_rm.json", json.dumps({"backbone": "minilm", "max_length": 512, "max_prompt_length": 128,
                                                   **({"error_class_weight": 2.0} if kind == "segment" else {})}))
    write(scored / "rm_metrics.json", json.dumps({"aspect": aspect, "kind": kind, "reward_model": str(trained), "eval_only": True,
                                                  "held_out": held_out, "beats_baseline_clearly": clearly}))
    return scored


def test_rm_held_out_table_reports_each_aspect_beside_its_baseline(tmp_path):
    factuality = write_held_out_run(tmp_path, "factuality", "segment", {
        "records": 100, "accuracy": 0.8, "majority_baseline_accuracy": 0.7, "accuracy_minus_baseline_ci95": [0.02, 0.18],
        "segments": 150, "error_segments": 45, "predicted_errors": 30, "error_auc": 0.71, "error_auc_ci95": [0.61, 0.8],
        "bootstrap_prompts": 100}, clearly=True)
    completeness = write_held_out_run(tmp_path, "completeness", "preference", {
        "records": 600, "pairwise_accuracy": 0.52, "pairwise_baseline_accuracy": 0.5, "pairwise_accuracy_ci95": [0.47, 0.57],
        "pairs": 530, "bootstrap_prompts": 100}, clearly=False)
    rows = rm_held_out_table(str(tmp_path / "results/qa_rm.md"), "T", [str(factuality), str(completeness)])
    table = (tmp_path / "results/qa_rm.md").read_text()
    # 690 s = 11.5 min; the AUC interval's lower end 0.61 is above 0.5.
    assert ("| factuality | segment accuracy | 0.800 | majority 0.700 | acc - baseline [+0.020, +0.180] | yes "
            "| 0.710 [0.610, 0.800]: above chance | 150 segments (45 errors, 30 flagged), 100 prompts "
            "| minilm, lr 5e-05, 2 epoch(s), max-length 512 (prompt 128), error weight 2; 400 training records, 11.5 min |") in table
    assert ("| completeness | pairwise accuracy | 0.520 | 0.5 (chance) | [0.470, 0.570] | no | – "
            "| 530 decided pairs, 100 prompts |") in table
    saved = json.loads((tmp_path / "results/qa_rm.json").read_text())["aspects"]
    assert saved["factuality"]["interval"] == [0.02, 0.18] and saved["completeness"]["beats_baseline_clearly"] is False
    assert rows["factuality"]["settings"]["error_class_weight"] == 2.0
    training_run = tmp_path / "rm-factuality"  # its rm_metrics.json has no eval_only
    with pytest.raises(RlhfkitError, match="not a `train-rm --eval-only` run"):
        rm_held_out_table(str(tmp_path / "t.md"), "T", [str(training_run)])
    with pytest.raises(RlhfkitError, match="nothing/rm_metrics.json: no such file"):
        rm_held_out_table(str(tmp_path / "t.md"), "T", [str(tmp_path / "nothing")])


def test_rm_held_out_table_labels_two_rms_of_one_aspect(tmp_path):
    """The pretrained-policy plan scores the judge's and the reward RMs of each aspect: one row
    each (keyed by aspect alone, the second would replace the first)."""
    held_out = {"records": 600, "pairwise_accuracy": 0.52, "pairwise_baseline_accuracy": 0.5,
                "pairwise_accuracy_ci95": [0.47, 0.57], "pairs": 530, "bootstrap_prompts": 100}
    judge = write_held_out_run(tmp_path / "judge", "completeness", "preference", held_out, clearly=False)
    reward = write_held_out_run(tmp_path / "reward", "completeness", "preference", {**held_out, "pairwise_accuracy": 0.6}, clearly=False)
    with pytest.raises(RlhfkitError, match="two evaluations of completeness; name the rows with labels"):
        rm_held_out_table(str(tmp_path / "t.md"), "T", [str(judge), str(reward)])
    rows = rm_held_out_table(str(tmp_path / "t.md"), "T", [str(judge), str(reward)], labels=["judge comp", "reward comp"])
    assert {label: row["value"] for label, row in rows.items()} == {"judge comp": 0.52, "reward comp": 0.6}
    table = (tmp_path / "t.md").read_text()
    assert "| judge comp | pairwise accuracy | 0.520 |" in table and "| reward comp | pairwise accuracy | 0.600 |" in table
    with pytest.raises(RlhfkitError, match="labels must name each of the 2 evaluations once"):
        rm_held_out_table(str(tmp_path / "t.md"), "T", [str(judge), str(reward)], labels=["x"])


# --- the pretrained-policy QA table (recipes/qa_feedback/smol_tiny.yaml, smol_paper.yaml) ---

SMOL_PLANS = [REPO / "recipes" / "qa_feedback" / f"smol_{scale}.yaml" for scale in ("tiny", "paper")]


@pytest.mark.parametrize("plan", SMOL_PLANS, ids=lambda p: p.stem)
def test_smol_plans_dry_run_through_the_cli(plan, run_cli, monkeypatch):
    output = dry_run_through_the_cli(plan, run_cli, monkeypatch)
    # Four PPO arms from the same SFT policy with the same settings, one method each: fine-grained,
    # holistic (sparse), R3HF per token and per sentence.
    ppo = [line for line in output.splitlines() if line.strip().startswith("rlhfkit ppo ")]
    assert len(ppo) == 4 and all(f"--policy runs/qa_feedback/{plan.stem.replace('_tiny', '')}/sft " in line for line in ppo)
    assert "--rewards rel=0.3,fact=0.5,comp=0.3" in ppo[0] and "--redistribute" not in ppo[1]
    assert "--redistribute pref:token " in ppo[2] and "--redistribute pref:sentence " in ppo[3]
    # The same settings: every option after the arm's own (--rewards, --rm, --redistribute) agrees.
    assert len({line.split(" --steps ")[1] for line in ppo}) == 1
    # The held-out records' prompts are evaluated, and no training step reads that file.
    evaluate = [line for line in output.splitlines() if line.strip().startswith("rlhfkit evaluate ")]
    assert len(evaluate) == 2 and all("/held-out/prompts.jsonl" in line for line in evaluate)
    training = [line for line in output.splitlines() if line.strip().startswith(("rlhfkit sft ", "rlhfkit ppo "))
                or (line.strip().startswith("rlhfkit train-rm ") and "--eval-only" not in line)]
    assert len(training) == 1 + 7 + 4 and not any("held" in line for line in training)


def test_smol_paper_plan_takes_the_hub_model_by_name(run_cli, monkeypatch):
    monkeypatch.chdir(REPO)
    result = run_cli("recipe", "recipes/qa_feedback/smol_paper.yaml", "--dry-run",
                     "--set", "policy=HuggingFaceTB/SmolLM2-1.7B-Instruct")
    assert result.exit_code == 0, result.output
    sft = [line for line in result.output.splitlines() if line.strip().startswith("rlhfkit sft ")]
    assert len(sft) == 1 and "--model HuggingFaceTB/SmolLM2-1.7B-Instruct " in sft[0]
    assert "--policy instruct=HuggingFaceTB/SmolLM2-1.7B-Instruct" in result.output
    # GPU scale: GAE (the default, so not printed), 200 steps of 16 prompts, 4 PPO epochs.
    assert "--advantage" not in result.output and "--steps 200 --prompts-per-step 16" in result.output
    assert "--ppo-epochs 4" in result.output


def test_smol_second_ppo_seed_reuses_sft_and_rms(run_cli, monkeypatch):
    # The README's second-seed command: the PPO arms get seed 1 and their own folders (and the
    # evaluations and table theirs), while every arm still starts from the one SFT policy and
    # optimises the one set of RMs.
    monkeypatch.chdir(REPO)
    result = run_cli("recipe", "recipes/qa_feedback/smol_tiny.yaml", "--dry-run", "--set", "ppo_seed=1",
                     "--set", "arm_suffix=-seed1", "--set", "results=results/qa_smol_seed1.md")
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.splitlines()]
    ppo = [line for line in lines if line.startswith("rlhfkit ppo ")]
    assert len(ppo) == 4 and all(" --seed 1 " in line + " " and "--policy runs/qa_feedback/smol/sft " in line for line in ppo)
    assert [line.split("--out ")[1].split()[0] for line in ppo] == [
        f"runs/qa_feedback/smol/ppo-{arm}-seed1" for arm in ("fine-grained", "holistic", "r3hf", "r3hf-sentence")]
    assert "--rm pref=runs/qa_feedback/smol/rm/reward-preference" in ppo[1]
    evaluate = [line for line in lines if line.startswith("rlhfkit evaluate ")]
    assert all("--policy fine-grained=runs/qa_feedback/smol/ppo-fine-grained-seed1" in line for line in evaluate)
    assert [line.split("--out ")[1].split()[0] for line in evaluate] == [
        "runs/qa_feedback/smol/evaluate-greedy-seed1", "runs/qa_feedback/smol/evaluate-sampled-seed1"]
    assert "out='results/qa_smol_seed1.md'" in result.output and "(PPO seed 1)" in result.output


def test_split_feedback_file_alternates_records(tmp_path):
    from rlhfkit.tasks.qa_feedback import split_feedback_file

    source = write(tmp_path / "feedback.json", json.dumps([{"question": f"q{i}"} for i in range(5)]))
    assert split_feedback_file(str(source), str(tmp_path / "halves"), ["reward", "judge"]) == {"reward": 3, "judge": 2}
    # Record i goes to names[i % 2]: 0, 2, 4 and 1, 3.
    assert [r["question"] for r in json.loads((tmp_path / "halves" / "reward.json").read_text())] == ["q0", "q2", "q4"]
    assert [r["question"] for r in json.loads((tmp_path / "halves" / "judge.json").read_text())] == ["q1", "q3"]
    with pytest.raises(RlhfkitError, match="distinct"):
        split_feedback_file(str(source), str(tmp_path / "x"), ["a", "a"])
    with pytest.raises(RlhfkitError, match="JSON list of at least 2"):
        split_feedback_file(str(write(tmp_path / "one.json", "[{}]")), str(tmp_path / "y"), ["a", "b"])


SMOL_REWARD = {"relevance": "rel", "factuality": "fact", "completeness": "comp", "preference": "pref"}
SMOL_JUDGE = {"relevance": "j-rel", "factuality": "j-fact", "completeness": "j-comp"}


def smol_generation(system: str, prompt_id: str, response: str, flags: dict, rewards: dict) -> Generation:
    return Generation(id=f"{system}:{prompt_id}", prompt=f"question: {prompt_id}? context: wikipage: T text: x", response=response,
                      model=system, meta={"prompt_id": prompt_id, "rewards": rewards, "error_flags": flags})


def test_smol_figures_by_hand():
    from rlhfkit.tasks.qa_feedback import smol_figures

    records = [
        smol_generation("S", "p1", "the cat sat", {"rel": [1, 2], "fact": [0, 1], "j-rel": [2, 2], "j-fact": [1, 1]},
                        {"comp": 1.0, "pref": 0.5, "j-comp": -1.0}),
        smol_generation("S", "p2", "dogs bark loudly today", {"rel": [0, 2], "fact": [1, 3], "j-rel": [0, 2], "j-fact": [0, 3]},
                        {"comp": 3.0, "pref": -0.5, "j-comp": 1.0}),
    ]
    references = {"p1": ["the cat sat"], "p2": ["no shared words"]}
    figures = smol_figures(records, references, SMOL_REWARD, SMOL_JUDGE, seed=0)
    # Pooled error rates: (1 + 0) / (2 + 2), (0 + 1) / (1 + 3), (2 + 0) / (2 + 2), (1 + 0) / (1 + 3).
    assert figures["reward/relevance_errors"][0] == 0.25 and figures["reward/factuality_errors"][0] == 0.25
    assert figures["judge/relevance_errors"][0] == 0.5 and figures["judge/factuality_errors"][0] == 0.25
    # Means per response: (1 + 3) / 2, (0.5 - 0.5) / 2, (-1 + 1) / 2; ROUGE-L 1 (identical) and 0; 3 and 4 words.
    assert figures["reward/completeness"][0] == 2.0 and figures["reward/preference"][0] == 0.0
    assert figures["judge/completeness"][0] == 0.0
    assert figures["rouge_l"][0] == 0.5 and figures["length"][0] == 3.5
    # Two prompts: a resample is {p1, p1}, {p1, p2} or {p2, p2} (probabilities 1/4, 1/2, 1/4), so the
    # 95% percentile interval runs from the {p2, p2} value to the {p1, p1} one (or the reverse):
    # relevance errors 0/4 .. 2/4; completeness 1 .. 3; ROUGE-L 0 .. 1.
    assert figures["reward/relevance_errors"][1] == [0.0, 0.5]
    assert figures["reward/completeness"][1] == [1.0, 3.0]
    assert figures["rouge_l"][1] == [0.0, 1.0]


def smol_figure_set(rel, fact, j_rel, j_fact, j_comp, pref, rouge) -> dict:
    return {"reward/relevance_errors": rel, "reward/factuality_errors": fact, "reward/completeness": (0.0, [0.0, 0.0]),
            "reward/preference": pref, "judge/relevance_errors": j_rel, "judge/factuality_errors": j_fact,
            "judge/completeness": j_comp, "rouge_l": rouge, "length": (50.0, [40.0, 60.0])}


def test_smol_goals_by_hand():
    from rlhfkit.tasks.qa_feedback import clearly_better, overlap, smol_goals

    # Intervals that do not overlap decide; touching ones overlap.
    assert clearly_better((0.1, [0.05, 0.15]), (0.3, [0.2, 0.4]), lower_is_better=True)
    assert not clearly_better((0.1, [0.05, 0.2]), (0.3, [0.2, 0.4]), lower_is_better=True)
    assert clearly_better((0.5, [0.45, 0.55]), (0.3, [0.2, 0.4]), lower_is_better=False)
    assert not clearly_better((0.1, None), (0.3, [0.2, 0.4]), lower_is_better=True)
    assert overlap((0.1, [0.05, 0.2]), (0.3, [0.2, 0.4])) and not overlap((0.1, [0.05, 0.15]), (0.3, [0.2, 0.4]))

    low, high = (0.10, [0.05, 0.15]), (0.30, [0.20, 0.40])
    pref = (0.0, [-0.1, 0.1])
    sft = smol_figure_set(high, high, high, high, (0.0, [-0.1, 0.1]), pref, (0.400, [0.35, 0.45]))
    # Fine-grained: every error rate clearly below SFT's and holistic's; ROUGE-L 0.395 >= 0.400 - 0.01.
    fine = smol_figure_set(low, low, low, low, (0.0, [-0.1, 0.1]), (0.05, [-0.05, 0.15]), (0.395, [0.35, 0.44]))
    holistic = smol_figure_set(high, high, high, high, (0.0, [-0.1, 0.1]), (0.1, [0.0, 0.2]), (0.4, [0.35, 0.45]))
    # R3HF: the judge's completeness clearly above holistic's, nothing clearly worse.
    r3hf = smol_figure_set(high, high, high, high, (0.5, [0.2, 0.8]), pref, (0.4, [0.35, 0.45]))
    figures = {"SFT": sft, "FG": fine, "H": holistic, "R": r3hf}
    goals = smol_goals(figures, sft="SFT", fine_grained="FG", holistic="H", r3hf="R")
    assert {g: (v["met"], v["by_reward_rms"]) for g, v in goals.items()} == {"a": (True, True), "b": (True, True), "c": (True, False)}
    assert "judge/factuality_errors: FG 0.100 [0.050, 0.150] vs SFT 0.300 [0.200, 0.400]" in goals["a"]["evidence"]

    # ROUGE-L 0.389 < 0.400 - 0.01: (a) not met although the error rates are.
    figures["FG"] = {**fine, "rouge_l": (0.389, [0.34, 0.44])}
    assert not smol_goals(figures, sft="SFT", fine_grained="FG", holistic="H", r3hf="R")["a"]["met"]
    # The judge's relevance errors overlap SFT's: (a) not met by the judge, still met by the reward RMs
    # (the reward-hacking signature).
    figures["FG"] = {**fine, "judge/relevance_errors": (0.18, [0.1, 0.25])}
    goals = smol_goals(figures, sft="SFT", fine_grained="FG", holistic="H", r3hf="R")
    assert (goals["a"]["met"], goals["a"]["by_reward_rms"]) == (False, True)
    # Preference scores that do not overlap are not comparable: (b) not met.
    figures["FG"] = {**fine, "reward/preference": (0.5, [0.3, 0.7])}
    assert not smol_goals(figures, sft="SFT", fine_grained="FG", holistic="H", r3hf="R")["b"]["met"]
    # R3HF clearly better on completeness but clearly worse on factuality errors: (c) not met.
    figures["R"] = {**r3hf, "judge/factuality_errors": (0.6, [0.5, 0.7])}
    assert not smol_goals(figures, sft="SFT", fine_grained="FG", holistic="H", r3hf="R")["c"]["met"]
    # Two R3HF arms (per token, per sentence): one verdict each, named. R is clearly worse on the
    # judge's factuality errors (not met); R2 is R3HF's first set above (met by the judge only).
    figures["R2"] = r3hf
    goals = smol_goals(figures, sft="SFT", fine_grained="FG", holistic="H", r3hf=["R", "R2"])
    assert {g: v["met"] for g, v in goals.items() if g.startswith("c")} == {"c: R": False, "c: R2": True}
    assert not goals["c: R2"]["by_reward_rms"] and goals["c: R2"]["evidence"].startswith("judge/relevance_errors: R2 0.300")


def test_smol_table_from_evaluate_outputs(tmp_path):
    from rlhfkit.tasks.qa_feedback import smol_table

    prompts = [PromptRecord(id=f"p{i}", prompt=f"question: Who is {i}? context: wikipage: T text: x", references=[f"gold {i}"])
               for i in range(2)]
    write_records(tmp_path / "prompts.jsonl", prompts)
    names = list(SMOL_REWARD.values()) + list(SMOL_JUDGE.values())

    def answers(system: str, flagged: int, comp: float) -> list[Generation]:
        return [Generation(id=f"{system}:{p.id}", prompt=p.prompt, response=f"gold {i}" if system == "SFT" else "other words",
                           model=system, meta={"prompt_id": p.id, "rewards": {n: comp for n in names},
                                               "error_flags": {n: [flagged, 2] for n in names if "rel" in n or "fact" in n}})
                for i, p in enumerate(prompts)]

    for decoding in ("greedy", "sampled"):
        records = answers("SFT", 1, 0.0) + answers("FG", 0, 0.0) + answers("H", 1, 0.0) + answers("R", 1, 1.0) + answers("R2", 1, 0.0)
        write_records(tmp_path / decoding / "generations.jsonl", records)
    for arm in ("FG", "H", "R"):
        write(tmp_path / arm / "metrics.jsonl", '{"step": 1, "reward/total": -0.5, "kl": 0.0}\n{"step": 2, "reward/total": 0.25, "kl": 0.01}\n')
    write(tmp_path / "rm_quality.md", "# RM quality\n\nsome table\n")
    write(tmp_path / "recipe_run.json", json.dumps({"steps": [{"step": "sft", "seconds": 90.0, "earlier_run": True},
                                                              {"step": "ppo", "seconds": 30.4}], "seconds": 120.4}))
    result = smol_table(str(tmp_path / "qa_smol.md"), "T", {d: str(tmp_path / d) for d in ("greedy", "sampled")},
                        str(tmp_path / "prompts.jsonl"), {"sft": "SFT", "fine_grained": "FG", "holistic": "H", "r3hf": ["R", "R2"]},
                        SMOL_REWARD, SMOL_JUDGE, {arm: str(tmp_path / arm) for arm in ("FG", "H", "R")},
                        sections=[str(tmp_path / "rm_quality.md")], timings=str(tmp_path / "recipe_run.json"))
    report = (tmp_path / "qa_smol.md").read_text()
    with pytest.raises(RlhfkitError, match=r"systems.r3hf must be a system name or a list of them, not 3"):
        smol_table(str(tmp_path / "x.md"), "T", {"greedy": str(tmp_path / "greedy")}, str(tmp_path / "prompts.jsonl"),
                   {"sft": "SFT", "fine_grained": "FG", "holistic": "H", "r3hf": 3}, SMOL_REWARD, SMOL_JUDGE, {})
    assert not (tmp_path / "x.md").exists()
    # Every response of FG has 0 of 2 segments flagged, SFT's 1 of 2: rates 0 and 0.5 on both prompts,
    # so each interval is a point and they do not overlap; ROUGE-L: SFT 1 (the gold), FG 0: (a) not met.
    fg = result["decodings"]["greedy"]["figures"]["FG"]
    assert fg["judge/relevance_errors"] == (0.0, [0.0, 0.0]) and fg["rouge_l"] == (0.0, [0.0, 0.0])
    assert not result["decodings"]["greedy"]["goals"]["a"]["met"] and result["decodings"]["greedy"]["goals"]["b"]["met"]
    assert "| (a) | **not met** | not met |" in report and "| (b) | **met** | met |" in report
    # Two R3HF arms, one verdict each: R's judged completeness 1 against H's 0 (points: clearly better)
    # and nothing worse; R2 equals H on everything.
    assert "| (c: R) | **met** | met |" in report and "| (c: R2) | **not met** | not met |" in report
    # The audit row: PPO's reward/total from step 1 to step 2, and FG's changes against SFT (0 - 0.5 errors).
    assert "| FG | 2 steps, reward/total -0.500 (step 1) -> +0.250 (step 2), KL 0.0100 | -0.500 / -0.500 / +0.000 |" in report
    assert "**Q: Who is 0?**" in report and "- gold: gold 0" in report and "- FG: other words" in report
    assert "## RM quality" in report and "| sft (an earlier run of the plan; reused) | 90 |" in report and "| ppo | 30 |" in report
    assert "| all steps above | 120 (2.0 min) |" in report
