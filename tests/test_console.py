"""The console people see: no library chatter, progress lines in logs, --help panels, did-you-mean."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

from rich.console import Console

from rlhfkit import runs
from rlhfkit.schema import PromptRecord, Span, SpanFeedback, write_records

RESPONSES = ["Bloom was written by Troye Sivan. It was released in 2018.", "The bridge opened in 1937. It is red."]


def write_span_feedback(path, n: int = 16) -> None:
    records = []
    for i in range(n):
        response = RESPONSES[i % 2]
        first_end = response.index(".") + 1
        spans = [Span(0, first_end, "Unverifiable", "factuality")] if i % 2 else []
        records.append(SpanFeedback(id=f"s{i}", prompt=f"question: who made thing {i}? answer:", response=response,
                                    spans=spans, aspects=["factuality"]))
    write_records(path, records)


# Runs two stages in one fresh interpreter (so import-time output counts) via the real app.
SCRIPT = """
import sys
from rlhfkit.cli import app
for args in ({train_rm!r}, {ppo!r}):
    try:
        app(args, prog_name="rlhfkit")
    except SystemExit as exit:
        if exit.code:
            raise
"""


def test_train_rm_and_ppo_print_only_their_own_lines(make_tiny_model, repo_root, tmp_path):
    # 256 positions: the default --max-length (factuality preset: 640) and ppo's default
    # --max-prompt-length (1024) do not fit, so each stage prints its one-line notice.
    model = make_tiny_model("gpt2", max_positions=256)
    write_span_feedback(tmp_path / "spans.jsonl")
    write_records(tmp_path / "prompts.jsonl", [PromptRecord(id=f"p{i}", prompt=f"question: what is {i}? answer:") for i in range(4)])
    rm = tmp_path / "rm"
    train_rm = ["train-rm", "--aspect", "factuality", "--data", str(tmp_path / "spans.jsonl"), "--model", str(model),
                "--out", str(rm), "--max-steps", "4", "--batch-size", "4", "--eval-fraction", "0.25"]
    ppo = ["ppo", "--policy", str(model), "--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "ppo"),
           "--rewards", "fact=1", "--rm", f"fact={rm}", "--steps", "3", "--prompts-per-step", "2",
           "--samples-per-prompt", "2", "--minibatch-size", "4", "--ppo-epochs", "1", "--max-new-tokens", "8"]
    # Not the test session's quieting: a user's shell has none of it.
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "COLUMNS", "PYTHONWARNINGS")}
    env["PYTHONPATH"] = str(repo_root)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(train_rm=train_rm, ppo=ppo)],
        capture_output=True, text=True, env=env, cwd=repo_root, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    own = ("train-rm", "ppo", "reward '")
    chatter = [line for line in lines if not line.startswith(own)]
    assert chatter == []
    # stdout and stderr are pipes here, as in a log file: a progress line per step for these
    # short runs (one every ceil(total / 10) steps: ceil(4/10) = ceil(3/10) = 1).
    train_lines = [line for line in lines if re.match(r"train-rm factuality: step \d/4 · loss \d\.\d{4} · .* samples/s · ETA ", line)]
    assert [line.split()[3] for line in train_lines] == ["1/4", "2/4", "3/4", "4/4"]
    ppo_lines = [line for line in lines if re.match(
        r"ppo: step \d/3 · reward [+-]\d\.\d{4} · factuality [+-]\d+\.\d{4} \(raw\) · KL -?\d\.\d{4} · .* tokens/s · ETA ", line)]
    assert [line.split()[2] for line in ppo_lines] == ["1/3", "2/3", "3/3"]
    # the summary, with each source's raw score
    assert any(re.match(r"ppo: 3 step\(s\) to step 3: reward/total [+-]\d\.\d{4} -> [+-]\d\.\d{4} "
                        r"\(reward/raw/factuality [+-]\d+\.\d{4} -> [+-]\d+\.\d{4}\), KL ", line) for line in lines)
    # the length notices, each one line: 640 -> 256; 1024 + 8 -> 248 + 8
    assert "train-rm: note: default --max-length 640 exceeds the model's 256 positions; using --max-length 256 (give the option to choose)" in lines
    assert ("ppo: note: default --max-prompt-length 1024 + --max-new-tokens 8 exceeds the model's 256 positions; "
            "using --max-prompt-length 248 + --max-new-tokens 8 (give the option to choose)") in lines
    # not wrapped at 80 columns
    assert any(len(line) > 80 and "reward model saved to" in line for line in lines)


def _capture(monkeypatch, terminal: bool) -> io.StringIO:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=terminal, width=200, soft_wrap=not terminal)
    monkeypatch.setattr(runs, "console", console)
    return buffer


def test_progress_lines_without_a_terminal(monkeypatch):
    buffer = _capture(monkeypatch, terminal=False)
    with runs.progress_bar("train", 25) as advance:
        advance(0)
        for step in range(1, 26):
            advance(metrics={"loss": 1 / step, "lr": 1e-3})
    lines = buffer.getvalue().splitlines()
    # every ceil(25 / 10) = 3 steps (3, 6, ..., 24: 8 lines) and at the last step 25
    assert [line.split()[2] for line in lines] == [f"{s}/25" for s in (3, 6, 9, 12, 15, 18, 21, 24, 25)]
    assert lines[0].startswith("train: step 3/25 · loss 0.3333 · ETA ")  # 1/3 = 0.3333
    assert lines[-1].startswith("train: step 25/25 · loss 0.0400 · ETA 0:00:00")


def test_resumed_progress_counts_from_the_checkpoint(monkeypatch):
    buffer = _capture(monkeypatch, terminal=False)
    with runs.progress_bar("ppo", 10) as advance:
        advance(8)  # resumed at step 8: no line for the skip
        advance(1, metrics={"reward/total": 0.5, "kl": 0.25})
        # with --normalize-rewards the total is ~0: the line shows each source's raw score too
        advance(1, metrics={"reward/total": -0.5, "reward/raw/helpfulness": 2.75, "reward/normalized/helpfulness": 0.0,
                            "reward/weighted/helpfulness": 0.0, "kl": 0.125})
    assert [line.split(" · ETA")[0] for line in buffer.getvalue().splitlines()] == [
        "ppo: step 9/10 · reward +0.5000 · KL 0.2500",
        "ppo: step 10/10 · reward -0.5000 · helpfulness +2.7500 (raw) · KL 0.1250",
    ]


def test_progress_bar_in_a_terminal_shows_the_loss(monkeypatch):
    buffer = _capture(monkeypatch, terminal=True)
    with runs.progress_bar("sft", 2) as advance:
        advance(metrics={"loss": 0.75})
        advance(metrics={"loss": 0.5})
    text = buffer.getvalue()
    assert "loss 0.5000" in text and "2/2" in text
    assert "sft: step" not in text  # no log lines beside the bar


def test_help_groups_options_in_panels_required_first(run_cli):
    result = run_cli("ppo", "--help")
    assert result.exit_code == 0
    text = result.output
    panels = re.findall(r"╭─ (\w+) ─", text)
    # the required options first (--policy, --prompts, --out, --rewards), then the panels in
    # their fixed order, --config/--debug/--help last
    assert panels == ["Required", "Data", "Model", "Rewards", "Training", "PPO", "Generation", "Distributed", "Output", "Other"]
    required = text.split("╭─ Required ─")[1].split("╰")[0]
    assert "--prompts" in required and "--eval-prompts" not in required
    assert "Examples" in text and "rlhfkit ppo --policy runs/sft" in text
    assert "--report-to" in text.split("╭─ Output ─")[1]


def test_did_you_mean(run_cli, tmp_path):
    result = run_cli("trian-rm")
    assert result.exit_code == 2 and "No such command 'trian-rm'. Did you mean train-rm?" in result.output
    data = tmp_path / "spans.jsonl"
    write_span_feedback(data, 2)
    result = run_cli("train-rm", "--aspect", "factuallity", "--data", data, "--model", tmp_path, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "--aspect 'factuallity' has no preset (did you mean 'factuality'?)" in result.output


def test_every_help_example_parses(repo_root, monkeypatch):
    import shlex

    from rlhfkit.cli import EXAMPLES, STAGES, stage_command

    monkeypatch.chdir(repo_root)  # an example's --config names a shipped file
    assert set(EXAMPLES) <= set(STAGES)
    for name, examples in EXAMPLES.items():
        command = stage_command(name)
        for example in examples:
            words = shlex.split(example)
            assert words[:2] == ["rlhfkit", name]
            command.make_context(name, words[2:])  # parses every option; runs nothing
