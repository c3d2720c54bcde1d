"""Cutting prompts that are longer than their token budget, the same way in every stage.

A QA-Feedback prompt is `question: ... context: <passages>`: the question is at the head and
the passages make it long. Keeping the head (cutting on the right, the default, which is also
what the reference's Hugging Face tokenizers do with `truncation=True`) keeps the question
and shortens the passages. Dialogue data, whose last turn matters most, wants `left` (keep the
tail); `middle` keeps both ends (the head gets the larger half) and drops the middle.

Special tokens the tokenizer adds (BOS, T5's closing EOS, a [CLS]/[SEP] pair) are never cut:
only the prompt's own content tokens are, so a cut prompt is framed as an uncut one.
"""

from __future__ import annotations

from collections.abc import Sequence

from rlhfkit.errors import RlhfkitError

TRUNCATION_SIDES = ("right", "left", "middle")
TRUNCATION_HELP = (
    "Which part of a too-long prompt is dropped: right (keep the head, where a QA prompt's question is; the "
    "reference's tokenizer default), left (keep the tail, for dialogue), or middle (keep both ends). Prompts "
    "rendered by a chat template are always cut on the left when generating, as sft cuts them, so the last turn "
    "and the generation prompt stay."
)


def check_truncation_side(side: str) -> None:
    if side not in TRUNCATION_SIDES:
        raise RlhfkitError(f"--truncation-side must be one of {', '.join(TRUNCATION_SIDES)}, got '{side}'")


def kept_indices(n: int, keep: int, side: str) -> list[int]:
    """Indices (in order) of the `keep` of `n` items that a cut on `side` keeps."""
    check_truncation_side(side)
    keep = max(0, min(keep, n))
    if side == "right":
        return list(range(keep))
    if side == "left":
        return list(range(n - keep, n))
    head = (keep + 1) // 2
    return list(range(head)) + list(range(n - (keep - head), n))


def cut_to_length(ids: Sequence[int], special_mask: Sequence[int], max_length: int, side: str) -> list[int]:
    """`ids` cut to at most `max_length` tokens by dropping content (non-special) tokens on `side`.

    `special_mask[i]` is 1 where `ids[i]` is a special token the tokenizer added. If the special
    tokens alone exceed `max_length` they are all kept (nothing sensible is shorter).
    """
    ids = list(ids)
    if len(ids) <= max_length:
        return ids
    content = [i for i, special in enumerate(special_mask) if not special]
    n_special = len(ids) - len(content)
    kept_content = {content[k] for k in kept_indices(len(content), max_length - n_special, side)}
    return [token for i, token in enumerate(ids) if special_mask[i] or i in kept_content]


def encode_prompt(
    tokenizer, prompt: str, max_length: int | None, side: str, add_special_tokens: bool = True
) -> tuple[list[int], int]:
    """Token ids of `prompt` (with the tokenizer's special tokens, unless the prompt is chat-
    templated text, which writes its own: `add_special_tokens=False`) cut to `max_length`, and
    how many were cut."""
    encoded = tokenizer(prompt, add_special_tokens=add_special_tokens, return_special_tokens_mask=True)
    ids = list(encoded["input_ids"])
    if max_length is None or len(ids) <= max_length:
        return ids, 0
    cut = cut_to_length(ids, encoded["special_tokens_mask"], max_length, side)
    return cut, len(ids) - len(cut)
