"""Where PPO's rollouts come from: `--generation-backend hf` (the policy's own `generate`) or `vllm`.

`vllm` samples with a vLLM engine (the optional `vllm` extra, CUDA machines) colocated with the
trainer, as OpenRLHF, verl and TRL's colocate mode do: the engine loads the policy's initial
weights from its directory, and after each PPO update the policy's weights are pushed into it
before the next rollout (`WeightSync`). Prompts are encoded by rlhfkit (same truncation as
`hf`) and handed to vLLM as token ids, and the sampled token ids come back into the same
`Rollout`, so log-probs, values and rewards are computed by the trainer exactly as for `hf`.

The engine is reached through `VLLMEngine`, a thin adapter over vLLM's documented offline API
(`vllm.LLM`, `LLM.generate` with `{"prompt_token_ids": ...}` prompts and `SamplingParams`; the
weights through the driver worker's `model.load_weights(name, tensor pairs)`); everything else
depends only on its two methods, so the bookkeeping is tested with a stand-in engine.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Collection, Iterable, Sequence
from typing import Protocol

import torch

from rlhfkit.errors import RlhfkitError
from rlhfkit.generation import Rollout, SamplingConfig, build_rollout, encode_prompts, generate

GENERATION_BACKENDS = ("hf", "vllm")
VLLM_MISSING = (
    "--generation-backend vllm needs vLLM, an optional extra for CUDA machines: pip install 'rlhfkit[vllm]'; "
    "or use --generation-backend hf"
)


def check_generation_backend(name: str, *, lora: bool = False, encoder_decoder: bool | None = None) -> None:
    """Refuse an unknown backend, and vllm when it is not installed or cannot serve the policy."""
    if name not in GENERATION_BACKENDS:
        raise RlhfkitError(f"--generation-backend must be one of {', '.join(GENERATION_BACKENDS)}, got '{name}'")
    if name != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise RlhfkitError(VLLM_MISSING)
    if lora:
        raise RlhfkitError("--generation-backend vllm with --lora-r is not supported yet (the engine holds merged weights); use hf")
    if encoder_decoder:
        raise RlhfkitError("--generation-backend vllm serves decoder-only policies; an encoder-decoder policy uses hf")


class Engine(Protocol):
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[list[int]]: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...


class VLLMEngine:
    """vllm.LLM in this process (colocated with the trainer)."""

    def __init__(self, model_path: str, *, dtype: str = "auto", seed: int = 0, gpu_memory_utilization: float = 0.3):
        try:
            from vllm import LLM
        except ImportError:
            raise RlhfkitError(VLLM_MISSING) from None
        self.llm = LLM(model=model_path, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization)

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[list[int]]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=1,
            temperature=sampling.temperature if sampling.do_sample else 0.0,
            top_k=sampling.top_k if sampling.do_sample and sampling.top_k > 0 else -1,  # -1: the whole vocabulary
            top_p=sampling.top_p if sampling.do_sample else 1.0,
            max_tokens=sampling.max_new_tokens,
        )
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_token_ids], params, use_tqdm=False)
        return [list(output.outputs[0].token_ids) for output in outputs]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        model.load_weights(weights=weights)


class WeightSync:
    """Which policy version the engine holds; pushes the weights only when they changed.

    Version 0 is the weights the engine loaded from the policy directory; `policy_updated()`
    after each PPO update makes the next `ensure_synced` push the current weights (once, however
    many updates came in between).
    """

    def __init__(self, engine: Engine, *, engine_has_policy_weights: bool = True):
        self.engine = engine
        self.policy_version = 0 if engine_has_policy_weights else 1
        self.engine_version = 0
        self.syncs = 0
        self.tensors_sent = 0

    def policy_updated(self) -> None:
        self.policy_version += 1

    def ensure_synced(self, policy: torch.nn.Module) -> bool:
        """Push the policy's weights if the engine's are older; whether it pushed."""
        if self.engine_version == self.policy_version:
            return False
        weights = [(name, tensor.detach()) for name, tensor in policy.state_dict().items()]
        self.engine.load_weights(weights)
        self.engine_version = self.policy_version
        self.syncs += 1
        self.tensors_sent += len(weights)
        return True


class HFGeneration:
    """Today's path: the policy's own `generate` (rlhfkit.generation)."""

    name = "hf"

    def generate(self, policy, tokenizer, prompts: list[str], sampling: SamplingConfig, **options) -> Rollout:
        return generate(policy, tokenizer, prompts, sampling, **options)

    def policy_updated(self) -> None:
        pass


class VLLMGeneration:
    """Rollouts sampled by an engine that is brought up to date with the policy before each batch."""

    name = "vllm"

    def __init__(self, engine: Engine, *, engine_has_policy_weights: bool = True):
        self.engine = engine
        self.sync = WeightSync(engine, engine_has_policy_weights=engine_has_policy_weights)

    def generate(
        self, policy, tokenizer, prompts: list[str], sampling: SamplingConfig, *, max_prompt_length: int,
        is_encoder_decoder: bool = False, truncation_side: str = "right", generator_seed: int | None = None,
        templated: Collection[str] = (),
    ) -> Rollout:
        if is_encoder_decoder:
            raise RlhfkitError("--generation-backend vllm serves decoder-only policies; an encoder-decoder policy uses hf")
        self.sync.ensure_synced(policy)
        device = next(policy.parameters()).device
        query_ids, query_mask, prompts_cut = encode_prompts(tokenizer, prompts, max_prompt_length, device, truncation_side, templated)
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(query_ids, query_mask)]
        responses = self.engine.generate(rows, sampling)
        if len(responses) != len(prompts):
            raise RlhfkitError(f"the generation engine returned {len(responses)} responses for {len(prompts)} prompts")
        # A row shorter than the longest stopped by itself (EOS, or another stop token: then unfinished).
        return build_rollout(
            tokenizer, list(prompts), query_ids, query_mask, pad_responses(responses, tokenizer.pad_token_id, device), prompts_cut,
            lengths=[len(row) for row in responses],
        )

    def policy_updated(self) -> None:
        self.sync.policy_updated()


def pad_responses(rows: Sequence[Sequence[int]], pad_token_id: int, device: torch.device) -> torch.Tensor:
    """Right-padded (B, T) response ids (T >= 1: an empty batch of responses is one pad wide)."""
    width = max([len(row) for row in rows] + [1])
    out = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(list(row), dtype=torch.long, device=device)
    return out


def make_generation_backend(name: str, policy_path: str, *, dtype: str = "auto", seed: int = 0, resumed: bool = False):
    """The backend `--generation-backend` names; a resumed run's weights are not the directory's, so they are pushed first."""
    if name == "hf":
        return HFGeneration()
    return VLLMGeneration(VLLMEngine(policy_path, dtype=dtype, seed=seed), engine_has_policy_weights=not resumed)
