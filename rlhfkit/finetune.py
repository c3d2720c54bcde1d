"""Supervised fine-tuning on demonstrations: the loop behind `rlhfkit sft` (the policy PPO
starts from) and `rlhfkit critique-revise train` (which fine-tunes on critique and revision
demonstrations with the same options, `FinetuneOptions`).

The loss is the language-model cross-entropy on response tokens only: prompt tokens are
inputs, never targets (their labels are -100). Causal LMs see `prompt + response + eos`;
encoder-decoder models (the paper's T5 policy) read the prompt in the encoder and predict
`response + eos` in the decoder. Prompts are tokenized exactly as the ppo stage's rollouts
tokenize them (`tokenizer(prompt)`, special tokens included), so the policy is trained on
the token sequences it will later generate from.

Records longer than `--max-length` are cut, and counted:
- the prompt loses tokens first, on `--truncation-side` (default right: the head, where a QA
  prompt's question is, stays; the same rule as ppo's rollouts, so the policy is trained on
  the prompts it will see); the response is what is being learned;
- a response that alone leaves no room for its prompt keeps `max_length // 2` prompt tokens
  and is cut on the right to the rest, losing its eos: it is still trained on, so a long
  answer's beginning is not thrown away.
For an encoder-decoder, `--max-length` bounds the prompt and the response each.

The held-out split (`--eval-fraction`) gives eval loss and perplexity before and after
training; the training loop itself (accumulation, schedule, checkpoints, resume, NaN
guard) is rlhfkit.training's.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rlhfkit.chat import (
    APPLY_CHAT_TEMPLATE_HELP,
    assistant_content,
    assistant_pieces,
    has_chat_template,
    load_chat_template,
    override_chat_template,
    prompt_messages,
)
from rlhfkit.config import DEFAULT_SEED, REQUIRED, opt
from rlhfkit.console import console
from rlhfkit.distributed import (
    DEEPSPEED_HELP,
    OFFLOAD_OPTIMIZER_HELP,
    OFFLOAD_PARAMS_HELP,
    check_deepspeed_options,
    full_parameters,
    is_main_process,
)
from rlhfkit.errors import RlhfkitError
from rlhfkit.generation import model_max_positions
from rlhfkit.lengths import fit_default_lengths
from rlhfkit.model_card import PUSH_TO_HUB_HELP, finish_model, scalar_metrics
from rlhfkit.models import (
    ATTN_IMPLEMENTATION_HELP,
    GRADIENT_CHECKPOINTING_HELP,
    add_lora,
    check_attn_implementation,
    check_training_options,
    count_parameters,
    load_policy,
    resolve_device,
    resolve_dtype,
    save_model,
)
from rlhfkit.plots import Panel, Series, draw, save_png
from rlhfkit.runs import OVERWRITE_HELP, RunDir, set_seed
from rlhfkit.schema import Demonstration, check_data_file, load_records
from rlhfkit.tracking import REPORT_TO_HELP, parse_report_to
from rlhfkit.training import (
    FitResult,
    LoopSettings,
    evaluate_loss,
    fit,
    split_held_out,
    validate_loop_options,
)
from rlhfkit.truncation import TRUNCATION_HELP, check_truncation_side, cut_to_length

IGNORE_INDEX = -100
METRICS_FILE = "sft_metrics.json"
LOSS_CURVE_FILE = "loss_curve.png"


@dataclass
class FinetuneOptions:
    """The fine-tuning options `sft` and `critique-revise train` share (declared once here)."""

    epochs: int = opt(10, "Passes over the training split (the paper: 10).", panel="Training")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (overrides --epochs).", panel="Training")
    batch_size: int = opt(4, "Demonstrations per micro-batch (the paper: 4 = 2 GPUs x 2).", panel="Training")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.", panel="Training")
    lr: float = opt(5e-5, "Peak learning rate (AdamW; the paper: 5e-5).", panel="Training")
    lr_scheduler: str = opt("linear", "Decay after warm-up: linear, cosine, constant, constant_with_warmup.", panel="Training")
    warmup_ratio: float = opt(0.0, "Fraction of the steps with linear LR warm-up.", panel="Training")
    weight_decay: float = opt(0.0, "AdamW weight decay (not applied to biases and norms).", panel="Training")
    max_grad_norm: float = opt(1.0, "Gradient clipping max norm (0 = no clipping).", panel="Training")
    group_by_length: bool = opt(True, "Batch demonstrations of similar length together (sorted within windows of 50 batches, the batches shuffled; seeded), so less of each batch is padding; the padding fraction is in metrics.jsonl and sft_metrics.json.", panel="Training")
    max_length: int = opt(1024, "Longest prompt + response in tokens (encoder-decoder: prompt and response each); prompts are cut first (--truncation-side).", panel="Training")
    eval_fraction: float = opt(0.1, "Fraction of the demonstrations held out for eval loss / perplexity (0 = none).", panel="Data")
    eval_every: int = opt(0, "Evaluate every N steps (0 = before and after training only).", panel="Training")
    save_every: int = opt(500, "Checkpoint to out/checkpoints/step-N every N steps (0 = never).", panel="Output")
    keep_checkpoints: int = opt(2, "Newest checkpoints to keep (0 = all).", panel="Output")
    resume: bool = opt(False, "Continue from the latest checkpoint in --out (same data and batch options).", panel="Training")
    overwrite: bool = opt(False, OVERWRITE_HELP, panel="Output")
    lora_r: int = opt(0, "LoRA rank (0 = full fine-tuning).", panel="Model")
    lora_alpha: int = opt(16, "LoRA alpha.", panel="Model")
    lora_dropout: float = opt(0.05, "LoRA dropout.", panel="Model")
    lora_target_modules: list[str] = opt([], "Module names LoRA adapts, repeatable (default: peft's choice for the architecture).", panel="Model")
    merge_lora: bool = opt(True, "Save the model with the LoRA adapter merged in (else the adapter alone).", panel="Model")
    dtype: str = opt("auto", "Compute dtype: auto (bf16 on supporting GPUs, fp32 on CPU), float32, bfloat16. Trained weights stay fp32.", panel="Model")
    device: str = opt("auto", "Device: auto, cpu, cuda, cuda:N.", panel="Distributed")
    trust_remote_code: bool = opt(False, "Allow model code from the hub repository.", panel="Model")
    seed: int = opt(DEFAULT_SEED, "Seed for the held-out split, data order, LoRA init and dropout.", panel="Training")
    chat_template: str | None = opt(None, "Jinja chat template file for conversational demonstrations (default: the tokenizer's own, if any); saved with the model.", panel="Model")
    report_to: list[str] = opt([], REPORT_TO_HELP, panel="Output")
    truncation_side: str = opt("right", TRUNCATION_HELP, panel="Data")
    gradient_checkpointing: bool = opt(False, GRADIENT_CHECKPOINTING_HELP, panel="Training")
    attn_implementation: str | None = opt(None, ATTN_IMPLEMENTATION_HELP, panel="Model")
    push_to_hub: str | None = opt(None, PUSH_TO_HUB_HELP, panel="Output")

    def validate_finetune(self) -> None:
        validate_loop_options(self)
        check_truncation_side(self.truncation_side)
        load_chat_template(self.chat_template)
        parse_report_to(self.report_to)
        if self.max_length < 2:
            raise RlhfkitError(f"--max-length must be >= 2, got {self.max_length}")
        if not 0 <= self.eval_fraction < 1:
            raise RlhfkitError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        check_training_options(self.lora_r, self.lora_dropout, self.dtype)
        check_attn_implementation(self.attn_implementation, self.device)


@dataclass
class SFTConfig(FinetuneOptions):
    model: str = opt(REQUIRED, "Base model: a Hugging Face hub id or a local save_pretrained directory (causal LM or T5-style seq2seq).", panel="Model")
    data: str = opt(REQUIRED, "Demonstrations: JSONL of `demonstration` records (annotate-import writes demonstrations.jsonl).", panel="Data")
    out: str = opt(REQUIRED, "Output directory: model/ (the fine-tuned model + tokenizer + model card, loadable with from_pretrained), checkpoints/, metrics.", panel="Output")
    deepspeed: str | None = opt(None, DEEPSPEED_HELP, panel="Distributed")
    offload_optimizer: bool = opt(False, OFFLOAD_OPTIMIZER_HELP, panel="Distributed")
    offload_params: bool = opt(False, OFFLOAD_PARAMS_HELP, panel="Distributed")
    # Not in FinetuneOptions: critique-revise sends its formatted tasks as user turns always.
    apply_chat_template: bool = opt(False, APPLY_CHAT_TEMPLATE_HELP, panel="Data")

    def validate(self) -> None:
        self.validate_finetune()
        check_deepspeed_options(self.deepspeed, self.offload_optimizer, self.offload_params)
        check_data_file(self.data, "--data")


# --- tokenization -------------------------------------------------------------------------


@dataclass
class SFTExample:
    """Token ids of one demonstration: `input_ids` (causal: prompt + response + eos; seq2seq:
    the prompt) and `labels` (causal: -100 over the prompt; seq2seq: response + eos)."""

    input_ids: list[int]
    labels: list[int]
    prompt_cut: int = 0  # prompt tokens dropped (on the truncation side)
    response_cut: int = 0  # response tokens (eos included) dropped from the right


def encode_demonstration(
    tokenizer: Any, prompt: str, response: str, max_length: int, is_encoder_decoder: bool,
    truncation_side: str = "right",
) -> SFTExample:
    """Tokenize one demonstration and apply the --max-length rule (see the module docstring)."""
    encoded_prompt = tokenizer(prompt, add_special_tokens=True, return_special_tokens_mask=True)
    prompt_ids = list(encoded_prompt["input_ids"])
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if is_encoder_decoder:
        keep_prompt = min(len(prompt_ids), max_length)
        keep_response = min(len(response_ids), max_length)
    elif len(prompt_ids) + len(response_ids) <= max_length:
        keep_prompt, keep_response = len(prompt_ids), len(response_ids)
    elif len(response_ids) < max_length:
        keep_prompt, keep_response = max_length - len(response_ids), len(response_ids)
    else:
        keep_prompt = min(len(prompt_ids), max_length // 2)
        keep_response = max_length - keep_prompt
    kept_prompt = cut_to_length(prompt_ids, encoded_prompt["special_tokens_mask"], keep_prompt, truncation_side)
    kept_response = response_ids[:keep_response]
    if is_encoder_decoder:
        input_ids, labels = kept_prompt, kept_response
    else:
        input_ids = kept_prompt + kept_response
        labels = [IGNORE_INDEX] * len(kept_prompt) + kept_response
    return SFTExample(input_ids, labels, len(prompt_ids) - len(kept_prompt), len(response_ids) - keep_response)


def encode_chat_demonstration(tokenizer: Any, pieces: list[tuple[str, bool]], max_length: int) -> SFTExample:
    """Token ids of a templated conversation (`chat.assistant_pieces`): the labels are the
    assistant turns' tokens (and an eos after the last one, unless the template ends the turn
    with eos itself), -100 elsewhere.

    Each piece is tokenized on its own, so no token straddles an assistant turn's edge and the
    mask is exact; the template writes any special tokens itself. A conversation longer than
    `max_length` loses tokens from the left, as prompts do.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_assistant in pieces:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if is_assistant else [IGNORE_INDEX] * len(ids)
    # An eos closes the conversation unless the template ended the last assistant turn with it
    # already (ChatML's <|im_end|> is SmolLM2's eos): a second one would teach eos eos.
    last_turn = tokenizer(pieces[-1][0], add_special_tokens=False)["input_ids"] if pieces and pieces[-1][1] else []
    if tokenizer.eos_token_id not in last_turn:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if pieces and pieces[-1][1] else IGNORE_INDEX)
    cut = max(0, len(input_ids) - max_length)
    return SFTExample(input_ids[cut:], labels[cut:], cut, 0)


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)


def make_collate(pad_token_id: int, is_encoder_decoder: bool):
    """Pad a list of SFTExamples to the longest in the batch (right padding; labels with -100)."""

    def collate(examples: list[SFTExample]) -> dict:
        input_ids = _pad([e.input_ids for e in examples], pad_token_id)
        attention_mask = _pad([[1] * len(e.input_ids) for e in examples], 0)
        labels = _pad([e.labels for e in examples], IGNORE_INDEX)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if not is_encoder_decoder:
            # First supervised position of the batch: logits are needed only from the one
            # before it (position 0 is never a target: nothing precedes it).
            supervised = (labels != IGNORE_INDEX).any(dim=0).nonzero()
            batch["first_target"] = max(1, int(supervised[0])) if len(supervised) else labels.shape[1]
        return batch

    return collate


def _accepts(model: torch.nn.Module, argument: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return argument in inspect.signature(base.forward).parameters


def make_loss_fn(model: torch.nn.Module, is_encoder_decoder: bool):
    """loss_fn(model, batch) -> (cross-entropy summed over supervised tokens, their count)."""
    if is_encoder_decoder:

        def seq2seq_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
            labels = batch["labels"]
            decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                decoder_input_ids=decoder_input_ids,
                use_cache=False,
            ).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            return loss, supervised_tokens(batch)

        return seq2seq_loss

    # Long prompts are most of a QA sequence: projecting only the positions that predict a
    # response token through the LM head (logits_to_keep) saves most of its cost.
    keeps_logits = _accepts(model, "logits_to_keep")

    def causal_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        start = batch["first_target"]
        keep = labels.shape[1] - start + 1  # positions start-1 .. end predict start .. end(+1)
        extra = {"logits_to_keep": keep} if keeps_logits else {}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **extra).logits
        logits = logits[:, -keep:-1]
        targets = labels[:, start:]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, supervised_tokens(batch)

    return causal_loss


def supervised_tokens(batch: dict) -> torch.Tensor:
    """The number of tokens the loss sums over: every label but -100, except a causal LM's
    position 0 (nothing precedes it to predict it; make_collate marks causal batches)."""
    labels = batch["labels"][:, 1:] if "first_target" in batch else batch["labels"]
    return (labels != IGNORE_INDEX).sum()


# --- saving -------------------------------------------------------------------------------




def plot_loss_curve(path: Path, result: FitResult, title: str) -> None:
    """Training loss per step, and the held-out loss at each evaluation as points (two
    evaluations joined by a straight line would look like a measured trend)."""
    evals = [e for e in result.evals if "loss" in e]
    series = [Series("train loss", range(1, len(result.losses) + 1), result.losses)]
    if evals:
        series.append(Series("held-out loss", [e["step"] for e in evals], [e["loss"] for e in evals], markers_only=True))
    panel = Panel("loss", "optimizer step", "cross-entropy per response token", series)
    save_png(draw(title, [panel], width=7, height=4), path)


def _fingerprint(examples: list[SFTExample]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(array("q", example.input_ids).tobytes())
        digest.update(array("q", example.labels).tobytes())
    return digest.hexdigest()


# --- the stage ----------------------------------------------------------------------------


def run_sft(cfg: SFTConfig, stage: str = "sft", card_data: str | None = None) -> Path:
    """Supervised fine-tuning on demonstrations: loss on response tokens only.

    `stage` names the stage in the loss plot's title and the model card, `card_data` the
    data in the card (critique-revise train runs this on demonstrations it made from --data).

    Holds out --eval-fraction of the data (eval loss and perplexity before and after),
    trains with gradient accumulation, LR warm-up/decay, optional LoRA, checkpoints and
    --resume, and saves a from_pretrained-loadable model in --out/model/ (with its model card), and
    sft_metrics.json and loss_curve.png.
    """
    records: list[Demonstration] = load_records(cfg.data, "demonstration")
    train_records, eval_records = split_held_out(records, cfg.eval_fraction, cfg.seed)
    out = Path(cfg.out)
    run = RunDir(out, "sft", cfg, resume=cfg.resume)

    device = resolve_device(cfg.device)
    compute_dtype = resolve_dtype(cfg.dtype, device)
    set_seed(cfg.seed)
    # Full fine-tuning keeps fp32 master weights (see LoopSettings.compute_dtype); a LoRA
    # base is frozen, so it is loaded in the compute dtype and the adapters stay fp32.
    weights_dtype = cfg.dtype if cfg.lora_r else "float32"
    model, tokenizer, is_encoder_decoder = load_policy(
        cfg.model, dtype=weights_dtype, device=str(device), trust_remote_code=cfg.trust_remote_code,
        gradient_checkpointing=cfg.gradient_checkpointing, attn_implementation=cfg.attn_implementation,
    )
    if tokenizer.eos_token_id is None:
        raise RlhfkitError(f"{cfg.model}: the tokenizer has no eos token, so responses cannot be taught to end")
    limit = model_max_positions(model)
    if not is_encoder_decoder:
        fit_default_lengths(cfg, limit, ("max_length",), "sft")
    if not is_encoder_decoder and limit is not None and cfg.max_length > limit:
        raise RlhfkitError(f"--max-length {cfg.max_length} exceeds the {limit} positions {cfg.model} allows; lower --max-length")

    override_chat_template(tokenizer, load_chat_template(cfg.chat_template))
    templated = has_chat_template(tokenizer) and not is_encoder_decoder

    def encode_one(r: Demonstration) -> SFTExample:
        messages = prompt_messages(tokenizer, r.prompt, r.meta, cfg.apply_chat_template) if templated else None
        if messages is not None:
            turn = {"role": "assistant", "content": assistant_content(r.prompt, r.response)}
            return encode_chat_demonstration(tokenizer, assistant_pieces(tokenizer, [*messages, turn]), cfg.max_length)
        return encode_demonstration(tokenizer, r.prompt, r.response, cfg.max_length, is_encoder_decoder, cfg.truncation_side)

    def encode(batch: list[Demonstration]) -> list[SFTExample]:
        return [encode_one(r) for r in batch]

    train_examples, eval_examples = encode(train_records), encode(eval_records)
    all_examples = train_examples + eval_examples
    truncated = sum(1 for e in all_examples if e.prompt_cut or e.response_cut)
    responses_cut = sum(1 for e in all_examples if e.response_cut)
    if truncated:
        note = (
            f"; {responses_cut} response(s) did not fit and are trained on their first tokens only (no eos)"
            if responses_cut
            else ""
        )
        console.print(
            f"sft: {truncated} of {len(all_examples)} demonstrations exceed --max-length {cfg.max_length} "
            f"and were truncated (prompt cut on the {cfg.truncation_side}){note}",
            soft_wrap=True,
        )

    if cfg.lora_r:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules or None)
    parameters = count_parameters(model)
    console.print(
        f"sft: {cfg.model} ({'encoder-decoder' if is_encoder_decoder else 'causal'}, {parameters.trainable:,} of "
        f"{parameters.total:,} parameters trained) on {device}, compute {str(compute_dtype).removeprefix('torch.')}; "
        f"{len(train_examples)} training / {len(eval_examples)} held-out demonstrations",
        soft_wrap=True,
    )

    collate = make_collate(tokenizer.pad_token_id, is_encoder_decoder)
    loss_fn = make_loss_fn(model, is_encoder_decoder)

    def evaluate() -> dict[str, float]:
        loss = evaluate_loss(model, eval_examples, collate, loss_fn, cfg.batch_size, compute_dtype)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}

    result = fit(
        model,
        train_examples,
        collate,
        loss_fn,
        LoopSettings.from_config(cfg, compute_dtype),
        run,
        evaluate=evaluate if eval_examples else None,
        tokenizer=tokenizer,
        data_fingerprint=_fingerprint(train_examples),
        description="sft",
        count_fn=supervised_tokens,
        # The sequences a batch pads to one width (seq2seq: the prompts; labels are padded apart).
        item_lengths=[[len(e.input_ids)] for e in train_examples],
    )

    main = is_main_process()
    with full_parameters(model):  # gathered from the ZeRO-3 shards: every process enters
        saved = save_model(model, tokenizer, out, merge_lora=cfg.merge_lora) if main else model
    before = result.evals[0] if result.evals else {}
    after = result.evals[-1] if result.evals else {}
    metrics = {
        "steps": result.steps,
        "epochs": round(result.steps / result.steps_per_epoch, 4),
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "train_loss": result.final_epoch_loss,
        "train_loss_last_step": result.losses[-1] if result.losses else None,
        "eval_loss_before": before.get("loss"),
        "eval_loss_after": after.get("loss"),
        "eval_perplexity_before": before.get("perplexity"),
        "eval_perplexity_after": after.get("perplexity"),
        "truncated": truncated,
        "responses_truncated": responses_cut,
        "samples_per_second": result.samples_per_second,
        "padding_fraction": result.padding_fraction,
        "train_seconds": result.train_seconds,
        "trainable_parameters": parameters.trainable,
        "total_parameters": parameters.total,
        "lora_merged": bool(cfg.lora_r and cfg.merge_lora),
        "saved_model_class": type(saved).__name__,
        "resumed_from_step": result.resumed_from,
    }
    run.write_json(METRICS_FILE, metrics)
    if main:
        plot_loss_curve(out / LOSS_CURVE_FILE, result, f"{stage}: {out.name}")
        finish_model(out, cfg.push_to_hub, title=out.name, stage=stage, base_model=cfg.model, data=[card_data or cfg.data],
                     metrics=scalar_metrics(metrics, ["steps", "train_loss", "eval_loss_after", "eval_perplexity_after"]))
    summary = f"sft: {result.steps} steps, train loss {metrics['train_loss']:.4f}"
    if after:
        summary += f", eval loss {before['loss']:.4f} -> {after['loss']:.4f} (perplexity {after['perplexity']:.2f})"
    run.close()
    console.print(f"{summary}, {result.samples_per_second:.1f} samples/s; model saved to {out}", soft_wrap=True)
    return out
