"""What a reward model of one aspect is: a task's preset for the aspect (`AspectPreset`, what
`train-rm --aspect NAME` alone means; `aspect_preset` finds it, `training_defaults` gives the
lengths and training options it implies) and the settings an RM trains with once the explicit
options are applied (`RMSettings`, from `resolve_settings`). The presets' values are task
knowledge: each task module under rlhfkit.tasks defines its own
(rlhfkit.tasks.qa_feedback.PRESETS, train-rm's default).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any

from rlhfkit.errors import RlhfkitError
from rlhfkit.segment import SEGMENT_RM_GRANULARITIES, SegmentLabelRules

KINDS = ("segment", "preference", "regression")
# Where a segment RM reads a segment's logits: the token completing it (one token per segment,
# as the reference's marker token), or the mean over all its tokens.
SEGMENT_POOLINGS = ("end", "mean")

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
    segment_pooling: str = "end"
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
    segment_pooling: str = "end"


def aspect_preset(presets: Mapping[str, AspectPreset], aspect: str, kind: str | None) -> AspectPreset:
    """The preset of `aspect` for `kind` (None: the preset's kind); a preset of another kind
    does not apply, so that kind's plain defaults stand in. RlhfkitError for an aspect with
    no preset and no kind, or an unknown kind."""
    preset = presets.get(aspect)
    if kind is None and preset is None:
        close = get_close_matches(aspect, list(presets), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RlhfkitError(
            f"--aspect {aspect!r} has no preset{hint}; give --kind ({', '.join(KINDS)}) "
            f"or use a preset aspect: {', '.join(presets)}"
        )
    kind = kind or preset.kind
    if kind not in KINDS:
        raise RlhfkitError(f"unknown --kind {kind!r}; valid: {', '.join(KINDS)}")
    if preset is not None and preset.kind == kind:
        return preset
    return AspectPreset(kind, "sentence" if kind == "segment" else "response")


def training_defaults(presets: Sequence[AspectPreset], max_length: int | None = None) -> dict[str, Any]:
    """The lengths and training options that RMs of `presets` trained on one input (a shared
    backbone; one preset: its own values) take when left out: the longest --max-length (or
    `max_length`, given), the longest prompt budget of at most half of it, the smallest
    learning rate, the most epochs."""
    max_length = max(p.max_length for p in presets) if max_length is None else max_length
    return {
        "max_length": max_length,
        "max_prompt_length": max(min(p.max_prompt_length, max_length // 2) for p in presets),
        "lr": min(p.lr for p in presets),
        "epochs": max(p.epochs for p in presets),
    }


def resolve_settings(
    preset: AspectPreset,
    aspect: str,
    *,
    granularity: str | None = None,
    positive_reward: float | None = None,
    negative_reward: float | None = None,
    error_class_weight: float | None = None,
    min_span_words: int | None = None,
    ignore_segments_with: Sequence[str] = ("preset",),
    segment_pooling: str | None = None,
) -> RMSettings:
    """`preset` with the options given (None: the preset's value) applied, validated.

    `ignore_segments_with` names the other aspects whose error segments (without an error
    of `aspect`) are left out of training; "preset" keeps the preset's, "none" none.
    """
    kind = preset.kind
    granularity_used = granularity or preset.granularity
    if kind == "segment" and granularity_used not in SEGMENT_RM_GRANULARITIES:
        raise RlhfkitError(f"--granularity for a segment RM must be {' or '.join(SEGMENT_RM_GRANULARITIES)}, got {granularity_used!r}")
    if kind != "segment" and granularity not in (None, "response"):
        raise RlhfkitError(f"--granularity applies to segment RMs only; a {kind} RM scores the whole response")
    positive = preset.positive_reward if positive_reward is None else positive_reward
    negative = preset.negative_reward if negative_reward is None else negative_reward
    if kind == "segment" and not negative < positive:
        raise RlhfkitError(f"--negative-reward ({negative}) must be below --positive-reward ({positive})")
    weight = preset.error_class_weight if error_class_weight is None else error_class_weight
    if not weight > 0:
        raise RlhfkitError(f"--error-class-weight must be > 0, got {weight}")
    min_words = preset.min_span_words if min_span_words is None else min_span_words
    if min_words < 0:
        raise RlhfkitError(f"--min-span-words must be >= 0, got {min_words}")
    ignore = [a for item in ignore_segments_with for a in str(item).split(",") if a.strip()]
    if ignore == ["preset"]:
        ignore_with = preset.ignore_with_aspects
    elif ignore == ["none"]:
        ignore_with = ()
    else:
        ignore_with = tuple(a.strip() for a in ignore)
    pooling = segment_pooling or preset.segment_pooling
    if pooling not in SEGMENT_POOLINGS:
        raise RlhfkitError(f"--segment-pooling must be one of {', '.join(SEGMENT_POOLINGS)}, got {pooling!r}")
    # Several aspects take one --segment-pooling: it applies to their segment RMs.
    pooling = pooling if kind == "segment" else "end"
    rules = SegmentLabelRules(min_words, preset.min_span_aspects if preset.min_span_aspects else (aspect,), ignore_with)
    return RMSettings(kind, granularity_used, positive, negative, weight, preset.holistic_fallback, rules, pooling)
