"""Placing rewards on the policy's response tokens, and composing several reward models.

Segment reward models and the policy can have different tokenizers, so a segment is
located by character offsets in the response text, never by token index: the segmenter
gives each segment's end offset, and `token_index_for_char_ends` maps it to the policy
token that completes the segment, where FG-RLHF puts the segment's reward.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from rlhfkit.errors import RlhfkitError


def token_index_for_char_ends(
    token_char_spans: Sequence[tuple[int, int]],
    char_ends: Sequence[int],
    text: str | None = None,
) -> list[int]:
    """For each segment end (exclusive character offset), the index of the completing token.

    The completing token is the first token whose span end >= the segment end, which is
    right for tokens that carry a leading space (GPT-2 byte-level BPE: " It" follows "."
    and is not part of the sentence that "." ends). Details:

    * tokens with empty spans (special tokens such as EOS, decoded to no text) never
      complete a segment;
    * when one character is split over several tokens (byte-level BPE gives every byte
      piece of "é" the same span), the last of those tokens completes it;
    * a segment end beyond the last token's text maps to the last token that has text
      (a response cut off at the length limit);
    * with `text` (the response text the offsets refer to), trailing whitespace is first
      dropped from each segment: segmenters often keep the space after a sentence, which
      byte-level tokenizers attach to the *next* token.
    """
    text_token_indices = [i for i, (start, end) in enumerate(token_char_spans) if end > start]
    if not text_token_indices:
        raise ValueError("token_char_spans has no token with text; cannot place segment ends")
    running_max_ends: list[int] = []
    for i in text_token_indices:
        end = token_char_spans[i][1]
        running_max_ends.append(max(end, running_max_ends[-1]) if running_max_ends else end)

    positions = []
    for char_end in char_ends:
        if text is not None:
            while char_end > 0 and char_end <= len(text) and text[char_end - 1].isspace():
                char_end -= 1
        k = bisect_left(running_max_ends, char_end)
        if k == len(text_token_indices):
            positions.append(text_token_indices[-1])
            continue
        # Later byte pieces of the same character overlap this token's span.
        while k + 1 < len(text_token_indices):
            this_end = token_char_spans[text_token_indices[k]][1]
            if token_char_spans[text_token_indices[k + 1]][0] >= this_end:
                break
            k += 1
        positions.append(text_token_indices[k])
    return positions


def place_rewards(
    num_tokens: int, positions: Sequence[int], values: Sequence[float] | Tensor
) -> Tensor:
    """A (num_tokens,) float32 reward vector with `values` at `positions`, 0 elsewhere.

    Several rewards at the same token add up (two segments completed by one token, or a
    segment reward and the sequence score both landing on the last token).
    """
    values = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    index = torch.as_tensor(list(positions), dtype=torch.long).reshape(-1)
    if index.numel() != values.numel():
        raise ValueError(f"place_rewards: {index.numel()} positions but {values.numel()} values")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_tokens):
        raise ValueError(f"place_rewards: positions {index.tolist()} outside 0..{num_tokens - 1}")
    return torch.zeros(num_tokens, dtype=torch.float32).index_add_(0, index, values)


def compose_token_rewards(
    components: Mapping[str, Tensor], weights: Mapping[str, float]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of the reward models' token rewards.

    `components` maps a reward name to its (B, T) token rewards, `weights` maps the same
    names to their weights (FG-RLHF's w_1..w_K). Returns the (B, T) total and, for
    logging, each component's weighted per-response sum (B,).
    """
    if not components:
        raise RlhfkitError("no reward components to compose; configure at least one reward model")
    missing_components = sorted(set(weights) - set(components))
    missing_weights = sorted(set(components) - set(weights))
    if missing_components or missing_weights:
        problems = []
        if missing_components:
            problems.append(f"weights given for unknown rewards {missing_components}")
        if missing_weights:
            problems.append(f"no weight given for rewards {missing_weights}")
        raise RlhfkitError(
            f"reward weights do not match the reward models: {'; '.join(problems)} "
            f"(rewards: {sorted(components)}; weights: {sorted(weights)})"
        )
    shapes = {name: tuple(rewards.shape) for name, rewards in components.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"reward components have different shapes: {shapes}")
    weighted = {
        name: weights[name] * rewards.to(torch.float32) for name, rewards in components.items()
    }
    total = torch.stack(list(weighted.values())).sum(dim=0)
    per_component_sums = {name: rewards.sum(dim=-1) for name, rewards in weighted.items()}
    return total, per_component_sums


NORMALIZE_REWARDS = ("none", "per-source")
NORMALIZE_EPS = 1e-8


def normalize_per_source(
    components: Mapping[str, Tensor],
    given: Mapping[str, Tensor],
    eps: float = NORMALIZE_EPS,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Each source's per-response reward standardised over the batch, before weighting; the
    shape of a dense or segment reward within a response is kept.

    Sources live on different scales (a 0-4 regression attribute, a +-0.5 segment reward,
    a Bradley-Terry logit), so a weight means little until each is put on one scale. What is
    standardised is the response's reward from the source: the sum over the positions where
    it placed one (`given[name]`, (B, T) bool; a sequence RM's single score, a segment RM's
    segments, an R3HF source's prefix differences). With m and s the mean and population std
    of those sums over the responses it rewarded, every rewarded position is divided by s and
    m / s is subtracted at the response's last rewarded position (where a sequence RM's score
    sits): each response's sum becomes (sum - m) / s, positions within it keep their ratios,
    and R3HF's differences still telescope, to the standardised sequence score. Standardising
    the positions themselves instead (each against the mean position) would add a term in the
    number of positions: two dense rows with sums 0.8 over 4 tokens and 1.6 over 12, spread
    evenly, would sum to +6.93 and -6.93, the better row penalised; here they sum to -1 and +1.

    `all_reduce` (distributed.all_reduce_sum) makes m and s those of the global batch over
    processes. A source whose rewarded sums are all equal (or that rewarded one response, or
    none) becomes 0: std <= 1e-6 x max(1, |m|) is treated as none (float32 sums of equal
    values differ by rounding, ~1e-7 relative), since dividing by it would blow the shape up.
    """
    reduce = all_reduce or (lambda t: t)
    out = {}
    for name, rewards in components.items():
        mask = given[name].to(rewards.device)
        placed = torch.where(mask, rewards.to(torch.float32), 0.0)
        rewarded = mask.any(dim=1)
        sums = placed.sum(dim=1)
        count, total = reduce(torch.stack([rewarded.sum(), sums[rewarded].sum()]).to(torch.float64)).tolist()
        normalized = torch.zeros_like(placed)
        if count:
            mean = total / count
            squares = reduce(((sums[rewarded].to(torch.float64) - mean) ** 2).sum().reshape(1)).item()
            std = math.sqrt(squares / count)
            if std > 1e-6 * max(1.0, abs(mean)):
                normalized = placed / (std + eps)
                width = mask.shape[1]
                last = width - 1 - mask.flip(dims=[1]).to(torch.int64).argmax(dim=1)
                rows = torch.nonzero(rewarded).squeeze(1)
                normalized[rows, last[rows]] -= mean / (std + eps)
        out[name] = normalized
    return out
