"""Per-token rewards, KL control and advantage estimation as pure tensor functions.

Shapes: B rows (one response each), T response positions. `mask` (B, T) marks the real
response tokens (1 / True) and the padding (0 / False). Responses are right-padded: each row
of `mask` is a run of ones starting at index 0 followed by zeros, which is what generation
produces once the prompt is cut off and everything after the first EOS is masked.

All statistics are computed in float32 whatever the input dtype (bf16 rewards/values would
lose the small differences GAE and whitening work with). Padded positions of every output
are exactly 0 so that a stray value there can never leak into a loss.

Distributed runs: whitening must use the statistics of the whole global batch (the
checklist's "mean/std over the whole batch, across ranks"); whitening each rank's shard on
its own would change the algorithm with the number of GPUs. The statistics functions take
`all_reduce`, a callable that sums a small 1-D tensor over all ranks and returns the sum on
every rank, for example::

    def all_reduce(t):
        torch.distributed.all_reduce(t)  # default op is SUM, in place
        return t

It is called with the same shapes in the same order on every rank (it is a collective).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

StatsReducer = Callable[[Tensor], Tensor]
"""Sums a 1-D float tensor over all ranks (a SUM all-reduce) and returns the result."""

KL_PENALTY_KINDS = ("k1", "abs", "mse", "k3")
GROUP_ADVANTAGE_KINDS = ("grpo", "rloo")
GROUP_BASELINES = ("per-reward", "sequence-sum")


def _sum_and_count(
    x: Tensor, mask: Tensor, all_reduce: StatsReducer | None
) -> tuple[Tensor, Tensor]:
    valid = mask.bool()
    masked = torch.where(valid, x.to(torch.float32), 0.0)
    stats = torch.stack([masked.sum(), valid.sum().to(torch.float32)])
    if all_reduce is not None:
        stats = all_reduce(stats)
    return stats[0], stats[1]


def masked_mean(
    x: Tensor,
    mask: Tensor,
    dim: int | None = None,
    all_reduce: StatsReducer | None = None,
) -> Tensor:
    """Mean of `x` over the positions where `mask` is set.

    With `dim`, the mean along that dimension (rows with no valid position give 0).
    `all_reduce` makes the mean global over ranks; it only applies to the full reduction
    (`dim=None`), the only one whitening needs.
    """
    if dim is not None:
        if all_reduce is not None:
            raise ValueError("masked_mean: all_reduce is only supported with dim=None")
        valid = mask.bool()
        total = torch.where(valid, x.to(torch.float32), 0.0).sum(dim)
        return total / valid.sum(dim).clamp(min=1)
    total, count = _sum_and_count(x, mask, all_reduce)
    if count.item() == 0:
        raise ValueError("masked_mean: the mask selects no positions")
    return total / count


def masked_var(
    x: Tensor,
    mask: Tensor,
    unbiased: bool = True,
    all_reduce: StatsReducer | None = None,
) -> Tensor:
    """Variance of `x` over the masked positions (Bessel-corrected when `unbiased`).

    Two passes (mean first, then the squared deviations from it) rather than
    E[x^2] - E[x]^2, which loses all precision in float32 when |mean| >> std (raw RM scores
    around 100 with spread 0.1, say). Each pass is one all-reduce of a 2-element vector
    when `all_reduce` is given. One valid position has no spread: the unbiased variance is
    then returned as 0 rather than a division by zero.
    """
    mean = masked_mean(x, mask, all_reduce=all_reduce)
    squared_deviation_sum, count = _sum_and_count(
        (x.to(torch.float32) - mean) ** 2, mask, all_reduce
    )
    if unbiased:
        if count.item() < 2:
            return torch.zeros_like(squared_deviation_sum)
        return squared_deviation_sum / (count - 1)
    return squared_deviation_sum / count


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    all_reduce: StatsReducer | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """Scale `x` to mean 0 / (unbiased) std 1 over the masked positions; padding stays 0.

    `shift_mean=False` keeps the original mean (only divides the spread), the convention
    for whitening rewards, where the sign of the mean reward carries information.
    """
    mean = masked_mean(x, mask, all_reduce=all_reduce)
    var = masked_var(x, mask, unbiased=True, all_reduce=all_reduce)
    whitened = (x.to(torch.float32) - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0.0)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' logprobs.

    k1: logp - logp_ref, the unbiased estimator whose sum is the sequence log-ratio that
        Ziegler et al. and FG-RLHF subtract from the reward (can be negative per token);
    abs: |logp - logp_ref|;  mse: 0.5 * (logp - logp_ref)^2;
    k3: (r - 1) - log r with r = p_ref / p: unbiased and never negative (Schulman's k3).
    """
    log_ratio = logprobs.to(torch.float32) - ref_logprobs.to(torch.float32)
    if kind == "k1":
        return log_ratio
    if kind == "abs":
        return log_ratio.abs()
    if kind == "mse":
        return 0.5 * log_ratio**2
    if kind == "k3":
        # r = exp(-log_ratio); (r - 1) - log r, written with expm1 for accuracy near r = 1.
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(
        f"unknown KL penalty kind {kind!r}; choose one of {', '.join(KL_PENALTY_KINDS)}"
    )


def kl_penalty_rewards(
    task_rewards: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    beta: float,
    kind: str = "k1",
) -> Tensor:
    """Per-token total reward: task reward where earned minus beta * KL at every token.

    `task_rewards` (B, T) already holds the task rewards at the tokens where they are earned
    (the sequence score at the last real token, segment rewards at segment ends, or
    redistributed per-token rewards). Padding is 0 in the result.
    """
    total = task_rewards.to(torch.float32) - beta * kl_penalty(logprobs, ref_logprobs, kind)
    return torch.where(mask.bool(), total, 0.0)


class FixedKLController:
    """A constant KL coefficient; `update` is a no-op so the PPO loop treats both alike."""

    def __init__(self, beta: float):
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        return None


class AdaptiveKLController:
    """Ziegler et al. (2019) adaptive KL coefficient.

    After each batch: error = clip(KL / target - 1, -0.2, 0.2) and
    beta <- beta * (1 + error * n_steps / horizon), where n_steps is the number of samples
    (episodes) in that batch, so beta moves at most 20% per `horizon` samples.
    """

    def __init__(self, init_beta: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(
                f"adaptive KL needs target > 0 and horizon > 0 "
                f"(got target={target}, horizon={horizon})"
            )
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


def _check_right_padded(mask: Tensor) -> None:
    valid = mask.to(torch.int8)
    if valid.shape[-1] > 1 and bool((valid[:, 1:] > valid[:, :-1]).any()):
        raise ValueError(
            "mask must be right-padded: each row is 1s from index 0 followed by 0s "
            "(responses start at index 0 of the response tensor)"
        )


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over each row's valid tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with
    V and A taken as 0 after the last valid token (the episode ends there: nothing to
    bootstrap from). Returns (advantages, returns = advantages + values), both 0 on padding
    and not whitened (whiten the advantages with `masked_whiten` over the whole batch).
    Rows may have different lengths; the mask must be right-padded.
    """
    _check_right_padded(mask)
    valid = mask.bool()
    rewards = torch.where(valid, rewards.to(torch.float32), 0.0)
    values = torch.where(valid, values.to(torch.float32), 0.0)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # Padded positions carry 0 so the last valid token starts a fresh recursion.
        advantage = torch.where(valid[:, t], delta + gamma * lam * next_advantage, 0.0)
        advantages_reversed.append(advantage)
        next_value = values[:, t]
        next_advantage = advantage
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = torch.where(valid, advantages + values, 0.0)
    return advantages, returns


def _check_group_shape(n_rows: int, group_size: int, kind: str) -> None:
    if kind not in GROUP_ADVANTAGE_KINDS:
        raise ValueError(
            f"unknown group advantage kind {kind!r}; "
            f"choose one of {', '.join(GROUP_ADVANTAGE_KINDS)}"
        )
    if group_size < 2:
        raise ValueError(
            f"group advantages need group_size >= 2 samples per prompt (got {group_size})"
        )
    if n_rows % group_size != 0:
        raise ValueError(
            f"batch of {n_rows} responses is not a whole number of groups of {group_size}; "
            "make the rollout batch a multiple of the group size"
        )


def group_advantages(
    scores: Tensor, group_size: int, kind: str = "grpo", eps: float = 1e-6
) -> Tensor:
    """Critic-free sequence advantages from the other samples of the same prompt.

    `scores` (B,) with B = n_prompts * group_size, consecutive rows sharing a prompt.
    grpo (Shao et al. 2024): (r - group mean) / (group std + eps), std Bessel-corrected as
        in TRL's GRPOTrainer;
    rloo (Ahmadian et al. 2024): r - mean of the other group_size - 1 samples' scores.
    """
    _check_group_shape(scores.shape[0], group_size, kind)
    grouped = scores.to(torch.float32).view(-1, group_size)
    if kind == "grpo":
        mean = grouped.mean(dim=1, keepdim=True)
        std = grouped.std(dim=1, keepdim=True)
        advantages = (grouped - mean) / (std + eps)
    else:
        others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
        advantages = grouped - others_mean
    return advantages.reshape(-1)


def broadcast_sequence_advantage(advantages: Tensor, mask: Tensor) -> Tensor:
    """Give every valid token of a row that row's sequence advantage (padding 0)."""
    return torch.where(mask.bool(), advantages.to(torch.float32)[:, None], 0.0)


def group_token_returns(
    token_rewards: Tensor,
    mask: Tensor,
    group_size: int,
    kind: str = "grpo",
    reward_mask: Tensor | None = None,
    eps: float = 1e-6,
    baseline: str = "per-reward",
) -> Tensor:
    """Per-token advantages for GRPO/RLOO with dense (fine-grained) rewards.

    baseline="sequence-sum" instead compares each sample's summed reward with its group's
    (`group_advantages` of the sums) and gives every token that advantage: a sample with more
    rewarded segments wins, which "per-reward" below cannot see (+0.3 on 2 and on 4
    sub-sentences are both exactly the group mean there), at the price of the positions.

    Choice: DeepSeekMath's GRPO with process supervision (Shao et al. 2024, sec. 4.1.3).
    The rewards themselves are normalised within the group, then each token gets the
    reward-to-go (gamma = 1) of the normalised rewards:

        grpo: r~ = (r - mean) / (std + eps), mean and (Bessel) std over every reward given
              in the group (all samples, all reward positions);
        rloo: r~ = r - mean of the rewards given to the *other* samples of the group;
        A_t  = sum of r~ at reward positions >= t.

    `reward_mask` (B, T) marks the positions where a reward is given (segment ends for
    fine-grained segment RMs); by default every valid token (per-token redistributed
    rewards). Zeros at positions that give no reward must not count as rewards of 0, hence
    the mask. With one reward per response at its last token this is exactly
    `group_advantages` broadcast over the tokens, so sparse and dense rewards share one
    code path. Normalising per-token returns across the group instead was rejected: the
    mean over tokens weights long responses more and mixes early (large) with late (small)
    returns.
    """
    n_rows, n_positions = token_rewards.shape
    _check_group_shape(n_rows, group_size, kind)
    if baseline not in GROUP_BASELINES:
        raise ValueError(f"unknown group baseline {baseline!r}; choose one of {', '.join(GROUP_BASELINES)}")
    valid = mask.bool()
    given = valid if reward_mask is None else (reward_mask.bool() & valid)
    if baseline == "sequence-sum":
        sums = torch.where(given, token_rewards.to(torch.float32), 0.0).sum(dim=1)
        return broadcast_sequence_advantage(group_advantages(sums, group_size, kind, eps), mask)
    rewards = torch.where(given, token_rewards.to(torch.float32), 0.0).view(
        -1, group_size, n_positions
    )
    given = given.view(-1, group_size, n_positions)
    count_per_sample = given.sum(dim=2, dtype=torch.float32)
    sum_per_sample = rewards.sum(dim=2)
    count_per_group = count_per_sample.sum(dim=1, keepdim=True)
    sum_per_group = sum_per_sample.sum(dim=1, keepdim=True)
    if kind == "grpo":
        mean = (sum_per_group / count_per_group.clamp(min=1.0))[:, :, None]
        squared_deviations = torch.where(given, (rewards - mean) ** 2, 0.0).sum(dim=(1, 2))
        std = (squared_deviations / (count_per_group.squeeze(1) - 1).clamp(min=1.0)).sqrt()
        normalised = (rewards - mean) / (std[:, None, None] + eps)
    else:
        others_count = (count_per_group - count_per_sample).clamp(min=1.0)
        others_mean = (sum_per_group - sum_per_sample) / others_count
        normalised = rewards - others_mean[:, :, None]
    normalised = torch.where(given, normalised, 0.0).view(n_rows, n_positions)
    reward_to_go = normalised.flip(1).cumsum(1).flip(1)
    return torch.where(valid, reward_to_go, 0.0)
