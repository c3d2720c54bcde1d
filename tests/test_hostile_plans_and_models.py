"""Issue 26 (items 1-6): hostile inputs, second pass. Each test reproduces one reported case: a
plan that reads and writes files anywhere or names Python code, redistribute --html over its
own files, a damaged rlhfkit_rm.json, UltraFeedback's pairs growing quadratically, a damaged
checkpoint on --resume, and lone surrogates in JSONL."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest


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
    from rlhfkit.schema import Generation, write_records

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
