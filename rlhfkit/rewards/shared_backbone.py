"""One backbone, a head per aspect: a fine-grained reward model that scores every aspect in one pass.

`rlhfkit train-rm --aspect factuality,relevance,completeness --shared-backbone` trains a
`MultiAspectRewardModel` (`new_multi_aspect_model`; its spec: `shared_spec`): a Hugging Face
base model (AutoModel, no head) and one linear head per aspect on its last hidden states:
- a segment aspect: a 2-way token classifier (no error / error), read at the token that
  completes each segment, as a separate segment RM's AutoModelForTokenClassification head;
- a sequence aspect (preference, regression): one scalar, read at the last real token for a
  decoder (so every position also gives its prefix's score, for R3HF) or at the first
  token (CLS) for an encoder.

The directory holds the backbone (save_pretrained, safetensors), the heads
(`aspect_heads.safetensors`: `<aspect>.weight` / `<aspect>.bias`), the tokenizer and one
`rlhfkit_rm.json` of kind `multi_aspect` whose `aspects` maps each aspect to what a
single-aspect spec holds (kind, granularity, rewards, normalisation, label rules); lengths
and truncation are shared, because all aspects read the same encoded input.

`load_aspect_reward_models(path)` gives one `RewardModel` per aspect. They share a
`SharedBackboneScorer`, which runs the backbone and every head once per input batch and
keeps the head outputs (a few floats per token, not the hidden states) for the other
aspects: three aspects scored on one batch cost one forward pass (and one tokenisation of each
(prompt, response)).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rlhfkit.errors import RlhfkitError
from rlhfkit.models import load_pretrained, load_tokenizer, model_dir, resolve_device
from rlhfkit.rewards.reward_model import (
    SEQUENCE_KINDS,
    SHARED_KIND,
    SPEC_FORMAT,
    EncodedPair,
    RewardModel,
    kind_spec,
    load_reward_model,
    read_spec,
)

if TYPE_CHECKING:
    from rlhfkit.rewards.presets import RMSettings

HEADS_FILE = "aspect_heads.safetensors"
# Head outputs of this many input batches are kept (least recently used dropped first). A PPO
# step scores its rollouts in rollouts / --rm-batch-size batches, each aspect all of them in
# turn, so the cache must hold one step's batches; an entry is rm_batch_size x tokens x
# (2 per segment aspect + 1 per sequence aspect) floats: 8 x 640 x 5 x 4 B = 100 KiB.
CACHED_BATCHES = 256
# Encoded (prompt, response) pairs kept: a few PPO steps' rollouts.
CACHED_PAIRS = 4096


def reads_last_token(config) -> bool:
    """Whether a backbone is a decoder (scores read at the last token) rather than an encoder (CLS).

    BERT-like models also have a causal-LM class, so "has a causal LM" is not enough: a
    model type with a masked-LM class is taken as an encoder.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def head_outputs(kind: str, head: nn.Module, hidden: Tensor, causal: bool) -> Tensor:
    """One head on the backbone's (B, T, H) last hidden states.

    segment: (B, T, 2) logits at every token; a sequence kind on a decoder: (B, T) score of
    every prefix; on an encoder: (B,) score read at the first token.
    """
    if kind == "segment":
        return head(hidden)
    if causal:
        return head(hidden)[..., 0]
    return head(hidden[:, 0])[:, 0]


def last_token_values(per_position: Tensor, attention_mask: Tensor) -> Tensor:
    """(B,) values at each row's last real token of right-padded (B, T) values."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask).argmax(dim=1)
    return per_position.gather(1, last.to(per_position.device).unsqueeze(1)).squeeze(1)


class MultiAspectRewardModel(nn.Module):
    """A base model and `heads[aspect]`: nn.Linear(hidden, 2) for segment aspects, (hidden, 1) for the others."""

    def __init__(self, backbone: nn.Module, kinds: dict[str, str]):
        super().__init__()
        self.backbone = backbone
        self.kinds = dict(kinds)
        self.causal = reads_last_token(backbone.config)
        hidden = backbone.config.hidden_size
        self.heads = nn.ModuleDict({aspect: nn.Linear(hidden, 2 if kind == "segment" else 1) for aspect, kind in kinds.items()})
        # As transformers initialises classifier heads: N(0, initializer_range), zero bias.
        std = getattr(backbone.config, "initializer_range", 0.02)
        for head in self.heads.values():
            nn.init.normal_(head.weight, std=std)
            nn.init.zeros_(head.bias)

    @property
    def config(self):
        return self.backbone.config

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def aspect_outputs(self, aspect: str, hidden: Tensor) -> Tensor:
        return head_outputs(self.kinds[aspect], self.heads[aspect], hidden, self.causal)

    def sequence_scores(self, aspect: str, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """(B,) score of a sequence aspect: at the last real token (decoder) or the first (encoder)."""
        out = self.aspect_outputs(aspect, hidden).float()
        return last_token_values(out, attention_mask) if self.causal else out

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        hidden = self.hidden_states(input_ids, attention_mask)
        return {aspect: self.aspect_outputs(aspect, hidden) for aspect in self.heads}

    def save_pretrained(self, directory: str | os.PathLike, **kwargs) -> None:
        """The backbone as save_pretrained writes it, and the heads beside it (safetensors)."""
        self.backbone.save_pretrained(directory, **kwargs)
        heads = {name: tensor.detach().contiguous().cpu() for name, tensor in self.heads.state_dict().items()}
        save_file(heads, str(Path(directory) / HEADS_FILE))

    def load_heads(self, directory: str | os.PathLike) -> None:
        path = model_dir(directory) / HEADS_FILE
        if not path.is_file():
            raise RlhfkitError(f"{directory}: no {HEADS_FILE}; the shared-backbone reward model is incomplete, train it again")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as err:  # a truncated or foreign file: safetensors' own message
            raise RlhfkitError(f"{path}: cannot read the aspect heads ({err})") from None
        missing = sorted(set(self.heads.state_dict()) - set(state))
        if missing:
            raise RlhfkitError(f"{path}: no weights for {', '.join(missing)}; the file does not match rlhfkit_rm.json")
        for name, tensor in self.heads.state_dict().items():
            if state[name].shape != tensor.shape:  # an aspect's kind edited in rlhfkit_rm.json
                aspect = name.partition(".")[0]
                raise RlhfkitError(
                    f"{path}: {name} has shape {tuple(state[name].shape)}, but aspect {aspect!r} is a "
                    f"{self.kinds[aspect]} head of shape {tuple(tensor.shape)}; the file does not match rlhfkit_rm.json"
                )
        self.heads.load_state_dict({k: v for k, v in state.items() if k in self.heads.state_dict()})


def _batch_key(input_ids: Tensor, attention_mask: Tensor) -> tuple:
    digest = hashlib.blake2b(input_ids.detach().cpu().numpy().tobytes(), digest_size=16)
    digest.update(attention_mask.detach().cpu().numpy().tobytes())
    return tuple(input_ids.shape), digest.hexdigest()


class SharedBackboneScorer:
    """Runs a MultiAspectRewardModel once per distinct input batch and hands each aspect its head's output.

    The aspects' RewardModels encode a (prompt, response) identically (one tokenizer, shared
    lengths), so the sources of one model scoring one rollout batch build identical input
    tensors; the first computes every head, the others find the result here.
    """

    def __init__(self, model: MultiAspectRewardModel):
        self.model = model.eval()
        self.forward_passes = 0
        self._cache: OrderedDict[tuple, dict[str, Tensor]] = OrderedDict()
        self._encoded: OrderedDict[tuple[str, str], EncodedPair | None] = OrderedDict()

    def clear(self) -> None:
        """Forget every cached output (a benchmark that scores one batch again must run the model)."""
        self._cache.clear()
        self._encoded.clear()

    def encode(self, prompt: str, response: str, encode: Callable[[str, str], EncodedPair | None]) -> EncodedPair | None:
        """`encode(prompt, response)`, tokenised once for all aspects (they share tokenizer and lengths)."""
        key = (prompt, response)
        if key in self._encoded:
            self._encoded.move_to_end(key)
            return self._encoded[key]
        pair = self._encoded[key] = encode(prompt, response)
        while len(self._encoded) > CACHED_PAIRS:
            self._encoded.popitem(last=False)
        return pair

    @torch.no_grad()
    def outputs(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        key = _batch_key(input_ids, attention_mask)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        out = {aspect: value.float() for aspect, value in self.model(input_ids, attention_mask).items()}
        self.forward_passes += 1
        self._cache[key] = out
        while len(self._cache) > CACHED_BATCHES:
            self._cache.popitem(last=False)
        return out


class AspectRewardModel(RewardModel):
    """One aspect of a shared-backbone reward model, with RewardModel's scoring methods."""

    def __init__(self, scorer: SharedBackboneScorer, aspect: str, tokenizer, spec: dict, device: torch.device):
        super().__init__(scorer.model, tokenizer, aspect_spec(spec, aspect), device)
        self.scorer = scorer

    @property
    def scores_prefixes(self) -> bool:
        return self.scorer.model.causal

    def encode(self, prompt: str, response: str) -> EncodedPair | None:
        return self.scorer.encode(prompt, response, super().encode)

    def token_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.scorer.outputs(input_ids, attention_mask)[self.aspect]

    def sequence_scores(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.scorer.outputs(input_ids, attention_mask)[self.aspect]
        return last_token_values(out, attention_mask) if self.scorer.model.causal else out

    def per_position_scores(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if not self.scores_prefixes:
            return super().per_position_scores(input_ids, attention_mask)  # the encoder error
        return self.scorer.outputs(input_ids, attention_mask)[self.aspect]


def new_multi_aspect_model(kinds: dict[str, str], backbone: str, *, device: torch.device, trust_remote_code: bool = False,
                           **memory_options) -> MultiAspectRewardModel:
    """A model to train: `backbone` (a hub id or directory, fp32 weights) with a fresh head per aspect;
    `memory_options`: load_pretrained's gradient_checkpointing and attn_implementation."""
    from transformers import AutoModel

    base = load_pretrained(AutoModel, backbone, dtype="float32", device=str(device), trust_remote_code=trust_remote_code, **memory_options)
    return MultiAspectRewardModel(base, kinds).to(device)


def aspect_reward_models(model: MultiAspectRewardModel, tokenizer, spec: dict, device: torch.device) -> dict[str, RewardModel]:
    """One RewardModel per aspect of `spec`, sharing one new scorer of `model` (so nothing
    cached before is reused: train-rm's weights change between evaluations)."""
    scorer = SharedBackboneScorer(model)
    return {aspect: AspectRewardModel(scorer, aspect, tokenizer, spec, device) for aspect in spec["aspects"]}


def shared_spec(
    settings: dict[str, RMSettings], weights: dict[str, float], trained_on: dict[str, str], *, max_length: int,
    max_prompt_length: int | None, truncation_side: str, backbone: str, causal: bool, apply_chat_template: bool = False,
) -> dict[str, Any]:
    """The rlhfkit_rm.json of a shared-backbone RM: the shared lengths and backbone, and
    under `aspects` each aspect's kind, segments, loss weight, data and kind_spec."""
    return {
        "format": SPEC_FORMAT,
        "kind": SHARED_KIND,
        "aspect": ",".join(settings),
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "truncation_side": truncation_side,
        "backbone": backbone,
        "apply_chat_template": apply_chat_template,
        "reads": "last_token" if causal else "first_token",
        "heads_file": HEADS_FILE,
        "aspects": {
            aspect: {"kind": s.kind, "granularity": s.granularity, "weight": weights[aspect], "trained_on": trained_on[aspect], **kind_spec(s)}
            for aspect, s in settings.items()
        },
    }


SHARED_KEYS = ("max_length", "max_prompt_length", "truncation_side", "backbone", "format", "apply_chat_template")


def aspect_spec(spec: dict, aspect: str) -> dict:
    """What a single-aspect rlhfkit_rm.json would hold for one aspect of a shared model."""
    return {**{k: spec.get(k) for k in SHARED_KEYS}, **spec["aspects"][aspect], "aspect": aspect, "shared_backbone": True}


def load_aspect_reward_models(path: str | os.PathLike, spec: dict, *, device: torch.device, dtype: str = "auto") -> dict[str, RewardModel]:
    """Every aspect of a shared-backbone reward model directory, sharing one scorer."""
    from transformers import AutoModel

    tokenizer = load_tokenizer(str(path), padding_side="right")
    backbone = load_pretrained(AutoModel, str(path), dtype=dtype, device=str(device))
    model = MultiAspectRewardModel(backbone, {aspect: entry["kind"] for aspect, entry in spec["aspects"].items()})
    model.load_heads(path)
    model.heads.to(device=device, dtype=next(backbone.parameters()).dtype)
    return aspect_reward_models(model, tokenizer, spec, device)


def load_reward_models(path: str | os.PathLike, *, device: str | torch.device | None = None, dtype: str = "auto") -> dict[str, RewardModel]:
    """{aspect: RewardModel} of a directory: its one aspect, or every aspect of a shared-backbone
    model (scored together: one forward pass per batch for all of them)."""
    spec = read_spec(path)
    if spec["kind"] != SHARED_KIND:
        rm = load_reward_model(path, device=device, dtype=dtype)
        return {rm.aspect: rm}
    return load_aspect_reward_models(path, spec, device=resolve_device(None if device is None else str(device)), dtype=dtype)


def load_named_reward_models(paths: dict[str, str], *, device: str | torch.device | None = None, dtype: str = "auto") -> dict[str, RewardModel]:
    """{name: RewardModel} of named RM directories, where a shared-backbone model's aspects are
    named NAME.ASPECT (as `--rm NAME=DIR` expands them): each directory is loaded once."""
    loaded: dict[str, dict[str, RewardModel]] = {}
    out = {}
    for name, path in paths.items():
        if path not in loaded:
            loaded[path] = load_reward_models(path, device=device, dtype=dtype)
        aspects = loaded[path]
        out[name] = aspects[name.rpartition(".")[2]] if read_spec(path)["kind"] == SHARED_KIND else next(iter(aspects.values()))
    return out


def load_sequence_aspect(path: str, aspect: str | None, option: str, *, device: str | torch.device | None = None,
                         dtype: str = "auto") -> RewardModel:
    """The sequence-level RM of a directory: its one RM, or the `aspect` of a shared-backbone
    model (which may be left out when the model has one sequence aspect)."""
    spec = read_spec(path)
    if spec["kind"] != SHARED_KIND:
        if aspect is not None and aspect != spec["aspect"]:
            raise RlhfkitError(f"{option} {path}: a single-aspect {spec['aspect']} reward model has no aspect {aspect!r}")
        return load_reward_model(path, device=device, dtype=dtype)
    sequence = [name for name, entry in spec["aspects"].items() if entry["kind"] in SEQUENCE_KINDS]
    if aspect is None and len(sequence) != 1:
        raise RlhfkitError(
            f"{option} {path} is a shared-backbone reward model with sequence aspects {', '.join(sequence) or 'none'}; "
            "name the one to use with --aspect"
        )
    chosen = aspect or sequence[0]
    if chosen not in sequence:
        raise RlhfkitError(f"--aspect {chosen}: not a sequence aspect of {path}; valid: {', '.join(sequence) or 'none'}")
    return load_reward_models(path, device=device, dtype=dtype)[chosen]
