"""Model loading, LoRA, and `rlhfkit init-model` (the tiny offline models)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import time

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

from rlhfkit import models
from rlhfkit.config import DEFAULT_SEED, build_config
from rlhfkit.errors import RlhfkitError
from rlhfkit.models import (
    EOS_TOKEN,
    PAD_TOKEN,
    add_lora,
    count_parameters,
    load_policy,
    load_pretrained,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    safe_torch_load,
)
from rlhfkit.stages.init_model import MODEL_RECORD, InitModelConfig, run_init_model


def gpt2_parameters(vocab: int, positions: int, embd: int, layers: int) -> int:
    """GPT-2 parameter count: token + position embeddings, per layer 2 LayerNorms (2E each),
    c_attn (E*3E + 3E), attn c_proj (E*E + E), c_fc (E*4E + 4E), mlp c_proj (4E*E + E) =
    12E² + 13E, a final LayerNorm (2E); the LM head is tied to the token embeddings."""
    return vocab * embd + positions * embd + layers * (12 * embd**2 + 13 * embd) + 2 * embd


# --- init-model -----------------------------------------------------------------------------


def test_init_model_cli_builds_a_loadable_model(run_cli, repo_root, tmp_path, monkeypatch):
    monkeypatch.chdir(repo_root)  # the default --corpus is the shipped data, relative to the repo
    out = tmp_path / "tiny"
    started = time.perf_counter()
    result = run_cli("init-model", "--out", out)
    elapsed = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    assert elapsed < 60
    assert "1,579,776 parameters" in result.output

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert (out / "model.safetensors").is_file()
    # Defaults: vocabulary 4096, 2048 positions, 4 layers of width 128.
    assert count_parameters(model).total == gpt2_parameters(4096, 2048, 128, 4) == 1_579_776
    assert len(tokenizer) == model.config.vocab_size == 4096
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) == (
        EOS_TOKEN,
        EOS_TOKEN,
        PAD_TOKEN,
    )
    assert model.config.eos_token_id == model.config.bos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id

    record = json.loads((out / MODEL_RECORD).read_text())
    assert record["arch"] == "gpt2" and record["parameters"] == 1_579_776 and record["seed"] == DEFAULT_SEED
    assert record["config"]["vocab_size"] == 4096 and record["versions"]["transformers"]
    for entry in record["corpus"]:
        assert (
            entry["sha256"] == hashlib.sha256((repo_root / entry["path"]).read_bytes()).hexdigest()
        )

    # max_positions must fit the QA task: every qa_dev prompt plus its longest gold answer.
    qa_dev = json.loads((repo_root / "data/qa_feedback/qa_dev.json").read_text(encoding="utf-8"))
    lengths = [
        len(tokenizer(ex["text"]).input_ids)
        + max(len(tokenizer(a).input_ids) for a in ex["answer"])
        + 1
        for ex in qa_dev
    ]
    assert max(lengths) <= model.config.n_positions
    assert record["longest_corpus_text_tokens"] <= model.config.n_positions


def test_init_model_is_deterministic_for_a_seed(repo_root, tmp_path):
    def build(name: str, seed: int):
        corpus = [str(repo_root / "data/qa_feedback/feedback.json")]
        options = {
            "vocab_size": 512,
            "n_layer": 1,
            "n_embd": 32,
            "n_head": 2,
            "corpus": corpus,
            "seed": seed,
        }
        return run_init_model(build_config(InitModelConfig, out=str(tmp_path / name), **options))

    first, again, other_seed = build("first", 3), build("again", 3), build("other", 4)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (
        other_seed / "model.safetensors"
    ).read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (other_seed / "tokenizer.json").read_bytes()


def test_init_model_replaces_its_own_output_but_not_a_foreign_directory(
    run_cli, repo_root, tmp_path
):
    corpus = repo_root / "data/qa_feedback/feedback.json"
    small = ["--vocab-size", 300, "--n-layer", 1, "--n-embd", 32, "--n-head", 2, "--corpus", corpus]
    out = tmp_path / "model"
    assert run_cli("init-model", "--out", out, *small).exit_code == 0
    assert run_cli("init-model", "--out", out, "--arch", "llama", *small).exit_code == 0
    assert json.loads((out / MODEL_RECORD).read_text())["arch"] == "llama"
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary directories left

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    result = run_cli("init-model", "--out", foreign, *small)
    assert result.exit_code == 2 and "not empty and was not written by init-model" in result.output
    assert (foreign / "todo.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"arch": "bert"}, "unknown --arch 'bert'; valid: gpt2, llama, t5"),
        ({"vocab_size": 100}, "--vocab-size must be at least 258"),
        ({"n_embd": 30, "n_head": 4}, "--n-embd (30) must be divisible by --n-head (4)"),
        ({"n_layer": 0}, "--n-layer must be >= 1, got 0"),
        ({"corpus": ["nowhere.json"]}, "--corpus nowhere.json: file not found"),
    ],
)
def test_init_model_rejects_bad_options(options, message, tmp_path, repo_root):
    values = {
        "out": str(tmp_path / "m"),
        "corpus": [str(repo_root / "data/qa_feedback/feedback.json")],
        **options,
    }
    with pytest.raises(RlhfkitError) as err:
        build_config(InitModelConfig, **values)
    assert message in str(err.value)


def test_init_model_reports_bad_corpus_json_with_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  "fine",\n  oops\n]\n')
    with pytest.raises(RlhfkitError, match=r"bad.json:3: invalid JSON"):
        run_init_model(build_config(InitModelConfig, out=str(tmp_path / "m"), corpus=[str(bad)]))
    assert not (tmp_path / "m").exists()


# --- the tiny models as policies and reward-model backbones ----------------------------------


def test_tiny_tokenizer_round_trips_and_keeps_offsets(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    text = (
        "Bloom is the second studio album by Troye Sivan, released on 31 August 2018.\n  It is OK."
    )
    encoded = tokenizer(text, return_offsets_mapping=True)
    assert tokenizer.decode(encoded.input_ids) == text  # no special tokens added
    # Offsets tile the text (a token's span includes the space before it, as in GPT-2).
    assert "".join(text[a:b] for a, b in encoded.offset_mapping) == text
    unicode_text = "Oscar Görres → “Bloom” 🌸"
    assert (
        tokenizer.decode(tokenizer(unicode_text).input_ids) == unicode_text
    )  # byte-level: lossless
    padded = tokenizer(["a b c", "a"], padding=True)
    assert padded.input_ids[1][-1] == tokenizer.pad_token_id and padded.attention_mask[1][-1] == 0
    assert load_tokenizer(tiny_model_dir, padding_side="left").padding_side == "left"


def test_load_policy_causal(tiny_model_dir):
    model, tokenizer, is_encoder_decoder = load_policy(tiny_model_dir, device="cpu")
    assert not is_encoder_decoder and type(model).__name__ == "GPT2LMHeadModel"
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    batch = tokenizer(["question: who? answer:", "hi"], return_tensors="pt", padding=True)
    logits = model(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], len(tokenizer))
    bf16, _, _ = load_policy(tiny_model_dir, dtype="bfloat16", device="cpu")
    assert bf16.dtype == torch.bfloat16


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or any(name in os.environ for name in models._GLIBC_MALLOC_SETTINGS),
    reason="the malloc tuning applies to glibc without the user's own malloc settings",
)
def test_loading_a_model_on_cpu_lets_freed_blocks_be_reused(tiny_model_dir):
    load_policy(tiny_model_dir, device="cpu")
    size, pages, blocks = 40 * 2**20, 40 * 2**20 // 4096, 5  # above glibc's largest default mmap threshold (32 MiB)
    torch.empty(size, dtype=torch.uint8).fill_(1)  # touched, then freed: the block to reuse
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(blocks):
        torch.empty(size, dtype=torch.uint8).fill_(1)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # Handed back to the kernel, every block faults once per 4 KiB page when touched
    # (5 x 10,240 = 51,200 faults); reused, none does, except now and then one whose heap
    # space moved (measured: at most one block in ten). Two blocks' worth is the bound.
    assert faults < 2 * pages


def test_load_policy_encoder_decoder(tiny_t5_dir):
    model, tokenizer, is_encoder_decoder = load_policy(tiny_t5_dir, device="cpu")
    assert is_encoder_decoder and type(model).__name__ == "T5ForConditionalGeneration"
    # Like T5's own tokenizer: eos appended, no bos; decoding starts from the pad token.
    ids = tokenizer("question: who wrote Bloom?").input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.bos_token is None
    assert model.config.decoder_start_token_id == tokenizer.pad_token_id
    batch = tokenizer(["question: who wrote Bloom?"], return_tensors="pt")
    labels = tokenizer(text_target=["Troye Sivan"], return_tensors="pt").input_ids
    loss = model(**batch, labels=labels).loss
    assert torch.isfinite(loss) and loss.item() > 0
    assert AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir).config.is_encoder_decoder


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "head", [AutoModelForSequenceClassification, AutoModelForTokenClassification]
)
def test_tiny_model_is_a_reward_model_backbone(arch, head, make_tiny_model):
    model_dir = make_tiny_model(arch)
    lm = AutoModelForCausalLM.from_pretrained(model_dir)
    reward_model = load_pretrained(head, model_dir, device="cpu", num_labels=3)
    assert reward_model.config.num_labels == 3 and reward_model.config.pad_token_id is not None
    # The backbone's weights are the saved ones; only the head is new.
    assert torch.equal(reward_model.get_input_embeddings().weight, lm.get_input_embeddings().weight)
    tokenizer = load_tokenizer(model_dir)
    batch = tokenizer(["It has 2 million people.", "Paris"], return_tensors="pt", padding=True)
    logits = reward_model(**batch).logits
    if head is AutoModelForSequenceClassification:
        assert logits.shape == (2, 3)
    else:
        assert logits.shape == (2, batch.input_ids.shape[1], 3)


# --- loader errors and helpers ----------------------------------------------------------------


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(
        RlhfkitError,
        match="model 'gpt2-large-does-not-exist' is neither a local directory nor reachable on the Hugging Face hub",
    ):
        load_policy("gpt2-large-does-not-exist")
    with pytest.raises(RlhfkitError, match="neither a local directory nor reachable"):
        load_tokenizer("./no/such/dir")


def test_directory_without_a_model_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(RlhfkitError, match="directory has no config.json"):
        load_policy(tmp_path)


def test_tokenizer_without_pad_gets_eos_as_pad(tiny_model_dir, tmp_path):
    backend = load_tokenizer(tiny_model_dir).backend_tokenizer
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN).save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.pad_token == EOS_TOKEN and tokenizer.pad_token_id == tokenizer.eos_token_id
    with pytest.raises(RlhfkitError, match="valid: left, right"):
        load_tokenizer(tiny_model_dir, padding_side="middle")


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RlhfkitError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(RlhfkitError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")  # second process of a launcher
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")


def test_resolve_dtype(monkeypatch):
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype("auto", "cuda") == torch.float32
    with pytest.raises(RlhfkitError, match="valid: auto, float32, bfloat16, float16"):
        resolve_dtype("fp8", "cpu")


def test_add_lora_defaults_and_counts(tiny_model_dir):
    model, _, _ = load_policy(tiny_model_dir, device="cpu")
    base = count_parameters(model)
    assert base.trainable == base.total == gpt2_parameters(1024, 2048, 64, 2)
    lora = add_lora(model, r=4, alpha=8, dropout=0.0)
    # peft's default for gpt2 adapts c_attn (64 → 192) in both layers: A is 4×64, B is 192×4,
    # so 2 × (256 + 768) = 2048 trainable parameters.
    assert count_parameters(lora) == (2048, base.total + 2048)
    adapted = {name.split(".lora_")[0] for name, p in lora.named_parameters() if p.requires_grad}
    assert adapted == {f"base_model.model.transformer.h.{i}.attn.c_attn" for i in range(2)}


def test_add_lora_keeps_a_reward_head_trainable(tiny_model_dir):
    reward_model = load_pretrained(
        AutoModelForSequenceClassification, tiny_model_dir, device="cpu", num_labels=2
    )
    lora = add_lora(reward_model, r=4, alpha=8, dropout=0.0)
    # 2048 LoRA parameters (as above) + the score head (64 × 2, no bias).
    assert count_parameters(lora).trainable == 2048 + 128


def test_add_lora_to_an_unknown_architecture_needs_target_modules():
    with pytest.raises(RlhfkitError, match="name the layers to adapt in target_modules"):
        add_lora(torch.nn.Sequential(torch.nn.Linear(3, 3)), r=2, alpha=4, dropout=0.0)


def test_safe_torch_load_reads_tensors_but_refuses_objects(tmp_path):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    assert safe_torch_load(tmp_path / "optimizer.pt")["param_groups"][0]["lr"] == 0.1

    torch.save({"obj": models.ParameterCount}, tmp_path / "evil.pt")  # pickles a class reference
    with pytest.raises(Exception, match="Weights only load failed"):
        safe_torch_load(tmp_path / "evil.pt")
