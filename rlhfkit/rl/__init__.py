"""RL core: advantages (GAE, whitening, KL control, group advantages) and PPO losses.

Pure tensor functions, no models and no I/O; import from the submodules
(`rlhfkit.rl.advantages`, `rlhfkit.rl.losses`).
"""
