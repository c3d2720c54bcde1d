"""`rlhfkit init-model`: build a tiny randomly initialised model and tokenizer, offline.

The directory it writes is an ordinary `save_pretrained` directory (safetensors): the
pipeline's stages, AutoModelForCausalLM / AutoModelForSeq2SeqLM, and reward-model heads
(AutoModelForSequenceClassification / AutoModelForTokenClassification with `num_labels`)
load it like any hub model. A byte-level BPE tokenizer is trained on the given corpus (by
default the shipped QA-Feedback data), so QA prompts tokenize to sensible lengths: with the
default 4096 tokens the longest qa_dev.json prompt is ~1,400 tokens and the longest gold
answer ~430, which is why `max_positions` defaults to 2048.

What was built is recorded in `rlhfkit_model.json` beside the model (options, parameter
count, corpus files with their sha256, package versions); the same options and seed give
byte-identical weights and tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.chat import SIMPLE_CHAT_TEMPLATE
from rlhfkit.config import DEFAULT_SEED, opt
from rlhfkit.console import console
from rlhfkit.errors import RlhfkitError
from rlhfkit.io import config_to_dict, shipped_path, write_json
from rlhfkit.models import (
    TINY_ARCHS,
    build_tiny_model,
    build_tiny_tokenizer,
    count_parameters,
    save_weights,
)
from rlhfkit.runs import package_versions
from rlhfkit.schema import read_json_file, read_json_lines

MODEL_RECORD = "rlhfkit_model.json"
SHIPPED_CORPUS = ["data/qa_feedback/feedback.json", "data/qa_feedback/qa_dev.json"]
# The byte-level alphabet (256 symbols) plus the two special tokens.
MIN_VOCAB_SIZE = 258


@dataclass
class InitModelConfig:
    out: str = opt("models/tiny", "Directory to write the model and tokenizer to.", panel="Output")
    arch: str = opt(
        "gpt2",
        f"Architecture: {', '.join(TINY_ARCHS)} (t5 is encoder-decoder, as the paper's QA policy).",
        panel="Model",
    )
    vocab_size: int = opt(
        4096, "Tokenizer vocabulary size (byte-level BPE, incl. 2 special tokens).",
        panel="Model",
    )
    n_layer: int = opt(4, "Transformer layers (T5: in the encoder and in the decoder each).", panel="Model")
    n_embd: int = opt(128, "Hidden size.", panel="Model")
    n_head: int = opt(4, "Attention heads (must divide --n-embd).", panel="Model")
    max_positions: int = opt(
        2048, "Longest sequence in tokens, prompt + response (T5: the tokenizer's limit only).",
        panel="Model",
    )
    corpus: list[str] = opt(
        SHIPPED_CORPUS,
        "Text to train the tokenizer on: .json/.jsonl (every string in it) or plain text; repeatable.",
        panel="Data",
    )
    seed: int = opt(DEFAULT_SEED, "Seed for the weights' random initialisation.", panel="Training")

    def validate(self) -> None:
        if self.arch not in TINY_ARCHS:
            raise RlhfkitError(f"unknown --arch {self.arch!r}; valid: {', '.join(TINY_ARCHS)}")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise RlhfkitError(
                f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 byte symbols + 2 special tokens), "
                f"got {self.vocab_size}"
            )
        for name in ("n_layer", "n_embd", "n_head", "max_positions"):
            if getattr(self, name) < 1:
                raise RlhfkitError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.n_embd % self.n_head:
            raise RlhfkitError(
                f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head})"
            )
        if not self.corpus:
            raise RlhfkitError("--corpus: give at least one file to train the tokenizer on")
        self.corpus = [str(shipped_path(path)) for path in self.corpus]
        for path in self.corpus:
            if not Path(path).is_file():
                raise RlhfkitError(
                    f"--corpus {path}: file not found"
                )
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise RlhfkitError(f"--out {out}: exists and is not a directory")
        if out.is_dir() and any(out.iterdir()) and not (out / MODEL_RECORD).is_file():
            raise RlhfkitError(
                f"--out {out}: directory is not empty and was not written by init-model; choose another --out"
            )


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)


def read_corpus(path: Path) -> list[str]:
    """Every string in a .json/.jsonl file (questions, passages, answers...), or a text file's text."""
    if path.suffix == ".json":
        return list(_strings(read_json_file(path)))
    if path.suffix == ".jsonl":
        return [text for _, value in read_json_lines(path) for text in _strings(value)]
    try:
        return [path.read_bytes().decode("utf-8")]
    except UnicodeDecodeError as err:
        raise RlhfkitError(f"--corpus {path}: not UTF-8 text (byte {err.start}); give text, JSON or JSONL") from None


def _longest_in_tokens(tokenizer: Any, texts: list[str]) -> int:
    """Token count of the longest text. A byte-level text has at most one token per UTF-8
    byte, so once texts get shorter in bytes than the longest so far in tokens, we stop."""
    longest = 0
    for text in sorted({t.encode("utf-8") for t in texts}, key=len, reverse=True):
        if len(text) <= longest:
            break
        longest = max(
            longest, len(tokenizer(text.decode("utf-8"), add_special_tokens=False).input_ids)
        )
    return longest


def _chmod_as_mkdir(path: Path) -> None:
    """Give a mkdtemp directory (always 0700) the mode a plain mkdir would have given it."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)


def _replace_dir(built: Path, out: Path) -> None:
    """Move the finished `built` directory to `out`, so `out` is never half-written."""
    if not out.exists():
        os.replace(built, out)
        return
    previous = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, previous / out.name)
    try:
        os.replace(built, out)
    except OSError:
        os.replace(previous / out.name, out)
        raise
    shutil.rmtree(previous)


def run_init_model(cfg: InitModelConfig) -> Path:
    """Build a tiny random GPT-2 / Llama / T5 model and a BPE tokenizer for offline runs.

    The tokenizer is trained on --corpus (default: the shipped QA-Feedback files); the model
    is written with save_pretrained, so every stage and from_pretrained can load --out.
    """
    started = time.perf_counter()
    corpus_paths = [Path(p) for p in cfg.corpus]
    texts: list[str] = []
    corpus_record = []
    for path in corpus_paths:
        file_texts = read_corpus(path)
        texts.extend(file_texts)
        corpus_record.append(
            {
                "path": str(path),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "texts": len(file_texts),
            }
        )
    if not any(t.strip() for t in texts):
        raise RlhfkitError(
            f"--corpus {', '.join(cfg.corpus)}: no text found to train the tokenizer on"
        )

    tokenizer = build_tiny_tokenizer(
        texts, cfg.vocab_size, append_eos=cfg.arch == "t5", model_max_length=cfg.max_positions
    )
    if cfg.arch != "t5":
        # A simple chat template, so conversational records take the templated path end to
        # end in tests (an encoder-decoder policy reads a prompt, not a chat: none for T5).
        tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
    model = build_tiny_model(
        cfg.arch,
        tokenizer,
        n_layer=cfg.n_layer,
        n_embd=cfg.n_embd,
        n_head=cfg.n_head,
        max_positions=cfg.max_positions,
        seed=cfg.seed,
    )
    longest = _longest_in_tokens(tokenizer, texts)
    parameters = count_parameters(model).total

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _chmod_as_mkdir(built)
        save_weights(model, tokenizer, built, out)
        write_json(
            built / MODEL_RECORD,
            {
                "stage": "init-model",
                "arch": cfg.arch,
                "parameters": parameters,
                "vocab_size": len(tokenizer),
                "max_positions": cfg.max_positions,
                "longest_corpus_text_tokens": longest,
                "seed": cfg.seed,
                "corpus": corpus_record,
                "config": config_to_dict(cfg),
                "versions": package_versions(),
                "command": sys.argv,
            },
        )
        _replace_dir(built, out)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise

    console.print(
        f"init-model: {out}: {cfg.arch}, {parameters:,} parameters, vocabulary {len(tokenizer):,}, "
        f"{cfg.max_positions} positions ({time.perf_counter() - started:.1f}s)",
        soft_wrap=True,
    )
    if longest > cfg.max_positions:
        console.print(
            f"note: the longest corpus text is {longest} tokens, more than --max-positions {cfg.max_positions}; "
            "such prompts will need truncation",
            soft_wrap=True,
        )
    return out
