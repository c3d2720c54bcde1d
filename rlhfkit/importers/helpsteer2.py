"""HelpSteer2 (nvidia/HelpSteer2): responses rated 0-4 on five attributes.

Each row has `prompt`, `response` and the integer attributes `helpfulness`, `correctness`,
`coherence`, `complexity` and `verbosity` (0..4). A row becomes one ScalarScore per
attribute (aspect = attribute name, score = the rating), so `train-rm --aspect correctness
--kind regression` trains an RM of one attribute, plus a PromptRecord per distinct prompt
(two responses share each prompt) for `ppo`.

Multi-turn prompts (about 29% of the data) hold every earlier turn in `prompt`, the turns
after the first introduced by `\\n<extra_id_1>Assistant\\n` or `\\n<extra_id_1>User\\n`; the
rated `response` is the last assistant turn. Such a prompt is split into messages
(`meta["messages"]`, for chat templates) and rendered in the plain dialogue format with the
response after `Assistant:`; a single-turn prompt is kept as it is.
"""

from __future__ import annotations

import re

from rlhfkit.chat import MESSAGES_KEY, plain_prompt
from rlhfkit.importers import (
    Converted,
    Importer,
    ImportOptions,
    Row,
    get_field,
    get_rating,
    unique_prompts,
)
from rlhfkit.schema import PromptRecord, RecordError, ScalarScore

NAME = "helpsteer2"
ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
MAX_RATING = 4
TURN_MARKER = re.compile(r"\n?<extra_id_1>(User|Assistant)\n")


def prompt_messages(prompt: str) -> list[dict]:
    """The turns of a HelpSteer2 prompt (the first is the user's; markers name the rest)."""
    parts = TURN_MARKER.split(prompt)
    messages = [{"role": "user", "content": parts[0]}]
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": role.lower(), "content": content})
    if messages[-1]["role"] != "user":
        raise RecordError("the prompt's last turn is an assistant turn; the rated response must follow a user turn")
    return messages


def convert(row: Row, options: ImportOptions) -> Converted:
    data = row.data
    prompt = get_field(data, "prompt", str)
    response = get_field(data, "response", str)
    ratings = {name: get_rating(data, name, 0, MAX_RATING) for name in ATTRIBUTES}
    messages = prompt_messages(prompt)
    if len(messages) > 1:
        prompt, response = plain_prompt(messages), " " + response
    meta = {MESSAGES_KEY: messages}
    base = f"{NAME}:{row.key}"
    yield PromptRecord(id=base, prompt=prompt, meta=meta)
    for name, rating in ratings.items():
        yield ScalarScore(
            id=f"{base}:{name}", prompt=prompt, response=response, score=float(rating), aspect=name, meta=meta
        )


IMPORTER = Importer(convert=convert, finish=unique_prompts)
