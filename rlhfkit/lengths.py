"""Default token lengths that fit the model.

The stages' default lengths are the papers' (1,024-token prompts, 200 new tokens), more than
a small model's positions (the demo's tiny model has 512). A length the user left at its
default is lowered to fit the model, with a one-line notice; a length the user gave is
never changed (the stage's own check then says what to lower).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from rlhfkit.console import console
from rlhfkit.errors import RlhfkitError


def field_defaults(cfg: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """The dataclass defaults of `names` on `cfg`'s class."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    return {name: fields[name].default for name in names}


def fit_default_lengths(
    cfg: Any, limit: Optional[int], names: tuple[str, ...], stage: str, defaults: Optional[dict[str, Any]] = None
) -> bool:
    """Lower the options `names` left at their defaults so that their sum fits `limit` positions.

    `names` are one length (e.g. max_length) or a prompt length then a response length
    (max_prompt_length, max_new_tokens). With two, a defaulted response length keeps its
    value up to half of the room left, and a defaulted prompt length takes the rest. Returns
    whether anything changed; prints one notice when it did.
    """
    if limit is None:
        return False
    defaults = defaults if defaults is not None else field_defaults(cfg, names)
    values = {name: getattr(cfg, name) for name in names}
    if sum(values.values()) <= limit:
        return False
    defaulted = [name for name in names if values[name] == defaults[name]]
    if not defaulted:
        return False
    room = limit - sum(value for name, value in values.items() if name not in defaulted)
    if room < len(defaulted):
        return False  # nothing sensible fits; the stage's check reports the lengths
    new = dict(values)
    if len(defaulted) == 1:
        new[defaulted[0]] = room
    else:
        prompt, response = defaulted
        new[response] = min(values[response], room // 2)
        new[prompt] = room - new[response]
    for name, value in new.items():
        setattr(cfg, name, value)

    def flags(lengths: dict[str, int]) -> str:
        return " + ".join(f"--{name.replace('_', '-')} {lengths[name]}" for name in names)

    console.print(
        f"{stage}: note: default {flags(values)} exceeds the model's {limit} positions; using {flags(new)} "
        "(give the option to choose)",
        markup=False,
        highlight=False,
    )
    return True


def fit_generation_lengths(cfg: Any, limit: Optional[int], stage: str, model_name: str, is_encoder_decoder: bool) -> None:
    """A decoder that generates: --max-prompt-length and --max-new-tokens left at their defaults
    fitted to its `limit` positions (fit_default_lengths), and their sum checked against it.
    An encoder-decoder reads the prompt and writes the response in separate positions."""
    if is_encoder_decoder or limit is None:
        return
    fit_default_lengths(cfg, limit, ("max_prompt_length", "max_new_tokens"), stage)
    if cfg.max_prompt_length + cfg.max_new_tokens > limit:
        raise RlhfkitError(
            f"--max-prompt-length {cfg.max_prompt_length} + --max-new-tokens {cfg.max_new_tokens} exceeds the "
            f"{limit} positions {model_name} allows; lower one of them"
        )
