"""`rlhfkit train-rm`: train a reward model for one feedback aspect (run_train_rm), one per
aspect of `--aspect a,b,c`, or with `--shared-backbone` one model with a head per aspect
(run_train_shared, rlhfkit.rewards.shared_backbone).

Three kinds (`--kind`, or the aspect's preset):

- `segment`: the Fine-Grained RLHF relevance / factuality RM. The response is cut into
  segments (sentences or sub-sentences, rlhfkit.segment); a token-classification head
  predicts, at the RM token that completes each segment, whether it has an error of the
  aspect. A segment is an error when an error span of the aspect overlaps it, in records
  whose annotator judged the aspect (so "no span" means "no error"); the QA-Feedback presets
  add the reference's two label rules (rlhfkit.segment.SegmentLabelRules: `--min-span-words`,
  `--ignore-segments-with`). `--error-class-weight` up-weights the rarer error class. Each
  segment earns `--positive-reward` or `--negative-reward` (+-1; the paper's +-0.3 relevance
  / +-0.5 factuality are the weights `ppo --rewards rel=0.3,fact=0.5` applies, once).
- `preference`: a sequence-level Bradley-Terry RM on (chosen, rejected) pairs; a tie is
  trained toward P = 1/2 (rlhfkit.rewards.losses; `--ties drop` leaves ties out). The mean
  and std of its scores on the training responses (or on `--normalize-on` responses, e.g.
  SFT samples, as the paper normalises its completeness RM) are stored with the model.
- `regression`: MSE on `score` records; on preference records the targets are chosen 1,
  rejected 0, and 0.5 for both sides of a tie.

Presets (the default task's, rlhfkit.tasks.qa_feedback) make `--aspect` alone enough:
factuality and relevance (segment: sentences, sub-sentences), completeness and preference
(preference; the shipped QA-Feedback sample has only holistic preferences, which
`--aspect completeness` trains on, saying so, when no preference names completeness). Any
other aspect works with an explicit `--kind` and the aspect name the records use.

The model input is the tokenizer pair (prompt, response) (rlhfkit.rewards.reward_model): a
prompt that does not fit loses tokens on `--truncation-side`; a record whose response alone
does not fit `--max-length` is left out and counted (its segment ends would be lost).

`--out` receives the model, `rlhfkit_rm.json` (what later stages need: aspect, kind,
granularity, rewards, normalisation, lengths, backbone), `rm_metrics.json`, run_config.json
and metrics.jsonl; `--eval-only` scores a saved RM (`--model`) on new labelled data.
rm_metrics.json holds the held-out metrics next to their trivial baselines with 95%
bootstrap intervals over held-out prompts, seeded by `--seed` (rlhfkit.rewards.scoring):
`beats_baseline` compares the point estimates, `beats_baseline_clearly` asks the interval's
lower end to be above the baseline (small held-out splits make small differences noise).

This module is the options and the run's steps; the parts are the core's: rlhfkit.rewards
(presets, data, losses, reward_model, shared_backbone, scoring) and rlhfkit.training.fit.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.chat import (
    APPLY_CHAT_TEMPLATE_HELP,
    load_chat_template,
    override_chat_template,
    render_record,
)
from rlhfkit.config import DEFAULT_SEED, REQUIRED, opt
from rlhfkit.console import console
from rlhfkit.distributed import (
    DEEPSPEED_HELP,
    OFFLOAD_OPTIMIZER_HELP,
    OFFLOAD_PARAMS_HELP,
    check_deepspeed_options,
    is_main_process,
)
from rlhfkit.errors import RlhfkitError
from rlhfkit.generation import model_max_positions
from rlhfkit.lengths import fit_default_lengths
from rlhfkit.model_card import PUSH_TO_HUB_HELP, finish_model, scalar_metrics
from rlhfkit.models import (
    ATTN_IMPLEMENTATION_HELP,
    GRADIENT_CHECKPOINTING_HELP,
    add_lora,
    check_attn_implementation,
    check_training_options,
    count_parameters,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from rlhfkit.rewards.data import (
    data_fingerprint,
    encode_training_examples,
    example_rows,
    load_aspect_records,
    make_collate,
    make_shared_collate,
    split_by_prompt,
)
from rlhfkit.rewards.losses import make_count_fn, make_loss_fn, make_shared_loss_fn
from rlhfkit.rewards.presets import (
    KINDS,
    AspectPreset,
    RMSettings,
    aspect_preset,
    resolve_settings,
    training_defaults,
)
from rlhfkit.rewards.reward_model import (
    SHARED_KIND,
    RewardModel,
    load_reward_model,
    new_reward_model,
    reward_model_spec,
    save_reward_model_weights,
    write_reward_model_spec,
)
from rlhfkit.rewards.scoring import (
    evaluate_reward_model,
    headline_metrics,
    held_out_entries,
    held_out_summary,
    score_normalization,
)
from rlhfkit.rewards.shared_backbone import (
    aspect_reward_models,
    new_multi_aspect_model,
    shared_spec,
)
from rlhfkit.runs import OVERWRITE_HELP, RunDir, set_seed
from rlhfkit.schema import Preference, ScalarScore, check_data_file
from rlhfkit.tasks import DEFAULT_TASK, TASK_PRESETS
from rlhfkit.tracking import REPORT_TO_HELP, parse_report_to
from rlhfkit.training import LoopSettings, fit, validate_loop_options
from rlhfkit.truncation import TRUNCATION_HELP, check_truncation_side

METRICS_FILE = "rm_metrics.json"
TIE_POLICIES = ("soft", "drop")
# Several aspects without --shared-backbone: each RM is written to OUT/<aspect>/, so the name
# must stay one path component inside OUT (no '/', no '..', not absolute, not hidden).
SAFE_DIRECTORY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
PRESETS = TASK_PRESETS[DEFAULT_TASK]  # what --aspect NAME alone means (rlhfkit.tasks.qa_feedback)
REGRESSION_SCORES = ("labels", "standardized")


@dataclass
class TrainRMConfig:
    aspect: str = opt(REQUIRED, f"Feedback aspect; presets: {', '.join(PRESETS)} (any other name needs --kind). Several, comma-separated (a,b,c): one RM per aspect, in OUT/<aspect>/, or one model with a head per aspect with --shared-backbone.", panel="Rewards")
    data: str = opt(REQUIRED, "Training (or, with --eval-only, evaluation) data: span_feedback, preference or score JSONL (with several aspects: the file of every aspect --data-for does not name).", panel="Data")
    data_for: list[str] = opt([], "Several aspects: ASPECT=FILE, the data of one aspect (repeatable), e.g. --data-for completeness=runs/import/preferences.jsonl.", panel="Data")
    shared_backbone: bool = opt(False, "Several aspects: train ONE model, a backbone with a head per aspect (segment or sequence), each aspect's loss on its own data; scores all aspects in one forward pass (ppo --rm fg=OUT --rewards fg.factuality=...).", panel="Model")
    aspect_weights: str | None = opt(None, "With --shared-backbone: loss weight of each aspect, comma-separated in --aspect order (default: 1 each).", panel="Rewards")
    model: str = opt(REQUIRED, "Backbone: a hub id or save_pretrained directory (causal LM or encoder); with --eval-only, a reward-model directory.", panel="Model")
    out: str = opt(REQUIRED, "Output directory: model/ (the reward model, rlhfkit_rm.json, model card), rm_metrics.json, checkpoints/.", panel="Output")
    kind: str | None = opt(None, f"Reward-model kind: {', '.join(KINDS)} (default: the aspect's preset).", panel="Rewards")
    granularity: str | None = opt(None, "Segment RMs: sentence, subsentence or step (one line each, for process reward models; default: the preset's, factuality sentence, relevance subsentence).", panel="Rewards")
    positive_reward: float | None = opt(None, "Segment RMs: reward of a segment judged fine (default 1; the paper's +0.3/+0.5 are the weights of `ppo --rewards rel=0.3,fact=0.5`).", panel="Rewards")
    negative_reward: float | None = opt(None, "Segment RMs: reward of a segment judged an error (default -1).", panel="Rewards")
    error_class_weight: float | None = opt(None, "Segment RMs: cross-entropy weight of the error class (no-error weighs 1; default: the preset's).", panel="Rewards")
    segment_pooling: str | None = opt(None, "Segment RMs: where a segment is judged. end: the logits of the token completing it (the default, one token per segment as the reference's marker token); mean: the logits averaged over all its tokens, which suits encoders pretrained for mean-pooled sentence embeddings (all-MiniLM-L6-v2 on QA-Feedback held-out records: relevance error AUC 0.655 vs 0.611 at the end token, factuality 0.764 vs 0.735; recipes/qa_feedback/README.md). Applies to the segment aspects; saved with the RM, which ppo and evaluate read.", panel="Rewards")
    min_span_words: int | None = opt(None, "Segment RMs: drop relevance spans (QA-Feedback presets; else spans of --aspect) shorter than this many words, as the reference does (default: the preset's, 5 for factuality/relevance; 0 keeps all).", panel="Data")
    ignore_segments_with: list[str] = opt(["preset"], "Segment RMs: leave out of training segments with an error of these other aspects and none of --aspect (the reference's rule for factuality: 'relevance'); 'none' labels them no-error; default: the preset's.", panel="Data")
    truncation_side: str = opt("right", TRUNCATION_HELP, panel="Data")
    ties: str = opt("soft", "Preference ties: soft (trained toward P = 1/2) or drop.", panel="Rewards")
    normalize_on: str | None = opt(None, "Preference RMs (and --regression-scores standardized): JSONL of responses (e.g. SFT samples) to compute the score mean/std on (default: the training responses).", panel="Data")
    regression_scores: str = opt(
        "labels",
        "Regression RMs: the units of the scores ppo and evaluate get. labels (default): the labels' own (a 0-4 "
        "HelpSteer2 attribute stays on 0-4); standardized: (score - mean) / std of the RM's scores on --normalize-on "
        "(else the training responses), as for preference RMs; a small spread (std 0.07 on one HelpSteer2 run) then "
        "multiplies every reward (there ~14x).",
        panel="Rewards",
    )
    eval_only: bool = opt(False, "Score the reward model at --model on --data and write rm_metrics.json; no training.", panel="Training")
    max_length: int | None = opt(None, "Longest prompt + response in RM tokens; the prompt is cut (--truncation-side), a response that does not fit is skipped (default: the preset's, else 1024).", panel="Training")
    max_prompt_length: int | None = opt(None, "Prompt tokens kept at most, cut on --truncation-side (0: as many as fit beside the response; default: the preset's, at most half of --max-length, else 0).", panel="Generation")
    epochs: int | None = opt(None, "Passes over the training split (default: the preset's, else 2).", panel="Training")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (overrides --epochs).", panel="Training")
    batch_size: int = opt(8, "Records (segment, regression) or prompts with all their comparisons (preference) per micro-batch.", panel="Training")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.", panel="Training")
    lr: float | None = opt(None, "Peak learning rate, AdamW (default: the preset's, else 5e-5; the presets' suit the tiny offline backbone, use 1e-5 to 5e-5 for a pretrained one).", panel="Training")
    lr_scheduler: str = opt("linear", "Decay after warm-up: linear, cosine, constant, constant_with_warmup.", panel="Training")
    warmup_ratio: float = opt(0.0, "Fraction of the steps with linear LR warm-up.", panel="Training")
    weight_decay: float = opt(0.0, "AdamW weight decay (not applied to biases and norms).", panel="Training")
    max_grad_norm: float = opt(1.0, "Gradient clipping max norm (0 = no clipping).", panel="Training")
    group_by_length: bool = opt(True, "Batch examples of similar length together (sorted within windows of 50 batches, the batches shuffled; seeded), so less of each batch is padding; the padding fraction is in metrics.jsonl and rm_metrics.json.", panel="Training")
    eval_fraction: float = opt(0.2, "Fraction of the prompts held out for metrics (0 = none); a prompt's records stay on one side.", panel="Data")
    eval_every: int = opt(0, "Evaluate every N steps (0 = before and after training only).", panel="Training")
    save_every: int = opt(0, "Checkpoint to out/checkpoints/step-N every N steps (0 = never).", panel="Output")
    keep_checkpoints: int = opt(2, "Newest checkpoints to keep (0 = all).", panel="Output")
    resume: bool = opt(False, "Continue from the latest checkpoint in --out (same data and batch options).", panel="Training")
    overwrite: bool = opt(False, OVERWRITE_HELP, panel="Output")
    lora_r: int = opt(0, "LoRA rank (0 = full fine-tuning); the saved RM has the adapter merged in.", panel="Model")
    lora_alpha: int = opt(16, "LoRA alpha.", panel="Model")
    lora_dropout: float = opt(0.05, "LoRA dropout.", panel="Model")
    lora_target_modules: list[str] = opt([], "Module names LoRA adapts, repeatable (default: peft's choice for the architecture).", panel="Model")
    dtype: str = opt("auto", "Compute dtype: auto (bf16 on supporting GPUs, fp32 on CPU), float32, bfloat16. Trained weights stay fp32.", panel="Model")
    device: str = opt("auto", "Device: auto, cpu, cuda, cuda:N.", panel="Distributed")
    trust_remote_code: bool = opt(False, "Allow model code from the hub repository.", panel="Model")
    seed: int = opt(DEFAULT_SEED, "Seed for the held-out split, data order, head initialisation and dropout.", panel="Training")
    gradient_checkpointing: bool = opt(False, GRADIENT_CHECKPOINTING_HELP, panel="Training")
    attn_implementation: str | None = opt(None, ATTN_IMPLEMENTATION_HELP, panel="Model")
    deepspeed: str | None = opt(None, DEEPSPEED_HELP, panel="Distributed")
    offload_optimizer: bool = opt(False, OFFLOAD_OPTIMIZER_HELP, panel="Distributed")
    offload_params: bool = opt(False, OFFLOAD_PARAMS_HELP, panel="Distributed")
    chat_template: str | None = opt(None, "Jinja chat template file for conversational records (default: the tokenizer's own, if any); saved with the RM.", panel="Model")
    report_to: list[str] = opt([], REPORT_TO_HELP, panel="Output")
    push_to_hub: str | None = opt(None, PUSH_TO_HUB_HELP + " Several aspects without --shared-backbone: to REPO-<aspect> each.", panel="Output")
    apply_chat_template: bool = opt(False, APPLY_CHAT_TEMPLATE_HELP + " Saved with the RM, so ppo and evaluate render prompts for it the same way.", panel="Data")

    def aspects(self) -> list[str]:
        return [name.strip() for name in self.aspect.split(",") if name.strip()]

    def data_files(self) -> dict[str, str]:
        """Each aspect's data file: its --data-for, else --data."""
        named: dict[str, str] = {}
        for item in self.data_for:
            aspect, sep, path = str(item).partition("=")
            if not sep or not aspect.strip() or not path.strip():
                raise RlhfkitError(f"--data-for {item!r} is not ASPECT=FILE (e.g. completeness=runs/import/preferences.jsonl)")
            if aspect.strip() in named:
                raise RlhfkitError(f"--data-for names {aspect.strip()!r} twice; give each aspect one file")
            named[aspect.strip()] = path.strip()
        stray = sorted(set(named) - set(self.aspects()))
        if stray:
            raise RlhfkitError(f"--data-for {', '.join(stray)}: not in --aspect {self.aspect}")
        return {aspect: named.get(aspect, self.data) for aspect in self.aspects()}

    def weights(self) -> dict[str, float]:
        """--aspect-weights by aspect (1 each when not given)."""
        names = self.aspects()
        if self.aspect_weights is None:
            return {name: 1.0 for name in names}
        parts = [part.strip() for part in self.aspect_weights.split(",")]
        if len(parts) != len(names):
            raise RlhfkitError(f"--aspect-weights gives {len(parts)} weight(s) for {len(names)} aspects ({', '.join(names)}); give one each, in that order")
        try:
            values = [float(part) for part in parts]
        except ValueError:
            raise RlhfkitError(f"--aspect-weights {self.aspect_weights!r}: not comma-separated numbers") from None
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise RlhfkitError(f"--aspect-weights must be finite numbers > 0, got {self.aspect_weights}")
        return dict(zip(names, values))

    def per_aspect(self) -> list[TrainRMConfig]:
        """`--aspect a,b,c`: one config per aspect (its --data-for file), each writing into OUT/<aspect>/."""
        files = self.data_files()
        configs = [
            dataclasses.replace(self, aspect=name, data=files[name], out=str(Path(self.out) / name), data_for=[], shared_backbone=False, aspect_weights=None,
                                push_to_hub=f"{self.push_to_hub}-{name}" if self.push_to_hub else None)
            for name in self.aspects()
        ]
        for one in configs:  # one --segment-pooling for several aspects applies to their segment RMs
            if one.segment_pooling is not None and not one.eval_only and one.preset().kind != "segment":
                one.segment_pooling = None
        return configs

    def check_segment_pooling_applies(self) -> None:
        """--segment-pooling given where no aspect trains a segment RM is an error, not ignored."""
        if self.segment_pooling is None or self.eval_only:
            return
        kinds = {name: dataclasses.replace(self, aspect=name, shared_backbone=False).preset().kind for name in self.aspects()}
        if "segment" not in kinds.values():
            shown = ", ".join(f"{name} is a {kind} RM" for name, kind in kinds.items())
            raise RlhfkitError(f"--segment-pooling applies to segment RMs only ({shown}); drop it")

    def check_data_for_files(self) -> None:
        for aspect, path in self.data_files().items():
            if path != self.data:
                check_data_file(path, f"--data-for {aspect}=")

    def validate(self) -> None:
        if self.shared_backbone:
            self.validate_shared()
            return
        if self.aspect_weights is not None:
            raise RlhfkitError("--aspect-weights weighs the aspects' losses of one model; add --shared-backbone")
        if len(self.aspects()) > 1:
            names = self.aspects()
            if len(set(names)) != len(names):
                raise RlhfkitError(f"--aspect {self.aspect!r} names an aspect twice")
            if self.eval_only or self.resume:
                raise RlhfkitError("--eval-only and --resume take one --aspect")
            unsafe = [name for name in names if not SAFE_DIRECTORY_NAME.fullmatch(name)]
            if unsafe:
                raise RlhfkitError(
                    f"--aspect {unsafe[0]!r}: each aspect's RM goes to OUT/<aspect>/, so an aspect name must be letters, "
                    "digits, '_', '-' and '.' (not first); or give --shared-backbone (one model)"
                )
            self.check_segment_pooling_applies()
            self.check_data_for_files()
            for one in self.per_aspect():
                one.validate()
            return
        if self.data_for:
            raise RlhfkitError("--data-for names the file of one of several aspects; with one --aspect use --data")
        check_deepspeed_options(self.deepspeed, self.offload_optimizer, self.offload_params)
        load_chat_template(self.chat_template)
        parse_report_to(self.report_to)
        if self.eval_only and self.deepspeed is not None:
            raise RlhfkitError("--eval-only scores in one process; drop --deepspeed")
        # Resolving the preset here fills the options left out, so run_config.json holds
        # the values actually used. --eval-only reads its lengths from the reward model.
        self.fill_defaults([AspectPreset(self.kind or "segment") if self.eval_only else self.preset()])
        if not self.eval_only:
            self.settings()
        validate_loop_options(self)
        if self.max_length < 2:
            raise RlhfkitError(f"--max-length must be >= 2, got {self.max_length}")
        if not 0 <= self.max_prompt_length < self.max_length:
            raise RlhfkitError(f"--max-prompt-length must be in [0, --max-length), got {self.max_prompt_length}")
        check_truncation_side(self.truncation_side)
        if not 0 <= self.eval_fraction < 1:
            raise RlhfkitError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.ties not in TIE_POLICIES:
            raise RlhfkitError(f"unknown --ties {self.ties!r}; valid: {', '.join(TIE_POLICIES)}")
        check_training_options(self.lora_r, self.lora_dropout, self.dtype)
        check_attn_implementation(self.attn_implementation, self.device)
        self.check_segment_pooling_applies()
        check_data_file(self.data, "--data")
        if self.normalize_on is not None:
            check_data_file(self.normalize_on, "--normalize-on")
        if self.regression_scores not in REGRESSION_SCORES:
            raise RlhfkitError(f"unknown --regression-scores {self.regression_scores!r}; valid: {', '.join(REGRESSION_SCORES)}")

    def validate_shared(self) -> None:
        """--shared-backbone: every aspect valid on its own, one set of lengths and training options.

        All aspects read one encoded input, so they share --max-length and
        --max-prompt-length; options left out take the largest of the aspects' presets
        (lengths, epochs) and the smallest learning rate.
        """
        names = self.aspects()
        if len(set(names)) != len(names):
            raise RlhfkitError(f"--aspect {self.aspect!r} names an aspect twice")
        if len(names) < 2:
            raise RlhfkitError("--shared-backbone trains one head per aspect; give several, e.g. --aspect factuality,relevance,completeness")
        self.check_segment_pooling_applies()
        self.check_data_for_files()
        bad = [n for n in names if not n.isidentifier()]
        if bad:
            raise RlhfkitError(f"--shared-backbone: aspect name(s) {', '.join(bad)} must be letters, digits and _ (they name heads and NAME.ASPECT rewards)")
        for option, value in (("--eval-only", self.eval_only), ("--resume", self.resume), ("--deepspeed", self.deepspeed), ("--lora-r", self.lora_r)):
            if value:
                raise RlhfkitError(f"{option} is not supported with --shared-backbone yet; train without it")
        self.weights()
        self.fill_defaults([dataclasses.replace(self, aspect=name, shared_backbone=False).preset() for name in names])
        for one in self.per_aspect():
            one.validate()

    def fill_defaults(self, presets: list[AspectPreset]) -> None:
        for name, value in training_defaults(presets, self.max_length).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def preset(self) -> AspectPreset:
        """The aspect's preset (the default task's, rlhfkit.tasks) for the requested kind."""
        return aspect_preset(PRESETS, self.aspect, self.kind)

    def settings(self) -> RMSettings:
        """The aspect's preset with this config's explicit options applied (validated)."""
        return resolve_settings(
            self.preset(), self.aspect, granularity=self.granularity, positive_reward=self.positive_reward,
            negative_reward=self.negative_reward, error_class_weight=self.error_class_weight,
            min_span_words=self.min_span_words, ignore_segments_with=self.ignore_segments_with,
            segment_pooling=self.segment_pooling,
        )


# --- the stage --------------------------------------------------------------------------------


def fit_preset_lengths(cfg: TrainRMConfig, limit: int | None) -> None:
    """--max-length left at the preset's, lowered to the backbone's positions (see rlhfkit.lengths);
    a --max-prompt-length left at the preset's follows it (at most half of --max-length)."""
    preset = cfg.preset()
    prompt_default = min(preset.max_prompt_length, cfg.max_length // 2)
    changed = fit_default_lengths(cfg, limit, ("max_length",), "train-rm", {"max_length": preset.max_length})
    if changed and cfg.max_prompt_length == prompt_default:
        cfg.max_prompt_length = min(preset.max_prompt_length, cfg.max_length // 2)


def start(cfg: TrainRMConfig) -> tuple[Any, Any, Any]:
    """(device, compute dtype, tokenizer with --chat-template), seeded: the first steps of every run."""
    device = resolve_device(cfg.device)
    compute_dtype = resolve_dtype(cfg.dtype, device)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, padding_side="right", trust_remote_code=cfg.trust_remote_code)
    override_chat_template(tokenizer, load_chat_template(cfg.chat_template))
    return device, compute_dtype, tokenizer


def check_positions(cfg: TrainRMConfig, limit: int | None) -> None:
    if limit is not None and cfg.max_length > limit:
        raise RlhfkitError(f"--max-length {cfg.max_length} exceeds the {limit} positions {cfg.model} allows; lower --max-length")


def training_summary(result, parameters) -> dict[str, Any]:
    """The training figures every rm_metrics.json carries (one RM or a shared backbone)."""
    return {
        "train_loss": result.final_epoch_loss,
        "train_seconds": result.train_seconds,
        "samples_per_second": result.samples_per_second,
        "padding_fraction": result.padding_fraction,
        "trainable_parameters": parameters.trainable,
        "total_parameters": parameters.total,
    }


def run_train_rm(cfg: TrainRMConfig) -> dict:
    """Train a reward model for one feedback aspect (segment, preference or regression).

    Segment RMs (factuality, relevance) predict an error per sentence / sub-sentence from span
    feedback; preference RMs are Bradley-Terry models on pairs; regression RMs fit scores.
    Writes the model with rlhfkit_rm.json (everything ppo/evaluate need to use it) and
    rm_metrics.json (held-out metrics beside their trivial baselines). Returns the metrics.
    Several aspects (`--aspect a,b,c`) train one RM each, into OUT/<aspect>/ (metrics by aspect),
    or, with --shared-backbone, one model with a head per aspect (run_train_shared).
    """
    if cfg.shared_backbone:
        return run_train_shared(cfg)
    if len(cfg.aspects()) > 1:
        configs = cfg.per_aspect()
        for one in configs:
            one.validate()  # fills the aspect's preset values, as for a single --aspect
            # Every aspect must have records before the first RM trains (a typo fails at once).
            load_aspect_records(one.data, one.aspect, one.settings(), one.ties)
        return {one.aspect: run_train_rm(one) for one in configs}
    if cfg.eval_only:
        return _evaluate_only(cfg)
    settings = cfg.settings()
    records = load_aspect_records(cfg.data, cfg.aspect, settings, cfg.ties)
    train_records, held_records = split_by_prompt(records, cfg.eval_fraction, cfg.seed)
    run = RunDir(Path(cfg.out), "train-rm", cfg, resume=cfg.resume)
    device, compute_dtype, tokenizer = start(cfg)
    train_records = [render_record(tokenizer, r, cfg.apply_chat_template) for r in train_records]
    held_records = [render_record(tokenizer, r, cfg.apply_chat_template) for r in held_records]
    fit_preset_lengths(cfg, model_max_positions(tokenizer))
    spec = reward_model_spec(
        cfg.aspect, settings, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length or None,
        truncation_side=cfg.truncation_side, backbone=cfg.model, trained_on=cfg.data,
        apply_chat_template=cfg.apply_chat_template,
    )
    train_examples, too_long = encode_training_examples(
        tokenizer, train_records, cfg.aspect, settings, max_length=cfg.max_length, max_prompt_length=spec["max_prompt_length"],
        truncation_side=cfg.truncation_side, source=cfg.data, label="train-rm:",
    )
    if settings.kind == "segment" and not any(any(e.labels) for e in train_examples):
        console.print(f"train-rm: note: no training segment has a {cfg.aspect} error; the RM can only learn 'no error'")

    # Full fine-tuning keeps fp32 master weights; a frozen LoRA base may use the compute dtype.
    model = new_reward_model(
        settings.kind, cfg.model, pad_token_id=tokenizer.pad_token_id, dtype=cfg.dtype if cfg.lora_r else "float32",
        device=str(device), trust_remote_code=cfg.trust_remote_code,
        gradient_checkpointing=cfg.gradient_checkpointing, attn_implementation=cfg.attn_implementation,
    )
    check_positions(cfg, model_max_positions(model))
    if cfg.lora_r:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules or None)
    parameters = count_parameters(model)
    rm = RewardModel(model, tokenizer, spec, device)
    console.print(
        f"train-rm: {cfg.aspect} ({settings.kind}"
        + (f", {settings.granularity}s" if settings.kind == "segment" else "")
        + f") on {cfg.model}, {parameters.trainable:,} of {parameters.total:,} parameters trained on {device}; "
        f"{len(train_examples)} training examples, {len(held_records)} held-out records",
        soft_wrap=True,
    )

    held_metrics: dict[str, Any] = {}

    def evaluate() -> dict[str, float]:
        # fit evaluates after the last step too, so held_metrics ends as the final model's.
        held_metrics.clear()
        held_metrics.update(evaluate_reward_model(rm, held_records, cfg.aspect, cfg.batch_size, cfg.seed,
                                                  training_mean=label_mean(train_records)))
        return headline_metrics(held_metrics)

    fingerprint = data_fingerprint([cfg.data], (cfg.aspect, settings, cfg.max_length, cfg.max_prompt_length, cfg.ties, cfg.eval_fraction))
    result = fit(
        model, train_examples, make_collate(settings.kind, tokenizer.pad_token_id),
        make_loss_fn(settings.kind, settings.error_class_weight, settings.segment_pooling), LoopSettings.from_config(cfg, compute_dtype), run,
        evaluate=evaluate if held_records else None, tokenizer=tokenizer, data_fingerprint=fingerprint,
        description=f"train-rm {cfg.aspect}", count_fn=make_count_fn(settings.kind),
        item_lengths=[example_rows(e) for e in train_examples],
    )

    model.eval()
    if settings.kind != "segment":
        spec["normalization"] = sequence_normalization(settings.kind, rm, train_records, cfg)
    saved = save_reward_model_weights(model, tokenizer, run.path)
    metrics = {
        "aspect": cfg.aspect, "kind": settings.kind, **held_out_entries(held_metrics), "steps": result.steps,
        "train_examples": len(train_examples), "train_records": len(train_records),
        "held_out_records": len(held_records), "train_records_too_long": too_long,
        **training_summary(result, parameters),
        "saved_model_class": type(saved).__name__, "resumed_from_step": result.resumed_from,
    }
    if settings.kind != "segment":
        ties = sum(1 for r in train_records if isinstance(r, Preference) and r.tie)
        metrics.update(normalization=spec["normalization"], ties=cfg.ties, train_ties=ties)
    run.write_json(METRICS_FILE, metrics)
    write_reward_model_spec(run.path, spec)
    if is_main_process():
        finish_model(run.path, cfg.push_to_hub, title=run.path.name, stage="train-rm", base_model=cfg.model, data=[cfg.data],
                     rewards={cfg.aspect: (f"{settings.kind} reward model", "this model")},
                     metrics={**scalar_metrics(metrics, ["steps", "train_loss"]), **scalar_metrics(held_metrics, list(held_metrics), "held-out ")})
    run.close()
    console.print(f"train-rm: {held_out_summary(held_metrics)}; reward model saved to {run.path}", soft_wrap=True)
    return metrics


def label_mean(records: list) -> float | None:
    """The mean of the training records' score labels (a regression RM's baseline), if any."""
    scores = [r.score for r in records if isinstance(r, ScalarScore)]
    return sum(scores) / len(scores) if scores else None


def sequence_normalization(kind: str, rm: RewardModel, train_records: list, cfg: TrainRMConfig) -> dict[str, Any]:
    """What a sequence RM's saved scores are: a regression RM's in its labels' units unless
    --regression-scores standardized; a preference RM's standardised (its logits' scale is
    arbitrary; the paper normalises its completeness RM on SFT samples)."""
    if kind == "regression" and cfg.regression_scores == "labels":
        return {"mean": 0.0, "std": 1.0, "computed_on": None, "units": "labels"}
    return score_normalization(rm, train_records, cfg.normalize_on, cfg.batch_size)


def run_train_shared(cfg: TrainRMConfig) -> dict:
    """`--shared-backbone`: one backbone with a head per aspect, each aspect's loss on its own data.

    Every micro-batch holds examples of one aspect (fit's item groups); the epoch's batches
    of all aspects are shuffled together, so the aspects alternate at random, each in
    proportion to its number of batches, and every optimizer step of --grad-accum batches
    may mix them. The held-out split of each aspect is the one a separate RM of that aspect
    makes (same records, same seed), so rm_metrics.json can be read beside separate RMs'.
    """
    cfg.validate_shared()
    configs = {one.aspect: one for one in cfg.per_aspect()}
    data = {aspect: one.data for aspect, one in configs.items()}
    weights = cfg.weights()
    settings = {aspect: one.settings() for aspect, one in configs.items()}
    kinds = {aspect: s.kind for aspect, s in settings.items()}
    records = {aspect: load_aspect_records(data[aspect], aspect, settings[aspect], cfg.ties) for aspect in configs}
    splits = {aspect: split_by_prompt(rs, cfg.eval_fraction, cfg.seed) for aspect, rs in records.items()}
    run = RunDir(Path(cfg.out), "train-rm", cfg)
    device, compute_dtype, tokenizer = start(cfg)
    train_records = {a: [render_record(tokenizer, r, cfg.apply_chat_template) for r in split[0]] for a, split in splits.items()}
    held_records = {a: [render_record(tokenizer, r, cfg.apply_chat_template) for r in split[1]] for a, split in splits.items()}
    check_positions(cfg, model_max_positions(tokenizer))

    items: list[tuple[str, Any]] = []
    counts: dict[str, dict[str, int]] = {}
    for aspect, rs in train_records.items():
        examples, too_long = encode_training_examples(
            tokenizer, rs, aspect, settings[aspect], max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length or None,
            truncation_side=cfg.truncation_side, source=data[aspect], label=f"train-rm: {aspect}:",
        )
        items += [(aspect, e) for e in examples]
        counts[aspect] = {"train_examples": len(examples), "train_records": len(rs), "train_records_too_long": too_long, "held_out_records": len(held_records[aspect])}

    model = new_multi_aspect_model(
        kinds, cfg.model, device=device, trust_remote_code=cfg.trust_remote_code,
        gradient_checkpointing=cfg.gradient_checkpointing, attn_implementation=cfg.attn_implementation,
    )
    parameters = count_parameters(model)
    spec = shared_spec(
        settings, weights, data, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length or None,
        truncation_side=cfg.truncation_side, backbone=cfg.model, causal=model.causal,
        apply_chat_template=cfg.apply_chat_template,
    )
    console.print(
        f"train-rm: {', '.join(f'{a} ({k})' for a, k in kinds.items())} on one {cfg.model} backbone, "
        f"{parameters.trainable:,} parameters trained on {device}; "
        + ", ".join(f"{a} {c['train_examples']} training examples" for a, c in counts.items()),
        soft_wrap=True,
    )

    held_metrics: dict[str, dict[str, Any]] = {}

    def evaluate() -> dict[str, float]:
        held_metrics.clear()
        summary = {}
        for aspect, rm in aspect_reward_models(model, tokenizer, spec, device).items():
            if held_records[aspect]:
                held_metrics[aspect] = evaluate_reward_model(rm, held_records[aspect], aspect, cfg.batch_size, cfg.seed,
                                                             training_mean=label_mean(train_records[aspect]))
                summary.update({f"{aspect}_{k}": v for k, v in headline_metrics(held_metrics[aspect]).items()})
        model.train()
        return summary

    fingerprint = data_fingerprint(
        list(data.values()), (cfg.aspect, settings, weights, cfg.max_length, cfg.max_prompt_length, cfg.ties, cfg.eval_fraction)
    )
    result = fit(
        model, items, make_shared_collate(kinds, tokenizer.pad_token_id),
        make_shared_loss_fn(
            kinds, weights, {a: s.error_class_weight for a, s in settings.items()},
            {a: s.segment_pooling for a, s in settings.items()},
        ),
        LoopSettings.from_config(cfg, compute_dtype), run, evaluate=evaluate if any(held_records.values()) else None,
        tokenizer=tokenizer, data_fingerprint=fingerprint, description=f"train-rm {cfg.aspect}", count_fn=lambda batch: 1,
        item_lengths=[example_rows(e) for _, e in items], item_groups=[aspect for aspect, _ in items],
    )

    model.eval()
    for aspect, rm in aspect_reward_models(model, tokenizer, spec, device).items():
        if kinds[aspect] != "segment":
            spec["aspects"][aspect]["normalization"] = sequence_normalization(kinds[aspect], rm, train_records[aspect], cfg)
    save_reward_model_weights(model, tokenizer, run.path)
    per_aspect = {
        aspect: {
            "kind": kinds[aspect], "weight": weights[aspect], **held_out_entries(held_metrics.get(aspect, {})), **counts[aspect],
            **({"normalization": spec["aspects"][aspect]["normalization"]} if kinds[aspect] != "segment" else {}),
        }
        for aspect in kinds
    }
    metrics = {
        "aspect": cfg.aspect, "kind": SHARED_KIND, "shared_backbone": True, "aspects": per_aspect, "steps": result.steps,
        **training_summary(result, parameters),
    }
    run.write_json(METRICS_FILE, metrics)
    write_reward_model_spec(run.path, spec)
    if is_main_process():
        finish_model(run.path, cfg.push_to_hub, title=run.path.name, stage="train-rm", base_model=cfg.model,
                     data=[cfg.data, *(path for _, path in (item.partition("=")[::2] for item in cfg.data_for))],
                     rewards={aspect: (f"{weights[aspect]} ({kinds[aspect]})", "shared backbone, own head") for aspect in kinds},
                     metrics={**scalar_metrics(metrics, ["steps", "train_loss"]),
                              **{f"{aspect} held-out {key}": value for aspect in kinds
                                 for key, value in scalar_metrics(held_metrics.get(aspect, {}), list(held_metrics.get(aspect, {}))).items()}})
    run.close()
    for aspect in kinds:
        console.print(f"train-rm: {aspect}: {held_out_summary(held_metrics.get(aspect, {}))}", soft_wrap=True)
    console.print(f"train-rm: shared-backbone reward model of {len(kinds)} aspects saved to {run.path}", soft_wrap=True)
    return metrics


def _evaluate_only(cfg: TrainRMConfig) -> dict:
    run = RunDir(cfg.out, "train-rm", cfg)
    rm = load_reward_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    granularity = rm.spec.get("granularity", "response")
    settings = RMSettings(rm.kind, granularity, 0.0, 0.0, 1.0, PRESETS.get(cfg.aspect, AspectPreset(rm.kind)).holistic_fallback)
    if cfg.kind is not None and cfg.kind != rm.kind:
        raise RlhfkitError(f"--kind {cfg.kind} but {cfg.model} is a {rm.kind} reward model")
    if rm.aspect != cfg.aspect:
        console.print(f"train-rm: note: {cfg.model} was trained for aspect {rm.aspect!r}; evaluating against {cfg.aspect!r} labels")
    records = load_aspect_records(cfg.data, cfg.aspect, settings, cfg.ties)
    held_metrics = evaluate_reward_model(rm, records, cfg.aspect, cfg.batch_size, cfg.seed)
    run.log_metrics(**{f"eval_{k}": v for k, v in held_metrics.items()})
    metrics = {"aspect": cfg.aspect, "kind": rm.kind, "reward_model": cfg.model, "eval_only": True, **held_out_entries(held_metrics)}
    run.write_json(METRICS_FILE, metrics)
    run.close()
    console.print(f"train-rm --eval-only: {held_out_summary(held_metrics)}", soft_wrap=True)
    return metrics
