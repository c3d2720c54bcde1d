"""RL math against numbers worked out by hand (in the comments next to each check)."""

import math
import threading

import pytest
import torch

from rlhfkit.rl.advantages import (
    AdaptiveKLController,
    FixedKLController,
    broadcast_sequence_advantage,
    gae,
    group_advantages,
    group_token_returns,
    kl_penalty,
    kl_penalty_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
)
from rlhfkit.rl.losses import entropy_from_logits, logprobs_from_logits, policy_loss, value_loss


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float32),
        torch.as_tensor(expected, dtype=torch.float32),
        atol=tol,
        rtol=0,
    )


# --- GAE -------------------------------------------------------------------------------

REWARDS_3 = torch.tensor([[0.0, 0.0, 1.0]])
VALUES_3 = torch.tensor([[0.5, 0.6, 0.7]])
MASK_3 = torch.ones(1, 3)


def test_gae_three_tokens_gamma_1_lambda_095():
    # deltas (V after the last token = 0):
    #   d2 = 1 + 0 - 0.7 = 0.3;  d1 = 0 + 0.7 - 0.6 = 0.1;  d0 = 0 + 0.6 - 0.5 = 0.1
    # A2 = 0.3;  A1 = 0.1 + 0.95 * 0.3 = 0.385;  A0 = 0.1 + 0.95 * 0.385 = 0.46575
    # returns = A + V = [0.96575, 0.985, 1.0]
    advantages, returns = gae(REWARDS_3, VALUES_3, MASK_3, gamma=1.0, lam=0.95)
    close(advantages, [[0.46575, 0.385, 0.3]])
    close(returns, [[0.96575, 0.985, 1.0]])


def test_gae_three_tokens_gamma_09_lambda_05():
    # d2 = 1 - 0.7 = 0.3;  d1 = 0.9 * 0.7 - 0.6 = 0.03;  d0 = 0.9 * 0.6 - 0.5 = 0.04
    # gamma * lam = 0.45:  A2 = 0.3;  A1 = 0.03 + 0.45 * 0.3 = 0.165
    #                      A0 = 0.04 + 0.45 * 0.165 = 0.11425
    # returns = [0.61425, 0.765, 1.0]
    advantages, returns = gae(REWARDS_3, VALUES_3, MASK_3, gamma=0.9, lam=0.5)
    close(advantages, [[0.11425, 0.165, 0.3]])
    close(returns, [[0.61425, 0.765, 1.0]])


def test_gae_rows_of_different_lengths_ignore_padding():
    # Row 0 is the gamma=1, lam=0.95 example above. Row 1 has 2 valid tokens; its padded
    # position holds reward 5 and value 9, which must not leak in.
    #   d1 = 2 + 0 - 0.5 = 1.5;  d0 = 0 + 0.5 - 1.0 = -0.5
    #   A1 = 1.5;  A0 = -0.5 + 0.95 * 1.5 = 0.925;  returns = [1.925, 2.0, 0]
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    close(advantages, [[0.46575, 0.385, 0.3], [0.925, 1.5, 0.0]])
    close(returns, [[0.96575, 0.985, 1.0], [1.925, 2.0, 0.0]])


def test_gae_rejects_a_mask_that_is_not_right_padded():
    with pytest.raises(ValueError, match="right-padded"):
        gae(REWARDS_3, VALUES_3, torch.tensor([[0, 1, 1]]), gamma=1.0, lam=0.95)


# --- masked statistics and whitening ---------------------------------------------------

X = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, 0.0]])
X_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
# Valid values 1..5: mean 3, unbiased variance (4 + 1 + 0 + 1 + 4) / 4 = 2.5, biased 2.


def test_masked_mean_and_var_use_only_valid_positions():
    close(masked_mean(X, X_MASK), 3.0)
    close(masked_mean(X, X_MASK, dim=1), [2.0, 4.5])
    close(masked_var(X, X_MASK), 2.5)
    close(masked_var(X, X_MASK, unbiased=False), 2.0)


def test_masked_whiten_mean_0_std_1_on_valid_positions_and_pads_untouched():
    whitened = masked_whiten(X, X_MASK)
    # (x - 3) / sqrt(2.5) at the valid positions; padding stays exactly 0.
    s = math.sqrt(2.5)
    close(whitened, [[-2 / s, -1 / s, 0.0, 0.0], [1 / s, 2 / s, 0.0, 0.0]])
    close(masked_mean(whitened, X_MASK), 0.0)
    close(masked_var(whitened, X_MASK), 1.0, tol=1e-5)
    assert whitened[0, 3] == 0 and whitened[1, 2] == 0 and whitened[1, 3] == 0


def test_masked_whiten_without_shift_keeps_the_mean():
    s = math.sqrt(2.5)
    close(
        masked_whiten(X, X_MASK, shift_mean=False),
        [[-2 / s + 3, -1 / s + 3, 3.0, 0.0], [1 / s + 3, 2 / s + 3, 0.0, 0.0]],
    )


def test_masked_var_is_precise_when_the_mean_dwarfs_the_spread():
    # Values 1e4 + {0, 0.1, 0.2}: unbiased variance = (0.01 + 0 + 0.01) / 2 = 0.01.
    # E[x^2] - E[x]^2 in float32 would lose it entirely (1e8 has ~8 digits).
    x = torch.tensor([[10000.0, 10000.1, 10000.2]])
    close(masked_var(x, torch.ones(1, 3)), 0.01, tol=2e-4)


class ThreadAllReduce:
    """A SUM all-reduce across threads that stand in for ranks (same semantics as a collective)."""

    def __init__(self, world_size):
        self.barrier = threading.Barrier(world_size)
        self.slots = [None] * world_size

    def for_rank(self, rank):
        def all_reduce(tensor):
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = torch.stack(self.slots).sum(dim=0)
            self.barrier.wait()
            return total

        return all_reduce


def test_masked_whiten_across_ranks_equals_whitening_the_global_batch():
    # Rank 0 holds row 0 (1, 2, 3), rank 1 holds row 1 (4, 5): each must be whitened with
    # the global mean 3 and variance 2.5, not with its own shard's statistics.
    reducer = ThreadAllReduce(2)
    results = [None, None]

    def run(rank):
        results[rank] = masked_whiten(
            X[rank : rank + 1], X_MASK[rank : rank + 1], all_reduce=reducer.for_rank(rank)
        )

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    close(torch.cat(results), masked_whiten(X, X_MASK))


# --- KL penalty and controllers --------------------------------------------------------


@pytest.mark.parametrize("kind", ["k1", "abs", "mse", "k3"])
def test_kl_penalty_is_zero_when_policy_equals_reference(kind):
    logprobs = torch.tensor([[-0.3, -2.0, -5.0]])
    close(kl_penalty(logprobs, logprobs.clone(), kind), [[0.0, 0.0, 0.0]])


def test_kl_penalty_hand_values():
    # p = 0.5, p_ref = 0.25: log ratio = ln 2 = 0.693147
    # k1 = abs = 0.693147;  mse = 0.5 * 0.693147^2 = 0.240227
    # k3: r = p_ref / p = 0.5 -> (r - 1) - ln r = -0.5 + 0.693147 = 0.193147
    logprobs, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    close(kl_penalty(logprobs, ref, "k1"), [0.693147])
    close(kl_penalty(logprobs, ref, "abs"), [0.693147])
    close(kl_penalty(logprobs, ref, "mse"), [0.240227])
    close(kl_penalty(logprobs, ref, "k3"), [0.193147])
    with pytest.raises(ValueError, match="k1, abs, mse, k3"):
        kl_penalty(logprobs, ref, "kl")


def test_kl_penalty_rewards():
    # beta = 0.1, logp - logp_ref = [0.5, 0, 0.5] (row 0), row 1 has one valid token.
    # row 0: [0 - 0.05, 0 - 0, 2 - 0.05] = [-0.05, 0, 1.95]
    # row 1: [1 - 0.1 * (-1)] = [1.1], padding 0
    task = torch.tensor([[0.0, 0.0, 2.0], [1.0, 3.0, 3.0]])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-2.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0], [-1.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    close(
        kl_penalty_rewards(task, logprobs, ref, mask, beta=0.1),
        [[-0.05, 0.0, 1.95], [1.1, 0.0, 0.0]],
    )


def test_adaptive_kl_controller_update():
    # error = clip(9 / 6 - 1 = 0.5, -0.2, 0.2) = 0.2
    # beta = 0.2 * (1 + 0.2 * 256 / 10000) = 0.2 * 1.00512 = 0.201024
    controller = AdaptiveKLController(init_beta=0.2, target=6.0, horizon=10000)
    controller.update(current_kl=9.0, n_steps=256)
    close(controller.value, 0.201024, tol=1e-9)
    # error = 5.4 / 6 - 1 = -0.1 (inside the clip)
    # beta = 0.201024 * (1 - 0.1 * 256 / 10000) = 0.201024 * 0.99744 = 0.200509379
    controller.update(current_kl=5.4, n_steps=256)
    close(controller.value, 0.200509379, tol=1e-9)


def test_fixed_kl_controller_never_moves():
    controller = FixedKLController(0.05)
    controller.update(current_kl=100.0, n_steps=256)
    assert controller.value == 0.05


# --- policy loss -------------------------------------------------------------------------


def test_policy_loss_first_minibatch_ratio_is_exactly_one():
    # logprobs == old_logprobs: ratio 1, nothing clipped, loss = -mean(adv over valid)
    # valid advantages 1, 3, 6 -> loss = -10 / 3
    logprobs = torch.tensor([[-1.2, -0.4, -3.0], [-0.7, -2.2, -1.0]])
    advantages = torch.tensor([[1.0, 3.0, 50.0], [6.0, 50.0, 50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, stats = policy_loss(logprobs, logprobs.clone(), advantages, mask, clip_eps=0.2)
    close(loss, -10.0 / 3.0)
    assert stats["ratio_mean"].item() == 1.0
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    # Sequence mean: row means 2 and 6 -> -(2 + 6) / 2 = -4
    loss_seq, _ = policy_loss(
        logprobs, logprobs.clone(), advantages, mask, clip_eps=0.2, aggregation="seq_mean"
    )
    close(loss_seq, -4.0)


def test_policy_loss_clipping_ratio_15():
    # ratio 1.5, eps 0.2 (clip range [0.8, 1.2]):
    #   A = +2: max(-2 * 1.5, -2 * 1.2) = max(-3, -2.4) = -2.4 (clipped term; no gradient)
    #   A = -2: max(+2 * 1.5, +2 * 1.2) = max(3, 2.4) = 3 (unclipped; gradient flows)
    # loss = (-2.4 + 3) / 2 = 0.3, clipfrac = 1/2,
    # approx_kl = (1.5 - 1) - ln 1.5 = 0.5 - 0.405465 = 0.094535
    # d loss / d logp: token 0 -> 0;  token 1 -> -A * ratio / 2 = 2 * 1.5 / 2 = 1.5
    old = torch.tensor([[-1.0, -2.0]])
    logprobs = (old + math.log(1.5)).requires_grad_(True)
    loss, stats = policy_loss(
        logprobs, old, torch.tensor([[2.0, -2.0]]), torch.ones(1, 2), clip_eps=0.2
    )
    close(loss, 0.3)
    close(stats["clipfrac"], 0.5)
    close(stats["approx_kl"], 0.094535)
    close(stats["ratio_mean"], 1.5)
    loss.backward()
    close(logprobs.grad, [[0.0, 1.5]])


def test_policy_and_value_loss_give_zero_gradient_on_pad_tokens():
    # Padded positions hold inf / NaN garbage: they must get exactly zero gradient and
    # leave the loss finite.
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    pad = ~mask.bool()
    logprobs = torch.tensor(
        [[-1.0, -2.0, float("inf")], [-0.5, float("nan"), 3.0]], requires_grad=True
    )
    old = torch.tensor([[-1.1, -1.9, float("nan")], [-0.4, 0.0, float("-inf")]])
    advantages = torch.tensor([[1.0, -1.0, float("nan")], [2.0, float("inf"), 1.0]])
    loss, _ = policy_loss(logprobs, old, advantages, mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(logprobs.grad[pad] == 0)
    assert torch.all(logprobs.grad[~pad] != 0)

    values = torch.tensor([[0.5, 0.2, float("nan")], [1.0, float("inf"), 7.0]], requires_grad=True)
    old_values = torch.tensor([[0.4, 0.3, 1.0], [1.0, float("nan"), 0.0]])
    returns = torch.tensor([[1.0, 0.0, float("inf")], [0.0, 5.0, 5.0]])
    vf_loss, _ = value_loss(values, old_values, returns, mask)
    vf_loss.backward()
    assert torch.isfinite(vf_loss)
    assert torch.all(values.grad[pad] == 0)
    assert torch.all(values.grad[~pad] != 0)


# --- value loss ----------------------------------------------------------------------------


def test_value_loss_clipping():
    # eps 0.2, old value 1.0 for both valid tokens:
    #   token 0: V = 1.5 -> clipped 1.2, R = 2: (1.5-2)^2 = 0.25, (1.2-2)^2 = 0.64 -> 0.64 (clipped)
    #   token 1: V = 0.9 (inside the clip), R = 0: both 0.81 -> 0.81 (not clipped)
    # loss = 0.5 * (0.64 + 0.81) / 2 = 0.3625, vf_clipfrac = 1/2
    values = torch.tensor([[1.5, 0.9, 4.0]])
    old_values = torch.tensor([[1.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 9.0]])
    loss, stats = value_loss(values, old_values, returns, torch.tensor([[1, 1, 0]]), clip_eps=0.2)
    close(loss, 0.3625)
    close(stats["vf_clipfrac"], 0.5)


# --- logits helpers ----------------------------------------------------------------------


def test_entropy_of_uniform_distribution_is_log_v():
    # Valid tokens: uniform over V = 7 -> entropy ln 7 = 1.945910. The padded position has a
    # peaked distribution (entropy ~0) that must not pull the mean down.
    logits = torch.zeros(1, 3, 7)
    logits[0, 2, 0] = 50.0
    close(entropy_from_logits(logits, torch.tensor([[1, 1, 0]])), math.log(7))


def test_logprobs_from_logits_use_the_sampling_temperature():
    # logits [0, ln 3]: softmax [0.25, 0.75] -> logp(token 1) = ln 0.75 = -0.287682
    # logits [0, 2 ln 3] at temperature 2: [0, ln 3] / ... -> again ln 0.75; token 0 -> ln 0.25
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 2 * math.log(3.0)]]])
    close(logprobs_from_logits(logits[:, :1], torch.tensor([[1]])), [[math.log(0.75)]])
    close(
        logprobs_from_logits(logits[:, 1:], torch.tensor([[1]]), temperature=2.0),
        [[math.log(0.75)]],
    )
    close(
        logprobs_from_logits(logits[:, 1:], torch.tensor([[0]]), temperature=2.0),
        [[math.log(0.25)]],
    )
    # bf16 logits are computed in float32.
    assert logprobs_from_logits(logits.bfloat16(), torch.tensor([[1, 1]])).dtype == torch.float32


# --- group advantages ----------------------------------------------------------------------


def test_group_advantages_grpo_and_rloo():
    # Two prompts x 3 samples: scores [1, 2, 3] and [5, 5, 5].
    # grpo group 1: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> [-1, 0, 1]
    #      group 2: all equal -> 0 / (0 + eps) = 0
    # rloo group 1: 1 - (2+3)/2 = -1.5;  2 - (1+3)/2 = 0;  3 - (1+2)/2 = 1.5;  group 2: 0
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    close(group_advantages(scores, 3, "grpo"), [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], tol=1e-5)
    close(group_advantages(scores, 3, "rloo"), [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="multiple of the group size"):
        group_advantages(scores, 4)
    with pytest.raises(ValueError, match="grpo, rloo"):
        group_advantages(scores, 3, "ppo")


def test_broadcast_sequence_advantage():
    close(
        broadcast_sequence_advantage(
            torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]])
        ),
        [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]],
    )


def test_group_token_returns_hand_example():
    # One prompt, 2 samples, T = 3.
    #   sample A: rewards 1 at t0 and 3 at t2 (reward positions t0, t2)
    #   sample B: reward 5 at t1; t2 is padding
    # grpo: rewards given in the group {1, 3, 5}: mean 3, unbiased std sqrt((4+0+4)/2) = 2
    #   normalised A: t0 -1, t2 0;  B: t1 +1
    #   reward-to-go A: [-1 + 0, 0, 0] = [-1, 0, 0];  B: [1, 1, 0(pad)]
    # rloo: A's baseline = mean of B's rewards = 5 -> A: 1-5 = -4 (t0), 3-5 = -2 (t2)
    #       B's baseline = mean of A's rewards = 2 -> B: 5-2 = 3 (t1)
    #   reward-to-go A: [-6, -2, -2];  B: [3, 3, 0]
    rewards = torch.tensor([[1.0, 0.0, 3.0], [0.0, 5.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    reward_mask = torch.tensor([[1, 0, 1], [0, 1, 0]])
    close(
        group_token_returns(rewards, mask, 2, "grpo", reward_mask=reward_mask),
        [[-1.0, 0.0, 0.0], [1.0, 1.0, 0.0]],
        tol=1e-5,
    )
    close(
        group_token_returns(rewards, mask, 2, "rloo", reward_mask=reward_mask),
        [[-6.0, -2.0, -2.0], [3.0, 3.0, 0.0]],
    )


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_group_token_returns_reduce_to_sequence_advantages_for_a_final_reward(kind):
    # A single reward at each response's last token: the same as group_advantages broadcast.
    scores = torch.tensor([0.5, 2.0, -1.0, 4.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    last = mask.sum(dim=1) - 1
    rewards = torch.zeros(4, 3)
    rewards[torch.arange(4), last] = scores
    reward_mask = torch.zeros(4, 3, dtype=torch.bool)
    reward_mask[torch.arange(4), last] = True
    expected = broadcast_sequence_advantage(group_advantages(scores, 2, kind), mask)
    close(group_token_returns(rewards, mask, 2, kind, reward_mask=reward_mask), expected)


def test_logprobs_and_entropy_without_gradient_go_in_chunks_with_the_same_values(monkeypatch):
    from rlhfkit.rl import losses

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, 11, generator=generator)
    tokens = torch.randint(0, 11, (5, 3), generator=generator)
    mask = torch.ones(5, 3)
    whole = logprobs_from_logits(logits, tokens, 0.7), entropy_from_logits(logits, mask)
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 2 * 3 * 11)  # two rows a chunk
    chunked = logprobs_from_logits(logits, tokens, 0.7), entropy_from_logits(logits, mask)
    expected = (logits / 0.7).log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(chunked[0], expected)
    torch.testing.assert_close(chunked[0], whole[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(chunked[1], whole[1], atol=1e-6, rtol=0)
    # With a gradient the batch goes in one piece and the gradient flows.
    logits.requires_grad_(True)
    logprobs_from_logits(logits, tokens, 0.7).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_response_logits_never_make_more_than_one_chunk_and_match_the_whole_logits(monkeypatch):
    """The LM head applied a chunk of positions at a time (no [B, T, V] tensor), once for all
    reductions: the same
    log-probs, entropy and gradients as from the whole logits, to float32 rounding (each
    value is one log_softmax / softmax over the same 11 numbers, summed in the same order
    within a row: 1e-6 absolute covers a few ulps of values of size ~3)."""
    from rlhfkit.rl import losses

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 4, 5, generator=generator)
    head = torch.nn.Linear(5, 11, bias=False)
    tokens = torch.randint(0, 11, (3, 4), generator=generator)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    seen_rows = []

    def recording_head(x):
        seen_rows.append(x.shape[0])
        return head(x)

    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 5 * 11)  # 5 positions of 11 logits a chunk
    wanted = hidden.clone().requires_grad_(True)
    by_temperature, entropy = losses.ResponseLogits(wanted, recording_head).token_stats(tokens, (0.7, 1.0), 0.7)
    valid = mask.bool()
    value = by_temperature[0.7].sum() + by_temperature[1.0].sum() + torch.where(valid, entropy, 0.0).sum() / valid.sum()
    value.backward()
    # One pass of the head for all three: one row to learn the vocabulary size (a plain
    # function has no out_features), 12 positions in chunks of 5, 5, 2, and the same chunks
    # again in the backward's recompute.
    assert sorted(seen_rows) == [1, 2, 2, 5, 5, 5, 5], seen_rows

    reference = hidden.clone().requires_grad_(True)
    logits = head(reference)
    expected_07, expected_10 = logprobs_from_logits(logits, tokens, 0.7), logprobs_from_logits(logits, tokens)
    (expected_07.sum() + expected_10.sum() + entropy_from_logits(logits / 0.7, mask)).backward()
    torch.testing.assert_close(by_temperature[0.7], expected_07, atol=1e-6, rtol=0)
    torch.testing.assert_close(by_temperature[1.0], expected_10, atol=1e-6, rtol=0)
    # The gradient sums 3 terms per element, each a difference of softmax values below 1.
    torch.testing.assert_close(wanted.grad, reference.grad, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(losses.ResponseLogits(hidden, head).token_stats(tokens, (1.0,))[0][1.0],
                                   logits.detach().log_softmax(-1).gather(-1, tokens[..., None])[..., 0])
