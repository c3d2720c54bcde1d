"""Issue 26 (items 1-6): hostile inputs, second pass. Each test reproduces one reported case: a
plan that reads and writes files anywhere or names Python code, redistribute --html over its
own files, a damaged rlhfkit_rm.json, UltraFeedback's pairs growing quadratically, a damaged
checkpoint on --resume, and lone surrogates in JSONL."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
from transformers import AutoModel

from rlhfkit.config import build_config
from rlhfkit.errors import RlhfkitError
from rlhfkit.io import write_json
from rlhfkit.models import load_tokenizer, model_dir, model_output_dir, save_model
from rlhfkit.rewards.reward_model import SPEC_FILE, load_reward_model, read_spec, reward_model_class
from rlhfkit.rewards.shared_backbone import MultiAspectRewardModel
from rlhfkit.runs import abandon_unstarted_runs
from rlhfkit.schema import (
    Demonstration,
    Generation,
    Preference,
    PromptRecord,
    load_records,
    write_records,
)
from rlhfkit.stages import annotate_import


def one_line_error(result) -> str:
    """The output of a refused command: one `error:` line, no traceback."""
    text = result.output.strip()
    assert "Traceback" not in text, text
    assert text.startswith("error: "), text
    return " ".join(text.split())  # rich may wrap a long line


# --- 1. a plan reads and writes only in its roots, and names no Python code -------------------


@pytest.fixture
def plan_dirs(tmp_path, monkeypatch) -> tuple[Path, Path, Path]:
    """(the plan's folder, the working directory, a folder outside both holding secret.md)."""
    plan_dir, work, outside = tmp_path / "plan", tmp_path / "work", tmp_path / "outside"
    for folder in (plan_dir, work, outside):
        folder.mkdir()
    (outside / "secret.md").write_text("the secret\n")
    monkeypatch.chdir(work)
    return plan_dir, work, outside


def write_plan(plan_dir: Path, steps: str) -> Path:
    plan = plan_dir / "plan.yaml"
    plan.write_text("vars: {out: runs/x}\nsteps:\n" + textwrap.dedent(steps))
    return plan


@pytest.mark.parametrize("section", ["/etc/passwd", "../outside/secret.md", "link/secret.md"])
def test_item1_a_plan_reads_nothing_outside_its_folder_and_working_directory(plan_dirs, run_cli, section):
    plan_dir, work, outside = plan_dirs
    (plan_dir / "link").symlink_to(outside)  # a symlink shipped in the plan's folder escapes it
    if section.startswith("link/"):
        section = f"{plan_dir}/{section}"
    plan = write_plan(plan_dir, f"""\
        - call: rlhfkit.recipes:collect_results
          with: {{out: report.md, title: T, sections: ["{section}"]}}
        """)
    for extra in (["--dry-run"], []):
        result = run_cli("recipe", plan, *extra)
        assert result.exit_code == 2, result.output
        error = one_line_error(result)
        assert f"step 1 (collect_results): sections: {section}" in error
        assert "lies outside the plan's folder, the working directory and --set out" in error
    assert not (work / "report.md").exists()


def test_item1_a_directory_a_plan_reads_holds_no_symlink_out(plan_dirs, run_cli):
    plan_dir, work, outside = plan_dirs
    (work / "data/inner").mkdir(parents=True)
    (work / "data/inner/loop").symlink_to(work / "data")  # a loop inside the roots is walked once
    plan = write_plan(plan_dir, """\
        - call: rlhfkit.tasks.qa_feedback:shorten_prompts
          with: {inputs: data, out: short}
        """)
    result = run_cli("recipe", plan, "--dry-run")
    assert result.exit_code == 0, result.output
    (work / "data/inner/secret.jsonl").symlink_to(outside / "secret.md")
    result = run_cli("recipe", plan, "--dry-run")
    assert result.exit_code == 2, result.output
    assert (f"step 1 (shorten_prompts): inputs: data/inner/secret.jsonl (= {outside}/secret.md) lies outside the "
            "plan's folder") in one_line_error(result)


def test_item1_a_plan_writes_no_code(plan_dirs, run_cli, tmp_path):
    """The reported chain: collect_results writes evil_judge.py into the working directory
    (then `py:evil_judge:score`), or a .pth file into a site-packages directory."""
    plan_dir, work, _ = plan_dirs
    site = work / "venv/lib/python3.12/site-packages"
    site.mkdir(parents=True)
    cases = {
        "evil_judge.py": "is not a data file (.md, .json, .jsonl, .png, .html, .csv, .txt)",
        "Makefile": "is not a data file",
        f"{site}/evil.pth": "lies in a Python site directory",
        f"{site}/notes.md": "lies in a Python site directory",
        ".git/hooks/notes.md": "lies in a hidden directory",
        f"{tmp_path}/outside/notes.md": "lies outside the plan's folder",
    }
    for out, refusal in cases.items():
        plan = write_plan(plan_dir, f"""\
            - call: rlhfkit.recipes:collect_results
              with: {{out: "{out}", title: T, notes: "import os; os.system('touch pwned')", sections: []}}
            """)
        result = run_cli("recipe", plan)
        assert result.exit_code == 2, (out, result.output)
        assert refusal in one_line_error(result), out
    assert sorted(p.name for p in work.rglob("*") if p.is_file()) == []
    # A stage step's --out falls under the same rule.
    plan = write_plan(plan_dir, f"""\
        - stage: annotate-import
          with: {{format: pairwise, inputs: [x.jsonl], out: "{site}/evil"}}
        """)
    result = run_cli("recipe", plan, "--dry-run")
    assert result.exit_code == 2 and "step 1 (annotate-import): out: " in one_line_error(result)
    assert "lies in a Python site directory" in one_line_error(result)
    # --set out names a tree outside the working directory: the plan may write there.
    plan = write_plan(plan_dir, """\
        - call: rlhfkit.recipes:collect_results
          with: {out: "${out}/notes.md", title: T, sections: []}
        """)
    assert run_cli("recipe", plan, "--set", f"out={tmp_path}/chosen").exit_code == 0
    assert (tmp_path / "chosen/notes.md").read_text() == "# T\n"


def test_item1_py_names_in_a_plan_need_allow_python(plan_dirs, run_cli):
    plan_dir, work, _ = plan_dirs
    (work / "evil_judge.py").write_text("import pathlib\npathlib.Path('pwned').touch()\n"
                                        "def score(prompts, responses):\n    return [0.0] * len(responses)\n")
    (plan_dir / "ppo.yaml").write_text("rm: ['x=py:evil_judge:score']\n")
    plans = {
        "a call's option": """\
            - call: rlhfkit.tasks.detox:toxicity_table
              with: {generations: g.jsonl, scorer: "py:evil_judge:score", out: t.md, title: T}
            """,
        "a stage's option": """\
            - stage: ppo
              with: {policy: p, prompts: p.jsonl, rm: ["x=py:evil_judge:score"], out: o}
            """,
        "a stage's config file": """\
            - stage: ppo
              config: ppo.yaml
              with: {policy: p, prompts: p.jsonl, out: o}
            """,
    }
    for where, steps in plans.items():
        plan = write_plan(plan_dir, steps)
        result = run_cli("recipe", plan, "--dry-run")
        assert result.exit_code == 2, (where, result.output)
        assert ("step 1 " in one_line_error(result) and "py:evil_judge:score is Python code, which would run with your "
                "permissions; run the plan with --allow-python if you trust it") in one_line_error(result), where
    plan = write_plan(plan_dir, "- stage: sft\n  with: {model: m, data: d.jsonl, out: o}\n")
    plan.write_text(plan.read_text().replace("vars: {out: runs/x}", "vars: {out: runs/x, judge: 'py:evil_judge:score'}"))
    assert "vars: py:evil_judge:score is Python code" in one_line_error(run_cli("recipe", plan, "--dry-run"))
    assert not (work / "pwned").exists()  # nothing was imported
    # With the flag the plan resolves (its dry run imports nothing), and rlhfkit's own py:
    # functions never need it.
    plan = write_plan(plan_dir, plans["a call's option"])
    assert run_cli("recipe", plan, "--dry-run", "--allow-python").exit_code == 0
    plan = write_plan(plan_dir, plans["a call's option"].replace("py:evil_judge:score", "py:rlhfkit.tasks.detox:word_list_toxicity"))
    assert run_cli("recipe", plan, "--dry-run").exit_code == 0
    assert not (work / "pwned").exists()


# --- 2. redistribute --html is checked like --out ---------------------------------------------


def test_item2_redistribute_html_never_overwrites_its_inputs_or_out(tmp_path, run_cli):
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "rlhfkit_rm.json").write_text('{"kind": "preference"}\n')
    data = tmp_path / "gen.jsonl"
    write_records(data, [Generation(id="g", prompt="p", response="r", model="m")])
    out = tmp_path / "tokens.jsonl"
    out.write_text("earlier output\n")
    before = {p: p.read_bytes() for p in (rm / "rlhfkit_rm.json", data, out)}
    cases = {
        str(data): "--html must be a .html file, got",
        str(out): "--html must be a .html file, got",
        str(rm / "rlhfkit_rm.json"): "--html must be a .html file, got",
        str(rm / "heat.html"): f"--html {rm / 'heat.html'} lies in an input of this run ({rm}); choose another --html",
        str(tmp_path): "--html must be a .html file",
    }
    for html, message in cases.items():
        result = run_cli("redistribute", "--rm", rm, "--input", data, "--out", out, "--html", html)
        assert result.exit_code == 2, (html, result.output)
        assert message in one_line_error(result), html
    # An --input named .html is still an input; --out may not go into the RM either.
    page = tmp_path / "page.html"
    page.write_text(data.read_text())
    result = run_cli("redistribute", "--rm", rm, "--input", page, "--out", out, "--html", page)
    assert f"--html {page} is an input of this run ({page}); choose another --html" in one_line_error(result)
    result = run_cli("redistribute", "--rm", rm, "--input", data, "--out", rm / "tokens.jsonl")
    assert f"--out {rm / 'tokens.jsonl'} lies in an input of this run ({rm})" in one_line_error(result)
    assert {p: p.read_bytes() for p in before} == before and sorted(p.name for p in rm.iterdir()) == ["rlhfkit_rm.json"]


# --- 3. a damaged rlhfkit_rm.json is one line naming the file and the field -------------------


def save_rm(model_dir: Path, out: Path, kind: str) -> Path:
    """A reward-model directory as train-rm leaves it (untrained head)."""
    tokenizer = load_tokenizer(model_dir)
    model = reward_model_class(kind).from_pretrained(model_dir, num_labels=2 if kind == "segment" else 1)
    model.config.pad_token_id = tokenizer.pad_token_id
    save_model(model, tokenizer, out)
    spec = {"format": 1, "aspect": "a", "kind": kind, "max_length": 64, "max_prompt_length": None,
            "truncation_side": "left", "granularity": "sentence" if kind == "segment" else "response"}
    if kind == "segment":
        spec.update(positive_reward=0.5, negative_reward=-0.5, segment_pooling="end")
    else:
        spec["normalization"] = {"mean": 0.0, "std": 1.0, "computed_on": "train"}
    write_json(model_output_dir(out) / SPEC_FILE, spec)  # beside the weights, as train-rm saves it
    return out


@pytest.fixture(scope="module")
def rm_dirs(make_tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rms")
    model = make_tiny_model("gpt2")
    return {kind: save_rm(model, root / kind, kind) for kind in ("preference", "segment")}


def damaged(rm: Path, tmp_path: Path, edit) -> Path:
    """A copy of `rm` whose rlhfkit_rm.json `edit` changed (a dict -> a dict, or bytes)."""
    copy = tmp_path / f"damaged-{rm.name}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(rm, copy)
    spec_path = model_dir(copy) / "rlhfkit_rm.json"
    if isinstance(edit, bytes):
        spec_path.write_bytes(edit)
    else:
        spec = json.loads(spec_path.read_text())
        edit(spec)
        spec_path.write_text(json.dumps(spec))
    return copy


PREFERENCE_DAMAGE = {
    "no normalization": (lambda s: s.pop("normalization"), "normalization must be an object with mean and std, got None"),
    "max_length abc": (lambda s: s.update(max_length="abc"), "max_length must be a whole number >= 1, got 'abc'"),
    "max_length -5": (lambda s: s.update(max_length=-5), "max_length must be a whole number >= 1, got -5"),
    "std 0": (lambda s: s["normalization"].update(std=0), "normalization.std must be a finite number > 0, got 0"),
    "mean text": (lambda s: s["normalization"].update(mean="0"), "normalization.mean must be a finite number, got '0'"),
    "not UTF-8": (b'{"aspect": "\xff"}', "not UTF-8 text (byte 12)"),
    "a number": (b"5", "the file holds int 5, not a JSON object"),
    "kind swapped": (
        lambda s: s.update(kind="segment", granularity="sentence", positive_reward=1, negative_reward=-1),
        "kind 'segment' needs a head of 2 output(s), but ",
    ),
}


@pytest.mark.parametrize("case", PREFERENCE_DAMAGE)
def test_item3_a_damaged_sequence_rm_spec_is_one_line(rm_dirs, tmp_path, run_cli, case):
    edit, message = PREFERENCE_DAMAGE[case]
    rm = damaged(rm_dirs["preference"], tmp_path, edit)
    data = tmp_path / "gen.jsonl"
    write_records(data, [Generation(id="g", prompt="a question", response="An answer.", model="m")])
    result = run_cli("redistribute", "--rm", rm, "--input", data, "--out", tmp_path / "tokens.jsonl")
    assert result.exit_code == 2, result.output
    error = one_line_error(result)
    assert f"{model_dir(rm)}/rlhfkit_rm.json: " in error and message in error, error
    assert error.endswith("re-save the model with `rlhfkit train-rm`)" if case == "kind swapped" else
                          "re-save the model with `rlhfkit train-rm`"), error


@pytest.mark.parametrize("field, message", [
    ("granularity", "granularity is None; a segment RM's is one of sentence, subsentence, step"),
    ("positive_reward", "positive_reward must be a finite number, got None"),
])
def test_item3_a_segment_rm_spec_missing_a_field_is_one_line(rm_dirs, tmp_path, field, message):
    rm = damaged(rm_dirs["segment"], tmp_path, lambda s: s.pop(field))
    with pytest.raises(RlhfkitError, match=f"^{model_dir(rm)}/rlhfkit_rm.json: {message}; re-save"):
        load_reward_model(rm)


def test_item3_std_0_in_ppo_and_evaluate_is_one_line_not_a_loss_or_json_failure(rm_dirs, tiny_model_dir, tmp_path, run_cli):
    rm = damaged(rm_dirs["preference"], tmp_path, lambda s: s["normalization"].update(std=0))
    prompts = tmp_path / "prompts.jsonl"
    write_records(prompts, [PromptRecord(id=f"p{i}", prompt=f"question {i}?") for i in range(2)])
    message = f"{model_dir(rm)}/rlhfkit_rm.json: normalization.std must be a finite number > 0, got 0"
    result = run_cli("ppo", "--policy", tiny_model_dir, "--prompts", prompts, "--rm", f"pref={rm}", "--rewards", "pref=1",
                     "--out", tmp_path / "ppo", "--steps", "1", "--prompts-per-step", "2", "--samples-per-prompt", "1",
                     "--minibatch-size", "1", "--max-new-tokens", "4")
    assert result.exit_code == 2 and message in one_line_error(result)
    result = run_cli("evaluate", "--policy", f"m={tiny_model_dir}", "--prompts", prompts, "--rm", f"pref={rm}",
                     "--out", tmp_path / "eval", "--max-new-tokens", "4")
    assert result.exit_code == 2 and message in one_line_error(result)


def test_item3_shared_backbone_spec_and_heads(tiny_model_dir, tmp_path):
    spec = {"aspect": "a,b", "kind": "multi_aspect", "max_length": 64,
            "aspects": {"a": {"kind": "segment", "granularity": "sentence", "positive_reward": 1, "negative_reward": -1},
                        "b": {"kind": "preference", "normalization": {"mean": 0, "std": 0}}}}
    write_json(tmp_path / "rlhfkit_rm.json", spec)
    with pytest.raises(RlhfkitError, match=r"rlhfkit_rm.json: aspects.b.normalization.std must be a finite number > 0, got 0; re-save"):
        read_spec(tmp_path)
    # An aspect's kind edited from segment to preference: its saved head (hidden size 64) no longer fits.
    backbone = AutoModel.from_pretrained(tiny_model_dir)
    MultiAspectRewardModel(backbone, {"a": "segment"}).save_pretrained(tmp_path / "shared")
    with pytest.raises(RlhfkitError, match=r"aspect_heads.safetensors: a.weight has shape \(2, 64\), but aspect 'a' is a "
                                           r"preference head of shape \(1, 64\); the file does not match rlhfkit_rm.json"):
        MultiAspectRewardModel(backbone, {"a": "preference"}).load_heads(tmp_path / "shared")


# --- 4. UltraFeedback --pairs all: no quadratic growth -----------------------------------------


def ultrafeedback_row(completions: int) -> dict:
    rated = {"Rating": "3", "Rationale": "ok"}
    return {"instruction": "Say hi.", "completions": [
        {"response": f"hi {c}", "annotations": {a: rated for a in ("instruction_following", "honesty", "truthfulness", "helpfulness")}}
        for c in range(completions)
    ]}


def test_item4_ultrafeedback_all_pairs_of_a_huge_row_is_refused_in_one_line(tmp_path, run_cli):
    data = tmp_path / "uf.jsonl"
    data.write_text(json.dumps(ultrafeedback_row(4)) + "\n" + json.dumps(ultrafeedback_row(100)) + "\n")
    result = run_cli("annotate-import", "--format", "ultrafeedback", data, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    # 100 completions: 100 x 99 / 2 = 4,950 pairs per aspect (1,000 made the 2.0M reported).
    assert (f"{data}:2: 100 completions: --pairs all would make 4,950 preferences per aspect; it takes at most 16 "
            "completions per row (use --pairs best-vs-worst)") in one_line_error(result)
    assert not (tmp_path / "out").exists()
    # --skip-invalid drops that row; the 4-completion row gives 4 aspects x 6 pairs, all ties.
    result = run_cli("annotate-import", "--format", "ultrafeedback", data, "--out", tmp_path / "out", "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "out/preferences.jsonl").read_text().splitlines()) == 24
    # best-vs-worst stays linear: one pair per aspect, none here (all rated 3).
    result = run_cli("annotate-import", "--format", "ultrafeedback", data, "--out", tmp_path / "bvw", "--pairs", "best-vs-worst")
    assert result.exit_code == 0, result.output


# --- 5. --resume from a damaged checkpoint: the one before it, or one line ---------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # what a full disk or a cut copy leaves


def stage_args(stage: str, model: Path, tmp_path: Path) -> list:
    """Checkpoints step-1 and step-2 (sft and train-rm save the last step as the model, not a checkpoint)."""
    if stage == "ppo":
        data = tmp_path / "prompts.jsonl"
        write_records(data, [PromptRecord(id=f"p{i}", prompt=f"question: what is {i}? answer:") for i in range(4)])
        return ["ppo", "--policy", model, "--prompts", data, "--prompts-per-step", "2", "--samples-per-prompt", "2",
                "--minibatch-size", "2", "--ppo-epochs", "1", "--max-new-tokens", "8", "--max-prompt-length", "32",
                "--rewards", "judge=1", "--rm", "judge=py:tests.judges:count_letters_e", "--steps", "2",
                "--save-every", "1", "--keep-checkpoints", "2"]
    data = tmp_path / "data.jsonl"
    if stage == "sft":
        write_records(data, [Demonstration(id=f"d{i}", prompt=f"q{i}?", response=f" answer {i}.") for i in range(4)])
        extra = []
    else:
        write_records(data, [Preference(id=f"p{i}", prompt=f"q{i}?", chosen=f" good {i}.", rejected=" bad.") for i in range(4)])
        extra = ["--aspect", "preference"]
    return [stage, "--model", model, "--data", data, *extra, "--batch-size", "2", "--max-steps", "3",
            "--eval-fraction", "0", "--save-every", "1", "--keep-checkpoints", "2"]


@pytest.mark.parametrize("stage", ["sft", "train-rm", "ppo"])
def test_item5_resume_passes_over_a_damaged_checkpoint_to_the_one_before(stage, tiny_model_dir, tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)  # py:tests.judges
    out = tmp_path / "run"
    args = [*stage_args(stage, tiny_model_dir, tmp_path), "--out", out]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    step1, step2 = out / "checkpoints/step-1", out / "checkpoints/step-2"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    truncate(step2 / "model.safetensors")
    result = run_cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert (f"{step2}/model.safetensors is damaged (Error while deserializing header: incomplete metadata, file not "
            "fully covered); trying the checkpoint before it") in text
    assert f"resuming from {step1}" in text and "Traceback" not in text
    # Step 2 was trained again from step 1 and saved whole over the damaged copy.
    assert result.exit_code == 0 and checkpoint_reads(step2)
    # Both damaged: one line naming each bad file, exit 2.
    truncate(step2 / "training_state.pt")
    (step1 / "training_state.pt").write_bytes(b"not a checkpoint")
    result = run_cli(*args, "--resume")
    assert result.exit_code == 2, result.output
    notices, _, error = result.output.strip().rpartition("\nerror: ")
    assert "Traceback" not in result.output and notices.count("trying the checkpoint before it") == 2
    damage = "is damaged (truncated, or not a PyTorch file of tensors)"
    assert " ".join(error.split()) == (
        f"--resume: {step2}/training_state.pt {damage}; {step1}/training_state.pt {damage}; no complete checkpoint is "
        f"left in {out}/checkpoints (start again with --overwrite, or use another --out)"
    )


def checkpoint_reads(checkpoint: Path) -> bool:
    # Imported here: the file is collected on the code before issue 26 too.
    from rlhfkit.training import checkpoint_damage

    return checkpoint_damage(checkpoint, ())[0] is None


# --- 6. lone surrogates: refused where they are read; annotate-import writes all or nothing ----

# Written with ensure_ascii, as the escape a tool leaves for half of a UTF-16 pair.
LONE = '"a\\ud800b"'
PAIR = '"a\\ud83d\\ude00b"'  # a surrogate pair: one character (U+1F600), fine


def test_item6_a_lone_surrogate_is_refused_with_file_and_line(tmp_path, run_cli, tiny_model_dir):
    data = tmp_path / "demos.jsonl"
    data.write_text('{"type": "demonstration", "id": "1", "prompt": "q", "response": ' + PAIR + "}\n"
                    '{"type": "demonstration", "id": "2", "prompt": ' + LONE + ', "response": "r"}\n')
    result = run_cli("sft", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "sft")
    assert result.exit_code == 2, result.output
    assert f"{data}:2: invalid JSON: a lone surrogate \\ud800 (half of a UTF-16 pair) is not text" in one_line_error(result)
    assert not (tmp_path / "sft").exists()
    data.write_text(data.read_text().splitlines()[0] + "\n")
    assert load_records(data)[0].response == "a\U0001F600b"


def test_item6_annotate_import_of_a_lone_surrogate_leaves_no_out(tmp_path, run_cli):
    source = tmp_path / "feedback.jsonl"
    source.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": ' + LONE + ', "chosen": "a", "rejected": "b"}\n')
    out = tmp_path / "import"
    result = run_cli("annotate-import", "--format", "pairwise", source, "--out", out)
    assert result.exit_code == 2, result.output
    assert one_line_error(result) == f"error: {source}:2: invalid JSON: a lone surrogate \\ud800 (half of a UTF-16 pair) is not text"
    assert not out.exists()
    result = run_cli("annotate-import", "--format", "pairwise", source, "--out", out, "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["import_report.json", "preferences.jsonl", "run_config.json"]


def test_item6_annotate_import_that_fails_writing_leaves_out_as_it_was(tmp_path, monkeypatch):
    source = tmp_path / "uf.jsonl"  # four record files: prompts, scalar scores, preferences, critiques
    source.write_text(json.dumps(ultrafeedback_row(2)) + "\n")
    written = []

    def fail_second(path, records):
        if written:
            raise OSError(28, "No space left on device")  # the second file: the disk filled
        written.append(path)
        return real(path, records)

    real = annotate_import.write_records
    monkeypatch.setattr(annotate_import, "write_records", fail_second)
    out = tmp_path / "import"
    cfg = build_config(annotate_import.ImportConfig, format="ultrafeedback", inputs=[str(source)], out=str(out))
    with pytest.raises(OSError):
        annotate_import.run_import(cfg)
    abandon_unstarted_runs()  # what the CLI does when a stage ends
    assert written and not out.exists()
    existing = tmp_path / "given"
    existing.mkdir()
    written.clear()
    with pytest.raises(OSError):
        annotate_import.run_import(build_config(annotate_import.ImportConfig, format="ultrafeedback", inputs=[str(source)], out=str(existing)))
    abandon_unstarted_runs()
    assert list(existing.iterdir()) == []  # an --out that existed stays, empty: the re-run is not blocked
    monkeypatch.setattr(annotate_import, "write_records", real)
    assert annotate_import.run_import(build_config(annotate_import.ImportConfig, format="ultrafeedback", inputs=[str(source)], out=str(existing)))
