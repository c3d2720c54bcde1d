"""Placing rewards on the policy's response tokens, and composing several reward models.

Segment reward models and the policy can have different tokenizers, so a segment is
located by character offsets in the response text, never by token index: the segmenter
gives each segment's end offset, and `token_index_for_char_ends` maps it to the policy
token that completes the segment, where FG-RLHF puts the segment's reward.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping, Sequence

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
    components: Mapping[str, Tensor], given: Mapping[str, Tensor], eps: float = NORMALIZE_EPS
) -> dict[str, Tensor]:
    """Each source's rewards standardised over the batch, before weighting.

    Sources live on different scales (a 0-4 regression attribute, a +-0.5 segment reward,
    a Bradley-Terry logit), so a weight means little until each is put on one scale. For
    each source, the rewards it gave (`given[name]`, (B, T) bool: the positions where it
    placed a reward; a sequence RM gives one per response, a segment RM one per segment)
    become `(r - mean) / (std + eps)`, mean and population std over those positions in the
    batch; positions it gave no reward stay 0. A source that gave one reward, or the same
    reward everywhere, becomes 0 there (its std is 0).
    """
    out = {}
    for name, rewards in components.items():
        mask = given[name].to(rewards.device)
        values = rewards[mask]
        normalized = torch.zeros_like(rewards)
        if values.numel():
            mean = values.mean()
            std = values.std(unbiased=False) if values.numel() > 1 else torch.zeros_like(mean)
            normalized[mask] = (values - mean) / (std + eps)
        out[name] = normalized
    return out
