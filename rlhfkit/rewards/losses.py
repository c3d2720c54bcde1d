"""Reward-model losses: Bradley-Terry on preference pairs (ties trained toward P = 1/2),
weighted cross-entropy at segment ends, MSE on scores; `make_loss_fn` (one RM) and
`make_shared_loss_fn` (a shared backbone, rlhfkit.rewards.shared_backbone) build the
loss(model, batch) of rlhfkit.training.fit from the batches of rlhfkit.rewards.data.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rlhfkit.rewards.data import IGNORE_INDEX
from rlhfkit.rewards.reward_model import mean_at_segment_ends, sequence_scores


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor, tie: torch.Tensor) -> torch.Tensor:
    """Per-pair loss: -log sigmoid(r_c - r_r - margin); a tie: -(log sigmoid(d) + log sigmoid(-d)) / 2.

    The tie term is the cross-entropy of the Bradley-Terry probability sigmoid(d) against
    the soft target 1/2 (no margin: a tie says the two are equally good).
    """
    diff = chosen.float() - rejected.float()
    preferred = -F.logsigmoid(diff - margin.float())
    tied = -0.5 * (F.logsigmoid(diff) + F.logsigmoid(-diff))
    return torch.where(tie, tied, preferred)


def segment_loss(logits: torch.Tensor, labels: torch.Tensor, error_class_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy at the labelled positions (labels -100 elsewhere), and their count."""
    weight = torch.tensor([1.0, error_class_weight], device=logits.device)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), weight=weight, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()


def pooled_segment_logits(logits: torch.Tensor, batch: dict, pooling: str) -> torch.Tensor:
    """The logits a segment RM's loss reads at each segment end: the end token's own ("end"),
    or the mean over the segment's tokens ("mean", rlhfkit.rewards.reward_model.SEGMENT_POOLINGS)."""
    return mean_at_segment_ends(logits, batch["segment_starts"]) if pooling == "mean" else logits


def make_loss_fn(kind: str, error_class_weight: float, segment_pooling: str = "end") -> Callable:
    count = make_count_fn(kind)

    def segment_batch_loss(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = segment_loss(pooled_segment_logits(logits, batch, segment_pooling), batch["labels"], error_class_weight)
        return loss, count(batch)

    def preference_batch_loss(model, batch):
        scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
        losses = bradley_terry_loss(scores[batch["chosen"]], scores[batch["rejected"]], batch["margin"], batch["tie"])
        return losses.sum(), count(batch)

    def regression_batch_loss(model, batch):
        scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
        return F.mse_loss(scores, batch["target"].float(), reduction="sum"), count(batch)

    return {"segment": segment_batch_loss, "preference": preference_batch_loss, "regression": regression_batch_loss}[kind]


def make_count_fn(kind: str) -> Callable:
    """count(batch): what the kind's loss sums over (labelled segment ends, comparisons,
    scored responses), from the batch alone."""
    if kind == "segment":
        return lambda batch: (batch["labels"] != IGNORE_INDEX).sum()
    if kind == "preference":
        return lambda batch: len(batch["chosen"])
    return lambda batch: len(batch["target"])


def make_shared_loss_fn(
    kinds: dict[str, str], weights: dict[str, float], error_class_weights: dict[str, float],
    segment_poolings: dict[str, str] | None = None,
) -> Callable:
    """loss(model, batch) of a MultiAspectRewardModel on a batch of one aspect (batch["aspect"]).

    Returns (weight x the aspect's mean loss over the batch, 1): fit divides the sum over a
    step's micro-batches by their number, so the objective is the mean over micro-batches
    of the weighted per-batch mean losses. The aspects' losses are means over different
    things (segments, comparisons, scores), which a common sum could not weigh fairly.
    """

    def shared_batch_loss(model, batch):
        aspect = batch["aspect"]
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])
        if kinds[aspect] == "segment":
            pooling = (segment_poolings or {}).get(aspect, "end")
            logits = pooled_segment_logits(model.aspect_outputs(aspect, hidden), batch, pooling)
            loss_sum, count = segment_loss(logits, batch["labels"], error_class_weights[aspect])
        elif kinds[aspect] == "preference":
            scores = model.sequence_scores(aspect, hidden, batch["attention_mask"])
            loss_sum = bradley_terry_loss(scores[batch["chosen"]], scores[batch["rejected"]], batch["margin"], batch["tie"]).sum()
            count = len(batch["chosen"])
        else:
            scores = model.sequence_scores(aspect, hidden, batch["attention_mask"])
            loss_sum, count = F.mse_loss(scores, batch["target"].float(), reduction="sum"), len(batch["target"])
        return weights[aspect] * loss_sum / max(float(count), 1.0), 1

    return shared_batch_loss
