"""`make gpu-check DRY_RUN=1`: the GPU check and its wheels are complete (offline, on CPU), and the
dry run finds what would stop it on the box."""

from __future__ import annotations

import json

import pytest

from bench import gpu_check


def test_the_dry_run_finds_the_gpu_check_ready(tmp_path):
    assert gpu_check.dry_run(tmp_path) == []


def test_an_import_the_box_lacks_is_named_with_its_file(tmp_path, monkeypatch):
    # trl travels as a wheel; without it in the lock, bench_ppo's `from trl import ...` is unmet.
    lock = json.loads(gpu_check.WHEELS_FILE.read_text())
    del lock["trl"]
    fake = tmp_path / "wheels.json"
    fake.write_text(json.dumps(lock))
    monkeypatch.setattr(gpu_check, "WHEELS_FILE", fake)
    monkeypatch.setattr(gpu_check, "check_plan", lambda workdir: [])
    problems = gpu_check.dry_run(tmp_path)
    assert "bench/bench_ppo.py: imports trl (trl), which is neither on the box nor in bench/gpu_wheels.json" in problems


@pytest.mark.parametrize(
    ("requirement", "problem"),
    [
        ("transformers>=5.20", "needs transformers>=5.20, the box would have 5.17.0"),  # box: 5.17.0
        ("dill<0.4", "needs dill<0.4, the box would have 0.4.1"),  # carried: 0.4.1
        ("left-pad", "left-pad is neither on the box nor carried"),
        ("transformers>=5.0", None),
        ("pandas>=99", None),  # on the box, version not read: accepted
        ("pywin32; sys_platform == 'win32'", None),  # not for Linux
    ],
)
def test_requirements_are_checked_against_the_box_and_the_wheels(requirement, problem):
    box, lock = json.loads(gpu_check.BOX_FILE.read_text()), json.loads(gpu_check.WHEELS_FILE.read_text())
    assert gpu_check.requirement_problem(requirement, box, lock) == problem


def test_wheels_over_the_carry_limit_are_refused(tmp_path, monkeypatch):
    box = json.loads(gpu_check.BOX_FILE.read_text())
    box["carry_limit_bytes"] = 1 << 20  # 1 MiB: less than the tree alone
    fake = tmp_path / "box.json"
    fake.write_text(json.dumps(box))
    monkeypatch.setattr(gpu_check, "BOX_FILE", fake)
    monkeypatch.setattr(gpu_check, "check_plan", lambda workdir: [])
    problems = gpu_check.dry_run(tmp_path)
    assert any("exceed the 1 MiB that travel" in p for p in problems), problems
