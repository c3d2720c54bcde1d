"""Model cards and --push-to-hub: what a saved model's card says and which files an upload
takes, checked offline on a real sft run (the upload itself is replaced by a recorder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlhfkit.config import build_config
from rlhfkit.errors import RlhfkitError
from rlhfkit.finetune import SFTConfig, run_sft
from rlhfkit.model_card import card_text, model_files, push_to_hub
from rlhfkit.models import MODEL_SUBDIR
from rlhfkit.schema import Demonstration, write_records


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("card")
    data = root / "demos.jsonl"
    write_records(data, [Demonstration(id=f"d{i}", prompt=f"question {i}?", response=f" answer {i}.") for i in range(8)])
    out = root / "sft"
    # Checkpoints every step and a held-out split: the run directory holds far more than the model.
    run_sft(build_config(SFTConfig, model=str(tiny_model_dir), data=str(data), out=str(out), max_steps=2, batch_size=4,
                         save_every=1, keep_checkpoints=0, eval_fraction=0.25, lr=1e-3))
    return out


def test_sft_writes_a_model_card(sft_run: Path, tiny_model_dir: Path) -> None:
    text = (sft_run / MODEL_SUBDIR / "README.md").read_text(encoding="utf-8")
    metadata = front_matter(text)
    # A local base model is no hub id: the card names it in its text, not as base_model.
    assert metadata == {"library_name": "transformers", "tags": ["rlhfkit", "sft"]}
    assert f"- base model: `{tiny_model_dir}`" in text and "stage `sft`" in text
    metrics = json.loads((sft_run / "sft_metrics.json").read_text())
    assert "| steps | 2 |" in text
    assert f"| eval_loss_after | {metrics['eval_loss_after']:.4g} |" in text
    assert f"| train_loss | {metrics['train_loss']:.4g} |" in text


def test_upload_takes_the_model_files_only(sft_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    assert any((sft_run / "checkpoints").iterdir()) and (sft_run / "metrics.jsonl").is_file()
    # The run directory keeps checkpoints, metrics and plots; its model folder what from_pretrained reads and the card.
    assert sorted(p.name for p in sft_run.iterdir()) == ["checkpoints", "loss_curve.png", "metrics.jsonl", MODEL_SUBDIR, "run_config.json", "sft_metrics.json"]
    files = model_files(sft_run / MODEL_SUBDIR)
    assert files == sorted(p.name for p in (sft_run / MODEL_SUBDIR).iterdir())
    assert files == ["README.md", "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]

    calls = []

    class Recorder:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))

    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    push_to_hub(sft_run, "me/tiny-sft")
    assert calls[0] == ("create_repo", "me/tiny-sft", {"exist_ok": True})
    assert calls[1][1]["folder_path"] == str(sft_run / MODEL_SUBDIR) and calls[1][1]["allow_patterns"] == files


def test_push_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RlhfkitError, match="holds no model weights"):
        push_to_hub(tmp_path, "me/nothing")


def test_card_metadata_for_hub_models_and_rewards() -> None:
    text = card_text(title="ppo-fg", stage="ppo", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                     data=["runs/import/prompts.jsonl", "allenai/qa-feedback"], metrics={"steps": 10, "kl": 0.5},
                     rewards={"fact": ("0.5", "runs/rm-fact"), "rel": ("0.3", "runs/rm-rel")}, version="0.1.0")
    assert front_matter(text) == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "datasets": ["allenai/qa-feedback"],
                                  "library_name": "transformers", "tags": ["rlhfkit", "ppo", "rlhf", "fine-grained-rlhf"]}
    assert "| fact | 0.5 | `runs/rm-fact` |" in text and "| rel | 0.3 | `runs/rm-rel` |" in text
    assert "rlhfkit 0.1.0" in text and "| kl | 0.5 |" in text


def test_a_run_directory_resolves_to_its_model_folder(sft_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from rlhfkit.models import load_policy, resolve_model_path

    assert resolve_model_path(sft_run) == str(sft_run / MODEL_SUBDIR)
    assert resolve_model_path(sft_run / MODEL_SUBDIR) == str(sft_run / MODEL_SUBDIR)
    # init-model's output, and a run saved before models had their own folder: the model at the top.
    assert resolve_model_path(tiny_model_dir) == str(tiny_model_dir)
    old_run = tmp_path / "old-sft"
    shutil.copytree(tiny_model_dir, old_run)
    (old_run / "checkpoints").mkdir()
    assert resolve_model_path(old_run) == str(old_run)
    assert resolve_model_path("gpt2") == "gpt2"  # a hub id
    model, _, _ = load_policy(str(sft_run))
    assert type(model).__name__ == "GPT2LMHeadModel"
