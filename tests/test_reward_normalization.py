"""`ppo --normalize-rewards per-source`: each source's per-response reward standardised over the
batch before weighting, the shape within a response kept."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.rewards.placement import compose_token_rewards, normalize_per_source

# eps = 1e-8 in the denominator moves a value of magnitude <= 10 by < 1e-6 relative; float32
# rounding of values near 1-10 is ~1e-6: 1e-5 covers both.
TOL = 1e-5


def test_each_responses_sum_is_standardised_and_its_shape_kept():
    # Source "seq" (one reward per response, at the last token): 1.0 and 3.0 -> mean 2, std 1
    # -> -1 and +1 (a sequence RM is standardised as before).
    seq = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    seq_given = torch.tensor([[False, False, True], [False, False, True]])
    # Source "seg" (one per segment): response sums 0.5 - 0.5 = 0 and 0.5 + 0.5 = 1 -> mean
    # 0.5, population std 0.5. Positions / 0.5, and mean / std = 1 off the last rewarded one:
    # [1, 0, -1 - 1] = [1, 0, -2] (sum -1) and [0, 1, 1 - 1] = [0, 1, 0] (sum +1).
    seg = torch.tensor([[0.5, 0.0, -0.5], [0.0, 0.5, 0.5]])
    seg_given = torch.tensor([[True, False, True], [False, True, True]])
    # Source "flat" gives 4.0 to every response: std 0, so 0.
    flat = torch.tensor([[0.0, 0.0, 4.0], [0.0, 0.0, 4.0]])
    out = normalize_per_source(
        {"seq": seq, "seg": seg, "flat": flat}, {"seq": seq_given, "seg": seg_given, "flat": seq_given}
    )
    torch.testing.assert_close(out["seq"], torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, 1.0]]), atol=TOL, rtol=0)
    torch.testing.assert_close(out["seg"], torch.tensor([[1.0, 0.0, -2.0], [0.0, 1.0, 0.0]]), atol=TOL, rtol=0)
    assert torch.equal(out["flat"], torch.zeros(2, 3))

    # Weighted afterwards: 0.5 x seq + 0.3 x seg; at [1, 2]: 0.5 x 1 + 0.3 x 0 = 0.5.
    total, per_source = compose_token_rewards({"seq": out["seq"], "seg": out["seg"]}, {"seq": 0.5, "seg": 0.3})
    assert total[1, 2].item() == pytest.approx(0.5, abs=TOL)
    # Response 0's weighted sum of seg: 0.3 x -1.
    assert per_source["seg"][0].item() == pytest.approx(-0.3, abs=TOL)


def dense_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """Two dense rows: 0.2 on each of 4 tokens (sum 0.8), 1.6 / 12 on each of 12 (sum 1.6)."""
    rewards, given = torch.zeros(2, 12), torch.zeros(2, 12, dtype=torch.bool)
    rewards[0, :4], given[0, :4] = 0.2, True
    rewards[1, :], given[1, :] = 1.6 / 12, True
    return rewards, given


# By hand: sums 0.8 and 1.6, mean 1.2, population std 0.4, so the sums become -1 and +1.
# Row 0: 0.2 / 0.4 = 0.5 per token, the last minus 1.2 / 0.4 = 3: [0.5, 0.5, 0.5, -2.5].
# Row 1: (1.6 / 12) / 0.4 = 1/3 per token, the last 1/3 - 3 = -8/3.
# (Standardising the 16 positions instead gives row sums +6.93 and -6.93: the longer, better
# row penalised for its length.)
DENSE_ROW_0 = [0.5, 0.5, 0.5, -2.5] + [0.0] * 8
DENSE_ROW_1 = [1 / 3] * 11 + [-8 / 3]


def test_dense_rows_are_judged_by_their_sums_not_their_lengths():
    rewards, given = dense_rows()
    out = normalize_per_source({"dense": rewards}, {"dense": given})["dense"]
    torch.testing.assert_close(out, torch.tensor([DENSE_ROW_0, DENSE_ROW_1]), atol=TOL, rtol=0)
    torch.testing.assert_close(out.sum(dim=1), torch.tensor([-1.0, 1.0]), atol=TOL, rtol=0)


def test_r3hf_differences_still_telescope_to_the_standardised_score():
    # Prefix scores R(x, y<=t) of two responses: [0, 1, 3] and [0, -1, 1]; R3HF's rewards are
    # their differences, [1, 2] and [-1, 2], which sum to R(x, y) - R(x) = 3 and 1.
    # Mean 2, std 1: [1, 2 - 2] = [1, 0] and [-1, 2 - 2] = [-1, 0], the differences of the
    # prefix scores [0, 1, 1] and [0, -1, -1]: they telescope to (3 - 2) / 1 and (1 - 2) / 1.
    rewards = torch.tensor([[1.0, 2.0], [-1.0, 2.0]])
    out = normalize_per_source({"r3hf": rewards}, {"r3hf": torch.ones(2, 2, dtype=torch.bool)})["r3hf"]
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), atol=TOL, rtol=0)


def test_a_source_with_one_reward_or_none_becomes_zero():
    one = torch.tensor([[0.0, 7.0]])
    out = normalize_per_source({"a": one, "b": one}, {"a": torch.tensor([[False, True]]), "b": torch.zeros(1, 2, dtype=torch.bool)})
    assert torch.equal(out["a"], torch.zeros(1, 2)) and torch.equal(out["b"], torch.zeros(1, 2))
