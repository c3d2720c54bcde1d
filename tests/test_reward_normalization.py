"""`ppo --normalize-rewards per-source`: each source standardised over the batch before weighting."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.rewards.placement import compose_token_rewards, normalize_per_source

# eps = 1e-8 in the denominator moves a z-score of magnitude <= 2 by < 1e-7; float32 rounding
# of values near 1 is ~1e-7: 1e-6 covers both.
TOL = 1e-6


def test_per_source_z_scores_over_the_positions_each_source_rewarded():
    # Source "seq" (one reward per response, at the last token): 1.0 and 3.0 -> mean 2, std 1
    # -> -1 and +1.
    seq = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    seq_given = torch.tensor([[False, False, True], [False, False, True]])
    # Source "seg" (one per segment): 0.5, -0.5, 0.5, 0.5 -> mean 0.25; deviations 0.25, -0.75,
    # 0.25, 0.25; variance (3 x 0.0625 + 0.5625) / 4 = 0.1875, std = sqrt(3)/4 -> 1/sqrt(3) for
    # 0.5 and -sqrt(3) for -0.5.
    seg = torch.tensor([[0.5, 0.0, -0.5], [0.0, 0.5, 0.5]])
    seg_given = torch.tensor([[True, False, True], [False, True, True]])
    # Source "flat" gives 4.0 everywhere it rewards: std 0, so 0.
    flat = torch.tensor([[0.0, 0.0, 4.0], [0.0, 0.0, 4.0]])
    out = normalize_per_source(
        {"seq": seq, "seg": seg, "flat": flat}, {"seq": seq_given, "seg": seg_given, "flat": seq_given}
    )
    r3 = 1 / math.sqrt(3)
    torch.testing.assert_close(out["seq"], torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, 1.0]]), atol=TOL, rtol=0)
    torch.testing.assert_close(out["seg"], torch.tensor([[r3, 0.0, -math.sqrt(3)], [0.0, r3, r3]]), atol=TOL, rtol=0)
    assert torch.equal(out["flat"], torch.zeros(2, 3))

    # Weighted afterwards: 0.5 x seq + 0.3 x seg; at [1, 2]: 0.5 x 1 + 0.3 / sqrt(3) = 0.6732051.
    total, per_source = compose_token_rewards({"seq": out["seq"], "seg": out["seg"]}, {"seq": 0.5, "seg": 0.3})
    assert total[1, 2].item() == pytest.approx(0.5 + 0.3 * r3, abs=TOL)
    # Response 0's weighted sum of seg: 0.3 x (1/sqrt(3) - sqrt(3)) = -0.3464102.
    assert per_source["seg"][0].item() == pytest.approx(0.3 * (r3 - math.sqrt(3)), abs=TOL)


def test_a_source_with_one_reward_or_none_becomes_zero():
    one = torch.tensor([[0.0, 7.0]])
    out = normalize_per_source({"a": one, "b": one}, {"a": torch.tensor([[False, True]]), "b": torch.zeros(1, 2, dtype=torch.bool)})
    assert torch.equal(out["a"], torch.zeros(1, 2)) and torch.equal(out["b"], torch.zeros(1, 2))
