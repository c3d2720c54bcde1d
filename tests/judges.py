"""Programmatic reward functions for tests (`--rm NAME=py:tests.judges:FUNCTION`)."""

from rlhfkit.segment import segment


def count_letters_e(prompts, responses):
    """A sequence reward: the share of the letter e in the response."""
    return [response.count("e") / max(len(response), 1) for response in responses]


def sentence_rewards(prompts, responses):
    """Segment rewards: +0.5 at the end of each sentence without 'big', -0.5 with it."""
    return [
        [(s.end, -0.5 if "big" in s.text else 0.5) for s in segment(response, "sentence")] if response.strip() else [(0, 0.0)]
        for response in responses
    ]
