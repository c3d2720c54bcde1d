"""Shared test fixtures: offline environment, tiny models built once per session, the CLI."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Before anything imports huggingface_hub/transformers, which read these at import time
# (rlhfkit modules are imported inside the fixtures, after this).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    # The tests' models are tiny: one intra-op thread is faster than two fighting over
    # two cores (and keeps runs repeatable when the machine is loaded).
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (bench/gpu_check.py runs it on a GPU box)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

# Small enough to build in about a second; vocabulary 1024 keeps the longest qa_dev prompt
# (~1,800 tokens) within the 2048 positions, so tests can feed real QA prompts.
TINY_SETTINGS = {
    "vocab_size": 1024,
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 2,
    "max_positions": 2048,
    "seed": 0,
}


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`make_tiny_model(arch="gpt2", **init_model_options)` → a model directory, built once per session.

    Uses exactly the code of `rlhfkit init-model` (with TINY_SETTINGS unless overridden).
    """
    from rlhfkit.config import build_config
    from rlhfkit.stages.init_model import InitModelConfig, run_init_model

    built: dict[tuple, Path] = {}

    def make(arch: str = "gpt2", **overrides: Any) -> Path:
        options = {
            **TINY_SETTINGS,
            "corpus": [str(REPO_ROOT / "data/qa_feedback/feedback.json")],
            **overrides,
        }
        key = (arch, tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in built:
            out = tmp_path_factory.mktemp(f"tiny-{arch}") / "model"
            built[key] = run_init_model(
                build_config(InitModelConfig, out=str(out), arch=arch, **options)
            )
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(make_tiny_model: Callable[..., Path]) -> Path:
    """A tiny GPT-2 (causal LM) directory: from_pretrained-loadable model and tokenizer."""
    return make_tiny_model("gpt2")


@pytest.fixture(scope="session")
def tiny_t5_dir(make_tiny_model: Callable[..., Path]) -> Path:
    """A tiny T5 (encoder-decoder) directory; its tokenizer appends eos like T5's."""
    return make_tiny_model("t5")


@pytest.fixture
def run_cli() -> Callable[..., Any]:
    """`run_cli("stage", "--opt", value, ...)` → click Result of the real `rlhfkit` app."""
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    runner = CliRunner()

    def invoke(*args: Any) -> Any:
        return runner.invoke(app, [str(arg) for arg in args], catch_exceptions=False)

    return invoke
