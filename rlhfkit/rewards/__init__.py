"""Rewards: where reward signals come from, how they land on policy tokens (placement by
character offsets and weighted composition, `rlhfkit.rewards.placement`) and R3HF /
sentence-level redistribution (`rlhfkit.rewards.redistribution`).
"""
