"""`rlhfkit sft` on tiny offline models: masking, truncation, learning, resume, NaN guard, LoRA, T5."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from rlhfkit import finetune as sft
from rlhfkit.finetune import IGNORE_INDEX, encode_demonstration, make_collate, make_loss_fn
from rlhfkit.models import MODEL_SUBDIR, load_tokenizer
from rlhfkit.schema import Demonstration, Preference, load_records, write_records
from rlhfkit.training import checkpoint_dir, evaluate_loss, list_checkpoints, split_held_out

PROMPT = "question: What colour is the sky on a clear day? answer:"
RESPONSE = " The sky is blue."


def write_demos(path: Path, n: int = 24, response: str = RESPONSE) -> Path:
    """Repetitive demonstrations: varied prompts, one answer, so a few steps learn it."""
    records = [
        Demonstration(id=f"d{i}", prompt=f"question: What colour is the sky over town {i}? answer:", response=response)
        for i in range(n)
    ]
    write_records(path, records)
    return path


def sft_args(model_dir: Path, data: Path, out: Path, *extra) -> list:
    return ["sft", "--model", model_dir, "--data", data, "--out", out, "--batch-size", 4, "--lr", "1e-3",
            "--eval-fraction", "0.25", "--save-every", 0, *extra]


def read_metrics(out: Path) -> dict:
    return json.loads((out / "sft_metrics.json").read_text())


# --- tokenization, masking, truncation ----------------------------------------------------


def test_only_response_tokens_and_eos_are_supervised(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    example = encode_demonstration(tokenizer, PROMPT, RESPONSE, max_length=512, is_encoder_decoder=False)
    n_prompt = len(tokenizer(PROMPT)["input_ids"])
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    supervised = example.labels[n_prompt:]
    assert IGNORE_INDEX not in supervised and example.input_ids[n_prompt:] == supervised
    # the supervised tokens are exactly the response followed by eos
    assert supervised[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(supervised) == RESPONSE + "<|endoftext|>"
    assert tokenizer.decode(example.input_ids[:n_prompt]) == PROMPT
    assert (example.prompt_cut, example.response_cut) == (0, 0)

    # a batch pads on the right; pads are masked in attention and in the labels
    short = encode_demonstration(tokenizer, "q?", " a", max_length=512, is_encoder_decoder=False)
    batch = make_collate(tokenizer.pad_token_id, False)([example, short])
    width = len(example.input_ids)
    assert batch["input_ids"].shape == (2, width)
    assert batch["attention_mask"][1].tolist() == [1] * len(short.input_ids) + [0] * (width - len(short.input_ids))
    assert batch["labels"][1].tolist() == short.labels + [IGNORE_INDEX] * (width - len(short.labels))
    assert batch["first_target"] == len(tokenizer("q?")["input_ids"])


def test_loss_is_the_cross_entropy_of_the_response_tokens_only(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    examples = [
        encode_demonstration(tokenizer, PROMPT, RESPONSE, 512, False),
        encode_demonstration(tokenizer, "q?", " a longer answer than the first one", 512, False),
    ]
    batch = make_collate(tokenizer.pad_token_id, False)(examples)
    with torch.no_grad():
        loss_sum, count = make_loss_fn(model, False)(model, batch)
        # By hand: position t's logits predict token t + 1; sum -log p over supervised tokens.
        expected, n = 0.0, 0
        for example in examples:
            ids = torch.tensor([example.input_ids])
            logprobs = F.log_softmax(model(ids).logits[0].double(), dim=-1)
            for t, label in enumerate(example.labels):
                if label != IGNORE_INDEX:
                    expected -= logprobs[t - 1, label].item()
                    n += 1
    assert int(count) == n == len(tokenizer(RESPONSE)["input_ids"]) + len(tokenizer(" a longer answer than the first one")["input_ids"]) + 2
    assert loss_sum.item() == pytest.approx(expected, rel=1e-4)


def test_truncation_cuts_the_prompt_first(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    response_ids = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    P, R = len(prompt_ids), len(response_ids)
    assert P > 6 and R > 3

    # room for 3 prompt tokens: by default (right) the prompt keeps its first 3 (the head,
    # where a QA prompt's question is), as ppo's rollouts cut it; the response is whole
    example = encode_demonstration(tokenizer, PROMPT, RESPONSE, R + 3, False)
    assert example.input_ids == prompt_ids[:3] + response_ids
    assert (example.prompt_cut, example.response_cut) == (P - 3, 0)
    # --truncation-side left keeps its last 3
    example = encode_demonstration(tokenizer, PROMPT, RESPONSE, R + 3, False, "left")
    assert example.input_ids == prompt_ids[-3:] + response_ids
    assert example.labels == [IGNORE_INDEX] * 3 + response_ids
    assert (example.prompt_cut, example.response_cut) == (P - 3, 0)

    # the response alone does not fit: the prompt keeps max_length // 2 = 2 tokens, the
    # response its first 3 (no eos); it is still trained on
    example = encode_demonstration(tokenizer, PROMPT, RESPONSE, 5, False, "left")
    assert example.input_ids == prompt_ids[-2:] + response_ids[:3]
    assert example.labels == [IGNORE_INDEX] * 2 + response_ids[:3]
    assert (example.prompt_cut, example.response_cut) == (P - 2, R - 3)


def test_truncated_records_are_counted_and_reported(tiny_model_dir, tmp_path, run_cli):
    tokenizer = load_tokenizer(tiny_model_dir)
    long_prompt = "question: " + "a very long passage about the sky " * 6 + "answer:"
    long_response = " blue" * 40
    data = tmp_path / "d.jsonl"
    write_records(data, [
        Demonstration(id="fits", prompt="q?", response=" blue."),
        Demonstration(id="long-prompt", prompt=long_prompt, response=" blue."),
        Demonstration(id="long-response", prompt="q?", response=long_response),
        Demonstration(id="fits-too", prompt="q?", response=" sky."),
    ])
    max_length = 24
    assert len(tokenizer(long_prompt)["input_ids"]) > max_length
    assert len(tokenizer(long_response)["input_ids"]) > max_length
    out = tmp_path / "out"
    result = run_cli(*sft_args(tiny_model_dir, data, out, "--max-length", max_length, "--max-steps", 1, "--eval-fraction", 0))
    assert result.exit_code == 0, result.output
    assert "2 of 4 demonstrations exceed --max-length 24 and were truncated" in result.output
    assert "1 response(s) did not fit" in result.output
    metrics = read_metrics(out)
    assert metrics["truncated"] == 2 and metrics["responses_truncated"] == 1


# --- training runs ------------------------------------------------------------------------


def test_sft_lowers_held_out_loss_and_saves_a_loadable_model(tiny_model_dir, tmp_path, run_cli):
    data = write_demos(tmp_path / "demos.jsonl")
    out = tmp_path / "out"
    result = run_cli(*sft_args(tiny_model_dir, data, out, "--epochs", 3, "--lr", "1e-2", "--warmup-ratio", "0.1"))
    assert result.exit_code == 0, result.output
    metrics = read_metrics(out)
    # 24 demonstrations, 6 held out; 18 in batches of 4 -> 5 steps per epoch
    assert (metrics["train_examples"], metrics["eval_examples"], metrics["steps"]) == (18, 6, 15)
    assert metrics["eval_loss_after"] < 0.5 * metrics["eval_loss_before"]
    assert metrics["eval_perplexity_after"] == pytest.approx(2.718281828 ** metrics["eval_loss_after"], rel=1e-6)
    assert metrics["truncated"] == 0 and metrics["samples_per_second"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 15]
    assert evals[0]["eval_loss"] == metrics["eval_loss_before"] and evals[1]["eval_loss"] == metrics["eval_loss_after"]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 16))
    assert json.loads((out / "run_config.json").read_text())["stage"] == "sft"
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the saved directory loads with from_pretrained and scores the held-out split as the run did
    model = AutoModelForCausalLM.from_pretrained(out / MODEL_SUBDIR)
    tokenizer = AutoTokenizer.from_pretrained(out / MODEL_SUBDIR)
    _, held_out = split_held_out(load_records(data), 0.25, seed=42)
    examples = [encode_demonstration(tokenizer, r.prompt, r.response, 1024, False) for r in held_out]
    collate = make_collate(tokenizer.pad_token_id, False)
    loss = evaluate_loss(model, examples, collate, make_loss_fn(model, False), batch_size=4)
    assert loss == pytest.approx(metrics["eval_loss_after"], rel=1e-5)


def interrupt_training_after(monkeypatch, calls_allowed: int) -> None:
    """Make the stage's training loss raise KeyboardInterrupt after `calls_allowed` training calls."""
    real = sft.make_loss_fn
    calls = {"n": 0}

    def make_loss_fn(model, is_encoder_decoder):
        loss_fn = real(model, is_encoder_decoder)

        def wrapped(model, batch):
            if model.training:
                calls["n"] += 1
                if calls["n"] > calls_allowed:
                    raise KeyboardInterrupt
            return loss_fn(model, batch)

        return wrapped

    monkeypatch.setattr(sft, "make_loss_fn", make_loss_fn)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_model_dir, tmp_path, run_cli, monkeypatch):
    data = write_demos(tmp_path / "demos.jsonl")
    common = ["--max-steps", 6, "--save-every", 2, "--grad-accum", 2, "--batch-size", 2, "--warmup-ratio", "0.2"]
    straight = tmp_path / "straight"
    assert run_cli(*sft_args(tiny_model_dir, data, straight), *common).exit_code == 0

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        interrupt_training_after(patch, 9)  # 2 micro-batches a step: dies in step 5
        result = run_cli(*sft_args(tiny_model_dir, data, resumed), *common)
    assert result.exit_code == 130 and "interrupted" in result.output
    assert [p.name for p in list_checkpoints(resumed)] == ["step-2", "step-4"]
    assert not (resumed / MODEL_SUBDIR).exists()
    result = run_cli(*sft_args(tiny_model_dir, data, resumed), *common, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and "step 4 of 6" in result.output

    expected, actual = load_file(straight / MODEL_SUBDIR / "model.safetensors"), load_file(resumed / MODEL_SUBDIR / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    a, b = read_metrics(straight), read_metrics(resumed)
    assert (a["eval_loss_before"], a["eval_loss_after"]) == (b["eval_loss_before"], b["eval_loss_after"])
    assert b["resumed_from_step"] == 4
    # a checkpoint is a from_pretrained directory too
    assert AutoModelForCausalLM.from_pretrained(checkpoint_dir(resumed, 4)) is not None


def test_nan_loss_stops_with_exit_3_and_keeps_the_checkpoint(tiny_model_dir, tmp_path, run_cli, monkeypatch):
    data = write_demos(tmp_path / "demos.jsonl")
    real = sft.make_loss_fn
    calls = {"n": 0}

    def make_loss_fn(model, is_encoder_decoder):
        loss_fn = real(model, is_encoder_decoder)

        def poisoned(model, batch):
            loss, count = loss_fn(model, batch)
            if model.training:
                calls["n"] += 1
                if calls["n"] == 3:
                    loss = loss * float("nan")
            return loss, count

        return poisoned

    monkeypatch.setattr(sft, "make_loss_fn", make_loss_fn)
    out = tmp_path / "out"
    result = run_cli(*sft_args(tiny_model_dir, data, out, "--save-every", 2, "--max-steps", 5))
    assert result.exit_code == 3
    assert "training diverged at step 3: the loss is nan" in result.output
    assert "step-2" in result.output and list_checkpoints(out) == [checkpoint_dir(out, 2)]
    assert not (out / MODEL_SUBDIR).exists()
    weights = load_file(checkpoint_dir(out, 2) / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_lora_run_saves_a_merged_loadable_model(tiny_model_dir, tmp_path, run_cli):
    data = write_demos(tmp_path / "demos.jsonl")
    out = tmp_path / "lora"
    result = run_cli(*sft_args(tiny_model_dir, data, out, "--lora-r", 4, "--lora-alpha", 8, "--max-steps", 4, "--lr", "1e-2"))
    assert result.exit_code == 0, result.output
    metrics = read_metrics(out)
    assert metrics["lora_merged"] and metrics["saved_model_class"] == "GPT2LMHeadModel"
    assert metrics["trainable_parameters"] < metrics["total_parameters"] / 10
    assert not (out / MODEL_SUBDIR / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / MODEL_SUBDIR)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    merged_weights, base_weights = merged.state_dict(), base.state_dict()
    assert merged_weights.keys() == base_weights.keys()
    # LoRA adapted only the attention projections (peft's default for gpt2: c_attn)
    changed = {k for k in base_weights if not torch.equal(base_weights[k], merged_weights[k])}
    assert changed and all("attn.c_attn.weight" in k for k in changed)
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]


def test_lora_without_merge_saves_the_adapter(tiny_model_dir, tmp_path, run_cli):
    data = write_demos(tmp_path / "demos.jsonl", n=8)
    out = tmp_path / "adapter"
    result = run_cli(*sft_args(tiny_model_dir, data, out, "--lora-r", 2, "--max-steps", 1, "--no-merge-lora"))
    assert result.exit_code == 0, result.output
    adapter = json.loads((out / MODEL_SUBDIR / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and Path(adapter["base_model_name_or_path"]) == Path(tiny_model_dir)
    assert not (out / MODEL_SUBDIR / "model.safetensors").exists()


def test_t5_prompt_goes_to_the_encoder_and_the_response_is_learned(tiny_t5_dir, tmp_path, run_cli):
    tokenizer = load_tokenizer(tiny_t5_dir)
    example = encode_demonstration(tokenizer, PROMPT, RESPONSE, 512, is_encoder_decoder=True)
    # T5's tokenizer appends eos to the encoder input; the labels are response + eos
    assert tokenizer.decode(example.input_ids) == PROMPT + "<|endoftext|>"
    assert tokenizer.decode(example.labels) == RESPONSE + "<|endoftext|>"
    assert IGNORE_INDEX not in example.labels

    data = write_demos(tmp_path / "demos.jsonl")
    out = tmp_path / "t5"
    result = run_cli(*sft_args(tiny_t5_dir, data, out, "--epochs", 2))
    assert result.exit_code == 0, result.output
    metrics = read_metrics(out)
    assert metrics["eval_loss_after"] < 0.7 * metrics["eval_loss_before"]
    assert metrics["saved_model_class"] == "T5ForConditionalGeneration"
    assert AutoModelForSeq2SeqLM.from_pretrained(out / MODEL_SUBDIR).config.is_encoder_decoder


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p.write_text(""), "no 'demonstration' records (the file is empty)"),
        (lambda p: None, "no such file"),
        (
            lambda p: write_records(p, [Preference(id="x", prompt="q", chosen="a", rejected="b")]),
            "d.jsonl:1: expected a 'demonstration' record, found 'preference'",
        ),
        (lambda p: p.write_text('{"type": "demonstration", "id": "x", "prompt": "q"}\n'), "d.jsonl:1: missing field 'response'"),
    ],
    ids=["empty", "missing", "wrong-type", "missing-field"],
)
def test_bad_data_exits_2_with_a_message(tiny_model_dir, tmp_path, run_cli, setup, message):
    data = tmp_path / "d.jsonl"
    setup(data)
    result = run_cli(*sft_args(tiny_model_dir, data, tmp_path / "out"))
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-length", 4096], "--max-length 4096 exceeds the 2048 positions"),
        (["--dtype", "float16"], "--dtype float16 is not supported for training"),
        (["--lr", "inf"], "--lr must be a positive number"),
        (["--lr-scheduler", "step"], "--lr-scheduler must be one of linear, cosine, constant, constant_with_warmup"),
        (["--eval-fraction", "1"], "--eval-fraction must be in [0, 1)"),
    ],
)
def test_bad_options_exit_2_with_a_message(tiny_model_dir, tmp_path, run_cli, extra, message):
    data = write_demos(tmp_path / "demos.jsonl", n=4)
    result = run_cli(*sft_args(tiny_model_dir, data, tmp_path / "out", *extra))
    assert result.exit_code == 2
    assert message in result.output
