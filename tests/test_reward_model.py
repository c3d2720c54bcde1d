"""The reward-model scoring API: RM inputs and segment-end positions worked out by hand,
segment rewards, padding invariance, one-pass prefix scores, save/reload, bad model dirs."""

from __future__ import annotations

import functools

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from rlhfkit.errors import RlhfkitError
from rlhfkit.io import write_json
from rlhfkit.models import load_tokenizer, save_model
from rlhfkit.rewards.data import IGNORE_INDEX, encode_segment_example, make_collate
from rlhfkit.rewards.losses import make_loss_fn
from rlhfkit.rewards.reward_model import (
    SPEC_FILE,
    EncodedPair,
    RewardModel,
    encode_pair,
    load_reward_model,
    mean_at_segment_ends,
    pad_right,
    per_position_scores,
    read_spec,
    reward_model_class,
    segment_end_positions,
    segment_rewards,
    segment_start_positions,
    sequence_scores,
    write_reward_model_spec,
)
from rlhfkit.schema import Span, SpanFeedback
from rlhfkit.segment import segment

PROMPTS = [
    "question: Where is Paris? context: wikipage: Paris text: Paris is the capital of France.",
    "question: Who wrote Hamlet?",
    "question: When was the album released? context: wikipage: Bloom text: Bloom is an album.",
]
RESPONSES = [
    "Paris is in France. It is the capital, and it is big.",
    "Shakespeare.",
    "Bloom was released on 31 August 2018. It is the second album by Troye Sivan.",
]


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (words and punctuation are tokens), so positions are countable by hand."""
    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


WORDS = ["Where", "is", "Paris", "?", "big", ".", "It", "rains", "a", "lot"]


def test_segment_labels_sit_on_the_tokens_that_end_each_sentence():
    tokenizer = word_tokenizer(WORDS)
    # Response characters: "Paris is big." = [0, 13), space, "It rains a lot." = [14, 29).
    # The span "It rains" [14, 22) is a factuality error, so sentence 2 is an error.
    record = SpanFeedback(
        id="r",
        prompt="Where is Paris?",
        response="Paris is big. It rains a lot.",
        spans=[Span(14, 22, "Unverifiable", "factuality"), Span(0, 5, "Irrelevant", "relevance")],
        aspects=["factuality", "relevance"],
    )
    # Tokens: 0 Where, 1 is, 2 Paris, 3 ?, 4 [EOS] (separator: the pair template has none),
    # 5 Paris, 6 is, 7 big, 8 ".", 9 It, 10 rains, 11 a, 12 lot, 13 ".".
    def encoder(max_length, max_prompt_length=None, side="left"):
        return functools.partial(
            encode_pair, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, truncation_side=side
        )

    example = encode_segment_example(encoder(64), record, "factuality", "sentence")
    assert example.input_ids == [3, 4, 5, 6, 1, 5, 4, 7, 8, 9, 10, 11, 12, 8]
    assert example.positions == [8, 13]
    assert example.labels == [0, 1]
    # Sentence 1 is tokens 5-8 ("Paris is big ."), sentence 2 tokens 9-13.
    assert example.starts == [5, 9]
    # Relevance labels on the same sentences: the span "Paris" [0, 5) marks sentence 1.
    assert encode_segment_example(encoder(64), record, "relevance", "sentence").labels == [1, 0]

    batch = make_collate("segment", tokenizer.pad_token_id)([example])
    expected = torch.full((1, 14), IGNORE_INDEX)
    expected[0, 8], expected[0, 13] = 0, 1
    assert torch.equal(batch["labels"], expected)
    # Mean pooling reads positions 5..8 at 8 and 9..13 at 13; every other position is its own start.
    assert batch["segment_starts"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 5, 9, 10, 11, 12, 9]]

    # --max-length 12: the prompt loses "Where is" from the left, the response is intact.
    cut = encode_segment_example(encoder(12), record, "factuality", "sentence")
    assert cut.input_ids == [5, 6, 1, 5, 4, 7, 8, 9, 10, 11, 12, 8]
    assert cut.positions == [6, 11]
    # A prompt budget of 1 token keeps only "?", however much room there is.
    assert encode_segment_example(encoder(64, 1), record, "factuality", "sentence").input_ids[:3] == [6, 1, 5]
    # 9 response tokens + the separator need 10; with 9 the record does not fit at all.
    assert encode_segment_example(encoder(10), record, "factuality", "sentence").input_ids[0] == 1
    assert encode_segment_example(encoder(9), record, "factuality", "sentence") is None
    # The same cuts keeping the head (the default, where a QA prompt's question is): "Where is"
    # stays; middle keeps one token of each end ("Where", "?"). A budget of 1 keeps "Where".
    assert encode_segment_example(encoder(12, side="right"), record, "factuality", "sentence").input_ids[:4] == [3, 4, 1, 5]
    assert encode_segment_example(encoder(12, side="middle"), record, "factuality", "sentence").input_ids[:4] == [3, 6, 1, 5]
    assert encode_segment_example(encoder(64, 1, side="right"), record, "factuality", "sentence").input_ids[:3] == [3, 1, 5]
    assert encode_pair(tokenizer, record.prompt, record.response, 12).input_ids[:4] == [3, 4, 1, 5]


def test_pair_encoding_keeps_response_offsets(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    for prompt, response in zip(PROMPTS, RESPONSES):
        pair = encode_pair(tokenizer, prompt, response, 512)
        assert pair.input_ids[pair.prompt_position] == tokenizer.eos_token_id
        assert pair.response_positions == list(range(pair.prompt_position + 1, len(pair.input_ids)))
        assert "".join(response[a:b] for a, b in pair.response_char_spans) == response
        assert tokenizer.decode(pair.input_ids[pair.prompt_position + 1 :]) == response
        segments = segment(response, "sentence")
        positions = segment_end_positions(pair, segments, response)
        # Each sentence's end character lies in the token placed there.
        for seg, position in zip(segments, positions):
            start, end = pair.response_char_spans[pair.response_positions.index(position)]
            assert start < seg.end <= end


def test_segment_rewards_from_error_probabilities():
    # P(error) > 0.5 is an error (the classifier's argmax); exactly 0.5 is not.
    assert segment_rewards([0.2, 0.7, 0.5, 0.51, 0.0], 0.5, -0.5) == [0.5, -0.5, 0.5, -0.5, 0.5]
    assert segment_rewards([0.9, 0.1], 0.3, -0.3) == [-0.3, 0.3]
    assert segment_rewards([], 0.3, -0.3) == []


def make_rm(model_dir, kind: str, **spec) -> RewardModel:
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(0)
    num_labels = 2 if kind == "segment" else 1
    model = reward_model_class(kind).from_pretrained(model_dir, num_labels=num_labels)
    model.config.pad_token_id = tokenizer.pad_token_id
    # A freshly initialised head gives scores of ~1e-2; scale it so differences are visible.
    head = model.classifier if kind == "segment" else model.score
    with torch.no_grad():
        head.weight.mul_(50)
    defaults = {"aspect": "test", "kind": kind, "max_length": 512, "granularity": "sentence" if kind == "segment" else "response"}
    if kind == "segment":
        defaults.update(positive_reward=0.5, negative_reward=-0.5)
    else:
        defaults["normalization"] = {"mean": 0.25, "std": 2.0, "computed_on": "test"}
    return RewardModel(model, tokenizer, {**defaults, **spec}, torch.device("cpu"))


def test_segment_scores_are_per_segment(tiny_model_dir):
    rm = make_rm(tiny_model_dir, "segment")
    scored = rm.score(PROMPTS + ["q"], RESPONSES + [""], batch_size=2)
    for response, rewards in zip(RESPONSES, scored):
        assert rewards.char_ends == [s.end for s in segment(response, "sentence")]
        assert rewards.values == segment_rewards(rewards.error_probs, 0.5, -0.5)
        assert all(0 <= p <= 1 for p in rewards.error_probs)
    assert len(scored[0].values) == 2 and len(scored[1].values) == 1
    assert (scored[-1].values, scored[-1].char_ends, scored[-1].error_probs) == ([], [], [])
    probs = [p for r in scored for p in r.error_probs]
    assert max(probs) - min(probs) > 1e-3  # the scaled head really discriminates


def test_scores_do_not_depend_on_padding(tiny_model_dir):
    sequence_rm = make_rm(tiny_model_dir, "preference")
    together = sequence_rm.raw_scores(PROMPTS, RESPONSES, batch_size=3)
    alone = [sequence_rm.raw_scores([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES)]
    assert together == pytest.approx(alone, abs=1e-5)
    assert len({round(s, 4) for s in alone}) == 3

    segment_rm = make_rm(tiny_model_dir, "segment")
    together = segment_rm.error_probabilities(PROMPTS, RESPONSES, batch_size=3)
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        (_, probs_alone), = segment_rm.error_probabilities([prompt], [response])
        assert together[i][1] == pytest.approx(probs_alone, abs=1e-5)


def test_sequence_score_is_read_at_the_last_real_token_even_if_it_is_the_pad_id(tiny_model_dir):
    rm = make_rm(tiny_model_dir, "preference")
    pad = rm.tokenizer.pad_token_id
    # Row 0 ends in a real token that happens to have the pad id (as EOS does when pad = eos).
    input_ids, attention_mask = pad_right([[20, 21, pad], [20, 21, 22, 23]], pad)
    with torch.no_grad():
        ours = sequence_scores(rm.model, input_ids, attention_mask)
        per_position = per_position_scores(rm.model, input_ids, attention_mask)
        pooled_by_hf = rm.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    assert ours.tolist() == pytest.approx([per_position[0, 2].item(), per_position[1, 3].item()])
    # Transformers' own pooling skips every pad id and reads row 0 one token early.
    assert pooled_by_hf[0].item() == pytest.approx(per_position[0, 1].item())
    assert pooled_by_hf[0].item() != pytest.approx(ours[0].item())


def test_one_pass_prefix_scores_equal_scoring_each_prefix(tiny_model_dir):
    rm = make_rm(tiny_model_dir, "preference")
    scores, char_ends, prompt_scores = rm.prefix_scores(PROMPTS, RESPONSES, batch_size=2)
    full = rm.score(PROMPTS, RESPONSES)
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        pair = encode_pair(rm.tokenizer, prompt, response, rm.max_length)
        assert char_ends[i] == [end for _, end in pair.response_char_spans]
        assert char_ends[i][-1] == len(response)
        separately = []
        for position in [pair.prompt_position, *pair.response_positions]:
            prefix = torch.tensor([pair.input_ids[: position + 1]])
            with torch.no_grad():
                raw = sequence_scores(rm.model, prefix, torch.ones_like(prefix)).item()
            separately.append((raw - 0.25) / 2.0)  # the spec's normalisation
        assert prompt_scores[i].item() == pytest.approx(separately[0], abs=1e-5)
        assert scores[i].tolist() == pytest.approx(separately[1:], abs=1e-5)
        # The last prefix is the whole response: the differences telescope to score - prompt score.
        assert scores[i][-1].item() == pytest.approx(full[i].values[0], abs=1e-5)
        assert full[i].char_ends == [len(response)] and full[i].error_probs is None


def test_prefix_scores_need_a_causal_sequence_rm(tiny_model_dir):
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=1)
    encoder = BertForSequenceClassification(config).eval()
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(RlhfkitError, match="encoder reward model .* cannot score prefixes"):
        per_position_scores(encoder, ids, torch.ones_like(ids))
    # Encoders still give whole-sequence scores (from their pooled first token).
    with torch.no_grad():
        assert sequence_scores(encoder, ids, torch.ones_like(ids)).shape == (1,)
    with pytest.raises(RlhfkitError, match="needs a sequence-level"):
        make_rm(tiny_model_dir, "segment").prefix_scores(PROMPTS, RESPONSES)


def test_saved_reward_model_reloads_with_the_same_scores(tiny_model_dir, tmp_path):
    for kind in ("segment", "preference"):
        rm = make_rm(tiny_model_dir, kind, aspect=f"{kind}-aspect")
        out = tmp_path / kind
        out.mkdir()
        save_model(rm.model, rm.tokenizer, out)
        write_reward_model_spec(out, rm.spec)
        loaded = load_reward_model(out, device="cpu")
        assert (loaded.aspect, loaded.kind, loaded.spec) == (f"{kind}-aspect", kind, rm.spec)
        before, after = rm.score(PROMPTS, RESPONSES), loaded.score(PROMPTS, RESPONSES)
        for a, b in zip(before, after):
            assert a.char_ends == b.char_ends
            assert a.values == pytest.approx(b.values, abs=1e-6)
            if kind == "segment":
                assert a.error_probs == pytest.approx(b.error_probs, abs=1e-6)


def test_not_a_reward_model_directory(tiny_model_dir, tmp_path):
    with pytest.raises(RlhfkitError, match=r"is not an rlhfkit reward model \(no rlhfkit_rm.json\); train one with `rlhfkit train-rm`"):
        load_reward_model(tiny_model_dir)
    (tmp_path / SPEC_FILE).write_text('{"aspect": "x", "kind": "ranking", "max_length": 8}')
    with pytest.raises(RlhfkitError, match="unknown kind 'ranking'; valid: segment, preference, regression"):
        load_reward_model(tmp_path)
    # An edited spec's pooling must not fall back to the end token silently.
    (tmp_path / SPEC_FILE).write_text('{"aspect": "x", "kind": "segment", "max_length": 8, "segment_pooling": "max"}')
    with pytest.raises(RlhfkitError, match="has segment_pooling 'max'; valid: end, mean"):
        load_reward_model(tmp_path)
    shared = {"aspect": "a,b", "kind": "multi_aspect", "max_length": 8,
              "aspects": {"a": {"kind": "segment", "segment_pooling": "first"}, "b": {"kind": "preference"}}}
    write_json(tmp_path / SPEC_FILE, shared)
    with pytest.raises(RlhfkitError, match="aspect 'a' has segment_pooling 'first'; valid: end, mean"):
        read_spec(tmp_path)


def test_a_response_longer_than_max_length_is_an_error(tiny_model_dir):
    rm = make_rm(tiny_model_dir, "preference", max_length=8)
    with pytest.raises(RlhfkitError, match=r"response 0 has \d+ tokens .* reads at most 8"):
        rm.score(PROMPTS[:1], RESPONSES[:1])


def test_segment_starts_follow_the_previous_segment_end():
    # Response tokens at positions 3..9; segments end at 5, 5 (one token completes two
    # segments) and 9: the first starts at the response's first token, the second is that
    # shared token alone, the third starts after it.
    pair = EncodedPair(input_ids=list(range(10)), response_positions=list(range(3, 10)), response_char_spans=[(0, 1)] * 7, prompt_position=2)
    assert segment_start_positions(pair, [5, 5, 9]) == [3, 5, 6]
    assert segment_start_positions(pair, []) == []


def test_mean_at_segment_ends_by_hand():
    # One row of 5 tokens, 2 logits each; segments [1, 2] and [3, 4] (0 is prompt).
    logits = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, -6.0], [0.5, 0.25], [1.5, 0.75]]])
    starts = torch.tensor([[0, 1, 1, 3, 3]])
    pooled = mean_at_segment_ends(logits, starts)
    # Position 2: ([1, 2] + [3, -6]) / 2 = [2, -2]; position 4: ([0.5, .25] + [1.5, .75]) / 2 = [1, 0.5].
    # Positions that are their own start keep their logits. Every value is a binary fraction
    # summed and halved, so float32/float64 represent each exactly: compared with ==.
    assert pooled[0, 2].tolist() == [2.0, -2.0]
    assert pooled[0, 4].tolist() == [1.0, 0.5]
    assert pooled[0, 0].tolist() == [9.0, 9.0] and pooled[0, 1].tolist() == [1.0, 2.0] and pooled[0, 3].tolist() == [0.5, 0.25]


def test_mean_pooled_segment_loss_by_hand():
    # A stand-in model returning fixed logits: the loss must read the segment means at the ends.
    logits = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, -6.0], [0.5, 0.25], [1.5, 0.75]]])

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": logits})()

    batch = {
        "input_ids": torch.zeros(1, 5, dtype=torch.long), "attention_mask": torch.ones(1, 5, dtype=torch.long),
        "labels": torch.tensor([[-100, -100, 1, -100, 0]]), "segment_starts": torch.tensor([[0, 1, 1, 3, 3]]),
    }
    # Mean logits [2, -2] labelled error: CE = log(1 + e^4) = 4.0181499279...; [1, 0.5]
    # labelled no-error: CE = log(1 + e^-0.5) = 0.4740769841...; sum 4.4922269120.
    loss, count = make_loss_fn("segment", 1.0, "mean")(Fixed(), batch)
    assert count == 2
    assert loss.item() == pytest.approx(4.4922269120, abs=1e-6)  # float32 CE of O(1) values
    # Read at the end tokens: [3, -6] error -> log(1 + e^9) = 9.0001234, [1.5, .75] no-error -> log(1 + e^-0.75) = 0.3868710.
    loss, _ = make_loss_fn("segment", 1.0, "end")(Fixed(), batch)
    assert loss.item() == pytest.approx(9.0001234 + 0.3868710, abs=1e-5)


def test_mean_pooled_rm_scores_the_mean_of_each_segments_token_logits(tiny_model_dir):
    rm = make_rm(tiny_model_dir, "segment", segment_pooling="mean")
    end_rm = RewardModel(rm.model, rm.tokenizer, {**rm.spec, "segment_pooling": "end"}, rm.device)
    scored = rm.error_probabilities(PROMPTS, RESPONSES, batch_size=2)
    for (prompt, response), (segments, probs) in zip(zip(PROMPTS, RESPONSES), scored):
        pair = encode_pair(rm.tokenizer, prompt, response, rm.max_length)
        with torch.no_grad():
            token_logits = rm.model(input_ids=torch.tensor([pair.input_ids])).logits[0]
        ends = segment_end_positions(pair, segments, response)
        first, expected = pair.response_positions[0], []
        for end in ends:  # each sentence's tokens, counted here from the response's first token
            expected.append(token_logits[first : end + 1].mean(0).softmax(-1)[1].item())
            first = end + 1
        assert probs == pytest.approx(expected, abs=1e-5)  # float32 logits, batch padding
    end_probs = [p for _, probs in end_rm.error_probabilities(PROMPTS, RESPONSES) for p in probs]
    assert [p for _, probs in scored for p in probs] != pytest.approx(end_probs, abs=1e-3)
