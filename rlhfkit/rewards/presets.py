"""What a reward model of one aspect is: a task's preset for the aspect (`AspectPreset`, what
`train-rm --aspect NAME` alone means) and the settings an RM trains with once the explicit
options are applied (`RMSettings`). The presets' values are task knowledge: each task module
under rlhfkit.tasks defines its own (rlhfkit.tasks.qa_feedback.PRESETS, train-rm's default).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhfkit.segment import SegmentLabelRules

NO_LABEL_RULES = SegmentLabelRules()  # plain overlap: an error span of the aspect makes a segment an error


@dataclass(frozen=True)
class AspectPreset:
    """What `--aspect NAME` alone means; explicit options override each field.

    The lengths bound prompt + response in RM tokens: a fixed prompt budget
    (`max_prompt_length`, 0 for as many as fit) puts every response at the same position,
    and `max_length` then only bounds the response (a response that does not fit cannot be
    scored, so it should be generous enough for PPO's samples).
    """

    kind: str
    granularity: str = "response"
    # +-1: the paper's weights w_k are the `ppo --rewards` weights, applied once there.
    positive_reward: float = 1.0
    negative_reward: float = -1.0
    error_class_weight: float = 1.0
    # The reference's label rules (rlhfkit.segment.SegmentLabelRules).
    min_span_words: int = 0
    min_span_aspects: tuple[str, ...] = ()
    ignore_with_aspects: tuple[str, ...] = ()
    max_length: int = 1024
    max_prompt_length: int = 0
    lr: float = 5e-5
    epochs: int = 2
    # Preference data judged holistically stands in when no record names the aspect.
    holistic_fallback: bool = False


@dataclass(frozen=True)
class RMSettings:
    """An RM's kind, segments, rewards and labels: the preset with the explicit options applied."""

    kind: str
    granularity: str
    positive_reward: float
    negative_reward: float
    error_class_weight: float
    holistic_fallback: bool
    label_rules: SegmentLabelRules = NO_LABEL_RULES
