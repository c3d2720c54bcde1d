"""What only a CUDA device can show (`gpu` marker: skipped without one; bench/gpu_check.py runs
these on the GPU box, with tests/test_bf16.py's cuda cases)."""

from __future__ import annotations

import json

import pytest
import torch

from rlhfkit.models import resolve_dtype
from rlhfkit.schema import Demonstration, write_records

pytestmark = pytest.mark.gpu


def test_auto_dtype_is_bf16_on_a_bf16_gpu():
    assert torch.cuda.is_bf16_supported()
    assert resolve_dtype("auto", "cuda") == torch.bfloat16


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_sft_with_checkpointing_and_lora_on_cuda(run_cli, make_tiny_model, tmp_path, attention):
    # Non-reentrant checkpointing under bf16 autocast with a frozen bf16 LoRA base: the
    # combination whose kernels only a GPU runs.
    data = tmp_path / "demos.jsonl"
    write_records(data, [Demonstration(id=f"d{i}", prompt=f"question {i}?", response=" an answer.") for i in range(8)])
    out = tmp_path / "sft"
    result = run_cli("sft", "--model", make_tiny_model("llama"), "--data", data, "--out", out, "--device", "cuda", "--dtype", "auto",
                     "--max-steps", "3", "--batch-size", "4", "--eval-fraction", "0", "--lora-r", "8", "--gradient-checkpointing",
                     "--attn-implementation", attention)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "sft_metrics.json").read_text())
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
