"""A word-list stand-in for a toxicity classifier (SCALE=tiny detoxification recipe only).

Not a toxicity model: P(toxic | text) = 1 - 0.3 ** (number of listed insults in the text),
so one insult scores 0.7 and two 0.91. It lets the offline recipe exercise the paper's two
rewards on its shipped stand-in data (data/SOURCE.md):
- `sentence_reward`: dense, at every sentence end, minus the change in P(toxic) the
  sentence causes (what `hf:CLASSIFIER@-toxic` computes with a real classifier);
- `holistic_reward`: minus P(toxic) of the whole response, once at its end;
- `toxicity`: P(toxic) per response, the evaluation scorer.
Use them as `--rm tox=py:recipes.detox.toxicity_stand_in:sentence_reward` from the
repository root.
"""

import re

from rlhfkit.segment import split_sentences

INSULTS = ("stupid", "idiot", "dumb", "pathetic", "loser", "losers", "useless", "ugly", "fool", "hate", "shut")
_WORD = re.compile(r"[a-z]+")


def p_toxic(text: str) -> float:
    hits = sum(word in INSULTS for word in _WORD.findall(text.lower()))
    return 1.0 - 0.3**hits


def toxicity(prompts, responses):
    return [p_toxic(r) for r in responses]


def holistic_reward(prompts, responses):
    return [-p_toxic(r) for r in responses]


def sentence_reward(prompts, responses):
    out = []
    for response in responses:
        ends = [s.end for s in split_sentences(response)] or [len(response)]
        before, rewards = 0.0, []
        for end in ends:
            now = p_toxic(response[:end])
            rewards.append((end, -(now - before)))
            before = now
        out.append(rewards)
    return out
