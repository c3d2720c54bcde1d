"""Chat templates: rendering conversational records, the SFT loss mask on assistant turns, and
the plain format when a tokenizer has no template. The tokenizer is init-model's with a
vocabulary of 258 (the 256 bytes + 2 special tokens, so no merges): every ASCII character
is one token, which makes token counts countable by hand."""

from __future__ import annotations

import pytest

from rlhfkit.chat import (
    SIMPLE_CHAT_TEMPLATE,
    assistant_pieces,
    plain_prompt,
    render_pair,
    render_prompt,
    render_record,
)
from rlhfkit.finetune import IGNORE_INDEX, encode_chat_demonstration
from rlhfkit.schema import Span, SpanFeedback

HI = [{"role": "user", "content": "Hi"}]
TWO_TURNS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo"},
    {"role": "user", "content": "Ok?"},
]


@pytest.fixture(scope="module")
def byte_tokenizer(make_tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tiny_model("gpt2", vocab_size=258))


def test_init_model_gives_the_tiny_tokenizer_the_simple_template(byte_tokenizer):
    assert byte_tokenizer.chat_template == SIMPLE_CHAT_TEMPLATE
    assert len(byte_tokenizer("<|end|>\n", add_special_tokens=False)["input_ids"]) == 8  # one per character


def test_two_turn_conversation_renders_exactly(byte_tokenizer):
    prompt = plain_prompt(TWO_TURNS)
    assert prompt == "User: Hi\n\nAssistant: Yo\n\nUser: Ok?\n\nAssistant:"
    meta = {"messages": TWO_TURNS}
    assert render_prompt(byte_tokenizer, prompt, meta) == (
        "<|user|>\nHi<|end|>\n<|assistant|>\nYo<|end|>\n<|user|>\nOk?<|end|>\n<|assistant|>\n"
    )
    head, response = render_pair(byte_tokenizer, prompt, " Sure.", meta)
    assert head + response == (
        "<|user|>\nHi<|end|>\n<|assistant|>\nYo<|end|>\n<|user|>\nOk?<|end|>\n<|assistant|>\nSure.<|end|>\n"
    )
    assert response == "Sure.<|end|>\n"  # the plain format's space after "Assistant:" is dropped


def test_sft_loss_mask_covers_exactly_the_assistant_tokens(byte_tokenizer):
    conversation = [*TWO_TURNS, {"role": "assistant", "content": "Sure."}]
    pieces = assistant_pieces(byte_tokenizer, conversation)
    assert pieces == [
        ("<|user|>\nHi<|end|>\n<|assistant|>\n", False),
        ("Yo<|end|>\n", True),
        ("<|user|>\nOk?<|end|>\n<|assistant|>\n", False),
        ("Sure.<|end|>\n", True),
    ]
    example = encode_chat_demonstration(byte_tokenizer, pieces, max_length=1024)
    # One token per character: "<|user|>\n" 9 + "Hi" 2 + "<|end|>\n" 8 + "<|assistant|>\n" 14 = 33
    # masked; "Yo<|end|>\n" 10 targets; 9 + "Ok?" 3 + 8 + 14 = 34 masked; "Sure.<|end|>\n" 13
    # targets; then eos, a target: 33 + 10 + 34 + 13 + 1 = 91 tokens, 24 of them targets.
    assert len(example.input_ids) == 91
    targets = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
    assert targets == list(range(33, 43)) + list(range(77, 91))
    assert byte_tokenizer.decode(example.input_ids[33:43]) == "Yo<|end|>\n"
    assert byte_tokenizer.decode(example.input_ids[77:90]) == "Sure.<|end|>\n"
    assert example.labels[-1] == byte_tokenizer.eos_token_id
    # Too long: cut from the left (the mask moves with the tokens).
    cut = encode_chat_demonstration(byte_tokenizer, pieces, max_length=20)
    assert cut.prompt_cut == 71 and cut.labels == example.labels[71:]


def test_without_a_template_the_plain_format_stays(byte_tokenizer, make_tiny_model):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(make_tiny_model("gpt2", vocab_size=258))
    plain.chat_template = None
    prompt = plain_prompt(HI)
    assert render_prompt(plain, prompt, {"messages": HI}) == prompt
    assert render_pair(plain, prompt, " Hey", {"messages": HI}) == (prompt, " Hey")
    # A record without messages stays plain even with a template.
    assert render_prompt(byte_tokenizer, "question: 2+2?", {}) == "question: 2+2?"


def test_span_offsets_follow_the_templated_response(byte_tokenizer):
    prompt = plain_prompt(HI)
    record = SpanFeedback(
        id="x", prompt=prompt, response=" Hello there. Bad bit.", spans=[Span(14, 22, "err", "a")],
        aspects=["a"], meta={"messages": HI},
    )
    assert record.response[14:22] == "Bad bit."
    rendered = render_record(byte_tokenizer, record)
    assert rendered.response == "Hello there. Bad bit.<|end|>\n"
    span = rendered.spans[0]
    assert rendered.response[span.start : span.end] == "Bad bit."  # moved left by the dropped space
