"""Issue 13: hostile-but-realistic input. Each test reproduces one reported case: plans that
call arbitrary Python, runs that mix in one --out, corrupt or wrong-kind model directories,
filesystem failures, bad numbers, huge records, and messages that left out what to fix."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlhfkit.config import REQUIRED, build_config, opt
from rlhfkit.errors import RlhfkitError
from rlhfkit.models import MODEL_SUBDIR
from rlhfkit.schema import PromptRecord, write_records


@dataclass
class _OutConfig:
    out: str = opt(REQUIRED, "Output directory.")
    overwrite: bool = opt(False, "Replace.")


JUDGE = ["--rewards", "judge=1", "--rm", "judge=py:tests.judges:count_letters_e"]


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "data" / "prompts.jsonl"
    write_records(path, [PromptRecord(id=f"p{i}", prompt=f"question: what is {i}? answer:") for i in range(4)])
    return path


def ppo_args(policy: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        "ppo", "--policy", str(policy), "--prompts", str(prompts), "--out", str(out),
        "--prompts-per-step", "2", "--samples-per-prompt", "2", "--minibatch-size", "2", "--ppo-epochs", "1",
        "--max-new-tokens", "8", "--max-prompt-length", "32", "--seed", "3", *JUDGE, *extra,
    ]


def one_line_error(result) -> str:
    """The output of a refused command: one `error:` line, no traceback."""
    text = result.output.strip()
    assert "Traceback" not in text, text
    assert text.startswith("error: "), text
    return " ".join(text.split())  # rich may wrap a long line


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


# --- 1. plans are code: only rlhfkit stages and registered functions --------------------------


@pytest.mark.parametrize("call", ["os:system", "subprocess:getoutput", "shutil:rmtree"])
def test_a_plan_cannot_call_arbitrary_python(tmp_path, run_cli, call):
    victim = tmp_path / "victim"
    victim.mkdir()
    plan = tmp_path / "plan.yaml"
    plan.write_text(textwrap.dedent(f"""\
        steps:
          - call: {call}
            with: {{command: "touch {tmp_path}/pwned", cmd: "touch {tmp_path}/pwned", path: "{victim}"}}
        """))
    for extra in ([], ["--dry-run"]):
        result = run_cli("recipe", plan, *extra)
        assert result.exit_code == 2
        assert f"call '{call}' is not a recipe function" in one_line_error(result)
    assert not (tmp_path / "pwned").exists() and victim.is_dir()


def test_dry_run_imports_nothing_outside_rlhfkit(tmp_path, run_cli, monkeypatch):
    module = tmp_path / "import_time_code.py"
    module.write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\ndef f(**kw): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plan = tmp_path / "plan.yaml"
    plan.write_text("steps:\n  - call: import_time_code:f\n")
    result = run_cli("recipe", plan, "--dry-run")
    assert result.exit_code == 2 and "not a recipe function" in one_line_error(result)
    assert not (tmp_path / "imported").exists()
    assert "import_time_code" not in sys.modules


def test_every_shipped_plan_still_validates_with_the_allowlist(run_cli, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    plans = [*sorted((repo_root / "recipes").glob("*/paper.yaml")), *sorted((repo_root / "recipes").glob("*/tiny.yaml")),
             repo_root / "recipes/demo.yaml"]
    for plan in plans:
        result = run_cli("recipe", plan, "--dry-run")
        assert result.exit_code == 0, (plan, result.output)


def test_trust_remote_code_from_a_plan_or_config_warns_naming_the_directory(tmp_path, run_cli, tiny_model_dir):
    data = tmp_path / "demos.jsonl"
    data.write_text('{"type": "demonstration", "id": "a", "prompt": "q", "response": "r"}\n')
    plan = tmp_path / "plan.yaml"
    plan.write_text(textwrap.dedent(f"""\
        steps:
          - stage: sft
            with: {{model: "{tiny_model_dir}", data: "{data}", out: "{tmp_path}/sft", trust_remote_code: true}}
        """))
    result = run_cli("recipe", plan, "--dry-run")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "warning: trust_remote_code is on" in text and str(tiny_model_dir) in text and "step 1 (sft)" in text

    config = tmp_path / "sft.yaml"
    config.write_text(f"trust_remote_code: true\nmodel: {tiny_model_dir}\n")
    from rlhfkit.config import load_config_file
    from rlhfkit.console import console
    from rlhfkit.finetune import SFTConfig

    with console.capture() as captured:
        load_config_file(config, SFTConfig)
    text = " ".join(captured.get().split())
    assert "trust_remote_code is on (set by" in text and str(config) in text and str(tiny_model_dir) in text


def test_foreach_is_capped_with_the_count(tmp_path):
    from rlhfkit.recipes import load_plan

    values = ", ".join(str(i) for i in range(101))
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"steps:\n  - stage: sft\n    name: s${{a}}-${{b}}-${{c}}\n"
                    f"    foreach: {{a: [{values}], b: [{values}], c: [{values}]}}\n")
    # 101^3 = 1,030,301 steps, far above the 1,000-step limit.
    with pytest.raises(RlhfkitError, match=r"'foreach' expands to 1,030,301 steps.*limit of 1,000 steps"):
        load_plan(plan)


# --- 2, 3, 4, 12. ppo: resume identity, --save-every 0, --keep-checkpoints, shared --out ----------


def test_ppo_checkpoints_resume_and_out_protection(run_cli, tiny_model_dir, prompts, tmp_path):
    out = tmp_path / "ppo"
    result = run_cli(*ppo_args(tiny_model_dir, prompts, out, "--steps", "3", "--save-every", "1", "--keep-checkpoints", "1"))
    assert result.exit_code == 0, result.output
    assert checkpoints(out) == ["step-3"]  # 12: the newest one kept
    before = {name: (out / name).read_bytes() for name in ("run_config.json", "metrics.jsonl")}

    # 4: a fresh run into a directory holding another run is refused, and writes nothing.
    result = run_cli(*ppo_args(tiny_model_dir, prompts, out, "--steps", "4"))
    assert result.exit_code == 2
    assert f"--out {out} is not empty (it holds an earlier ppo run); give --resume" in one_line_error(result)

    # 2: --resume with other prompts is another run: refused before anything is written.
    other = tmp_path / "other.jsonl"
    write_records(other, [PromptRecord(id="x", prompt="question: who? answer:")] * 4)
    result = run_cli(*ppo_args(tiny_model_dir, other, out, "--steps", "4", "--resume"))
    assert result.exit_code == 2
    message = one_line_error(result)
    assert "step-3 belongs to another run (prompts:" in message
    result = run_cli(*ppo_args(tiny_model_dir, prompts, out, "--steps", "4", "--resume", "--seed", "4"))
    assert result.exit_code == 2 and "seed: 3 then, 4 now" in one_line_error(result)
    assert {name: (out / name).read_bytes() for name in before} == before

    # The same run resumes; --overwrite replaces it (old checkpoints gone).
    result = run_cli(*ppo_args(tiny_model_dir, prompts, out, "--steps", "4", "--resume", "--save-every", "1", "--keep-checkpoints", "1"))
    assert result.exit_code == 0, result.output
    assert checkpoints(out) == ["step-4"]
    result = run_cli(*ppo_args(tiny_model_dir, prompts, out, "--steps", "1", "--overwrite"))
    assert result.exit_code == 0, result.output
    assert checkpoints(out) == ["step-1"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_ppo_save_every_0_saves_only_at_the_end(run_cli, tiny_model_dir, prompts, tmp_path):
    out = tmp_path / "ppo"
    result = run_cli(*ppo_args(tiny_model_dir, prompts, out, "--steps", "2", "--save-every", "0"))
    assert result.exit_code == 0, result.output  # was: ZeroDivisionError after step 1
    assert checkpoints(out) == ["step-2"]
    assert (out / MODEL_SUBDIR / "model.safetensors").is_file()


def test_out_equal_to_an_input_is_refused(run_cli, tiny_model_dir, prompts, tmp_path):
    result = run_cli(*ppo_args(tiny_model_dir, prompts, tiny_model_dir, "--steps", "1", "--overwrite"))
    assert result.exit_code == 2
    assert f"--out {tiny_model_dir} is an input of this run" in one_line_error(result)
    result = run_cli(*ppo_args(tiny_model_dir, prompts, prompts.parent, "--steps", "1", "--overwrite"))
    assert result.exit_code == 2 and "holds an input of this run" in one_line_error(result)
    assert prompts.is_file() and (tiny_model_dir / "model.safetensors").is_file()


def test_a_second_run_into_a_locked_out_names_the_holder(tmp_path):
    from rlhfkit.runs import LOCK_FILE, RunDir

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""\
            import fcntl, os, sys, time
            handle = open({str(out / LOCK_FILE)!r}, "a+")
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.write(str(os.getpid())); handle.flush()
            print("locked", flush=True)
            time.sleep(60)
            """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = build_config(_OutConfig, out=str(out))
        with pytest.raises(RlhfkitError, match=rf"in use by another rlhfkit run \(pid {holder.pid}\)"):
            RunDir(out, "toy", cfg)
    finally:
        holder.kill()
        holder.wait()
    run = RunDir(out, "toy", cfg)  # free again once the holder is gone
    run.log_metrics(step=1, loss=1.0)
    run.close()
    assert (out / "metrics.jsonl").is_file()


def test_a_refused_run_creates_nothing(run_cli, tiny_model_dir, prompts, tmp_path):
    out = tmp_path / "new"
    result = run_cli(*ppo_args(tiny_model_dir, prompts, out, "--steps", "1", "--rm", "extra=py:tests.judges:count_letters_e"))
    assert result.exit_code == 2
    result = run_cli(*ppo_args(tiny_model_dir, tmp_path / "missing.jsonl", out, "--steps", "1"))
    assert result.exit_code == 2
    assert not out.exists()


# --- 5, 6, 8. model directories: corrupt, wrong kind, pickle-only ------------------------------


def _copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_is_one_line_naming_the_file(run_cli, tiny_model_dir, prompts, tmp_path):
    broken = _copy_model(tiny_model_dir, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = run_cli(*ppo_args(broken, prompts, tmp_path / "out", "--steps", "1"))
    assert result.exit_code == 2
    assert f"{weights}: corrupt or truncated weights file" in one_line_error(result)
    weights.write_bytes(b"\x00" * 64)
    from rlhfkit.models import load_policy

    with pytest.raises(RlhfkitError, match="corrupt or truncated weights file"):
        load_policy(broken)


def test_pickle_only_directory_is_refused_in_one_line(tiny_model_dir, tmp_path):
    import pickle

    from rlhfkit.models import load_policy

    model_dir = _copy_model(tiny_model_dir, tmp_path / "pickled")
    (model_dir / "model.safetensors").unlink()

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    import torch

    torch.save({"weights": RunsCode()}, model_dir / "pytorch_model.bin", pickle_module=pickle)
    with pytest.raises(RlhfkitError, match=r"pytorch_model.bin: a pickle weights file that does not load as plain tensors"):
        load_policy(model_dir)
    assert not (tmp_path / "pwned").exists()


@pytest.fixture
def classifier_dir(tiny_model_dir, tmp_path) -> Path:
    """A sequence-classifier (reward-model-like) directory built from the tiny LM."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "classifier"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_a_reward_model_directory_is_not_a_policy(run_cli, classifier_dir, prompts, tmp_path):
    result = run_cli(*ppo_args(classifier_dir, prompts, tmp_path / "out", "--steps", "1"))
    assert result.exit_code == 2
    assert "is a classifier (GPT2ForSequenceClassification); expected a causal or seq2seq language model" in one_line_error(result)
    (classifier_dir / "rlhfkit_rm.json").write_text("{}")
    data = tmp_path / "demos.jsonl"
    data.write_text('{"type": "demonstration", "id": "a", "prompt": "q", "response": "r"}\n' * 4)
    result = run_cli("sft", "--model", classifier_dir, "--data", data, "--out", tmp_path / "sft", "--max-steps", "1")
    assert result.exit_code == 2 and "is an rlhfkit reward model" in one_line_error(result)


def test_an_hf_reward_must_be_a_classifier(tiny_model_dir):
    import torch

    from rlhfkit.rewards.sources import ClassifierSource

    # Before: a causal LM loaded as a classifier got a random head and PPO trained on noise.
    with pytest.raises(RlhfkitError, match=r"--rm tox=hf:.*is GPT2LMHeadModel, not a sequence classifier"):
        ClassifierSource("tox", str(tiny_model_dir), torch.device("cpu"))


# --- 7. reward sources: repeated and unused --rm -----------------------------------------------


def _ppo_config(**values):
    from rlhfkit.stages.ppo import PPOConfig

    base = {"policy": "p", "prompts": "x.jsonl", "out": "o", "rewards": "comp=1", "rm": ["comp=py:tests.judges:count_letters_e"]}
    return build_config(PPOConfig, **{**base, **values})


def test_repeated_and_unused_rm_are_errors():
    with pytest.raises(RlhfkitError, match=r"--rm completeness is given twice \(a and b\)"):
        _ppo_config(rm=["comp=a", "completeness=b"])
    with pytest.raises(RlhfkitError, match=r"--rm factuality: not named by --rewards comp=1"):
        _ppo_config(rm=["comp=py:tests.judges:count_letters_e", "fact=/no/such/dir"])


# --- 9. numbers are checked before any model loads ----------------------------------------------


@pytest.mark.parametrize(("values", "message"), [
    ({"seed": 2**64}, r"--seed must be in \[0, 2\^64\), got 18446744073709551616"),
    ({"lr": float("nan")}, "--lr must be a number, got nan"),
    ({"lr": -1.0}, "--lr must be >= 0, got -1.0"),  # 0 is allowed: the no-update diagnostic
    ({"kl_coef": float("nan")}, "--kl-coef must be a number, got nan"),
    ({"rewards": "comp=nan"}, "--rewards: the weight of 'comp' must be a finite number, got nan"),
    ({"rewards": "comp=inf"}, "--rewards: the weight of 'comp' must be a finite number, got inf"),
    ({"top_p": 2.0}, r"--top-p must be in \(0, 1\], got 2.0"),
    ({"temperature": 0.0}, "--temperature must be > 0, got 0.0"),
    ({"save_every": -1}, "--save-every must be >= 0, got -1"),
    ({"keep_checkpoints": -2}, "--keep-checkpoints must be >= 0, got -2"),
])
def test_ppo_numbers(values, message):
    with pytest.raises(RlhfkitError, match=message):
        _ppo_config(**values)


def test_redistribute_and_sft_numbers(tmp_path):
    from rlhfkit.finetune import SFTConfig
    from rlhfkit.stages.redistribute import RedistributeConfig

    base = {"rm": "r", "input": "in.jsonl", "out": "o.jsonl"}
    with pytest.raises(RlhfkitError, match="--batch-size must be >= 1, got 0"):
        build_config(RedistributeConfig, **base, batch_size=0)
    with pytest.raises(RlhfkitError, match="--limit must be >= 0, got -3"):
        build_config(RedistributeConfig, **base, limit=-3)
    with pytest.raises(RlhfkitError, match=r"--seed must be in \[0, 2\^64\)"):
        build_config(SFTConfig, model="m", data="d", out="o", seed=2**64 + 1)


def test_a_py_reward_with_the_wrong_signature(tmp_path, monkeypatch):
    from rlhfkit.rewards.sources import PythonFunctionSource

    (tmp_path / "wrong_judge.py").write_text("def score(responses):\n    return [0.0] * len(responses)\n"
                                             "def broken(prompts, responses):\n    return 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RlhfkitError, match=r"py:wrong_judge:score must take \(prompts, responses\)"):
        PythonFunctionSource("judge", "wrong_judge:score")
    source = PythonFunctionSource("judge", "wrong_judge:broken")
    with pytest.raises(RlhfkitError, match="py:wrong_judge:broken raised ZeroDivisionError: division by zero"):
        source.token_rewards(["p"], ["r"], [[(0, 1)]])


def test_numbers_fail_before_models_load(run_cli, tmp_path, prompts, monkeypatch):
    from rlhfkit import models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_pretrained", no_loading)
    result = run_cli(*ppo_args(tmp_path / "no-model", prompts, tmp_path / "out", "--temperature", "0"))
    assert result.exit_code == 2 and "--temperature must be > 0" in one_line_error(result)


# --- 8. filesystem errors: one line, never a traceback --------------------------------------------


def test_out_that_is_a_file_or_under_dev_null(run_cli, tiny_model_dir, prompts, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    result = run_cli(*ppo_args(tiny_model_dir, prompts, a_file, "--steps", "1"))
    assert result.exit_code == 2 and f"--out {a_file}: exists and is not a directory" in one_line_error(result)
    result = run_cli(*ppo_args(tiny_model_dir, prompts, "/dev/null/x", "--steps", "1"))
    assert result.exit_code == 2 and "--out /dev/null/x: /dev/null is not a directory" in one_line_error(result)


def test_a_full_disk_is_one_line_exit_1(run_cli, tmp_path, monkeypatch):
    """ENOSPC from a stand-in at the moment an artifact is written (no small filesystem here)."""
    from rlhfkit import io

    source = tmp_path / "feedback.jsonl"
    source.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "fsync", full_disk)
    result = run_cli("annotate-import", "--format", "pairwise", source, "--out", tmp_path / "out")
    assert result.exit_code == 1
    # annotate-import writes into a staging folder inside --out and moves the files in when all
    # are complete, so the line names the staged file; nothing half-written is left behind.
    error = one_line_error(result)
    assert f"cannot write {tmp_path / 'out'}/" in error and "preferences.jsonl: No space left on device" in error
    assert not (tmp_path / "out" / "preferences.jsonl").exists()


def test_a_read_only_out_is_one_line_exit_1(run_cli, tmp_path, monkeypatch):
    """EROFS from a stand-in mkdir (the tests run as root, whom permissions do not stop)."""
    from pathlib import Path as RealPath

    source = tmp_path / "feedback.jsonl"
    source.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    real_mkdir = RealPath.mkdir

    def read_only(self, *args, **kwargs):
        if self.name == "ro":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(RealPath, "mkdir", read_only)
    result = run_cli("annotate-import", "--format", "pairwise", source, "--out", tmp_path / "ro")
    assert result.exit_code == 1
    assert f"cannot write {tmp_path / 'ro'}: Read-only file system" in one_line_error(result)


# --- 10. a huge record is refused with file:line before it is tokenised -----------------------------


def test_a_huge_record_is_refused_with_file_and_line(tmp_path, monkeypatch):
    from rlhfkit.schema import MAX_RECORD_ENV, load_records

    path = tmp_path / "demos.jsonl"
    small = json.dumps({"type": "demonstration", "id": "a", "prompt": "q", "response": "r"})
    huge = json.dumps({"type": "demonstration", "id": "b", "prompt": "q", "response": "x" * 5000})
    path.write_text(small + "\n" + huge + "\n")
    monkeypatch.setenv(MAX_RECORD_ENV, "4096")
    # The second line is 5000 x's plus ~70 bytes of JSON: above 4096.
    with pytest.raises(RlhfkitError, match=rf"{path}:2: record longer than the 4,096-byte limit"):
        load_records(path)
    monkeypatch.setenv(MAX_RECORD_ENV, "8192")
    assert len(load_records(path)) == 2


# --- 13. weights have the mode of every other artifact -------------------------------------------


def test_saved_weights_follow_the_umask(tiny_model_dir, tmp_path):
    from rlhfkit.models import load_policy, save_model

    model, tokenizer, _ = load_policy(tiny_model_dir)
    out = tmp_path / "saved"
    out.mkdir()
    old = os.umask(0o022)
    try:
        save_model(model, tokenizer, out)
    finally:
        os.umask(old)
    # 0o666 & ~0o022 = 0o644, as config.json gets.
    assert (out / MODEL_SUBDIR / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (out / MODEL_SUBDIR / "config.json").stat().st_mode & 0o777 == 0o644
    assert (tiny_model_dir / "model.safetensors").stat().st_mode & 0o777 == 0o644  # init-model's too


# --- 14. messages ----------------------------------------------------------------------------------


def test_a_directory_given_as_a_data_file(run_cli, tiny_model_dir, tmp_path):
    result = run_cli(*ppo_args(tiny_model_dir, tmp_path, tmp_path / "out", "--steps", "1"))
    assert result.exit_code == 2
    assert f"--prompts {tmp_path}: is a directory; give a JSONL file" in one_line_error(result)


def test_file_errors_name_the_option(run_cli, tiny_model_dir, prompts, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "prompt", "id": "a", "prompt": "q"}\n{oops\n')
    result = run_cli(*ppo_args(tiny_model_dir, bad, tmp_path / "out", "--steps", "1"))
    assert result.exit_code == 2 and f"--prompts {bad}:2: invalid JSON" in one_line_error(result)
    result = run_cli(*ppo_args(tiny_model_dir, prompts, tmp_path / "out", "--steps", "1", "--eval-prompts", bad))
    assert result.exit_code == 2 and f"--eval-prompts {bad}:2: invalid JSON" in one_line_error(result)
    result = run_cli("redistribute", "--rm", tiny_model_dir, "--input", bad, "--out", tmp_path / "r.jsonl")
    assert result.exit_code == 2 and f"--input {bad}:2: invalid JSON" in one_line_error(result)


def test_config_file_values_are_checked_naming_the_file(run_cli, tiny_model_dir, prompts, tmp_path):
    config = tmp_path / "ppo.yaml"
    config.write_text("lr: fast\n")
    result = run_cli(*ppo_args(tiny_model_dir, prompts, tmp_path / "out"), "--config", config)
    assert result.exit_code == 2 and f"{config}: option lr must be float, got 'fast'" in one_line_error(result)
    config.write_text("kl_coef: .nan\n")
    result = run_cli(*ppo_args(tiny_model_dir, prompts, tmp_path / "out"), "--config", config)
    assert result.exit_code == 2
    assert f"--kl-coef must be a number, got nan (set in --config {config})" in one_line_error(result)


def test_a_scalar_for_a_list_option_in_a_config(tmp_path):
    from rlhfkit.config import load_config_file
    from rlhfkit.stages.ppo import PPOConfig

    config = tmp_path / "ppo.yaml"
    config.write_text("rm: judge=py:tests.judges:count_letters_e\n")
    assert load_config_file(config, PPOConfig) == {"rm": ["judge=py:tests.judges:count_letters_e"]}


def test_recipe_overwrite_passes_overwrite_to_its_stages(tmp_path, run_cli):
    source = tmp_path / "feedback.jsonl"
    source.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"steps:\n  - stage: annotate-import\n    with: {{format: pairwise, inputs: [{source}], out: {tmp_path}/import}}\n")
    assert run_cli("recipe", plan).exit_code == 0
    result = run_cli("recipe", plan)  # the earlier run's output is not silently mixed into
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "is not empty (it holds an earlier annotate-import run); give --overwrite" in " ".join(result.output.split())
    assert run_cli("recipe", plan, "--overwrite").exit_code == 0
