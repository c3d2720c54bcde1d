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

import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from jinja2 import TemplateError

from rlhfkit.errors import RlhfkitError
from rlhfkit.schema import RecordError, max_record_bytes

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
    """The text of `--chat-template FILE` (None when not given; an empty file is an error)."""
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise RlhfkitError(f"--chat-template: {path}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RlhfkitError(f"--chat-template: {path}: not UTF-8 text (byte {err.start})") from None
    if not text.strip():
        raise RlhfkitError(f"--chat-template: {path}: the file is empty")
    return text


PROBE_CONVERSATION = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."}]


def override_chat_template(tokenizer: Any, override: Optional[str] = None) -> None:
    """Install `--chat-template` text on `tokenizer` (it then wins over the model's own),
    once it renders a two-turn conversation: a template that cannot is refused before a
    stage saves it with a model (where it would break a later stage)."""
    if override is None:
        return
    tokenizer.chat_template = override
    try:
        _template(tokenizer, PROBE_CONVERSATION[:1], generation_prompt=True)
        _template(tokenizer, PROBE_CONVERSATION, generation_prompt=False)
    except RlhfkitError as err:
        raise RlhfkitError(f"--chat-template: {err}") from None


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def messages_of(meta: dict) -> Optional[list[dict]]:
    """A record's prompt conversation (`meta["messages"]`), or None for a plain record."""
    messages = meta.get(MESSAGES_KEY) if isinstance(meta, dict) else None
    return messages or None


# Bounds on rendering one conversation. transformers renders in jinja's sandbox, which keeps
# a template from reaching Python, but not from looping for ever (nested loops over
# range(100000)) or building a huge string. Real templates render a conversation in well
# under a millisecond, and add markup around the messages, which are at most a record.
RENDER_SECONDS = 10.0
RENDER_SIZE_FACTOR = 4
"""A rendering may be at most this many times the record cap (characters)."""


class _RenderTimeout(BaseException):
    """Raised in the rendering thread by the alarm (a BaseException, so no `except
    Exception` inside jinja or transformers swallows it)."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """SIGALRM after `seconds`; only the main thread can take signals, and every stage (one
    per process under DeepSpeed) renders there; elsewhere this adds no bound. An alarm set
    by the caller is put back with the time it had left."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise _RenderTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    started = time.monotonic()
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay:
            left = max(outer_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)


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
    """One rendering by the tokenizer's template; any failure is one line (RlhfkitError)."""
    try:
        with _time_limit(RENDER_SECONDS):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except _RenderTimeout:
        raise RlhfkitError(
            f"the chat template took more than {RENDER_SECONDS:g} s to render one conversation (a loop without end?)"
        ) from None
    except (TemplateError, ValueError) as err:  # the template rejects this conversation
        raise RlhfkitError(f"the chat template cannot render this conversation: {err}") from None
    except Exception as err:  # noqa: BLE001 (a template is data: whatever it raises is one line)
        # include without a loader (TypeError), range above jinja's bound (OverflowError), a
        # recursive macro (RecursionError), a huge string (MemoryError)
        reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise RlhfkitError(f"the chat template cannot render this conversation: {reason}") from None
    limit = RENDER_SIZE_FACTOR * max_record_bytes()
    if len(text) > limit:
        raise RlhfkitError(
            f"the chat template rendered {len(text):,} characters, more than {RENDER_SIZE_FACTOR}x the "
            f"{max_record_bytes():,}-byte record limit"
        )
    return text


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
