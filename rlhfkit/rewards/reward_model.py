"""Scoring with a trained rlhfkit reward model: the one place later stages get RM rewards from.

`rlhfkit train-rm` trains a `new_reward_model` and writes a Hugging Face model directory
(`save_reward_model_weights`) plus, last, `rlhfkit_rm.json` (`reward_model_spec`: aspect, kind,
granularity, reward values, score normalisation, max_length; `write_reward_model_spec`);
`load_reward_model(path)` reads it back, and PPO, redistribution and evaluation call
`RewardModel.score` / `prefix_scores` so none of them re-implements segmentation or reward
placement.

Kinds:
- `segment` (Fine-Grained RLHF relevance/factuality): a token classifier reads prompt +
  response and predicts, at the RM token that completes each segment, whether the segment
  has an error of its aspect (`segment_pooling` "end"; "mean" averages the logits of all
  the segment's tokens instead); the reward is `negative_reward` for a predicted error and
  `positive_reward` otherwise, one per segment.
- `preference` (Bradley-Terry) and `regression`: a sequence classifier with one output; the
  score is read at the last real token and normalised with the mean/std stored in the spec.

Inputs are encoded as a tokenizer *pair* (prompt, response), so special tokens are whatever
the backbone uses and the response's token offsets are offsets into the response itself
(a separator is added where the template has none, e.g. GPT-2). A prompt longer than its
budget (`max_prompt_length`, and whatever `max_length` leaves beside the response) loses
tokens from its left; the response never does: one that does not fit is an error here and
is left out (counted) in training.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rlhfkit.chat import render_prompt
from rlhfkit.distributed import full_parameters, is_main_process
from rlhfkit.errors import RlhfkitError
from rlhfkit.io import write_json
from rlhfkit.models import (
    load_pretrained,
    load_tokenizer,
    model_dir,
    model_output_dir,
    resolve_device,
    save_model,
)
from rlhfkit.rewards.placement import token_index_for_char_ends
from rlhfkit.rewards.presets import KINDS, SEGMENT_POOLINGS, RMSettings
from rlhfkit.schema import read_json_file
from rlhfkit.segment import GRANULARITIES, SEGMENT_RM_GRANULARITIES, Segment, segment
from rlhfkit.truncation import TRUNCATION_SIDES, kept_indices

SPEC_FILE = "rlhfkit_rm.json"
SPEC_FORMAT = 1
SEQUENCE_KINDS = ("preference", "regression")
SHARED_KIND = "multi_aspect"  # rlhfkit.rewards.shared_backbone: several aspects on one backbone
# Token-classification labels of a segment RM: index 1 is "this segment has an error".
SEGMENT_LABELS = {0: "no_error", 1: "error"}


@dataclass
class SegmentRewards:
    """Rewards of one response: `values[i]` is earned where the response's text reaches `char_ends[i]`.

    Segment RMs give one value per segment (with the RM's error probability); sequence RMs a
    single normalised score at `len(response)`.
    """

    values: list[float]
    char_ends: list[int]
    error_probs: list[float] | None = None


@dataclass
class EncodedPair:
    """One (prompt, response) as RM input ids, with where the response's tokens are.

    `response_positions[k]` is the index in `input_ids` of the k-th response token and
    `response_char_spans[k]` its character span in the response. `prompt_position` is the
    token just before the response (the separator after the prompt), where the prompt's
    own score is read.
    """

    input_ids: list[int]
    response_positions: list[int]
    response_char_spans: list[tuple[int, int]]
    prompt_position: int


def separator_token_id(tokenizer) -> int:
    """The token put between prompt and response when the tokenizer's pair template puts none."""
    for token_id in (tokenizer.sep_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise RlhfkitError(
        f"the reward model's tokenizer ({type(tokenizer).__name__}) has neither a sep nor an eos token "
        "to mark where the response starts; add one to the tokenizer"
    )


def encode_pair(
    tokenizer, prompt: str, response: str, max_length: int, max_prompt_length: int | None = None,
    truncation_side: str = "right",
) -> EncodedPair | None:
    """Tokenise prompt + response for an RM; None when the response alone exceeds `max_length`.

    The prompt keeps at most `max_prompt_length` tokens and whatever fits beside the
    response, losing tokens on `truncation_side` (rlhfkit.truncation; the default keeps the
    head, where a QA prompt's question is). With a fixed prompt budget every long prompt's
    response starts at the same position, which lets a model with learned absolute
    positions (GPT-2) see where in the response a segment lies.

    Decoder tokenizers (GPT-2) join a pair with nothing in between, so the RM could not tell
    where the response starts; a separator (sep, else eos) is put there in that case.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise RlhfkitError(
            f"the reward model's tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer; "
            "rlhfkit needs character offsets, which only fast (Rust) tokenizers give"
        )
    encoded = tokenizer(prompt, response, add_special_tokens=True, return_offsets_mapping=True, truncation=False)
    ids = list(encoded["input_ids"])
    offsets = [tuple(span) for span in encoded["offset_mapping"]]
    sequence_ids = list(encoded.sequence_ids())
    first_response = next((i for i, s in enumerate(sequence_ids) if s == 1), len(ids))
    if first_response == 0 or sequence_ids[first_response - 1] is not None:
        ids.insert(first_response, separator_token_id(tokenizer))
        offsets.insert(first_response, (0, 0))
        sequence_ids.insert(first_response, None)
        first_response += 1
    prompt_indices = [i for i, s in enumerate(sequence_ids) if s == 0]
    excess = len(ids) - max_length
    if excess > len(prompt_indices):
        return None
    if max_prompt_length is not None:
        excess = max(excess, len(prompt_indices) - max_prompt_length)
    if excess > 0:
        kept_prompt = {prompt_indices[k] for k in kept_indices(len(prompt_indices), len(prompt_indices) - excess, truncation_side)}
        keep = [i for i in range(len(ids)) if sequence_ids[i] != 0 or i in kept_prompt]
        ids = [ids[i] for i in keep]
        offsets = [offsets[i] for i in keep]
        sequence_ids = [sequence_ids[i] for i in keep]
        first_response -= excess
    response_positions = [i for i, s in enumerate(sequence_ids) if s == 1]
    return EncodedPair(
        input_ids=ids,
        response_positions=response_positions,
        response_char_spans=[offsets[i] for i in response_positions],
        prompt_position=first_response - 1,
    )


def segment_end_positions(encoded: EncodedPair, segments: Sequence[Segment], response: str) -> list[int]:
    """The index in `encoded.input_ids` of the RM token that completes each segment."""
    if not segments:
        return []
    indices = token_index_for_char_ends(encoded.response_char_spans, [s.end for s in segments], response)
    return [encoded.response_positions[k] for k in indices]


def segment_start_positions(encoded: EncodedPair, end_positions: Sequence[int]) -> list[int]:
    """The index in `encoded.input_ids` of each segment's first RM token, given each one's end
    (`segment_end_positions`): the response's first token, then the token after the previous
    segment's end. A segment completed by the same token as the one before it (a token
    spanning their boundary) is that one token."""
    starts = []
    first = encoded.response_positions[0] if encoded.response_positions else 0
    for end in end_positions:
        starts.append(min(first, end))
        first = max(first, end + 1)
    return starts


def mean_at_segment_ends(token_logits: Tensor, segment_starts: Tensor) -> Tensor:
    """(B, T, C) logits -> float32 (B, T, C) whose position t holds the mean of the logits of
    positions `segment_starts[b, t]` .. t: at a segment's end, the segment's mean logits.

    A position with `segment_starts[b, t] == t` keeps its own logits. The sums are prefix
    sums in float64, so a mean over n tokens differs from the directly summed one by a few
    float64 roundings, far below the float32 it is returned in.
    """
    batch, width, classes = token_logits.shape
    sums = torch.nn.functional.pad(token_logits.double().cumsum(dim=1), (0, 0, 1, 0))  # sums[:, t] = first t tokens
    starts = segment_starts.to(token_logits.device)
    before = sums.gather(1, starts.unsqueeze(-1).expand(batch, width, classes))
    counts = torch.arange(1, width + 1, device=token_logits.device) - starts
    return ((sums[:, 1:] - before) / counts.unsqueeze(-1)).float()


def segment_starts_tensor(shape: tuple[int, int], rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Tensor:
    """(B, T) start positions for `mean_at_segment_ends`: each row's (ends, starts) set at the
    ends, every other position its own start (its logits unchanged)."""
    starts = torch.arange(shape[1]).repeat(shape[0], 1)
    for row, (ends, firsts) in enumerate(rows):
        if len(ends):
            starts[row, list(ends)] = torch.tensor(list(firsts), dtype=torch.long)
    return starts


def pad_right(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded (input_ids, attention_mask) for a batch of token-id lists."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def judged_errors(error_probs: Sequence[float]) -> list[bool]:
    """Which segments the RM judges errors: P(error) > 0.5, the two-class argmax."""
    return [p > 0.5 for p in error_probs]


def segment_rewards(error_probs: Sequence[float], positive_reward: float, negative_reward: float) -> list[float]:
    """`negative_reward` for each segment judged an error, `positive_reward` for the others."""
    return [negative_reward if error else positive_reward for error in judged_errors(error_probs)]


def _score_head(model: nn.Module) -> nn.Module | None:
    """The per-position `score` head of a decoder sequence classifier (GPT-2, Llama, Mistral, Qwen...).

    Encoder classifiers (BERT, Longformer) have a `classifier` over a pooled first token instead.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "score", None)
    return head if isinstance(head, nn.Module) else None


def per_position_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T) score of a decoder sequence classifier at every position, from one forward pass.

    The HF model applies its `score` head to every position and then keeps one per row; a
    forward hook on the head captures all of them. In a causal model the output at position
    t sees tokens <= t only, so it is the score of the prefix ending there.
    """
    head = _score_head(model)
    if head is None:
        raise RlhfkitError(
            f"{type(model).__name__} is not a decoder (causal) sequence classifier with a per-position "
            "`score` head; an encoder reward model (BERT, Longformer...) reads the whole text at once, "
            "so it cannot score prefixes in one pass. Train the RM on a causal backbone for R3HF."
        )
    captured: list[Tensor] = []
    handle = head.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        handle.remove()
    return captured[-1][..., 0].float()


def sequence_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B,) score of each sequence, read at its last real token (decoders) or pooled (encoders).

    HF decoder classifiers pick "the rightmost token that is not the pad token"; with a pad
    token equal to EOS a response ending in EOS would be read one token early, so we read the
    last position the attention mask marks instead (batches are right-padded).
    """
    if _score_head(model) is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
    per_position = per_position_scores(model, input_ids, attention_mask)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask).argmax(dim=1)
    return per_position.gather(1, last.to(per_position.device).unsqueeze(1)).squeeze(1)


def _batches(n: int, batch_size: int) -> list[range]:
    if batch_size < 1:
        raise RlhfkitError(f"batch_size must be >= 1, got {batch_size}")
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


class RewardModel:
    """A loaded reward model (`load_reward_model`); all methods are batched and gradient-free."""

    def __init__(self, model: nn.Module, tokenizer, spec: dict, device: torch.device):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.spec = spec
        self.device = device

    def render_prompt(self, prompt: str, meta: dict) -> str:
        """A record's prompt as this RM was trained on it: through its own tokenizer's chat
        template (conversational records, and plain ones if trained with --apply-chat-template),
        whatever the policy's template is."""
        return render_prompt(self.tokenizer, prompt, meta, bool(self.spec.get("apply_chat_template")))

    @property
    def aspect(self) -> str:
        return self.spec["aspect"]

    @property
    def kind(self) -> str:
        return self.spec["kind"]

    @property
    def scores_prefixes(self) -> bool:
        """Whether one forward pass gives the score of every prefix (a causal classifier)."""
        return _score_head(self.model) is not None

    # The model's outputs, one method each (a shared-backbone aspect reads them from one pass).
    def token_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Segment RMs: (B, T, 2) no-error / error logits at every token."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def sequence_scores(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return sequence_scores(self.model, input_ids, attention_mask)

    def per_position_scores(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return per_position_scores(self.model, input_ids, attention_mask)

    @property
    def max_length(self) -> int:
        return int(self.spec["max_length"])

    @property
    def segment_pooling(self) -> str:
        # RMs saved before the option existed read the token completing each segment.
        return self.spec.get("segment_pooling", "end")

    @property
    def max_prompt_length(self) -> int | None:
        return self.spec.get("max_prompt_length")

    def encode(self, prompt: str, response: str) -> EncodedPair | None:
        """`encode_pair` with this RM's length limits (None: the response does not fit)."""
        # RMs saved before the option existed were trained with prompts cut on the left.
        side = self.spec.get("truncation_side", "left")
        return encode_pair(self.tokenizer, prompt, response, self.max_length, self.max_prompt_length, side)

    def _encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[EncodedPair]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        encoded = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            pair = self.encode(prompt, response)
            if pair is None:
                n_tokens = len(self.tokenizer(response, add_special_tokens=False)["input_ids"])
                raise RlhfkitError(
                    f"response {i} has {n_tokens} tokens for the {self.aspect} reward model, which reads at "
                    f"most {self.max_length} (its max_length); generate shorter responses or retrain the RM "
                    "with a larger --max-length"
                )
            encoded.append(pair)
        return encoded

    def _inputs(self, encoded: Sequence[EncodedPair]) -> tuple[Tensor, Tensor]:
        input_ids, attention_mask = pad_right([e.input_ids for e in encoded], self.tokenizer.pad_token_id)
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _normalise(self, raw: Tensor) -> Tensor:
        norm = self.spec["normalization"]
        return (raw - norm["mean"]) / norm["std"]

    @torch.no_grad()
    def error_probabilities(
        self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 8
    ) -> list[tuple[list[Segment], list[float]]]:
        """Segment RMs: each response's segments and the RM's P(error) for each."""
        if self.kind != "segment":
            raise RlhfkitError(f"the {self.aspect} reward model is a {self.kind} model; only segment RMs give error probabilities")
        granularity = self.spec["granularity"]
        out: list[tuple[list[Segment], list[float]]] = []
        for rows in _batches(len(responses), batch_size):
            encoded = self._encode([prompts[i] for i in rows], [responses[i] for i in rows])
            input_ids, attention_mask = self._inputs(encoded)
            logits = self.token_logits(input_ids, attention_mask).float()
            segments = [segment(responses[i], granularity) for i in rows]
            ends = [segment_end_positions(encoded[row], segments[row], responses[i]) for row, i in enumerate(rows)]
            if self.segment_pooling == "mean":
                firsts = [segment_start_positions(encoded[row], ends[row]) for row in range(len(rows))]
                logits = mean_at_segment_ends(logits, segment_starts_tensor(logits.shape[:2], list(zip(ends, firsts))))
            probs = logits.softmax(dim=-1)[..., 1]
            for row in range(len(rows)):
                out.append((segments[row], probs[row, ends[row]].tolist()))
        return out

    @torch.no_grad()
    def raw_scores(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 8) -> list[float]:
        """Sequence RMs: the unnormalised score of each (prompt, response)."""
        self._require_sequence_kind("raw_scores")
        scores: list[float] = []
        for rows in _batches(len(responses), batch_size):
            encoded = self._encode([prompts[i] for i in rows], [responses[i] for i in rows])
            scores.extend(self.sequence_scores(*self._inputs(encoded)).float().tolist())
        return scores

    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 8) -> list[SegmentRewards]:
        """Rewards of each response: per segment (segment RMs) or one normalised score at the end."""
        if self.kind == "segment":
            positive, negative = self.spec["positive_reward"], self.spec["negative_reward"]
            return [
                SegmentRewards(segment_rewards(probs, positive, negative), [s.end for s in segments], probs)
                for segments, probs in self.error_probabilities(prompts, responses, batch_size)
            ]
        raw = torch.tensor(self.raw_scores(prompts, responses, batch_size), dtype=torch.float64)
        return [
            SegmentRewards([float(value)], [len(response)], None)
            for value, response in zip(self._normalise(raw).tolist(), responses)
        ]

    @torch.no_grad()
    def prefix_scores(
        self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 8
    ) -> tuple[list[Tensor], list[list[int]], Tensor]:
        """R3HF: the normalised score of every response prefix, from one forward pass per batch.

        Returns, per response, a (T_i,) tensor with the score after each RM response token
        and each token's end character in the response, plus a (B,) tensor of prompt scores
        (the score at the token before the response: the separator after the prompt). Special
        tokens the template appends after the response (an EOS) are included with end
        `len(response) + 1`, after the whole text, so the last prefix score is exactly the
        sequence score (the differences telescope to score(x, y) - score(x)) and only a policy
        token that ends the response (its EOS) reads them.
        """
        self._require_sequence_kind("prefix_scores")
        scores: list[Tensor] = []
        char_ends: list[list[int]] = []
        prompt_scores: list[float] = []
        for rows in _batches(len(responses), batch_size):
            encoded = self._encode([prompts[i] for i in rows], [responses[i] for i in rows])
            input_ids, attention_mask = self._inputs(encoded)
            per_position = self._normalise(self.per_position_scores(input_ids, attention_mask).double()).float().cpu()
            for row, i in enumerate(rows):
                pair = encoded[row]
                end = len(pair.input_ids)
                first = pair.response_positions[0] if pair.response_positions else end
                trailing = end - first - len(pair.response_positions)
                scores.append(per_position[row, first:end].clone())
                char_ends.append([char_end for _, char_end in pair.response_char_spans] + [len(responses[i]) + 1] * trailing)
                prompt_scores.append(float(per_position[row, pair.prompt_position]))
        return scores, char_ends, torch.tensor(prompt_scores)

    def _require_sequence_kind(self, method: str) -> None:
        if self.kind not in SEQUENCE_KINDS:
            raise RlhfkitError(
                f"{method} needs a sequence-level (preference/regression) reward model; "
                f"the {self.aspect} reward model is a {self.kind} model"
            )


def read_spec(path: str | os.PathLike) -> dict:
    """The `rlhfkit_rm.json` of a reward-model directory, every field checked (`check_spec`);
    RlhfkitError naming the file and the field if there is none, or it is damaged."""
    spec_path = model_dir(path) / SPEC_FILE
    if not spec_path.is_file():
        raise RlhfkitError(f"{path} is not an rlhfkit reward model (no {SPEC_FILE}); train one with `rlhfkit train-rm`")
    try:
        spec = read_json_file(spec_path)
    except RlhfkitError as err:
        raise RlhfkitError(f"{err}; re-save the model with `rlhfkit train-rm`") from None
    check_spec(spec, spec_path)
    return spec


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_spec(spec: Any, spec_path: Path) -> None:
    """Every field of an rlhfkit_rm.json (single-aspect or shared-backbone) that scoring reads,
    checked for presence, type and range; RlhfkitError names the file and the field. A
    hand-edited or damaged file would otherwise fail deep inside scoring (a KeyError, a size
    mismatch, NaN rewards from std 0). The fields keep their meaning (reward_model_spec,
    shared_spec); fields this check does not know are left alone."""

    def bad(field: str, problem: str) -> RlhfkitError:
        return RlhfkitError(f"{spec_path}: {field} {problem}; re-save the model with `rlhfkit train-rm`")

    if not isinstance(spec, dict):
        raise bad("the file", f"holds {type(spec).__name__} {json.dumps(spec)[:40]}, not a JSON object")
    missing = [key for key in ("aspect", "kind", "max_length") if key not in spec]
    if missing:
        raise bad("the file", f"lacks {', '.join(missing)}")
    if not isinstance(spec["aspect"], str) or not spec["aspect"]:
        raise bad("aspect", f"must be a non-empty string, got {spec['aspect']!r}")
    if not _is_count(spec["max_length"], 1):
        raise bad("max_length", f"must be a whole number >= 1, got {spec['max_length']!r}")
    if spec.get("max_prompt_length") is not None and not _is_count(spec["max_prompt_length"], 0):
        raise bad("max_prompt_length", f"must be null or a whole number >= 0, got {spec['max_prompt_length']!r}")
    if spec.get("truncation_side", "left") not in TRUNCATION_SIDES:
        raise bad("truncation_side", f"is {spec['truncation_side']!r}; valid: {', '.join(TRUNCATION_SIDES)}")
    if spec["kind"] == SHARED_KIND:
        aspects = spec.get("aspects")
        if not isinstance(aspects, dict) or not aspects:
            raise RlhfkitError(f"{spec_path}: a {SHARED_KIND} reward model lists its aspects under 'aspects'; re-save it with `rlhfkit train-rm`")
        for aspect, entry in aspects.items():
            kind = entry.get("kind") if isinstance(entry, dict) else None
            if kind not in KINDS:
                raise RlhfkitError(f"{spec_path}: aspect {aspect!r} has kind {kind!r}; valid: {', '.join(KINDS)}")
            _check_kind_fields(entry, spec_path, lambda field, problem, a=aspect: bad(f"aspects.{a}.{field}", problem), aspect)
    elif spec["kind"] not in KINDS:
        raise RlhfkitError(f"{spec_path}: unknown kind {spec['kind']!r}; valid: {', '.join(KINDS)}")
    else:
        _check_kind_fields(spec, spec_path, bad)


def _check_kind_fields(entry: dict, spec_path: Path, bad: Callable[[str, str], RlhfkitError], aspect: str | None = None) -> None:
    """The fields of one RM's kind (kind_spec): a segment RM's pooling, segments and rewards,
    a sequence RM's score normalisation."""
    if entry["kind"] == "segment":
        pooling = entry.get("segment_pooling", "end")
        if pooling not in SEGMENT_POOLINGS:
            where = f"aspect {aspect!r} has" if aspect else "has"
            raise RlhfkitError(f"{spec_path}: {where} segment_pooling {pooling!r}; valid: {', '.join(SEGMENT_POOLINGS)}")
        if entry.get("granularity") not in SEGMENT_RM_GRANULARITIES:
            raise bad("granularity", f"is {entry.get('granularity')!r}; a segment RM's is one of {', '.join(SEGMENT_RM_GRANULARITIES)}")
        for field in ("positive_reward", "negative_reward"):
            if not _is_number(entry.get(field)):
                raise bad(field, f"must be a finite number, got {entry.get(field)!r}")
        if not isinstance(entry.get("label_rules", {}), dict):
            raise bad("label_rules", f"must be an object, got {entry['label_rules']!r}")
        return
    if entry.get("granularity", "response") not in GRANULARITIES:
        raise bad("granularity", f"is {entry['granularity']!r}; valid: {', '.join(GRANULARITIES)}")
    norm = entry.get("normalization")
    if not isinstance(norm, dict):
        raise bad("normalization", f"must be an object with mean and std, got {norm!r}")
    if not _is_number(norm.get("mean")):
        raise bad("normalization.mean", f"must be a finite number, got {norm.get('mean')!r}")
    if not _is_number(norm.get("std")) or norm["std"] <= 0:
        raise bad("normalization.std", f"must be a finite number > 0, got {norm.get('std')!r}")


def check_head_matches_kind(path: str | os.PathLike, kind: str) -> None:
    """RlhfkitError when the directory's weights are not a `kind` RM (an edited kind): a
    segment RM has a 2-label token head, a sequence RM a 1-score head (new_reward_model)."""
    config_path = model_dir(path) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # load_pretrained reports a missing or damaged config.json
    if not isinstance(config, dict):
        return
    labels = len(config.get("id2label") or {}) or config.get("num_labels")
    expected = 2 if kind == "segment" else 1
    if labels is not None and labels != expected:
        raise RlhfkitError(
            f"{model_dir(path) / SPEC_FILE}: kind {kind!r} needs a head of {expected} output(s), but {config_path} has "
            f"{labels} labels; the kind does not match the weights (re-save the model with `rlhfkit train-rm`)"
        )


def spec_aspects(spec: dict) -> dict[str, str]:
    """{aspect: kind} of a reward model's spec: one entry, or every aspect of a shared-backbone model."""
    if spec["kind"] == SHARED_KIND:
        return {aspect: entry["kind"] for aspect, entry in spec["aspects"].items()}
    return {spec["aspect"]: spec["kind"]}


def reward_model_class(kind: str):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    return AutoModelForTokenClassification if kind == "segment" else AutoModelForSequenceClassification


def new_reward_model(kind: str, backbone: str, *, pad_token_id: int, **load_options) -> nn.Module:
    """A `kind` reward model to train: `backbone` (a hub id or directory, loaded with
    rlhfkit.models.load_pretrained's `load_options`) with a fresh head, a 2-way token
    classifier (SEGMENT_LABELS) for a segment RM, one score otherwise."""
    if kind == "segment":
        labels = {"num_labels": 2, "id2label": SEGMENT_LABELS, "label2id": {v: k for k, v in SEGMENT_LABELS.items()}}
    else:
        labels = {"num_labels": 1}
    model = load_pretrained(reward_model_class(kind), backbone, **load_options, **labels)
    model.config.pad_token_id = pad_token_id
    return model


def kind_spec(settings: RMSettings) -> dict[str, Any]:
    """What rlhfkit_rm.json holds for the RM's kind: a segment RM's rewards and label rules,
    a sequence RM's score normalisation (identity until training is done)."""
    if settings.kind == "segment":
        return {
            "positive_reward": settings.positive_reward, "negative_reward": settings.negative_reward,
            "error_class_weight": settings.error_class_weight, "label_rules": settings.label_rules.to_dict(),
            "segment_pooling": settings.segment_pooling,
        }
    return {"normalization": {"mean": 0.0, "std": 1.0, "computed_on": None}}


def reward_model_spec(
    aspect: str, settings: RMSettings, *, max_length: int, max_prompt_length: int | None, truncation_side: str,
    backbone: str, trained_on: str, apply_chat_template: bool = False,
) -> dict[str, Any]:
    """The rlhfkit_rm.json of a single-aspect RM (`max_prompt_length` None: as many as fit)."""
    return {
        "format": SPEC_FORMAT,
        "aspect": aspect,
        "kind": settings.kind,
        "granularity": settings.granularity,
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "truncation_side": truncation_side,
        "backbone": backbone,
        "trained_on": trained_on,
        "apply_chat_template": apply_chat_template,
        **kind_spec(settings),
    }


def save_reward_model_weights(model: nn.Module, tokenizer, out: Path) -> nn.Module:
    """The first step of writing a reward-model directory: its rlhfkit_rm.json removed (a stale
    spec beside weights being replaced would make a half-trained directory look usable), then
    the model (a LoRA adapter merged in) and tokenizer saved (rlhfkit.models.save_model). Every
    process enters (ZeRO-3 gathers the shards for it); the main one writes. Returns the model saved."""
    main = is_main_process()
    if main:
        (model_output_dir(out) / SPEC_FILE).unlink(missing_ok=True)
    with full_parameters(model):
        return save_model(model, tokenizer, out, merge_lora=True) if main else model


def write_reward_model_spec(out: Path, spec: dict[str, Any]) -> None:
    """The last step: a directory with rlhfkit_rm.json is a complete reward model."""
    if is_main_process():
        write_json(model_output_dir(out) / SPEC_FILE, spec)


def load_reward_model(path: str | os.PathLike, *, device: str | torch.device | None = None, dtype: str = "auto") -> RewardModel:
    """Load a directory written by `rlhfkit train-rm` for scoring (eval mode, on `device`)."""
    spec = read_spec(path)
    if spec["kind"] == SHARED_KIND:
        raise RlhfkitError(
            f"{path} is a shared-backbone reward model of several aspects ({', '.join(spec['aspects'])}); "
            "give it as --rm NAME=DIR and use its aspects as NAME.ASPECT (e.g. --rewards NAME.factuality=0.5)"
        )
    check_head_matches_kind(path, spec["kind"])
    target = resolve_device(None if device is None else str(device))
    tokenizer = load_tokenizer(str(path), padding_side="right")
    model = load_pretrained(reward_model_class(spec["kind"]), str(path), dtype=dtype, device=str(target))
    model.config.pad_token_id = tokenizer.pad_token_id
    return RewardModel(model, tokenizer, spec, target)
