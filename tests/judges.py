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


def _words(response):
    import re

    return [(m.end(), m.group()) for m in re.finditer(r"\S+", response)]


def words_with_e(prompts, responses):
    """Dense segment rewards: 1 at the end of every word containing an 'e', else 0."""
    return [[(end, 1.0 if "e" in word else 0.0) for end, word in _words(r)] or [(0, 0.0)] for r in responses]


def words_with_e_holistic(prompts, responses):
    """The same total as `words_with_e`, given once at the end of the response."""
    return [float(sum("e" in word for _, word in _words(r))) for r in responses]


def audit_truth(prompts, responses):
    """An audit judge (`evaluate --audit-judge`): a sentence containing 'bad' is a factual
    error, and a response's true preference (and completeness) score is minus the number of
    such sentences."""
    out = []
    for response in responses:
        bad = [s for s in segment(response, "sentence") if "bad" in s.text]
        out.append({"spans": [{"start": s.start, "end": s.end, "aspect": "factuality"} for s in bad],
                    "scores": {"preference": -float(len(bad)), "completeness": -float(len(bad))}})
    return out
