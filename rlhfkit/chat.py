"""Conversations: the plain dialogue format, and rendering with a tokenizer's chat template.

A conversational record keeps two forms of its prompt. `prompt` is the plain text every
stage has always used (`User: ...\\n\\nAssistant: ...\\n\\nUser: ...\\n\\nAssistant:`, the
response starting with a space, as in Anthropic HH and TRL), and `meta["messages"]` is the
same prompt as a list of `{"role", "content"}` messages. When the tokenizer has a chat
template (or `--chat-template FILE` gives one), stages render the messages with it instead:

- a prompt to generate from ends with the template's generation prompt;
- a prompt with its response is the conversation with the response as one more assistant
  turn; the response text is what the template adds after the generation prompt (for the
  tiny model's template, the content and the end-of-turn marker);
- for SFT, `assistant_mask` says which pieces are assistant turns, so the loss covers the
  assistant turns only.

Records without `meta["messages"]` keep their plain text, unless `--apply-chat-template`
asks for them to be sent as one user turn (`prompt_messages`): what an instruct model was
tuned on. Tokenizers without a template keep the plain text, and refuse `--apply-chat-template`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from jinja2 import TemplateError

from rlhfkit.errors import RlhfkitError
from rlhfkit.schema import RecordError

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
ASSISTANT_CUE = "\n\nAssistant:"
MESSAGES_KEY = "messages"
"""The key of `meta` that holds a record's prompt as a conversation."""

# A small Jinja chat template in the style of ChatML; `init-model` gives it to the tiny
# tokenizer so the templated path runs end to end in tests.
SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


APPLY_CHAT_TEMPLATE_HELP = (
    "Send plain prompts (records without meta.messages) through the chat template as one user turn, as instruct "
    "models expect. Conversational records always use the template. Off by default, as in TRL, which templates "
    "conversational data only; with a tokenizer that has no chat template (and no --chat-template) it is an error."
)


def role_name(role: str) -> str:
    return ROLE_NAMES.get(role, role.capitalize())


def render_plain(messages: list[dict]) -> str:
    """The plain dialogue format: `User: ...\\n\\nAssistant: ...` (other roles capitalised)."""
    return "\n\n".join(f"{role_name(m['role'])}: {m['content']}" for m in messages)


def plain_prompt(messages: list[dict]) -> str:
    """A conversation as a plain prompt ending with the assistant's cue (responses start with a space)."""
    return render_plain(messages) + ASSISTANT_CUE


def checked_messages(value: Any, field_name: str) -> list[dict]:
    """`value` checked as a non-empty list of `{"role": str, "content": str}` (RecordError if not)."""
    if not isinstance(value, list):
        raise RecordError(f"field {field_name!r} must be a list of messages, got {type(value).__name__}")
    if not value:
        raise RecordError(f"field {field_name!r} is an empty conversation")
    for i, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise RecordError(f'{field_name}[{i}] must be a message {{"role": str, "content": str}}')
    return [{"role": m["role"], "content": m["content"]} for m in value]


# ---------------------------------------------------------------------------------------
# Chat templates


def load_chat_template(path: Optional[str]) -> Optional[str]:
    """The text of `--chat-template FILE` (None when not given)."""
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise RlhfkitError(f"--chat-template: {path}: no such file")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RlhfkitError(f"--chat-template: {path}: not UTF-8 text (byte {err.start})") from None


def override_chat_template(tokenizer: Any, override: Optional[str] = None) -> None:
    """Install `--chat-template` text on `tokenizer` (it then wins over the model's own)."""
    if override is not None:
        tokenizer.chat_template = override


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def messages_of(meta: dict) -> Optional[list[dict]]:
    """A record's prompt conversation (`meta["messages"]`), or None for a plain record."""
    messages = meta.get(MESSAGES_KEY) if isinstance(meta, dict) else None
    return messages or None


def prompt_messages(tokenizer: Any, prompt: str, meta: dict, plain_as_user_turn: bool = False) -> Optional[list[dict]]:
    """The conversation a prompt is rendered from with the tokenizer's template, or None to keep
    the plain text: `meta["messages"]`, or with `plain_as_user_turn` (--apply-chat-template) the
    plain prompt as one user turn."""
    messages = messages_of(meta)
    if messages is None and plain_as_user_turn:
        if not has_chat_template(tokenizer):
            raise RlhfkitError(
                "--apply-chat-template: the tokenizer has no chat template; give one with --chat-template FILE"
            )
        messages = [{"role": "user", "content": prompt}]
    if messages is None or not has_chat_template(tokenizer):
        return None
    return messages


def _template(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except (TemplateError, ValueError) as err:  # the template rejects this conversation
        raise RlhfkitError(f"the chat template cannot render this conversation: {err}") from None


def render_prompt(tokenizer: Any, prompt: str, meta: dict, plain_as_user_turn: bool = False) -> str:
    """The text to generate from: the template with its generation prompt, or the plain prompt."""
    messages = prompt_messages(tokenizer, prompt, meta, plain_as_user_turn)
    if messages is None:
        return prompt
    return _template(tokenizer, messages, generation_prompt=True)


def render_pair(
    tokenizer: Any, prompt: str, response: str, meta: dict, plain_as_user_turn: bool = False
) -> tuple[str, str]:
    """(prompt text, response text): the conversation up to its generation prompt, and the
    assistant turn as the policy writes it.

    With a template, the response is the final assistant turn as the template writes it, but
    ending where the policy's text ends: when the turn's content is followed by the eos token
    (ChatML's <|im_end|> is SmolLM2's eos), generation stops there and decoding drops it, so
    the response stops at the content, and a reward model trained on these texts sees in `ppo`
    and `evaluate` the text it saw in training. The plain response drops the leading space
    the plain format puts after the `Assistant:` cue.
    """
    messages = prompt_messages(tokenizer, prompt, meta, plain_as_user_turn)
    if messages is None:
        return prompt, response
    content = assistant_content(prompt, response)
    head = _template(tokenizer, messages, generation_prompt=True)
    whole = _template(tokenizer, [*messages, {"role": "assistant", "content": content}], False)
    turn = whole[len(head) :]
    if not whole.startswith(head) or content not in turn:
        raise RlhfkitError(
            "the chat template renders a conversation differently with and without its last "
            "assistant turn, so the response cannot be told apart from the prompt"
        )
    end = turn.index(content) + len(content)
    eos = getattr(tokenizer, "eos_token", None)
    return head, turn[:end] if eos and turn[end:].startswith(eos) else turn


def assistant_pieces(tokenizer: Any, messages: list[dict]) -> list[tuple[str, bool]]:
    """The templated conversation cut into pieces, each marked True if it is an assistant turn.

    Each assistant turn is what the template adds after the generation prompt; everything
    else (system and user turns, role headers, the generation prompts) is not. Joined, the
    pieces are exactly `apply_chat_template(messages)`.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _template(tokenizer, messages[:i], generation_prompt=True) if i else ""
        upto = _template(tokenizer, messages[: i + 1], generation_prompt=False)
        if not head.startswith(done) or not upto.startswith(head):
            raise RlhfkitError("the chat template does not render conversations by appending turns")
        if head != done:
            pieces.append((head[len(done) :], False))
        pieces.append((upto[len(head) :], True))
        done = upto
    whole = _template(tokenizer, messages, generation_prompt=False)
    if not whole.startswith(done):
        raise RlhfkitError("the chat template does not render conversations by appending turns")
    if whole != done:
        pieces.append((whole[len(done) :], False))
    return pieces


def render_record(tokenizer: Any, record: Any, plain_as_user_turn: bool = False) -> Any:
    """A record with its prompt (and responses) rendered by the tokenizer's chat template.

    Records without `meta["messages"]` (unless `plain_as_user_turn`), or a tokenizer without a
    template, come back as they are. Span offsets move with the response text, so spans keep
    covering the same words.
    """
    from rlhfkit.schema import (
        Critique,
        Demonstration,
        Generation,
        Preference,
        PromptRecord,
        ScalarScore,
        SpanFeedback,
    )

    meta = getattr(record, "meta", {})
    prompt = getattr(record, "prompt", None)
    if prompt is None or prompt_messages(tokenizer, prompt, meta, plain_as_user_turn) is None:
        return record
    plain = plain_as_user_turn
    if isinstance(record, PromptRecord):
        return dataclasses.replace(record, prompt=render_prompt(tokenizer, prompt, meta, plain))
    if isinstance(record, Preference):
        head, chosen = render_pair(tokenizer, prompt, record.chosen, meta, plain)
        _, rejected = render_pair(tokenizer, prompt, record.rejected, meta, plain)
        return dataclasses.replace(record, prompt=head, chosen=chosen, rejected=rejected)
    if isinstance(record, Critique):
        head, response = render_pair(tokenizer, prompt, record.response, meta, plain)
        _, revision = render_pair(tokenizer, prompt, record.revision, meta, plain)
        return dataclasses.replace(record, prompt=head, response=response, revision=revision)
    if isinstance(record, (Demonstration, ScalarScore, Generation)):
        head, response = render_pair(tokenizer, prompt, record.response, meta, plain)
        return dataclasses.replace(record, prompt=head, response=response)
    if isinstance(record, SpanFeedback):
        head, response = render_pair(tokenizer, prompt, record.response, meta, plain)
        content = assistant_content(prompt, record.response)
        shift = response.find(content) - (len(record.response) - len(content))
        spans = [dataclasses.replace(s, start=s.start + shift, end=s.end + shift) for s in record.spans]
        return dataclasses.replace(record, prompt=head, response=response, spans=spans)
    return record


def assistant_content(prompt: str, response: str) -> str:
    """The assistant turn's content: the plain response without the space after the cue."""
    return response[1:] if prompt.endswith(ASSISTANT_CUE) and response.startswith(" ") else response
