"""Rewards: where reward signals come from (`rlhfkit.rewards.sources`), how they land on
policy tokens (placement by character offsets and weighted composition,
`rlhfkit.rewards.placement`) and R3HF / sentence-level redistribution
(`rlhfkit.rewards.redistribution`); the reward models end to end: the model and its spec
(`reward_model`, `shared_backbone`), what an aspect's RM is (`presets`), its training data
(`data`), losses (`losses`) and held-out scoring (`scoring`).
"""
