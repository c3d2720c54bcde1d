"""Slow learning check (`make learn-check` prints the curves): PPO raises a learnable reward."""

import pytest


@pytest.mark.slow
def test_ppo_raises_a_learnable_fine_grained_reward(tmp_path):
    from bench.learning_check import learning_curves, window_means

    curves = learning_curves(tmp_path, steps=30, seeds=[0])
    first, last = window_means(curves["fine-grained"][0])
    # Measured: ~4 words with an 'e' per 12-token response at the start, ~6-8 after 30 steps.
    assert last > first + 1.0, curves
