"""Dense rewards from differences of a reward model's scores on growing prefixes.

R3HF / RED (Li et al., arXiv 2411.08302): a sequence reward model R scores the prefix
(x, y<=t) at every response position; token t's reward is what it added,

    r_t = R(x, y<=t) - R(x, y<=t-1),   with R(x, y<=0) = R(x), the prompt's own score,

so the rewards of a response telescope to R(x, y) - R(x). R(x) depends only on the
prompt, so with gamma = 1 this is potential-based shaping of the sequence reward: the
optimal policy is unchanged while credit reaches each token directly.

What this module follows, and where it differs or could not check:

* Prefix scores are read in one pass. For a causal (decoder) RM, the hidden state at
  position t depends only on tokens <= t, so applying the score head to every position's
  hidden state gives R(x, y<=t) for all t at the cost of one forward pass; R(x) is the
  score read at the last prompt token of the same pass. This module takes those scores
  as tensors; reading them from the RM belongs to the reward-model wrapper.
* The sequence reward is not added on top: the redistributed rewards replace it (their
  sum already is R(x, y) - R(x); adding R(x, y) at the last token would count it twice).
  They differ from the sparse reward only by the prompt-only constant R(x).
* No normalisation or scaling happens here. An RM normalised with SFT statistics
  (score - mean) / std gives differences divided by std (the mean cancels except in
  R(x)); apply the normalisation to the scores before calling, as for the sparse reward.
* Only the abstract of 2411.08302 (v1 "R3HF", v2 "RED") could be read from the stored
  copies available when this was written; the method section, and so any extra
  scaling, clipping or mixing with the sparse reward the paper may use, was not checked.
  The definition above is the one in the project checklist.

The same arithmetic at sentence granularity is the FG-RLHF toxicity reward: the score is
read after each sentence and each sentence is rewarded with the change it caused, placed
at its last token. Both go through `score_differences`, parametrised by the positions at
which the score is read (every token for "token", segment-end tokens for "sentence").
Scores where lower is better (toxicity) are negated by the caller before this.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def score_differences(scores: Tensor, read_mask: Tensor, prompt_score: Tensor) -> Tensor:
    """Reward at each read position = its score - the score at the previous read position.

    `scores` (B, T) holds the score of the prefix ending at each position (only read where
    `read_mask` is set), `prompt_score` (B,) stands in for the position before the first.
    Returns (B, T) float32 rewards, 0 wherever `read_mask` is not set; per row they sum to
    (score at the last read position) - prompt_score.
    """
    read = read_mask.bool()
    scores = scores.to(torch.float32)
    n_rows, n_positions = scores.shape
    positions = torch.arange(n_positions, device=scores.device).expand(n_rows, n_positions)
    last_read_up_to = torch.where(read, positions, -1).cummax(dim=1).values
    previous_read = torch.cat(
        [
            torch.full((n_rows, 1), -1, device=scores.device, dtype=last_read_up_to.dtype),
            last_read_up_to[:, :-1],
        ],
        dim=1,
    )
    previous_score = torch.where(
        previous_read >= 0,
        scores.gather(1, previous_read.clamp(min=0)),
        prompt_score.to(device=scores.device, dtype=torch.float32)[:, None],
    )
    return torch.where(read, scores - previous_score, 0.0)


def prefix_differences(prefix_scores: Tensor, mask: Tensor, prompt_score: Tensor) -> Tensor:
    """Token-level redistribution (R3HF): r_t = R(x, y<=t) - R(x, y<=t-1) on valid tokens.

    `prefix_scores` (B, T): the RM's score read at every response position; `mask` (B, T)
    the valid response tokens; `prompt_score` (B,): R(x). Over each row's valid tokens the
    rewards sum to R(x, y) - R(x).
    """
    return score_differences(prefix_scores, mask, prompt_score)


def segment_differences(
    segment_scores: Sequence[Sequence[float]],
    segment_end_tokens: Sequence[Sequence[int]],
    num_tokens: int,
    prompt_score: Tensor,
) -> Tensor:
    """Sentence-level redistribution: the change in score each segment caused, at its end.

    For response b, `segment_scores[b][j]` is the score of the text up to the end of
    segment j and `segment_end_tokens[b][j]` the index of the policy token that completes
    it (from `token_index_for_char_ends`); segments in text order. Returns (B, num_tokens)
    rewards. Segments completed by the same token collapse into one reward there (the
    later score is kept), so the sum per row stays last score - prompt_score.
    """
    if len(segment_scores) != len(segment_end_tokens):
        raise ValueError(
            f"segment_differences: {len(segment_scores)} rows of scores but "
            f"{len(segment_end_tokens)} rows of segment end tokens"
        )
    scores = torch.zeros(len(segment_scores), num_tokens, dtype=torch.float32)
    read_mask = torch.zeros(len(segment_scores), num_tokens, dtype=torch.bool)
    for row, (row_scores, row_positions) in enumerate(zip(segment_scores, segment_end_tokens)):
        if len(row_scores) != len(row_positions):
            raise ValueError(
                f"segment_differences: row {row} has {len(row_scores)} scores but "
                f"{len(row_positions)} segment end tokens"
            )
        for score, position in zip(row_scores, row_positions):
            if not 0 <= position < num_tokens:
                raise ValueError(
                    f"segment_differences: row {row} segment end token {position} "
                    f"outside 0..{num_tokens - 1}"
                )
            scores[row, position] = score
            read_mask[row, position] = True
    return score_differences(scores, read_mask, prompt_score.cpu()).to(prompt_score.device)
