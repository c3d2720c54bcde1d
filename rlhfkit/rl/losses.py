"""PPO losses and the logprob/entropy helpers they need, as pure tensor functions.

Shapes: (B, T) per-token tensors with `mask` (B, T) marking the real response tokens.
Padded positions are excluded with `torch.where` *before* any nonlinearity, so that
whatever sits there (garbage, inf, NaN) gets exactly zero gradient and cannot turn the
loss into NaN.

Aggregation over tokens (`aggregation`):
  "token_mean" (default): sum over all valid tokens of the batch / number of valid tokens.
      Every token weighs the same, so long responses contribute in proportion to their
      length; this is what the FG-RLHF code, lm-human-preferences and TRL's PPO do.
  "seq_mean": mean over tokens within each response, then mean over responses. Every
      response weighs the same, whatever its length (the GRPO paper's form); rows with no
      valid token are left out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

AGGREGATIONS = ("token_mean", "seq_mean")
CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MiB in float32) where no gradient is needed


def _aggregate(per_token: Tensor, valid: Tensor, aggregation: str) -> Tensor:
    per_token = torch.where(valid, per_token, 0.0)
    if aggregation == "token_mean":
        return per_token.sum() / valid.sum().clamp(min=1)
    if aggregation == "seq_mean":
        tokens_per_row = valid.sum(dim=1)
        has_tokens = tokens_per_row > 0
        row_means = per_token.sum(dim=1) / tokens_per_row.clamp(min=1)
        return row_means[has_tokens].sum() / has_tokens.sum().clamp(min=1)
    raise ValueError(
        f"unknown loss aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}"
    )


def _masked_mean_detached(x: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, x.detach().to(torch.float32), 0.0).sum() / valid.sum().clamp(min=1)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    aggregation: str = "token_mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss: mean of max(-A * r, -A * clip(r, 1 - eps, 1 + eps)).

    The ratio r = exp(logp - logp_old) is formed in log space (dividing probabilities
    underflows for long-tail tokens). Stats, detached 0-dim tensors over the valid tokens:
    clipfrac (share of tokens where the clipped term is the one used), approx_kl
    (k3 = (r - 1) - log r: unbiased for KL(old || new) and never negative; the early-stop
    signal) and ratio_mean.
    """
    valid = mask.bool()
    log_ratio = torch.where(valid, logprobs.to(torch.float32) - old_logprobs.to(torch.float32), 0.0)
    advantages = torch.where(valid, advantages.to(torch.float32), 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = _aggregate(torch.maximum(unclipped, clipped), valid, aggregation)
    stats = {
        "clipfrac": _masked_mean_detached((clipped > unclipped).to(torch.float32), valid),
        "approx_kl": _masked_mean_detached(torch.expm1(log_ratio) - log_ratio, valid),
        "ratio_mean": _masked_mean_detached(ratio, valid),
    }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    aggregation: str = "token_mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: 0.5 * mean(max((V - R)^2, (clip(V, V_old +- eps) - R)^2)).

    Clipping around the rollout-time values keeps the value head from moving further than
    eps per batch, the counterpart of the policy clip. Stats: vf_clipfrac, the share of
    valid tokens where the clipped error is the larger one.
    """
    valid = mask.bool()
    values = torch.where(valid, values.to(torch.float32), 0.0)
    old_values = torch.where(valid, old_values.to(torch.float32), 0.0)
    returns = torch.where(valid, returns.to(torch.float32), 0.0)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * _aggregate(torch.maximum(unclipped_error, clipped_error), valid, aggregation)
    stats = {
        "vf_clipfrac": _masked_mean_detached(
            (clipped_error > unclipped_error).to(torch.float32), valid
        )
    }
    return loss, stats


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over valid tokens of the entropy of softmax(logits) (B, T, V) -> scalar.

    H = logsumexp(z) - sum(softmax(z) * z), computed in float32.
    """
    entropy = _by_rows(_token_entropy, logits)
    valid = mask.bool()
    return torch.where(valid, entropy, 0.0).sum() / valid.sum().clamp(min=1)


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) gathered at `tokens`: (B, T, V), (B, T) -> (B, T).

    `logits[:, t]` must be the distribution that `tokens[:, t]` was drawn from (for a causal
    LM: the logits of the positions before the response tokens, i.e. shifted by one).
    Use the sampling temperature: the PPO ratio compares the probabilities the tokens were
    actually sampled with. top-k / top-p filtering does not enter the logprob.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    return _by_rows(_token_logprobs, logits, tokens, temperature)


def _token_logprobs(logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    # log_softmax is one fused kernel (forward and backward); chosen - logsumexp runs a
    # max, a subtraction, an exp and a sum over the (B, T, V) logits, with and without a
    # gradient about 2x the time on CPU (PPO takes log-probs at two temperatures per pass).
    # At temperature 1 no scaled copy of the logits is made (x / 1 is x exactly).
    scaled = logits.to(torch.float32)
    if temperature != 1.0:
        scaled = scaled / temperature
    return torch.log_softmax(scaled, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _token_entropy(logits: Tensor) -> Tensor:
    logits = logits.to(torch.float32)
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def _by_rows(per_token, logits: Tensor, *args) -> Tensor:
    """`per_token(logits, *args)` -> (B, T), a few batch rows at a time when no gradient is needed.

    Its float32 / temperature-scaled copy of the logits and its softmax temporaries then take
    a chunk of ~CHUNK_ELEMENTS instead of more copies of the whole batch's (B, T, V) logits
    (PPO's rollout and reference passes). With a gradient autograd keeps them for the
    backward anyway, so the batch goes in one piece. Tensor `args` are (B, ...), split alike.
    """
    rows = max(1, CHUNK_ELEMENTS // max(1, logits[0].numel()))
    if (torch.is_grad_enabled() and logits.requires_grad) or logits.shape[0] <= rows:
        return per_token(logits, *args)
    chunks = []
    for i in range(0, logits.shape[0], rows):
        chunk_args = [a[i : i + rows] if isinstance(a, Tensor) else a for a in args]
        chunks.append(per_token(logits[i : i + rows], *chunk_args))
    return torch.cat(chunks)


class ResponseLogits:
    """The logits of a batch's response positions, made from their last hidden states by the LM
    head a chunk of positions at a time, so a [batch, length, vocabulary] tensor never exists.

    With a 49k vocabulary, B x T x V float32 logits (and log_softmax's copy of them, and the
    copy autograd keeps for the backward) are most of a small model's memory in PPO. Here
    each chunk of ~CHUNK_ELEMENTS logits is made, reduced to what PPO needs (the sampled
    tokens' log-probs, the entropy) and freed; with a gradient, each chunk is checkpointed, so
    the backward makes its logits again instead of keeping them (what fused linear + cross-
    entropy kernels do). `head=None`: `hidden` are the logits themselves (a model whose head
    is not a plain linear map, e.g. T5's scaled tied head), reduced a few rows at a time
    when no gradient is needed.
    """

    def __init__(self, hidden: Tensor, head: Callable[[Tensor], Tensor] | None = None):
        self.hidden, self.head = hidden, head

    def token_stats(
        self, tokens: Tensor | None, temperatures, entropy_temperature: float | None = None
    ) -> tuple[dict[float, Tensor], Tensor | None]:
        """({temperature: log-probs at `tokens` (B, T)}, per-token entropy at
        `entropy_temperature` (B, T) or None), all from one pass of the LM head: PPO's rollout
        pass wants the sampling and the KL temperature's log-probs and the entropy."""
        temperatures = list(dict.fromkeys(temperatures))
        if any(t <= 0 for t in temperatures):
            raise ValueError(f"temperature must be > 0 (got {temperatures})")
        if self.head is None:
            logprobs = {t: logprobs_from_logits(self.hidden, tokens, t) for t in temperatures}
            entropy = None
            if entropy_temperature is not None:
                entropy = _by_rows(_token_entropy, self.hidden / entropy_temperature)
            return logprobs, entropy

        def per_token(logits: Tensor, *chunk_tokens: Tensor) -> Tensor:
            columns = [_token_logprobs(logits, chunk_tokens[0], t) for t in temperatures]
            if entropy_temperature is not None:
                columns.append(_token_entropy(logits / entropy_temperature))
            return torch.stack(columns, dim=-1)

        stats = self._by_positions(per_token, *([tokens] if temperatures else []))
        logprobs = {t: stats[..., i] for i, t in enumerate(temperatures)}
        return logprobs, (stats[..., -1] if entropy_temperature is not None else None)

    def _by_positions(self, per_token, *args: Tensor) -> Tensor:
        batch, length, width = self.hidden.shape
        flat = self.hidden.reshape(batch * length, width)
        flat_args = [a.reshape(batch * length) for a in args]
        vocab = getattr(self.head, "out_features", None) or self.head(flat[:1]).shape[-1]
        positions = max(1, CHUNK_ELEMENTS // vocab)
        head = self.head

        def chunk(hidden: Tensor, *chunk_args: Tensor) -> Tensor:
            return per_token(head(hidden), *chunk_args)

        grad = torch.is_grad_enabled() and flat.requires_grad
        pieces = []
        for i in range(0, flat.shape[0], positions):
            part = [flat[i : i + positions], *(a[i : i + positions] for a in flat_args)]
            pieces.append(checkpoint(chunk, *part, use_reentrant=False) if grad else chunk(*part))
        return torch.cat(pieces).reshape(batch, length, *pieces[0].shape[1:])
