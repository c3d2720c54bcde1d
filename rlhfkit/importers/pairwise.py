"""Pairwise preferences as TRL and OpenRLHF store them: `prompt` / `chosen` / `rejected`.

Three shapes are read, each giving one Preference whose `prompt + chosen` (and
`prompt + rejected`) is the whole text the model sees:

- explicit strings: `{"prompt": "...", "chosen": "...", "rejected": "..."}`, taken as is;
- Anthropic-HH dialogue strings without a prompt (`"\\n\\nHuman: ...\\n\\nAssistant: ..."`): the
  prompt is everything up to and including the last `"\\n\\nAssistant:"` both share;
- conversational message lists (`[{"role": ..., "content": ...}]`): the prompt is the
  `prompt` messages (a string prompt is one user message) or, without one, the messages
  `chosen` and `rejected` share; messages are rendered with `chat.render_plain`, and the
  prompt messages are kept in `meta["messages"]` for chat templates.

Optional `margin` (number), `tie` (bool) and `aspect` (string) are carried over; `--field`
renames any of these six fields.
"""

from __future__ import annotations

import math
import os
from typing import Optional

from rlhfkit.chat import MESSAGES_KEY, render_plain, role_name
from rlhfkit.importers import Converted, Importer, ImportOptions, Row, Skipped, get_field
from rlhfkit.schema import Preference, RecordError

NAME = "pairwise"
FIELDS = {name: name for name in ("prompt", "chosen", "rejected", "margin", "tie", "aspect")}
HH_ASSISTANT_TURN = "\n\nAssistant:"


def _messages(value: list, field_name: str) -> list[dict]:
    for i, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise RecordError(
                f'{field_name}[{i}] must be a message {{"role": str, "content": str}}'
            )
    return value


def split_dialogue_strings(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of two HH-style full dialogues."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(HH_ASSISTANT_TURN)
    if cut < 0:
        raise RecordError(
            "no prompt field, and chosen and rejected share no '\\n\\nAssistant:' turn to split the prompt at"
        )
    cut += len(HH_ASSISTANT_TURN)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def split_dialogue_messages(
    prompt: list[dict], chosen: list[dict], rejected: list[dict]
) -> tuple[str, str, str, Optional[list[dict]]]:
    """(prompt, chosen response, rejected response) of a conversation, rendered as text.

    Without prompt messages the shared leading messages are the prompt. The prompt text ends
    with the role cue of the next turn (`\\n\\nAssistant:`) and each response starts with a
    space, as in the HH dialogue strings, so `prompt + response` is the rendered conversation.
    The fourth value is the prompt messages when each response is one assistant message (a
    chat template can then render the pair), else None.
    """
    if not prompt:
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise RecordError("no prompt field, and chosen and rejected share no leading messages")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if not chosen and not rejected:
        return render_plain(prompt), "", "", None  # identical conversations: the caller skips them
    if not chosen or not rejected:
        raise RecordError("chosen or rejected has no message after the prompt")
    if chosen[0]["role"] != rejected[0]["role"]:
        raise RecordError(
            f"chosen and rejected continue with different roles ({chosen[0]['role']!r}, {rejected[0]['role']!r})"
        )
    cue = f"{role_name(chosen[0]['role'])}:"
    prompt_text = f"{render_plain(prompt)}\n\n{cue}"
    single_turns = len(chosen) == len(rejected) == 1 and chosen[0]["role"] == "assistant"
    return (
        prompt_text,
        render_plain(chosen)[len(cue) :],
        render_plain(rejected)[len(cue) :],
        prompt if single_turns else None,
    )


def convert(row: Row, options: ImportOptions) -> Converted:
    fields, data = options.fields, row.data
    chosen = get_field(data, fields["chosen"], (str, list))
    rejected = get_field(data, fields["rejected"], (str, list))
    prompt = get_field(data, fields["prompt"], (str, list), optional=True)
    messages = None
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:
            prompt, chosen, rejected = split_dialogue_strings(chosen, rejected)
        elif not isinstance(prompt, str):
            raise RecordError(
                f"field {fields['prompt']!r} is a message list but chosen and rejected are strings"
            )
    elif isinstance(chosen, list) and isinstance(rejected, list):
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        prompt, chosen, rejected, messages = split_dialogue_messages(
            _messages(prompt or [], fields["prompt"]),
            _messages(chosen, fields["chosen"]),
            _messages(rejected, fields["rejected"]),
        )
    else:
        raise RecordError(
            f"fields {fields['chosen']!r} and {fields['rejected']!r} must both be strings or both message lists"
        )

    margin = get_field(data, fields["margin"], (int, float), optional=True)
    if margin is not None and not math.isfinite(margin):
        raise RecordError(f"field {fields['margin']!r} must be finite, got {margin!r}")
    tie = get_field(data, fields["tie"], bool, optional=True) or False
    aspect = get_field(data, fields["aspect"], str, optional=True)
    if chosen == rejected:
        yield Skipped(
            row.where, "chosen and rejected are identical: the preference carries no signal"
        )
        return
    yield Preference(
        id=f"{NAME}:{row.key}",
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        aspect=aspect,
        margin=None if margin is None else float(margin),
        tie=tie,
        meta={MESSAGES_KEY: messages} if messages else {},
    )


IMPORTER = Importer(convert=convert, fields=FIELDS)
