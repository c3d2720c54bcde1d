"""A model card (README.md with the hub's YAML metadata) for every model a stage saves, and
`--push-to-hub REPO`, which uploads the model's own files and nothing else of the run.

A stage's --out holds the model (from_pretrained files, rlhfkit's spec files) beside the run's
other artifacts (checkpoints, metrics, plots, tracker logs). `model_files` lists the model's
by name, so an upload never carries optimizer states or checkpoints.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from rlhfkit.errors import RlhfkitError
from rlhfkit.io import write_text
from rlhfkit.models import model_dir, model_output_dir

CARD_FILE = "README.md"
# The files of a saved model: what save_pretrained writes for a model, a LoRA adapter and a
# tokenizer, and rlhfkit's own files that loading needs (a reward model's spec and heads, the
# critique-and-revise templates, init-model's record). Top level only: checkpoints/ and tracker
# folders are never part of it.
MODEL_FILE_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "adapter_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "chat_template.jinja",
    "chat_template.json", "rlhfkit_rm.json", "rlhfkit_model.json", "critique_revise.json", CARD_FILE,
)
PUSH_TO_HUB_HELP = (
    "After saving, upload the model (its files and model card, not checkpoints or metrics) to this Hugging Face "
    "hub repository (created if missing; needs a login: `hf auth login` or HF_TOKEN)."
)

METHODS = {
    "sft": "Supervised fine-tuning on demonstrations (loss on the response tokens only).",
    "critique-revise train": (
        "Critique-and-revise fine-tuning (Jin et al. 2023, arXiv 2311.14543): the model learns to critique a "
        "response and to revise it given a critique."
    ),
    "train-rm": "A reward model trained on human feedback (rlhfkit train-rm).",
    "ppo": (
        "PPO from fine-grained, weighted rewards (Fine-Grained RLHF, Wu et al. 2023, arXiv 2306.01693); "
        "a single sequence reward is the holistic (preference) baseline."
    ),
}


def model_files(directory: str | os.PathLike) -> list[str]:
    """The names of the model's files at the top of `directory` (sorted)."""
    return sorted(
        path.name for path in Path(directory).iterdir()
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in MODEL_FILE_PATTERNS)
    )


def _hub_id(name: str) -> str | None:
    """`name` when it reads as a hub repository id (not a local path), else None."""
    if not name or Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return None
    return name


def card_text(*, title: str, stage: str, base_model: str, data: Sequence[str], metrics: Mapping[str, Any],
              rewards: Mapping[str, str] | None = None, command: Sequence[str] = (), version: str) -> str:
    """The README.md: hub metadata (base_model and datasets only when they are hub ids), the
    method, the reward sources and weights, the data, the key metrics and rlhfkit's version."""
    metadata: dict[str, Any] = {"library_name": "transformers", "tags": ["rlhfkit", stage.split()[0]]}
    if stage == "ppo":
        metadata["tags"] += ["rlhf", "fine-grained-rlhf"]
    if _hub_id(base_model):
        metadata["base_model"] = base_model
    hub_data = [d for d in data if _hub_id(d) and not d.endswith((".json", ".jsonl"))]
    if hub_data:
        metadata["datasets"] = hub_data
    lines = ["---", yaml.safe_dump(metadata, sort_keys=True).strip(), "---", "", f"# {title}", "",
             f"Trained with rlhfkit {version}, stage `{stage}`.", "",
             "## Method", "", METHODS.get(stage, stage), "", f"- base model: `{base_model}`"]
    if rewards:
        lines += ["", "## Reward sources and weights", "", "| source | weight | reward model |", "|---|---:|---|"]
        lines += [f"| {name} | {weight} | `{path}` |" for name, (weight, path) in rewards.items()]
    lines += ["", "## Data", ""] + [f"- `{d}`" for d in data]
    if metrics:
        lines += ["", "## Key metrics", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {key} | {_number(value)} |" for key, value in metrics.items() if value is not None]
    if command:
        lines += ["", "## Command", "", "```", " ".join(command), "```"]
    if stage == "train-rm":
        use = ["from rlhfkit.rewards.reward_model import load_reward_model",
               'reward_model = load_reward_model("<this folder>")  # scores with the head and normalisation in rlhfkit_rm.json']
    else:
        use = ["from transformers import AutoModelForCausalLM, AutoTokenizer  # AutoModelForSeq2SeqLM for T5-style models",
               'model = AutoModelForCausalLM.from_pretrained("<this folder or repository>")',
               'tokenizer = AutoTokenizer.from_pretrained("<this folder or repository>")']
    lines += ["", "## Use", "", "```python", *use, "```", ""]
    return "\n".join(lines)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def write_model_card(out: str | os.PathLike, **card: Any) -> Path:
    """Write README.md (card_text) into the model folder of the run directory `out`."""
    from rlhfkit import __version__

    path = model_output_dir(out) / CARD_FILE
    write_text(path, card_text(version=__version__, **card))
    return path


def push_to_hub(out: str | os.PathLike, repo_id: str) -> None:
    """Upload the model folder of `out` (its model_files) to the hub repository `repo_id`."""
    out = model_dir(out)
    files = model_files(out)
    if not any(fnmatch.fnmatch(name, "*.safetensors") for name in files):
        raise RlhfkitError(f"--push-to-hub: {out} holds no model weights to upload")
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(out), allow_patterns=files, commit_message="rlhfkit: upload model")


def finish_model(out: str | os.PathLike, push_to_hub_repo: str | None, **card: Any) -> None:
    """A saved model's last steps (main process only): its card, then the upload if asked."""
    write_model_card(out, **card)
    if push_to_hub_repo:
        push_to_hub(out, push_to_hub_repo)


def scalar_metrics(metrics: Mapping[str, Any], keys: Sequence[str], prefix: str = "") -> dict[str, Any]:
    """The numbers among `metrics[key]` for `keys`, in that order (missing and None left out)."""
    return {prefix + key: metrics[key] for key in keys
            if isinstance(metrics.get(key), (int, float)) and not isinstance(metrics.get(key), bool)}
