"""The holistic toxicity reward of the paper-scale detoxification recipe.

The dense (sentence-level) reward needs no code: `--rm tox=hf:unitary/toxic-bert@-toxic`
scores every sentence end with a Hugging Face classifier (rlhfkit.rewards.sources). The
holistic baseline gives the same classifier's verdict once, at the end of the response:
`--rm tox=py:recipes.detox.toxicity:holistic_reward`. The classifier is
RLHFKIT_TOXICITY_CLASSIFIER (default unitary/toxic-bert, label "toxic"), standing in for
the Perspective API the paper used, which needs an API key and network access.
"""

import functools
import os

CLASSIFIER = os.environ.get("RLHFKIT_TOXICITY_CLASSIFIER", "unitary/toxic-bert")
LABEL = os.environ.get("RLHFKIT_TOXICITY_LABEL", "toxic")


@functools.lru_cache(maxsize=1)
def _scorer():
    from rlhfkit.recipes import text_scorer

    return text_scorer(f"hf:{CLASSIFIER}@{LABEL}")


def holistic_reward(prompts, responses):
    return [-p for p in _scorer()(list(prompts), list(responses))]
