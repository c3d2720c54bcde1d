"""Issue 26, items 7-20 (Low): hostile inputs, second pass. Each test is named after its item
and reproduces the reported case: deep nesting, YAML alias bombs, chat templates that loop or
explode, trackers that fail to start, full disks, huge lines, unsafe aspect names, --overwrite
on a folder that is not a run, hf: specs, compare, --chat-template and misleading messages."""

from __future__ import annotations

import json
import textwrap
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rlhfkit.config import REQUIRED, build_config, opt
from rlhfkit.errors import EnvironmentFailure, RlhfkitError
from rlhfkit.schema import MAX_RECORD_ENV, Demonstration, write_records

DEEP_JSON = "[" * 200_000  # the 200 KB line of `[`


def one_line_error(result) -> str:
    """The output of a refused command: one `error:` line, no traceback."""
    text = result.output.strip()
    assert "Traceback" not in text, text
    assert text.startswith("error: ") and len(text.splitlines()) == 1, text
    return text


def pairwise_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


PAIR = {"prompt": "p", "chosen": "a", "rejected": "b"}


# --- 7. deep nesting: one line with file:line in every reader ---------------------------------


def test_item07_deeply_nested_json_or_yaml_is_one_line_in_every_reader(tmp_path, run_cli):
    from rlhfkit.config import load_config_file
    from rlhfkit.recipes import load_plan
    from rlhfkit.rewards.reward_model import read_spec
    from rlhfkit.schema import load_records
    from rlhfkit.stages.sft import SFTConfig

    data = tmp_path / "demos.jsonl"
    data.write_text(DEEP_JSON + "\n")
    with pytest.raises(RlhfkitError, match=rf"^{data}:1: invalid JSON: nested too deeply$"):
        load_records(data)

    rows = tmp_path / "pairs.jsonl"
    rows.write_text(json.dumps(PAIR) + "\n" + '{"prompt": ' + DEEP_JSON + "\n")
    result = run_cli("annotate-import", "--format", "pairwise", rows, "--out", tmp_path / "import")
    assert result.exit_code == 2 and f"{rows}:2: invalid JSON: nested too deeply" in one_line_error(result)

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n" + DEEP_JSON + "\n")
    result = run_cli("compare", run, "--out", tmp_path / "cmp.md")
    assert result.exit_code == 2 and f"{run / 'metrics.jsonl'}:2: invalid JSON: nested too deeply" in one_line_error(result)

    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "rlhfkit_rm.json").write_text(DEEP_JSON)
    with pytest.raises(RlhfkitError, match="rlhfkit_rm.json: invalid JSON: nested too deeply"):
        read_spec(rm)

    # 990 levels: under libyaml's own 1,000-level bound, over Python's recursion limit when
    # the values are built; 200,000 levels: libyaml's bound.
    for depth in (990, 200_000):
        config = tmp_path / "sft.yaml"
        config.write_text("lr: " + "[" * depth + "]" * depth + "\n")
        with pytest.raises(RlhfkitError, match=rf"^{config}(:1)?: invalid YAML: (nested too deeply|exceeded maximum nesting depth)$"):
            load_config_file(config, SFTConfig)
        plan = tmp_path / "plan.yaml"
        plan.write_text("steps: " + "[" * depth + "]" * depth + "\n")
        with pytest.raises(RlhfkitError, match=rf"^{plan}(:1)?: invalid YAML: (nested too deeply|exceeded maximum nesting depth)$"):
            load_plan(plan)


# --- 8. YAML alias bombs ---------------------------------------------------------------------------


def alias_bomb(levels: int) -> str:
    """`levels` lines of nine aliases each: 9**levels leaf values from ~40 bytes a line."""
    lines = ['  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"  l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", ["vars", "with"])
def test_item08_a_yaml_alias_bomb_in_a_plan_is_refused(tmp_path, run_cli, where):
    # 9**6 = 531,441 leaves, above the 100,000-value bound, but small enough that the old
    # loader walked it in seconds (the 9 levels reached 3.3 GB or ran past 120 s).
    plan = tmp_path / "plan.yaml"
    bomb = alias_bomb(6)
    if where == "vars":
        plan.write_text("vars:\n" + bomb + "steps:\n  - stage: annotate-import\n    with: {format: pairwise, inputs: [x.jsonl], out: o}\n")
    else:  # the bomb is a step's option value
        indented = textwrap.indent(bomb, "    ")
        plan.write_text("steps:\n  - stage: annotate-import\n    with:\n      format: pairwise\n      out: o\n      inputs:\n" + indented)
    result = run_cli("recipe", plan, "--dry-run")
    assert result.exit_code == 2
    assert f"{plan}: YAML aliases expand to more than 100,000 values; write the values out" in one_line_error(result)


def test_item08_a_few_aliases_still_load(tmp_path):
    from rlhfkit.yamlfile import parse_yaml

    # 3 levels: 9**3 = 729 leaves, far below the bound.
    assert len(parse_yaml("root:\n" + alias_bomb(3), "x")["root"]["l2"]) == 9


# --- 9. chat templates: a time and size bound, one line for every failure -------------------------


@pytest.fixture
def tokenizer(tiny_model_dir):
    from rlhfkit.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


CONVERSATION = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{% include 'other.jinja' %}", "TypeError: no loader for this environment specified"),
        ("{{ range(10**9) | length }}", "OverflowError: Range too big"),
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError: maximum recursion depth exceeded"),
    ],
)
def test_item09_chat_template_errors_outside_jinja_are_one_line(tokenizer, template, message):
    from rlhfkit.chat import render_prompt

    tokenizer.chat_template = template
    with pytest.raises(RlhfkitError, match=f"^the chat template cannot render this conversation: {message}"):
        render_prompt(tokenizer, "p", CONVERSATION)


def test_item09_a_template_that_loops_for_ever_is_stopped(tokenizer, monkeypatch):
    import time

    from rlhfkit import chat

    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.5)
    # 100,000 x 100,000 iterations: hours; the alarm stops it after 0.5 s.
    tokenizer.chat_template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    started = time.monotonic()
    with pytest.raises(RlhfkitError, match=r"^the chat template took more than 0.5 s to render one conversation"):
        chat.render_prompt(tokenizer, "p", CONVERSATION)
    assert time.monotonic() - started < 5  # 0.5 s plus the time to get back from the loop


def test_item09_a_huge_rendering_is_refused(tokenizer, monkeypatch):
    from rlhfkit.chat import render_prompt

    monkeypatch.setenv(MAX_RECORD_ENV, "1000")
    tokenizer.chat_template = "{{ 'x' * 10**6 }}"
    # 10**6 characters > 4 x 1,000 (the record cap).
    with pytest.raises(RlhfkitError, match=r"^the chat template rendered 1,000,000 characters, more than 4x the 1,000-byte record limit$"):
        render_prompt(tokenizer, "p", CONVERSATION)


# --- 10. a tracker that fails to start --------------------------------------------------------------


@dataclass
class _TrackedConfig:
    out: str = opt(REQUIRED, "Output directory.")
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    marker: str = "second run"


def test_item10_a_tracker_that_fails_to_start_is_one_line_and_keeps_run_config(tmp_path, monkeypatch):
    from rlhfkit import tracking
    from rlhfkit.runs import RUN_CONFIG, RunDir

    class Unreachable:
        def __init__(self, out, stage, config):
            raise ConnectionError("cannot reach https://tracker.invalid")

    out = tmp_path / "run"
    first = RunDir(out, "sft", _TrackedConfig(out=str(out), report_to=[], marker="first run"))
    first.write_json("x.json", {})
    first.close()
    before = (out / RUN_CONFIG).read_text()

    monkeypatch.setitem(tracking.TRACKER_CLASSES, "tensorboard", Unreachable)
    resumed = RunDir(out, "sft", _TrackedConfig(out=str(out)), resume=True)
    with pytest.raises(EnvironmentFailure) as caught:
        resumed.begin()
    resumed.close()
    assert str(caught.value) == (
        "--report-to tensorboard: the tracker did not start: ConnectionError: cannot reach https://tracker.invalid"
    )
    assert caught.value.exit_code == 1
    assert (out / RUN_CONFIG).read_text() == before  # still the first run's


# --- 11. a full disk during a weights save -----------------------------------------------------------


def test_item11_a_full_disk_during_a_weights_save_names_the_directory(tiny_model_dir, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from rlhfkit.models import load_policy, save_model

    model, tokenizer, _ = load_policy(str(tiny_model_dir))

    def full_disk(*args, **kwargs):
        # What safetensors raises when a write fails with ENOSPC.
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(model, "save_pretrained", full_disk)
    out = tmp_path / "out"
    out.mkdir()
    # save_model writes into the run's model folder, out/model (models.model_output_dir).
    with pytest.raises(EnvironmentFailure, match=rf"^cannot write {out / 'model'}: No space left on device$"):
        save_model(model, tokenizer, out)
    assert list(out.iterdir()) == []  # the temporary directory is gone


def test_item11_a_full_disk_while_logging_metrics_names_the_file(tmp_path, monkeypatch):
    import errno
    import os

    from rlhfkit import io
    from rlhfkit.runs import RunDir

    out = tmp_path / "run"
    run = RunDir(out, "sft", _TrackedConfig(out=str(out), report_to=[]))
    run.log_metrics(1, loss=1.0)

    def full_disk(*args, **kwargs):  # a write refused with ENOSPC names no file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io, "open", full_disk, raising=False)
    with pytest.raises(EnvironmentFailure, match=rf"^cannot write {out / 'metrics.jsonl'}: No space left on device$"):
        run.log_metrics(2, loss=0.5)
    run.close()


# A full disk in an atomic write (every other artifact): test_hostile_inputs.py's
# test_a_full_disk_is_one_line_exit_1 now asserts the file is named.


# --- 12. the record cap applies while a line is read --------------------------------------------------


def test_item12_a_line_above_the_cap_is_refused_before_it_is_read_whole(tmp_path, monkeypatch):
    from rlhfkit.schema import load_records

    path = tmp_path / "demos.jsonl"
    path.write_bytes(b"x" * 20_000_000)  # 20 MB without a newline
    monkeypatch.setenv(MAX_RECORD_ENV, "4096")
    tracemalloc.start()
    try:
        with pytest.raises(RlhfkitError, match=rf"^{path}:1: record longer than the 4,096-byte limit"):
            load_records(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # At most cap + 1 = 4,097 bytes of the line are read; the old reader held all 20 MB.
    assert peak < 1_000_000


# --- 13. annotate-import: the record cap on what it reads and what it writes ----------------------------


def test_item13_annotate_import_applies_the_record_cap(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv(MAX_RECORD_ENV, "4096")
    long_line = pairwise_file(tmp_path / "long.jsonl", [PAIR, {**PAIR, "prompt": "q" * 5000}])
    result = run_cli("annotate-import", "--format", "pairwise", long_line, "--out", tmp_path / "a")
    assert result.exit_code == 2
    assert f"{long_line}:2: record longer than the 4,096-byte limit" in one_line_error(result)

    # A 2,600-byte conversational row: its preference keeps the prompt twice (as text and as
    # meta.messages), 2 x 2,500 characters > 4,096, which every later stage would refuse.
    row = {
        "prompt": [{"role": "user", "content": "q" * 2500}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    conversational = pairwise_file(tmp_path / "chat.jsonl", [row])
    assert len(conversational.read_bytes()) < 4096
    result = run_cli("annotate-import", "--format", "pairwise", conversational, "--out", tmp_path / "b")
    assert result.exit_code == 2
    assert "above the 4,096-byte limit every stage reads" in one_line_error(result)
    assert not (tmp_path / "b").exists()


# --- 14. aspect names become directories ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute", ".hidden"])
def test_item14_aspect_names_used_as_directories_are_checked(tmp_path, name):
    from rlhfkit.stages.train_rm import TrainRMConfig

    data = pairwise_file(tmp_path / "prefs.jsonl", [PAIR])
    with pytest.raises(RlhfkitError, match=rf"^--aspect '{name}': each aspect's RM goes to OUT/<aspect>/"):
        build_config(TrainRMConfig, model="m", data=str(data), aspect=f"overall,{name}", kind="preference", out=str(tmp_path / "rms"))
    assert not (tmp_path / "escaped").exists()


# --- 15. --overwrite empties only an rlhfkit run -------------------------------------------------------------


def test_item15_overwrite_refuses_a_folder_that_holds_no_run(run_cli, tmp_path):
    source = pairwise_file(tmp_path / "feedback.jsonl", [PAIR])
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\documentclass{article}")
    result = run_cli("annotate-import", "--format", "pairwise", source, "--out", thesis, "--overwrite")
    assert result.exit_code == 2
    assert f"--out {thesis} holds files that are not an rlhfkit run (thesis.tex; no run_config.json)" in one_line_error(result)
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"steps:\n  - stage: annotate-import\n    with: {{format: pairwise, inputs: [{source}], out: {thesis}}}\n")
    result = run_cli("recipe", plan, "--overwrite")
    assert result.exit_code == 2 and "holds files that are not an rlhfkit run" in result.output
    assert sorted(p.name for p in thesis.iterdir()) == ["thesis.tex"]
    # An earlier run is still replaced.
    run = tmp_path / "run"
    assert run_cli("annotate-import", "--format", "pairwise", source, "--out", run).exit_code == 0
    assert run_cli("annotate-import", "--format", "pairwise", source, "--out", run, "--overwrite").exit_code == 0


# --- 16. hf: specs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["hf:", "hf::"])
def test_item16_an_empty_hf_spec_is_one_line(run_cli, tmp_path, spec):
    result = run_cli("annotate-import", "--format", "pairwise", spec, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert f"{spec}: no dataset after hf:; give hf:NAME or hf:NAME:CONFIG" in one_line_error(result)


def test_item16_hf_data_files_with_different_columns_and_the_offline_hub(run_cli, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    pairwise_file(files / "a.jsonl", [PAIR])
    pairwise_file(files / "b.jsonl", [{**PAIR, "extra": {"x": 1}}])
    result = run_cli("annotate-import", "--format", "pairwise", f"hf:{files}", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "cannot load the dataset: its data files have different columns: there are 1 new columns ({'extra'})" in result.output
    # The hub cannot be reached (HF_DATASETS_OFFLINE=1, conftest.py): the environment, exit 1.
    result = run_cli("annotate-import", "--format", "pairwise", "hf:someone/no-such-dataset", "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "hf:someone/no-such-dataset: cannot load the dataset: Couldn't reach" in one_line_error(result)


# --- 17. compare ---------------------------------------------------------------------------------------------------


def make_run(path: Path, metrics: bytes, run_config: str = '{"stage": "sft"}') -> Path:
    path.mkdir()
    (path / "metrics.jsonl").write_bytes(metrics)
    (path / "run_config.json").write_text(run_config)
    return path


def test_item17_compare_reads_bad_runs_in_one_line(run_cli, tmp_path):
    good = b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    binary = make_run(tmp_path / "binary", good + b"\xff\xfe\n")
    result = run_cli("compare", binary, "--out", tmp_path / "cmp.md")
    assert result.exit_code == 2 and f"{binary / 'metrics.jsonl'}:3: not UTF-8 text (byte 0)" in one_line_error(result)
    # A run_config.json holding a number, and metric lines that are not objects: left out.
    odd = make_run(tmp_path / "odd", good + b"5\n[1, 2]\n", run_config="5")
    result = run_cli("compare", odd, "--out", tmp_path / "cmp.md")
    assert result.exit_code == 0, result.output
    # loss 2.0 -> 1.5: change -0.5000; the stage unknown: '-'.
    assert "| odd | - | 2 | 2.0000 | 1.5000 | -0.5000 |" in (tmp_path / "cmp.md").read_text()


def test_item17_compare_does_not_overwrite_a_file_it_did_not_write(run_cli, tmp_path):
    run = make_run(tmp_path / "run", b'{"step": 1, "loss": 2.0}\n')
    results = tmp_path / "results.md"
    results.write_text("# evaluate results\n")
    result = run_cli("compare", run, "--out", results)
    assert result.exit_code == 2
    assert f"--out {results}: exists and was not written by rlhfkit compare" in one_line_error(result)
    assert results.read_text() == "# evaluate results\n"
    for out in (tmp_path / "cmp.md", tmp_path / "cmp.png"):  # its own output is replaced
        assert run_cli("compare", run, "--out", out).exit_code == 0
        assert run_cli("compare", run, "--out", out).exit_code == 0


# --- 18. --chat-template: empty, or broken ---------------------------------------------------------------------------


def test_item18_an_empty_or_broken_chat_template_is_refused_before_anything_is_saved(run_cli, tiny_model_dir, tmp_path):
    data = tmp_path / "demos.jsonl"
    write_records(data, [Demonstration(id=f"d{i}", prompt=f"q{i}", response=" a") for i in range(4)])
    sft = ["sft", "--model", tiny_model_dir, "--data", data, "--epochs", "1", "--batch-size", "2", "--max-length", "16"]
    empty = tmp_path / "empty.jinja"
    empty.write_text("\n")
    result = run_cli(*sft, "--out", tmp_path / "a", "--chat-template", empty)
    assert result.exit_code == 2 and f"--chat-template: {empty}: the file is empty" in one_line_error(result)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for message in messages %}{{ message['content'] }")  # an unclosed {{
    result = run_cli(*sft, "--out", tmp_path / "b", "--chat-template", broken)
    assert result.exit_code == 2
    assert "--chat-template: the chat template cannot render this conversation: " in one_line_error(result)
    assert not (tmp_path / "b" / "model.safetensors").exists()


# --- 19. further tracebacks ---------------------------------------------------------------------------------------------


def test_item19_recipe_set_with_bad_yaml_and_a_non_utf8_plan(run_cli, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("vars: {n: 1}\nsteps: []\n")
    result = run_cli("recipe", plan, "--dry-run", "--set", "n=[1")
    assert result.exit_code == 2 and "--set n=[1: invalid YAML: " in one_line_error(result)
    plan.write_bytes(b"steps: []\n# \xff\n")  # 0xff after the 10 bytes of line 1 and "# ": byte 12
    result = run_cli("recipe", plan, "--dry-run")
    assert result.exit_code == 2 and f"{plan}: not UTF-8 text (byte 12)" in one_line_error(result)


def test_item19_a_corrupt_metrics_file_on_resume(tmp_path):
    from rlhfkit.runs import RunDir

    out = tmp_path / "run"
    first = RunDir(out, "sft", _TrackedConfig(out=str(out), report_to=[]))
    first.log_metrics(1, loss=1.0)
    first.close()
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 2, "loss": \n')  # cut off by a crash
    resumed = RunDir(out, "sft", _TrackedConfig(out=str(out), report_to=[]), resume=True)
    with pytest.raises(RlhfkitError, match=rf"^{out / 'metrics.jsonl'}:2: invalid JSON: Expecting value"):
        resumed.truncate_metrics(1)
    resumed.close()


def test_item19_a_negative_size_in_config_json(tiny_model_dir, tmp_path):
    import shutil

    from rlhfkit.models import load_policy

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["n_embd"] = -5
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(RlhfkitError, match=rf"^{model}: cannot build the model its config.json describes: .*negative dimension -5"):
        load_policy(str(model))


def test_item19_a_binary_corpus(run_cli, tmp_path):
    corpus = tmp_path / "corpus.bin"
    corpus.write_bytes(b"\x00\x01\xff\xfe" * 10)
    result = run_cli("init-model", "--out", tmp_path / "model", "--corpus", corpus)
    assert result.exit_code == 2
    assert f"--corpus {corpus}: not UTF-8 text (byte 2); give text, JSON or JSONL" in one_line_error(result)


# --- 20. messages that misled -----------------------------------------------------------------------------------------------


def test_item20_messages_name_the_option_and_what_is_wrong(run_cli, tmp_path):
    from rlhfkit.stages.train_rm import TrainRMConfig

    data = pairwise_file(tmp_path / "prefs.jsonl", [PAIR])
    common = {"model": "m", "out": str(tmp_path / "rm")}
    with pytest.raises(RlhfkitError, match=rf"^--data {tmp_path}: is a directory; give a JSONL file$"):
        build_config(TrainRMConfig, data=str(tmp_path), aspect="overall", kind="preference", **common)
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(RlhfkitError, match=rf"^--data-for relevance={missing}: no such file$"):
        build_config(TrainRMConfig, data=str(data), aspect="factuality,relevance", data_for=[f"relevance={missing}"], **common)
    with pytest.raises(RlhfkitError, match=r"^--segment-pooling applies to segment RMs only \(overall is a preference RM\); drop it$"):
        build_config(TrainRMConfig, data=str(data), aspect="overall", kind="preference", segment_pooling="mean", **common)
    # Several aspects: it applies to the segment ones (factuality), the others keep "end".
    cfg = build_config(TrainRMConfig, data=str(data), aspect="factuality,completeness", segment_pooling="mean", **common)
    assert [(one.aspect, one.segment_pooling) for one in cfg.per_aspect()] == [("factuality", "mean"), ("completeness", None)]

    result = run_cli("evaluate", "--generations", missing, "--out", tmp_path / "eval")
    assert result.exit_code == 2 and f"--generations {missing}: no such file" in one_line_error(result)
