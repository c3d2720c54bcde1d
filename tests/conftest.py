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


# --- SmolLM2's real tokenizer (tests/fixtures/smollm2_tokenizer, Apache-2.0: see its NOTICE) ---

SMOLLM2_TOKENIZER_DIR = REPO_ROOT / "tests/fixtures/smollm2_tokenizer"
# Llama-3's template shape: the template writes its own BOS, and the tokenizer adds one too.
LLAMA3_STYLE_TEMPLATE = REPO_ROOT / "tests/fixtures/llama3_style_chat_template.jinja"


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer: 49,152 tokens, ChatML template, eos `<|im_end|>`,
    bos `<|im_start|>` (not added by the tokenizer)."""
    from rlhfkit.models import load_tokenizer

    return load_tokenizer(str(SMOLLM2_TOKENIZER_DIR))


@pytest.fixture(scope="session")
def make_tiny_smollm2(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`make_tiny_smollm2(style="chatml")` -> a tiny random Llama directory with SmolLM2's tokenizer
    and template (built once per style, ~1 s). style="llama3": the tokenizer adds a BOS and the
    template writes its own (LLAMA3_STYLE_TEMPLATE), as Llama-3's do."""
    from transformers import AutoTokenizer

    from rlhfkit.models import build_tiny_model, save_model

    built: dict[str, Path] = {}

    def make(style: str = "chatml") -> Path:
        if style not in built:
            tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER_DIR, add_bos_token=style == "llama3")
            if style == "llama3":
                tokenizer.chat_template = LLAMA3_STYLE_TEMPLATE.read_text(encoding="utf-8")
            model = build_tiny_model("llama", tokenizer, n_layer=2, n_embd=32, n_head=2, max_positions=1024)
            out = tmp_path_factory.mktemp(f"tiny-smollm2-{style}") / "model"
            out.mkdir()
            save_model(model, tokenizer, out)
            built[style] = out
        return built[style]

    return make
