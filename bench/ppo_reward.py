"""The reward both PPO benchmark sides optimise (`bench/bench_ppo.py`).

One function serves both: rlhfkit calls it as `--rm judge=py:bench.ppo_reward:letter_e_share`
with (prompts, responses), TRL's GRPOTrainer as a reward function with (prompts, completions,
**kwargs). It is cheap on purpose, so the benchmark measures the trainers, not the judge.
"""


def letter_e_share(prompts, completions, **kwargs):
    """A sequence reward: the share of the letter e in each completion."""
    return [completion.count("e") / max(len(completion), 1) for completion in completions]
