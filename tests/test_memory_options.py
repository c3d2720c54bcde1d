"""--gradient-checkpointing and --attn-implementation: the same gradients, the options reach the
model, are saved in run_config.json, and a wrong choice is one line before any model loads."""

from __future__ import annotations

import json

import pytest
import torch

from rlhfkit.models import load_policy


def _gradients(model_dir, *, gradient_checkpointing: bool, dropout_seed: int | None) -> dict[str, torch.Tensor]:
    model, _, is_encoder_decoder = load_policy(
        str(model_dir), dtype="float32", device="cpu", gradient_checkpointing=gradient_checkpointing
    )
    checkpointing = getattr(type(model), "is_activation_checkpointing", None) or type(model).is_gradient_checkpointing
    assert checkpointing.fget(model) == gradient_checkpointing
    model.train()
    ids = torch.randint(0, 1000, (3, 24), generator=torch.Generator().manual_seed(0))
    labels = ids[:, :8].contiguous() if is_encoder_decoder else ids
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
    model(input_ids=ids, labels=labels).loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_gradient_checkpointing_gives_bitwise_the_same_gradients(make_tiny_model, arch):
    # Tolerance 0, derived: checkpointing drops a layer's activations after the forward and
    # recomputes them in the backward with the same kernels, on the same inputs, on the same
    # (single) thread, so the recomputed activations are the same bits; the backward then runs
    # the same operations on the same values in the same order. No rounding step differs, so
    # on CPU in fp32 the gradients are equal bit for bit. Dropout stays on (GPT-2 and T5 have
    # p = 0.1): the non-reentrant checkpoint restores the RNG state before recomputing, so the
    # masks are the same too (seeded here).
    model_dir = make_tiny_model(arch)
    plain = _gradients(model_dir, gradient_checkpointing=False, dropout_seed=7)
    checkpointed = _gradients(model_dir, gradient_checkpointing=True, dropout_seed=7)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.equal(plain[name], checkpointed[name]), name


def test_gradient_checkpointing_keeps_fewer_activations(make_tiny_model):
    # Bytes autograd keeps for the backward (saved-tensor hooks see every tensor a forward
    # saves outside a checkpointed region; inside one only the layer's inputs are held). A
    # 6-layer model keeps each layer's attention and MLP activations without checkpointing;
    # with it, one hidden state per layer plus the embeddings and the LM head's: expect well
    # under half (measured 2026-12-07: see the module's test below for the 30-layer figure).
    model_dir = make_tiny_model("llama", n_layer=6)
    saved = {}
    for gradient_checkpointing in (False, True):
        model, _, _ = load_policy(str(model_dir), dtype="float32", device="cpu", gradient_checkpointing=gradient_checkpointing)
        model.train()
        ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
        total = [0]

        def pack(tensor, total=total):
            total[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        saved[gradient_checkpointing] = total[0]
    assert saved[True] < saved[False] / 2, saved


def test_stages_pass_and_save_the_options(run_cli, make_tiny_model, tmp_path):
    from rlhfkit.schema import Demonstration, write_records

    model_dir = make_tiny_model("llama")
    data = tmp_path / "demos.jsonl"
    write_records(data, [Demonstration(id=f"d{i}", prompt=f"question {i}?", response=" an answer.") for i in range(4)])
    out = tmp_path / "sft"
    result = run_cli("sft", "--model", model_dir, "--data", data, "--out", out, "--max-steps", "1", "--batch-size", "2",
                     "--eval-fraction", "0", "--gradient-checkpointing", "--attn-implementation", "eager")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "run_config.json").read_text())["config"]
    assert saved["gradient_checkpointing"] is True and saved["attn_implementation"] == "eager"


def test_the_model_gets_the_attention_kernel_asked_for(make_tiny_model):
    model_dir = make_tiny_model("llama")
    for name in ("eager", "sdpa"):
        model, _, _ = load_policy(str(model_dir), dtype="float32", device="cpu", attn_implementation=name)
        assert model.config._attn_implementation == name


@pytest.mark.parametrize(
    ("stage", "value", "message"),
    [
        ("sft", "flash", "unknown --attn-implementation 'flash'; valid: sdpa, eager, flash_attention_2"),
        ("sft", "flash_attention_2", "--attn-implementation flash_attention_2 needs a CUDA device"),
        ("train-rm", "flash", "unknown --attn-implementation 'flash'"),
        ("ppo", "flash", "unknown --attn-implementation 'flash'"),
    ],
)
def test_a_wrong_attention_kernel_is_one_line(run_cli, tiny_model_dir, tmp_path, stage, value, message):
    data = tmp_path / "records.jsonl"
    data.write_text("")
    required = {
        "sft": ["--model", tiny_model_dir, "--data", data],
        "train-rm": ["--model", tiny_model_dir, "--data", data, "--aspect", "preference"],
        "ppo": ["--policy", tiny_model_dir, "--prompts", data, "--rewards", "len=1", "--device", "cpu"],
    }[stage]
    result = run_cli(stage, *required, "--out", tmp_path / "out", "--device", "cpu", "--attn-implementation", value)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
