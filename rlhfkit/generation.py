"""Batched generation and the per-token bookkeeping every stage that samples needs.

`generate` samples responses for a batch of prompts (left padding, KV cache, top-k/top-p/
temperature, stop at EOS) and returns the exact token ids that were sampled, so training
never re-tokenises decoded text (that would move token boundaries). `response_logprobs`
recomputes their log-probabilities under any model with the same temperature used for
sampling (top-k/top-p shape what is sampled, not the probabilities PPO needs).

Decoder-only and encoder-decoder (T5) policies go through the same two functions.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from rlhfkit.distributed import is_zero3_partitioned
from rlhfkit.errors import RlhfkitError
from rlhfkit.rl.losses import ResponseLogits
from rlhfkit.truncation import encode_prompt


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = True


@dataclass
class Rollout:
    """A batch of prompts with sampled responses.

    `query_ids` are left-padded prompt tokens; `response_ids` are right-padded response tokens
    (the EOS token, when sampled, is the last real token). For encoder-decoder policies
    `query_ids` feed the encoder and `response_ids` are the decoder's outputs.
    """

    prompts: list[str]
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    texts: list[str]
    finished: torch.Tensor
    token_char_spans: list[list[tuple[int, int]]] = field(default_factory=list)
    prompts_cut: int = 0  # prompts cut to max_prompt_length (rlhfkit.truncation)
    # Each reward source's (B, T) token rewards before the weights, once the rollout is scored
    # (logged per source in rollouts.jsonl: the report's heat maps).
    source_rewards: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)

    def to(self, device: torch.device) -> Rollout:
        for name in ("query_ids", "query_mask", "response_ids", "response_mask", "finished"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def encode_prompts(
    tokenizer, prompts: list[str], max_prompt_length: int, device: torch.device, truncation_side: str = "right",
    templated: Collection[str] = (),
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded prompt ids, each prompt cut to `max_prompt_length` tokens on `truncation_side`
    (rlhfkit.truncation: special tokens are kept), and how many prompts were cut.

    Prompts in `templated` were rendered by a chat template, which writes every special token
    it wants (Llama-3's writes its BOS): they get none from the tokenizer, as sft encodes them,
    so a template's BOS is never doubled, and are cut on the left, as sft cuts conversations: the
    last turn and the generation prompt stay. Plain prompts get the tokenizer's special tokens."""
    rows, n_cut = [], 0
    for prompt in prompts:
        chat = prompt in templated
        ids, cut = encode_prompt(tokenizer, prompt, max_prompt_length, "left" if chat else truncation_side, not chat)
        rows.append(ids)
        n_cut += cut > 0
    width = max(len(ids) for ids in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        if ids:
            input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, width - len(ids):] = 1
    return input_ids.to(device), attention_mask.to(device), n_cut


def model_max_positions(tokenizer_or_model) -> Optional[int]:
    config = getattr(tokenizer_or_model, "config", None)
    if config is not None:
        for name in ("max_position_embeddings", "n_positions", "n_ctx"):
            if getattr(config, name, None):
                return int(getattr(config, name))
        return None
    limit = getattr(tokenizer_or_model, "model_max_length", None)
    return int(limit) if limit and limit < 10**9 else None


def first_eos_mask(response_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of real response tokens (up to and including the first EOS) and whether EOS came.

    Works when pad == eos (GPT-2 style): everything after the first EOS is padding.
    """
    is_eos = response_ids == eos_token_id
    finished = is_eos.any(dim=1)
    first = torch.where(finished, is_eos.int().argmax(dim=1), torch.full_like(finished, response_ids.shape[1], dtype=torch.long))
    positions = torch.arange(response_ids.shape[1], device=response_ids.device).unsqueeze(0)
    mask = positions <= first.unsqueeze(1)
    return mask.long(), finished


def token_char_spans(tokenizer, token_ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of `token_ids` and each token's [start, end) character span in it.

    Decoding every prefix is what makes this tokenizer-agnostic (byte-level BPE tokens that
    split a UTF-8 character, SentencePiece's dropped leading space): a token owns the
    characters its prefix adds to the text.
    """
    prefixes = _decode_all(tokenizer, [token_ids[: i + 1] for i in range(len(token_ids))])
    text = prefixes[-1] if prefixes else ""
    spans = []
    previous_end = 0
    for prefix in prefixes:
        end = len(prefix) if text.startswith(prefix) else previous_end
        end = max(end, previous_end)
        spans.append((previous_end, end))
        previous_end = end
    if spans:
        start, _ = spans[-1]
        spans[-1] = (start, len(text))
    return text, spans


def _decode_all(tokenizer, rows: list[list[int]]) -> list[str]:
    """`tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)`.

    A fast tokenizer that keeps transformers' own decoding runs exactly that as its Rust
    tokenizer's `decode_batch`, which is called directly: transformers would first check every
    id of every row in Python, most of the time of `token_char_spans` (which decodes each
    prefix of a response) in a PPO rollout.
    """
    if type(tokenizer)._decode is PreTrainedTokenizerFast._decode and type(tokenizer).decode is PreTrainedTokenizerBase.decode:
        return tokenizer.backend_tokenizer.decode_batch(rows, skip_special_tokens=True)
    return tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class TopKSampler(LogitsProcessor):
    """Temperature + top-k (+ top-p within the k) sampling as a logits processor.

    Same distribution as transformers' TemperatureLogitsWarper -> TopKLogitsWarper ->
    TopPLogitsWarper -> softmax -> multinomial, but softmax and the draw run over the k
    candidates instead of the whole vocabulary (~10x less work per step for k=20 of 4,096).
    It returns scores that are -inf everywhere except 0 at the drawn token, so generate's
    greedy step (do_sample=False) emits exactly that token; the processors transformers
    puts before custom ones (min_new_tokens' EOS suppression, repetition penalties) have
    already run. The draw uses torch's global generator, as transformers' own sampling does,
    so a seeded run stays repeatable. Log-probs for PPO are recomputed from the model
    (`forward_response`), so nothing reads these scores.
    """

    def __init__(self, temperature: float, top_k: int, top_p: float = 1.0):
        if temperature <= 0:
            raise RlhfkitError(f"sampling temperature must be > 0 (got {temperature})")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, scores.shape[-1])
        values, candidates = torch.topk(scores / self.temperature, k, dim=-1)  # descending
        if self.top_p < 1.0:
            # TopPLogitsWarper's rule, on the k candidates in ascending order: drop the tokens
            # whose cumulative probability is <= 1 - top_p, always keeping the most likely one.
            ascending = values.flip(-1)
            cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= (1 - self.top_p)
            remove[..., -1] = False
            values = ascending.masked_fill(remove, -float("inf")).flip(-1)
        pick = torch.multinomial(values.softmax(dim=-1), num_samples=1)
        drawn = candidates.gather(-1, pick)
        return torch.full_like(scores, -float("inf")).scatter_(-1, drawn, 0.0)


def _other_sampling_warpers(model) -> bool:
    """Whether the model's generation_config asks for sampling warpers TopKSampler lacks."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return False
    return any(
        getattr(config, name, None) not in (None, default)
        for name, default in (("min_p", 0.0), ("typical_p", 1.0), ("epsilon_cutoff", 0.0), ("eta_cutoff", 0.0), ("top_h", 1.0))
    )


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    sampling: SamplingConfig,
    *,
    max_prompt_length: int,
    is_encoder_decoder: bool = False,
    generator_seed: Optional[int] = None,
    truncation_side: str = "right",
    templated: Collection[str] = (),
) -> Rollout:
    """Sample one response per prompt (repeat prompts in `prompts` for several samples);
    `templated`: the prompts a chat template rendered (see encode_prompts)."""
    device = next(model.parameters()).device
    query_ids, query_mask, prompts_cut = encode_prompts(tokenizer, prompts, max_prompt_length, device, truncation_side, templated)
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    was_training = model.training
    model.eval()
    kwargs = {
        "input_ids": query_ids,
        "attention_mask": query_mask,
        "max_new_tokens": sampling.max_new_tokens,
        "do_sample": sampling.do_sample,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "use_cache": True,
    }
    if sampling.do_sample and sampling.top_k > 0 and not _other_sampling_warpers(model):
        # Draw the token among the top-k candidates only (see TopKSampler): transformers would
        # softmax and sample over the whole vocabulary at every step. The draw happens in the
        # processor and the greedy step emits it, so no sampling flags go to transformers
        # (they would only warn under do_sample=False).
        kwargs.update(
            do_sample=False,
            logits_processor=LogitsProcessorList([TopKSampler(sampling.temperature, sampling.top_k, sampling.top_p)]),
        )
    elif sampling.do_sample:
        # top_k=0 explicitly: None would fall back to the model's generation_config (often 50).
        kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    if is_zero3_partitioned(model):
        # Every process's forward gathers the sharded parameters with the others, so all keep
        # stepping until the last one has finished its responses.
        kwargs["synced_gpus"] = True
    output = model.generate(**kwargs)
    model.train(was_training)
    # Decoder-only outputs repeat the prompt; encoder-decoder outputs start with the decoder start token.
    response_ids = output[:, 1:] if is_encoder_decoder else output[:, query_ids.shape[1]:]
    if response_ids.shape[1] == 0:
        response_ids = torch.full((len(prompts), 1), tokenizer.pad_token_id, device=device)
    return build_rollout(tokenizer, list(prompts), query_ids, query_mask, response_ids, prompts_cut)


def build_rollout(
    tokenizer, prompts: list[str], query_ids, query_mask, response_ids, prompts_cut: int, lengths: list[int] | None = None
) -> Rollout:
    """A Rollout from right-padded sampled ids (however sampled: rlhfkit.generation_backends):
    everything after a row's first EOS (and, with `lengths`, after its last sampled token) is
    masked out and the texts are decoded with offsets."""
    response_mask, finished = first_eos_mask(response_ids, tokenizer.eos_token_id)
    if lengths is not None:
        positions = torch.arange(response_ids.shape[1], device=response_ids.device)
        within = positions.unsqueeze(0) < torch.tensor(lengths, device=response_ids.device).unsqueeze(1)
        response_mask = response_mask * within.to(response_mask.dtype)
        finished = ((response_ids == tokenizer.eos_token_id) & within).any(dim=1)  # padding may be EOS (GPT-2)
    response_ids = torch.where(response_mask.bool(), response_ids, torch.full_like(response_ids, tokenizer.pad_token_id))
    texts, spans = [], []
    for row, mask in zip(response_ids.tolist(), response_mask.tolist()):
        real = [tok for tok, m in zip(row, mask) if m]
        text, row_spans = token_char_spans(tokenizer, real)
        texts.append(text)
        spans.append(row_spans)
    return Rollout(
        prompts=list(prompts),
        query_ids=query_ids,
        query_mask=query_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        texts=texts,
        finished=finished,
        token_char_spans=spans,
        prompts_cut=prompts_cut,
    )


# Decoder-only architectures whose logits are exactly `get_output_embeddings()(last hidden
# state)` (no logit scaling or soft-capping), so their response logits can be made a chunk
# at a time (rlhfkit.rl.losses.ResponseLogits); others go through the model's own forward.
PLAIN_LM_HEAD_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "olmo", "olmo2", "phi3"})


def forward_response(
    model, rollout: Rollout, *, is_encoder_decoder: bool, want_hidden: bool = False, want_logits: bool = True
) -> tuple[Optional[ResponseLogits], Optional[torch.Tensor]]:
    """Logits predicting each response token (B, T, V, as ResponseLogits) and/or the last
    hidden states there (B, T, H).

    Decoder-only: the output at position p predicts token p+1, so the response's logits are
    read from the last prompt token to the second-to-last response token. Position ids are
    passed explicitly because prompts are left-padded. The LM head is applied only to those
    positions, a chunk at a time (ResponseLogits), and not at all when only hidden states are
    wanted (a value model does not need vocabulary-sized logits).
    """
    if is_encoder_decoder:
        start = torch.full_like(rollout.response_ids[:, :1], model.config.decoder_start_token_id)
        decoder_input_ids = torch.cat([start, rollout.response_ids[:, :-1]], dim=1)
        decoder_mask = torch.cat([torch.ones_like(start), rollout.response_mask[:, :-1]], dim=1)
        out = model(
            input_ids=rollout.query_ids,
            attention_mask=rollout.query_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_mask,
            output_hidden_states=want_hidden,
        )
        return (ResponseLogits(out.logits) if want_logits else None), (out.decoder_hidden_states[-1] if want_hidden else None)
    input_ids = torch.cat([rollout.query_ids, rollout.response_ids], dim=1)
    attention_mask = torch.cat([rollout.query_mask, rollout.response_mask], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    prompt_len = rollout.query_ids.shape[1]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not want_logits or base.config.model_type in PLAIN_LM_HEAD_TYPES:
        trunk = getattr(base, base.base_model_prefix, base)
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        hidden = hidden[:, prompt_len - 1 : -1]
        logits = ResponseLogits(hidden, base.get_output_embeddings()) if want_logits else None
        return logits, (hidden if want_hidden else None)
    # Only the positions that predict response tokens go through the LM head (the prompt's
    # would be projected to the vocabulary and thrown away): the last T + 1, minus the final one.
    keep = rollout.response_ids.shape[1] + 1
    extra = {"logits_to_keep": keep} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=want_hidden, **extra)
    hidden = out.hidden_states[-1][:, prompt_len - 1 : -1] if want_hidden else None
    return ResponseLogits(out.logits[:, -keep:-1]), hidden


@functools.lru_cache(maxsize=64)
def _forward_parameters(forward_type: type) -> frozenset:
    return frozenset(inspect.signature(forward_type.forward).parameters)


def _accepts(model, argument: str) -> bool:
    """Whether the (PEFT-unwrapped) model's forward takes `argument`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return argument in _forward_parameters(type(base))
