"""Reward-model training data: the records that train an RM of one aspect
(`load_aspect_records`), the held-out split by prompt (`split_by_prompt`), their encoding as
examples (`encode_examples`: segment labels at the tokens completing segments, preference
groups, scores; `encode_training_examples` on an RM's input, reporting what is left out),
the collate that pads a batch of them (`make_collate`; `make_shared_collate` for a shared
backbone's aspects) and the fingerprint a resume checks (`data_fingerprint`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path

import torch

from rlhfkit.console import console
from rlhfkit.errors import RlhfkitError
from rlhfkit.rewards.presets import NO_LABEL_RULES, RMSettings
from rlhfkit.rewards.reward_model import (
    EncodedPair,
    encode_pair,
    pad_right,
    segment_end_positions,
    segment_start_positions,
    segment_starts_tensor,
)
from rlhfkit.schema import Preference, Record, ScalarScore, SpanFeedback, load_records
from rlhfkit.segment import SegmentLabelRules, segment
from rlhfkit.training import split_held_out

IGNORE_INDEX = -100  # the label of the tokens that complete no segment (no loss)
HOLISTIC_ASPECTS = (None, "preference")
"""Preference records judged as a whole (no aspect, or the importers' "preference")."""

RECORD_KINDS = {"segment": (SpanFeedback,), "preference": (Preference,), "regression": (ScalarScore, Preference)}


def load_aspect_records(path: str, aspect: str, settings: RMSettings, ties: str = "soft") -> list[Record]:
    """The records of `path` that train/evaluate an RM of `aspect` (RlhfkitError if none)."""
    records = load_records(path)
    wanted = RECORD_KINDS[settings.kind]
    types = Counter(r.type_name for r in records)
    records = [r for r in records if isinstance(r, wanted)]
    if not records:
        names = " or ".join(f"'{cls.type_name}'" for cls in wanted)
        raise RlhfkitError(
            f"{path}: a {settings.kind} reward model trains on {names} records; this file has "
            + ", ".join(f"{n} '{t}'" for t, n in types.items())
        )
    if settings.kind == "segment":
        judged = [r for r in records if aspect in r.aspects]
        if not judged:
            found = sorted({a for r in records for a in r.aspects} | {s.aspect for r in records for s in r.spans})
            close = get_close_matches(aspect, found, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RlhfkitError(
                f"{path}: no span_feedback record judged aspect {aspect!r}{hint}; found aspects: {', '.join(found) or 'none'}"
            )
        return judged
    by_aspect = [r for r in records if r.aspect == aspect]
    if not by_aspect and settings.holistic_fallback:
        by_aspect = [r for r in records if r.aspect in HOLISTIC_ASPECTS]
        if by_aspect and aspect not in HOLISTIC_ASPECTS:
            console.print(
                f"train-rm: no record of {path} names aspect {aspect!r}; using its {len(by_aspect)} "
                "holistic preferences (the shipped QA-Feedback sample has only those)",
                soft_wrap=True,
            )
    if not by_aspect:
        found = sorted({str(r.aspect) for r in records})
        close = get_close_matches(aspect, found, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RlhfkitError(f"{path}: no {wanted[0].type_name} record has aspect {aspect!r}{hint}; found aspects: {', '.join(found)}")
    for r in by_aspect:
        if isinstance(r, Preference) and r.chosen == r.rejected:
            raise RlhfkitError(
                f"{path}: preference {r.id!r} has identical chosen and rejected responses, which says nothing; remove it"
            )
    if ties == "drop":
        by_aspect = [r for r in by_aspect if not (isinstance(r, Preference) and r.tie)]
        if not by_aspect:
            raise RlhfkitError(f"{path}: every preference of aspect {aspect!r} is a tie; use --ties soft to train on them")
    return by_aspect


def split_by_prompt(records: Sequence[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, held_out) with every prompt's records on one side, so held-out responses are unseen."""
    prompts = list(dict.fromkeys(r.prompt for r in records))
    if fraction > 0 and len(prompts) < 2:
        raise RlhfkitError(
            "held-out data is split by prompt (a prompt's responses never land on both sides) and the data has "
            "only 1 distinct prompt; give more prompts or --eval-fraction 0"
        )
    _, held_prompts = split_held_out(prompts, fraction, seed)
    held = set(held_prompts)
    return [r for r in records if r.prompt not in held], [r for r in records if r.prompt in held]


def segment_labels(
    record: SpanFeedback, aspect: str, granularity: str, rules: SegmentLabelRules = NO_LABEL_RULES
) -> tuple[list, list[bool | None]]:
    """The record's segments and each one's label: True error, False none, None left out."""
    segments = segment(record.response, granularity)
    return segments, rules.labels(segments, record.spans, record.response, aspect)


@dataclass
class SegmentExample:
    input_ids: list[int]
    positions: list[int]  # RM tokens that complete a segment
    labels: list[int]  # 1 = error, per position
    starts: list[int]  # each segment's first RM token (what --segment-pooling mean averages from)


@dataclass
class Comparison:
    chosen: int  # indices into PreferenceGroup.responses
    rejected: int
    margin: float
    tie: bool


@dataclass
class PreferenceGroup:
    """All comparisons of one prompt: each distinct response is scored once per step and
    every pair among them is a loss term (InstructGPT's K-choose-2 batching, which is
    cheaper than a forward pass per pair side and overfits less)."""

    responses: list[list[int]]
    comparisons: list[Comparison]


@dataclass
class ScoreExample:
    input_ids: list[int]
    target: float


Encode = Callable[[str, str], EncodedPair | None]
"""(prompt, response) -> RM input, None when the response does not fit (RewardModel.encode)."""


def encode_segment_example(
    encode: Encode, record: SpanFeedback, aspect: str, granularity: str, rules: SegmentLabelRules = NO_LABEL_RULES
) -> SegmentExample | None:
    """Ids with the label of each segment at the token completing it; None if it does not fit.

    Segments the label rules leave out get no position (no loss). Two segments completed by
    one token (rare: a token spanning a boundary) share a label, an error if either is one.
    """
    pair = encode(record.prompt, record.response)
    if pair is None:
        return None
    segments, labels = segment_labels(record, aspect, granularity, rules)
    ends = segment_end_positions(pair, segments, record.response)
    by_position: dict[int, int] = {}
    start_of: dict[int, int] = {}
    for position, first, label in zip(ends, segment_start_positions(pair, ends), labels):
        if label is not None:
            by_position[position] = max(by_position.get(position, 0), int(label))
            start_of[position] = min(start_of.get(position, first), first)
    return SegmentExample(pair.input_ids, list(by_position), list(by_position.values()), [start_of[p] for p in by_position])


def encode_preference_groups(encode: Encode, records: Sequence[Preference]) -> tuple[list[PreferenceGroup], int]:
    """One group per prompt; (groups, pairs left out because a response does not fit)."""
    groups: dict[str, tuple[PreferenceGroup, dict[str, int]]] = {}
    too_long = 0
    for r in records:
        group, index = groups.setdefault(r.prompt, (PreferenceGroup([], []), {}))
        sides = []
        for response in (r.chosen, r.rejected):
            if response not in index:
                pair = encode(r.prompt, response)
                if pair is None:
                    break
                index[response] = len(group.responses)
                group.responses.append(pair.input_ids)
            sides.append(index[response])
        if len(sides) < 2:
            too_long += 1
            continue
        group.comparisons.append(Comparison(sides[0], sides[1], r.margin or 0.0, r.tie))
    return [group for group, _ in groups.values() if group.comparisons], too_long


def encode_examples(encode: Encode, records: Sequence[Record], aspect: str, settings: RMSettings) -> tuple[list, int]:
    """(examples, how many records were left out because a response does not fit)."""
    if settings.kind == "preference":
        return encode_preference_groups(encode, records)
    examples: list = []
    too_long = 0
    for r in records:
        if settings.kind == "segment":
            example = encode_segment_example(encode, r, aspect, settings.granularity, settings.label_rules)
            encoded = [] if example is None else [example]
        elif isinstance(r, Preference):
            chosen, rejected = encode(r.prompt, r.chosen), encode(r.prompt, r.rejected)
            # Regression on pairs: chosen 1, rejected 0; a tie is 0.5 on both sides.
            targets = (0.5, 0.5) if r.tie else (1.0, 0.0)
            encoded = [] if chosen is None or rejected is None else [
                ScoreExample(chosen.input_ids, targets[0]), ScoreExample(rejected.input_ids, targets[1])
            ]
        else:
            pair = encode(r.prompt, r.response)
            encoded = [] if pair is None else [ScoreExample(pair.input_ids, r.score)]
        too_long += not encoded
        examples.extend(encoded)
    return examples, too_long


def encode_training_examples(
    tokenizer, records: Sequence[Record], aspect: str, settings: RMSettings, *, max_length: int,
    max_prompt_length: int | None, truncation_side: str, source: str, label: str,
) -> tuple[list, int]:
    """encode_examples on the RM input (rlhfkit.rewards.reward_model.encode_pair) of these
    lengths, reporting the records left out (their response alone is longer than
    `max_length`) on a line starting with `label`; RlhfkitError naming `source` if none is left."""

    def encode(prompt: str, response: str) -> EncodedPair | None:
        return encode_pair(tokenizer, prompt, response, max_length, max_prompt_length, truncation_side)

    examples, too_long = encode_examples(encode, records, aspect, settings)
    if too_long:
        console.print(
            f"{label} {too_long} training record(s) have a response longer than --max-length {max_length} "
            "tokens and are left out (the response is never cut; raise --max-length to keep them)",
            soft_wrap=True,
        )
    if not examples:
        raise RlhfkitError(f"{source}: no {aspect} training record fits --max-length {max_length}")
    return examples, too_long


def example_rows(example: SegmentExample | PreferenceGroup | ScoreExample) -> list[int]:
    """The lengths of the sequences an example puts in its batch (a preference group: each response)."""
    if isinstance(example, PreferenceGroup):
        return [len(ids) for ids in example.responses]
    return [len(example.input_ids)]


def make_collate(kind: str, pad_token_id: int) -> Callable[[list], dict]:
    """collate(examples of one kind) -> the right-padded batch the kind's loss reads
    (rlhfkit.rewards.losses); segment labels are IGNORE_INDEX off the segment ends, and
    "segment_starts" holds each segment's first token at its end (what mean pooling reads)."""

    def collate_segments(items: list[SegmentExample]) -> dict:
        input_ids, attention_mask = pad_right([e.input_ids for e in items], pad_token_id)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, e in enumerate(items):
            labels[row, e.positions] = torch.tensor(e.labels, dtype=torch.long)
        starts = segment_starts_tensor(tuple(input_ids.shape), [(e.positions, e.starts) for e in items])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "segment_starts": starts}

    def collate_groups(items: list[PreferenceGroup]) -> dict:
        responses, chosen, rejected, margin, tie = [], [], [], [], []
        for group in items:
            offset = len(responses)
            responses.extend(group.responses)
            for c in group.comparisons:
                chosen.append(offset + c.chosen)
                rejected.append(offset + c.rejected)
                margin.append(c.margin)
                tie.append(c.tie)
        input_ids, attention_mask = pad_right(responses, pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "chosen": torch.tensor(chosen),
            "rejected": torch.tensor(rejected),
            "margin": torch.tensor(margin),
            "tie": torch.tensor(tie),
        }

    def collate_scores(items: list[ScoreExample]) -> dict:
        input_ids, attention_mask = pad_right([e.input_ids for e in items], pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "target": torch.tensor([e.target for e in items])}

    return {"segment": collate_segments, "preference": collate_groups, "regression": collate_scores}[kind]


def make_shared_collate(kinds: dict[str, str], pad_token_id: int) -> Callable[[list], dict]:
    """collate((aspect, example) items of one aspect) -> that aspect's batch (make_collate)
    with its "aspect", which rlhfkit.rewards.losses.make_shared_loss_fn reads."""
    collates = {aspect: make_collate(kind, pad_token_id) for aspect, kind in kinds.items()}

    def collate(items: list[tuple[str, object]]) -> dict:
        aspect = items[0][0]
        return {**collates[aspect]([example for _, example in items]), "aspect": aspect}

    return collate


def data_fingerprint(paths: Sequence[str], options: tuple) -> str:
    """sha256 of the data files (each once, in order) and the options that shape the examples:
    what a checkpoint's step N must have been trained on for a resume to continue it."""
    digest = hashlib.sha256()
    for path in dict.fromkeys(paths):
        digest.update(Path(path).read_bytes())
    digest.update(repr(options).encode())
    return digest.hexdigest()


def responses_of(records: Sequence[Record]) -> list[tuple[str, str]]:
    """Distinct (prompt, response) pairs of any records that carry responses."""
    pairs = []
    for r in records:
        if isinstance(r, Preference):
            pairs += [(r.prompt, r.chosen), (r.prompt, r.rejected)]
        elif hasattr(r, "response"):
            pairs.append((r.prompt, r.response))
    return list(dict.fromkeys(pairs))
