"""Reward placement on policy tokens, composition of reward models, and redistribution."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from rlhfkit.errors import RlhfkitError
from rlhfkit.rewards.placement import (
    compose_token_rewards,
    place_rewards,
    token_index_for_char_ends,
)
from rlhfkit.rewards.redistribution import (
    prefix_differences,
    score_differences,
    segment_differences,
)

ANSWER = "Paris is the capital of France. It has 2 million people."
# GPT-2-style byte-level BPE pieces: a leading space belongs to the following token, so
# " It" starts right after the "." that ends sentence 1. The last token is EOS, which
# decodes to no text (empty span).
PIECES = [
    "Paris",
    " is",
    " the",
    " capital",
    " of",
    " France",
    ".",
    " It",
    " has",
    " 2",
    " million",
    " people",
    ".",
]


def spans_of(pieces):
    spans, start = [], 0
    for piece in pieces:
        spans.append((start, start + len(piece)))
        start += len(piece)
    return spans


ANSWER_SPANS = spans_of(PIECES) + [(len(ANSWER), len(ANSWER))]
assert "".join(PIECES) == ANSWER


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float32),
        torch.as_tensor(expected, dtype=torch.float32),
        atol=tol,
        rtol=0,
    )


# --- character offsets -> policy tokens --------------------------------------------------


def test_two_sentence_answer_gets_the_factuality_reward_at_each_sentence_end_and_nowhere_else():
    # Sentence ends (exclusive): "...France." ends at 31, "...people." at 56 = len(ANSWER).
    # Token 6 is "." (30, 31) and token 12 is "." (55, 56); token 13 is EOS.
    sentence_ends = [ANSWER.index(".") + 1, len(ANSWER)]
    assert sentence_ends == [31, 56]
    positions = token_index_for_char_ends(ANSWER_SPANS, sentence_ends)
    assert positions == [6, 12]
    rewards = place_rewards(len(ANSWER_SPANS), positions, [-1.0, 1.0])
    expected = torch.zeros(14)
    expected[6], expected[12] = -1.0, 1.0
    close(rewards, expected)


def test_segment_with_trailing_space_still_ends_at_the_period_given_the_text():
    # A segmenter that keeps the space after a sentence ends it at 32, which the token
    # " It" (31, 34) would reach first; with the text, trailing whitespace is dropped.
    assert token_index_for_char_ends(ANSWER_SPANS, [32, 56], text=ANSWER) == [6, 12]


def test_offsets_from_a_real_byte_level_bpe_tokenizer():
    # A tiny byte-level BPE trained here (no download). "é" is not in its merges, so it
    # becomes two byte tokens with the same span (its last byte completes the segment).
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([ANSWER] * 5, trainer)
    text = ANSWER + " Café!"
    encoding = tokenizer.encode(text)
    positions = token_index_for_char_ends(
        encoding.offsets, [31, 56, text.index("é") + 1, len(text)]
    )
    assert [encoding.tokens[p] for p in positions[:2]] == [".", "."]
    e_pieces = [
        i
        for i, span in enumerate(encoding.offsets)
        if span == (text.index("é"), text.index("é") + 1)
    ]
    assert len(e_pieces) == 2 and positions[2] == e_pieces[1]
    assert positions[3] == len(encoding.tokens) - 1 and encoding.tokens[-1] == "!"


def test_empty_span_tokens_and_ends_beyond_the_text():
    # Token 1 is a special token with an empty span; token 3 is EOS (empty span).
    spans = [(0, 3), (3, 3), (3, 7), (7, 7)]
    # end 3 -> token 0; end 5 -> token 2; end 99 (past the text) -> last token with text = 2
    assert token_index_for_char_ends(spans, [3, 5, 99]) == [0, 2, 2]
    with pytest.raises(ValueError, match="no token with text"):
        token_index_for_char_ends([(0, 0)], [1])


def test_place_rewards_adds_rewards_at_the_same_token():
    # positions [1, 1, 3], values [0.5, 0.25, 2] -> [0, 0.75, 0, 2]
    close(place_rewards(4, [1, 1, 3], [0.5, 0.25, 2.0]), [0.0, 0.75, 0.0, 2.0])
    with pytest.raises(ValueError, match="outside 0..3"):
        place_rewards(4, [4], [1.0])


# --- composing reward models ---------------------------------------------------------------


def test_compose_two_reward_models_with_weights():
    # total = 0.3 * factuality + 0.7 * completeness
    #   row 0: [0.3 * -1, 0, 0.3 * 1 + 0.7 * 2] = [-0.3, 0, 1.7]
    #   row 1: [0, 0.3 * 1, 0.7 * -1] = [0, 0.3, -0.7]
    # per-component weighted sums: factuality [0, 0.3], completeness [1.4, -0.7]
    factuality = torch.tensor([[-1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    completeness = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, -1.0]])
    total, sums = compose_token_rewards(
        {"factuality": factuality, "completeness": completeness},
        {"factuality": 0.3, "completeness": 0.7},
    )
    close(total, [[-0.3, 0.0, 1.7], [0.0, 0.3, -0.7]])
    close(sums["factuality"], [0.0, 0.3])
    close(sums["completeness"], [1.4, -0.7])


def test_compose_rejects_weights_and_components_that_do_not_match():
    components = {"factuality": torch.zeros(1, 2), "completeness": torch.zeros(1, 2)}
    with pytest.raises(
        RlhfkitError,
        match=r"unknown rewards \['relevance'\].*no weight given for rewards \['completeness'\]",
    ):
        compose_token_rewards(components, {"factuality": 1.0, "relevance": 0.5})


# --- redistribution --------------------------------------------------------------------------


def test_prefix_differences_hand_example():
    # Prompt score 0.5, prefix scores [1, 3, 2.5] then padding (9 must be ignored):
    #   r = [1 - 0.5, 3 - 1, 2.5 - 3] = [0.5, 2, -0.5]; sum 2 = R(x, y) - R(x) = 2.5 - 0.5
    rewards = prefix_differences(
        torch.tensor([[1.0, 3.0, 2.5, 9.0]]), torch.tensor([[1, 1, 1, 0]]), torch.tensor([0.5])
    )
    close(rewards, [[0.5, 2.0, -0.5, 0.0]])


class TinyCausalRM(torch.nn.Module):
    """A deterministic causal scorer: the output at position t depends only on tokens <= t."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(20, 8)
        self.rnn = torch.nn.GRU(8, 8, batch_first=True)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, token_ids):  # (B, L) -> a score for every prefix (B, L)
        hidden, _ = self.rnn(self.embed(token_ids))
        return self.head(hidden).squeeze(-1)


@torch.no_grad()
def test_one_pass_redistribution_matches_scoring_each_prefix_and_telescopes():
    rm = TinyCausalRM()
    prompt = torch.tensor([3, 7, 1])
    responses = [torch.tensor([4, 9, 2, 11]), torch.tensor([5, 6])]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    response_ids = torch.zeros(2, 4, dtype=torch.long)
    for row, response in enumerate(responses):
        response_ids[row, : len(response)] = response

    # One pass over prompt + response: the prompt score is read at the last prompt token,
    # the prefix scores at every response position.
    full = rm(torch.cat([prompt.expand(2, -1), response_ids], dim=1))
    prompt_score, prefix_scores = full[:, len(prompt) - 1], full[:, len(prompt) :]
    rewards = prefix_differences(prefix_scores, mask, prompt_score)

    for row, response in enumerate(responses):
        # The same, one prefix at a time: R(x, y<=t) for t = 0..len(y).
        one_at_a_time = [
            rm(torch.cat([prompt, response[:t]])[None])[0, -1] for t in range(len(response) + 1)
        ]
        expected = [one_at_a_time[t + 1] - one_at_a_time[t] for t in range(len(response))]
        close(rewards[row, : len(response)], expected, tol=1e-5)
        close(rewards[row].sum(), one_at_a_time[-1] - one_at_a_time[0], tol=1e-5)
        assert torch.all(rewards[row, len(response) :] == 0)


def test_segment_differences_sentence_level_toxicity_style_reward():
    # Scores (higher = better, e.g. minus toxicity) after each sentence of ANSWER, placed at
    # the sentence-end tokens 6 and 12; baseline (prompt) score 0:
    #   token 6: -0.2 - 0 = -0.2;  token 12: -0.9 - (-0.2) = -0.7;  0 elsewhere
    # Row 1: two segments completed by the same token 3 collapse: 2.0 - 0.5 = 1.5
    rewards = segment_differences(
        [[-0.2, -0.9], [1.0, 2.0]], [[6, 12], [3, 3]], 14, torch.tensor([0.0, 0.5])
    )
    expected = torch.zeros(2, 14)
    expected[0, 6], expected[0, 12], expected[1, 3] = -0.2, -0.7, 1.5
    close(rewards, expected)


def test_token_and_sentence_granularity_share_one_code_path():
    # Reading the score at every token through the segment entry point gives the token-level
    # redistribution; reading it at tokens 1 and 3 gives [0, s1 - p, 0, s3 - s1].
    scores = torch.tensor([[0.2, -0.4, 1.0, 0.7]])
    prompt = torch.tensor([0.1])
    every_token = segment_differences([scores[0].tolist()], [[0, 1, 2, 3]], 4, prompt)
    close(every_token, prefix_differences(scores, torch.ones(1, 4), prompt))
    at_segment_ends = score_differences(scores, torch.tensor([[0, 1, 0, 1]]), prompt)
    close(at_segment_ends, [[0.0, -0.4 - 0.1, 0.0, 0.7 - (-0.4)]])


def _prefix_scores_one_scan(read_scores, read_char_ends, prompt_score, spans):
    """The reference: one scan over the policy tokens and the RM's reads, in order."""
    out = torch.empty(len(spans))
    j, current = 0, prompt_score
    for t, (_, end) in enumerate(spans):
        while j < len(read_char_ends) and read_char_ends[j] <= end:
            current = float(read_scores[j])
            j += 1
        out[t] = current
    if len(spans) and len(read_char_ends):
        out[-1] = float(read_scores[-1])
    return out


def test_vectorised_prefix_scores_on_policy_tokens_match_one_scan():
    from rlhfkit.rewards.sources import _prefix_scores_on_policy_tokens

    generator = torch.Generator().manual_seed(0)
    cases = [
        ([], [], []),  # nothing
        ([0.3], [5], []),  # no policy token
        ([], [], [(0, 3), (3, 5)]),  # no RM read: the prompt score, last token included
        ([0.3, 0.9], [2, 5], [(0, 0), (0, 1)]),  # tokens before any read, the last gets the final score
    ]
    for _ in range(200):
        n_reads, n_tokens = torch.randint(0, 8, (2,), generator=generator).tolist()
        reads = torch.randint(0, 20, (n_reads,), generator=generator).tolist()
        if torch.rand(1, generator=generator) < 0.8:
            reads.sort()  # RM offsets are sorted; unsorted ones must still match the scan
        ends = sorted(torch.randint(0, 20, (n_tokens,), generator=generator).tolist())
        spans = list(zip([0] + ends[:-1], ends))
        cases.append((torch.randn(n_reads, generator=generator).tolist(), reads, spans))
    for scores, reads, spans in cases:
        scores = torch.tensor(scores, dtype=torch.float32)
        expected = _prefix_scores_one_scan(scores, reads, -0.25, spans)
        got = _prefix_scores_on_policy_tokens(scores, reads, -0.25, spans)
        assert got.dtype == torch.float32 and torch.equal(got, expected), (reads, spans)


def test_redistributed_rows_match_per_row_prefix_differences():
    from rlhfkit.rewards.sources import RewardModelSource

    class FakeRM:
        """Prefix scores read after RM tokens ending at the given characters; an end of
        len(response) + 1 is a special token the RM's template appends after the text."""

        kind, aspect, scores_prefixes = "preference", "completeness", True

        def prefix_scores(self, prompts, responses, batch_size=8):
            scores = [[0.5, 1.5, 1.0], [2.0], [0.1, -0.3], [0.4, 0.6, 0.9], [0.4, 0.6, 0.9]]
            ends = [[2, 4, 6], [3], [1, 2], [1, 2, 3], [1, 2, 3]]
            return [torch.tensor(s) for s in scores], ends, torch.tensor([0.2, -1.0, 0.0, 0.1, 0.1])

    spans = [
        [(0, 1), (1, 4), (4, 6)],
        [(0, 3)],
        [(0, 1), (1, 1), (1, 2), (2, 2)],
        [(0, 1), (1, 2), (2, 2)],  # "ab" then EOS
        [(0, 1), (1, 2)],  # "ab" cut off before its EOS
    ]
    source = RewardModelSource("comp", FakeRM(), redistribute="token")
    rows = source.token_rewards(["p"] * 5, ["abcdef", "abc", "ab", "ab", "ab"], spans).per_token
    # A token's prefix score is the last score read at or before its end (the prompt's score
    # before any); the final token reads the last score; its reward is the change.
    # Row 0: prefix scores 0.2 (nothing read by char 1), 1.5 (reads at 2 and 4), 1.0:
    #   [0.2 - 0.2, 1.5 - 0.2, 1.0 - 1.5] = [0, 1.3, -0.5], summing to 1.0 - 0.2.
    # Row 1: one token reading 2.0 after a prompt score of -1.0: [3.0].
    # Row 2: 0.1, 0.1 (an empty token reads nothing new), -0.3, -0.3: [0.1, 0, -0.4, 0].
    # Row 3: 0.4, 0.6, then EOS takes the read after the text, 0.9: [0.3, 0.2, 0.3].
    # Row 4: cut off, the last text token takes it: 0.4, 0.9: [0.3, 0.5].
    expected = [[0.0, 1.3, -0.5], [3.0], [0.1, 0.0, -0.4, 0.0], [0.3, 0.2, 0.3], [0.3, 0.5]]
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected):
        close(row, want)
