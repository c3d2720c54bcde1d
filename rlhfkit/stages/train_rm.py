"""`rlhfkit train-rm`: train one reward model for one feedback aspect (or, with
`--shared-backbone`, one model with a head per aspect: run_train_shared, rlhfkit.rewards.shared_backbone).

Three kinds (`--kind`, or the aspect's preset):

- `segment`: the Fine-Grained RLHF relevance / factuality RM. The response is cut into
  segments (sentences or sub-sentences, rlhfkit.segment); a token-classification head reads
  prompt + response and predicts, at the RM token that completes each segment, whether the
  segment has an error of the aspect. Training labels come from span feedback: a segment is
  an error when an error span of the aspect overlaps it. Only records whose annotator judged
  the aspect (`SpanFeedback.aspects`) are used, so "no span" really means "no error". The
  QA-Feedback presets add the reference's two rules (rlhfkit.segment.SegmentLabelRules):
  relevance spans under 5 words are dropped, and the factuality RM leaves out sentences with
  a relevance error and no factuality error (`--min-span-words`, `--ignore-segments-with`).
  Cross-entropy is taken at those positions only; `--error-class-weight` up-weights the
  rarer error class. At inference each segment earns `--positive-reward` or
  `--negative-reward` (+-1; the paper's +-0.3 relevance / +-0.5 factuality are the weights
  `ppo --rewards rel=0.3,fact=0.5` applies, once).
- `preference`: a sequence-level Bradley-Terry RM on (chosen, rejected) pairs,
  loss -log sigmoid(r_c - r_r - margin). A tie ("no preference") is trained toward the
  Bradley-Terry probability 1/2 either way: loss -(log sigmoid(d) + log sigmoid(-d)) / 2,
  which is smallest at r_c = r_r (`--ties drop` leaves ties out instead). The mean and std
  of its scores on the training responses (or on `--normalize-on` responses, e.g. SFT
  samples, as the paper normalises its completeness RM) are stored with the model.
- `regression`: a scalar score regressed with MSE on `score` records; given preference
  records instead, the targets are chosen 1, rejected 0, and 0.5 for both sides of a tie.

Presets (the default task's, rlhfkit.tasks.qa_feedback) make `--aspect` alone enough:
factuality (segment, sentences; QA-Feedback labels Wrong-Grounding and Unverifiable),
relevance (segment, sub-sentences; Irrelevant, Redundant, Incoherent), completeness and
preference (preference kind). The shipped QA-Feedback sample has only holistic preferences
(aspect "preference"), so `--aspect completeness` trains on those when no preference names
completeness, and says so. Any other aspect works with an explicit `--kind` and the aspect
name the records use.

The model input is the tokenizer pair (prompt, response) (see rlhfkit.rewards.reward_model):
a prompt longer than `--max-length` loses tokens from its left; a record whose response
alone does not fit is left out and counted (its segment ends would be lost).

`--out` receives the model (save_pretrained + tokenizer), `rlhfkit_rm.json` (what later
stages need: aspect, kind, granularity, rewards, normalisation, max_length, backbone),
`rm_metrics.json` (held-out metrics next to their trivial baselines), run_config.json and
metrics.jsonl. `--eval-only` scores a saved RM (`--model`) on new labelled data.

Small held-out splits make small differences noise, so rm_metrics.json also holds 95%
bootstrap intervals over held-out prompts (segment RMs: accuracy minus the majority
baseline, and error AUC; preference RMs: pairwise accuracy), seeded by `--seed`.
`beats_baseline` compares the point estimates; `beats_baseline_clearly` asks the interval's
lower end to be above the baseline.

This module is the options and the run; the parts live in the core: rlhfkit.rewards.data
(records, split, encoding, collate), rlhfkit.rewards.losses, rlhfkit.rewards.scoring
(held-out metrics, normalisation), rlhfkit.metrics (the statistics and intervals).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from rlhfkit.chat import load_chat_template, override_chat_template, render_record
from rlhfkit.config import REQUIRED, opt
from rlhfkit.console import console
from rlhfkit.distributed import (
    DEEPSPEED_HELP,
    OFFLOAD_OPTIMIZER_HELP,
    OFFLOAD_PARAMS_HELP,
    check_deepspeed_options,
    full_parameters,
    is_main_process,
)
from rlhfkit.errors import RlhfkitError
from rlhfkit.generation import model_max_positions
from rlhfkit.io import write_json
from rlhfkit.lengths import fit_default_lengths
from rlhfkit.metrics import beats_baseline, beats_baseline_clearly, interval_verdict
from rlhfkit.models import (
    DTYPES,
    add_lora,
    count_parameters,
    load_pretrained,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    save_model,
)
from rlhfkit.rewards.data import (
    encode_examples,
    example_rows,
    load_aspect_records,
    make_collate,
    responses_of,
    split_by_prompt,
)
from rlhfkit.rewards.losses import make_count_fn, make_loss_fn, make_shared_loss_fn
from rlhfkit.rewards.presets import AspectPreset, RMSettings
from rlhfkit.rewards.reward_model import (
    KINDS,
    SEGMENT_LABELS,
    SPEC_FILE,
    SPEC_FORMAT,
    EncodedPair,
    RewardModel,
    encode_pair,
    load_reward_model,
    reward_model_class,
)
from rlhfkit.rewards.scoring import evaluate_reward_model, score_statistics
from rlhfkit.runs import OVERWRITE_HELP, RunDir, set_seed
from rlhfkit.schema import Preference, load_records
from rlhfkit.segment import SEGMENT_RM_GRANULARITIES, SegmentLabelRules
from rlhfkit.tasks import DEFAULT_TASK, TASK_PRESETS
from rlhfkit.tracking import REPORT_TO_HELP, parse_report_to
from rlhfkit.training import LoopSettings, fit, validate_loop_options
from rlhfkit.truncation import TRUNCATION_HELP, check_truncation_side

METRICS_FILE = "rm_metrics.json"
TIE_POLICIES = ("soft", "drop")
PRESETS = TASK_PRESETS[DEFAULT_TASK]  # what --aspect NAME alone means (rlhfkit.tasks.qa_feedback)


@dataclass
class TrainRMConfig:
    aspect: str = opt(REQUIRED, f"Feedback aspect; presets: {', '.join(PRESETS)} (any other name needs --kind). Several, comma-separated (a,b,c): one RM per aspect, in OUT/<aspect>/, or one model with a head per aspect with --shared-backbone.")
    data: str = opt(REQUIRED, "Training (or, with --eval-only, evaluation) data: span_feedback, preference or score JSONL (with several aspects: the file of every aspect --data-for does not name).")
    data_for: list[str] = opt([], "Several aspects: ASPECT=FILE, the data of one aspect (repeatable), e.g. --data-for completeness=runs/import/preferences.jsonl.")
    shared_backbone: bool = opt(False, "Several aspects: train ONE model, a backbone with a head per aspect (segment or sequence), each aspect's loss on its own data; scores all aspects in one forward pass (ppo --rm fg=OUT --rewards fg.factuality=...).")
    aspect_weights: str | None = opt(None, "With --shared-backbone: loss weight of each aspect, comma-separated in --aspect order (default: 1 each).")
    model: str = opt(REQUIRED, "Backbone: a hub id or save_pretrained directory (causal LM or encoder); with --eval-only, a reward-model directory.")
    out: str = opt(REQUIRED, "Output directory: the reward model, rlhfkit_rm.json, rm_metrics.json, checkpoints/.")
    kind: str | None = opt(None, f"Reward-model kind: {', '.join(KINDS)} (default: the aspect's preset).")
    granularity: str | None = opt(None, "Segment RMs: sentence, subsentence or step (one line each, for process reward models; default: the preset's, factuality sentence, relevance subsentence).")
    positive_reward: float | None = opt(None, "Segment RMs: reward of a segment judged fine (default 1; the paper's +0.3/+0.5 are the weights of `ppo --rewards rel=0.3,fact=0.5`).")
    negative_reward: float | None = opt(None, "Segment RMs: reward of a segment judged an error (default -1).")
    error_class_weight: float | None = opt(None, "Segment RMs: cross-entropy weight of the error class (no-error weighs 1; default: the preset's).")
    min_span_words: int | None = opt(None, "Segment RMs: drop relevance spans (QA-Feedback presets; else spans of --aspect) shorter than this many words, as the reference does (default: the preset's, 5 for factuality/relevance; 0 keeps all).")
    ignore_segments_with: list[str] = opt(["preset"], "Segment RMs: leave out of training segments with an error of these other aspects and none of --aspect (the reference's rule for factuality: 'relevance'); 'none' labels them no-error; default: the preset's.")
    truncation_side: str = opt("right", TRUNCATION_HELP)
    ties: str = opt("soft", "Preference ties: soft (trained toward P = 1/2) or drop.")
    normalize_on: str | None = opt(None, "Sequence RMs: JSONL of responses (e.g. SFT samples) to compute the score mean/std on (default: the training responses).")
    eval_only: bool = opt(False, "Score the reward model at --model on --data and write rm_metrics.json; no training.")
    max_length: int | None = opt(None, "Longest prompt + response in RM tokens; the prompt is cut (--truncation-side), a response that does not fit is skipped (default: the preset's, else 1024).")
    max_prompt_length: int | None = opt(None, "Prompt tokens kept at most, cut on --truncation-side (0: as many as fit beside the response; default: the preset's, at most half of --max-length, else 0).")
    epochs: int | None = opt(None, "Passes over the training split (default: the preset's, else 2).")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (overrides --epochs).")
    batch_size: int = opt(8, "Records (segment, regression) or prompts with all their comparisons (preference) per micro-batch.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    lr: float | None = opt(None, "Peak learning rate, AdamW (default: the preset's, else 5e-5; the presets' suit the tiny offline backbone, use 1e-5 to 5e-5 for a pretrained one).")
    lr_scheduler: str = opt("linear", "Decay after warm-up: linear, cosine, constant, constant_with_warmup.")
    warmup_ratio: float = opt(0.0, "Fraction of the steps with linear LR warm-up.")
    weight_decay: float = opt(0.0, "AdamW weight decay (not applied to biases and norms).")
    max_grad_norm: float = opt(1.0, "Gradient clipping max norm (0 = no clipping).")
    group_by_length: bool = opt(True, "Batch examples of similar length together (sorted within windows of 50 batches, the batches shuffled; seeded), so less of each batch is padding; the padding fraction is in metrics.jsonl and rm_metrics.json.")
    eval_fraction: float = opt(0.2, "Fraction of the prompts held out for metrics (0 = none); a prompt's records stay on one side.")
    eval_every: int = opt(0, "Evaluate every N steps (0 = before and after training only).")
    save_every: int = opt(0, "Checkpoint to out/checkpoints/step-N every N steps (0 = never).")
    keep_checkpoints: int = opt(2, "Newest checkpoints to keep (0 = all).")
    resume: bool = opt(False, "Continue from the latest checkpoint in --out (same data and batch options).")
    overwrite: bool = opt(False, OVERWRITE_HELP)
    lora_r: int = opt(0, "LoRA rank (0 = full fine-tuning); the saved RM has the adapter merged in.")
    lora_alpha: int = opt(16, "LoRA alpha.")
    lora_dropout: float = opt(0.05, "LoRA dropout.")
    lora_target_modules: list[str] = opt([], "Module names LoRA adapts, repeatable (default: peft's choice for the architecture).")
    dtype: str = opt("auto", "Compute dtype: auto (bf16 on supporting GPUs, fp32 on CPU), float32, bfloat16. Trained weights stay fp32.")
    device: str = opt("auto", "Device: auto, cpu, cuda, cuda:N.")
    trust_remote_code: bool = opt(False, "Allow model code from the hub repository.")
    seed: int = opt(42, "Seed for the held-out split, data order, head initialisation and dropout.")
    deepspeed: str | None = opt(None, DEEPSPEED_HELP)
    offload_optimizer: bool = opt(False, OFFLOAD_OPTIMIZER_HELP)
    offload_params: bool = opt(False, OFFLOAD_PARAMS_HELP)
    chat_template: str | None = opt(None, "Jinja chat template file for conversational records (default: the tokenizer's own, if any); saved with the RM.")
    report_to: list[str] = opt([], REPORT_TO_HELP)

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
        return [
            dataclasses.replace(self, aspect=name, data=files[name], out=str(Path(self.out) / name), data_for=[], shared_backbone=False, aspect_weights=None)
            for name in self.aspects()
        ]

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
        preset = AspectPreset(self.kind or "segment") if self.eval_only else self.preset()
        for name in ("max_length", "lr", "epochs"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(preset, name))
        if self.max_prompt_length is None:
            self.max_prompt_length = min(preset.max_prompt_length, self.max_length // 2)
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
        if self.lora_r < 0:
            raise RlhfkitError(f"--lora-r must be >= 0, got {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            raise RlhfkitError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.dtype == "float16":
            raise RlhfkitError("--dtype float16 is not supported for training (no loss scaling); use bfloat16 or float32")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise RlhfkitError(f"unknown --dtype {self.dtype!r}; valid: auto, float32, bfloat16")
        if not Path(self.data).is_file():
            raise RlhfkitError(f"--data {self.data}: no such file")
        if self.normalize_on is not None and not Path(self.normalize_on).is_file():
            raise RlhfkitError(f"--normalize-on {self.normalize_on}: no such file")

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
        bad = [n for n in names if not n.isidentifier()]
        if bad:
            raise RlhfkitError(f"--shared-backbone: aspect name(s) {', '.join(bad)} must be letters, digits and _ (they name heads and NAME.ASPECT rewards)")
        for option, value in (("--eval-only", self.eval_only), ("--resume", self.resume), ("--deepspeed", self.deepspeed), ("--lora-r", self.lora_r)):
            if value:
                raise RlhfkitError(f"{option} is not supported with --shared-backbone yet; train without it")
        self.weights()
        presets = [dataclasses.replace(self, aspect=name, shared_backbone=False).preset() for name in names]
        if self.max_length is None:
            self.max_length = max(p.max_length for p in presets)
        if self.max_prompt_length is None:
            self.max_prompt_length = max(min(p.max_prompt_length, self.max_length // 2) for p in presets)
        if self.lr is None:
            self.lr = min(p.lr for p in presets)
        if self.epochs is None:
            self.epochs = max(p.epochs for p in presets)
        for one in self.per_aspect():
            one.validate()

    def preset(self) -> AspectPreset:
        """The aspect's preset (the default task's, rlhfkit.tasks) for the requested kind (a
        preset of another kind does not apply)."""
        preset = PRESETS.get(self.aspect)
        if self.kind is None and preset is None:
            close = get_close_matches(self.aspect, list(PRESETS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RlhfkitError(
                f"--aspect {self.aspect!r} has no preset{hint}; give --kind ({', '.join(KINDS)}) "
                f"or use a preset aspect: {', '.join(PRESETS)}"
            )
        kind = self.kind or preset.kind
        if kind not in KINDS:
            raise RlhfkitError(f"unknown --kind {kind!r}; valid: {', '.join(KINDS)}")
        if preset is not None and preset.kind == kind:
            return preset
        return AspectPreset(kind, "sentence" if kind == "segment" else "response")

    def settings(self) -> RMSettings:
        """The aspect's preset with this config's explicit options applied (validated)."""
        preset = self.preset()
        kind = preset.kind
        granularity = self.granularity or preset.granularity
        if kind == "segment" and granularity not in SEGMENT_RM_GRANULARITIES:
            raise RlhfkitError(f"--granularity for a segment RM must be {' or '.join(SEGMENT_RM_GRANULARITIES)}, got {granularity!r}")
        if kind != "segment" and self.granularity not in (None, "response"):
            raise RlhfkitError(f"--granularity applies to segment RMs only; a {kind} RM scores the whole response")
        positive = preset.positive_reward if self.positive_reward is None else self.positive_reward
        negative = preset.negative_reward if self.negative_reward is None else self.negative_reward
        if kind == "segment" and not negative < positive:
            raise RlhfkitError(f"--negative-reward ({negative}) must be below --positive-reward ({positive})")
        weight = preset.error_class_weight if self.error_class_weight is None else self.error_class_weight
        if not weight > 0:
            raise RlhfkitError(f"--error-class-weight must be > 0, got {weight}")
        min_words = preset.min_span_words if self.min_span_words is None else self.min_span_words
        if min_words < 0:
            raise RlhfkitError(f"--min-span-words must be >= 0, got {min_words}")
        ignore = [a for item in self.ignore_segments_with for a in str(item).split(",") if a.strip()]
        if ignore == ["preset"]:
            ignore_with = preset.ignore_with_aspects
        elif ignore == ["none"]:
            ignore_with = ()
        else:
            ignore_with = tuple(a.strip() for a in ignore)
        rules = SegmentLabelRules(
            min_words, preset.min_span_aspects if preset.min_span_aspects else (self.aspect,), ignore_with
        )
        return RMSettings(kind, granularity, positive, negative, weight, preset.holistic_fallback, rules)


def _fingerprint(path: str, cfg: TrainRMConfig, settings: RMSettings) -> str:
    digest = hashlib.sha256(Path(path).read_bytes())
    digest.update(repr((cfg.aspect, settings, cfg.max_length, cfg.max_prompt_length, cfg.ties, cfg.eval_fraction)).encode())
    return digest.hexdigest()


# --- the stage --------------------------------------------------------------------------------


def fit_preset_lengths(cfg: TrainRMConfig, limit: int | None) -> None:
    """--max-length left at the preset's, lowered to the backbone's positions (see rlhfkit.lengths);
    a --max-prompt-length left at the preset's follows it (at most half of --max-length)."""
    preset = cfg.preset()
    prompt_default = min(preset.max_prompt_length, cfg.max_length // 2)
    changed = fit_default_lengths(cfg, limit, ("max_length",), "train-rm", {"max_length": preset.max_length})
    if changed and cfg.max_prompt_length == prompt_default:
        cfg.max_prompt_length = min(preset.max_prompt_length, cfg.max_length // 2)


def kind_spec(settings: RMSettings) -> dict[str, Any]:
    """What rlhfkit_rm.json holds for the RM's kind: a segment RM's rewards and label rules,
    a sequence RM's score normalisation (identity until training is done)."""
    if settings.kind == "segment":
        return {
            "positive_reward": settings.positive_reward, "negative_reward": settings.negative_reward,
            "error_class_weight": settings.error_class_weight, "label_rules": settings.label_rules.to_dict(),
        }
    return {"normalization": {"mean": 0.0, "std": 1.0, "computed_on": None}}


def normalization(rm: RewardModel, train_records: list, cfg: TrainRMConfig) -> dict[str, Any]:
    """A sequence RM's score mean/std on the --normalize-on responses, else the training responses."""
    if cfg.normalize_on:
        pairs, computed_on = responses_of(load_records(cfg.normalize_on)), cfg.normalize_on
    else:
        pairs, computed_on = responses_of(train_records), "training responses"
    return {**score_statistics(rm, pairs, cfg.batch_size), "computed_on": computed_on}


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
    out = Path(cfg.out)
    run = RunDir(out, "train-rm", cfg, resume=cfg.resume)

    device = resolve_device(cfg.device)
    compute_dtype = resolve_dtype(cfg.dtype, device)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, padding_side="right", trust_remote_code=cfg.trust_remote_code)
    override_chat_template(tokenizer, load_chat_template(cfg.chat_template))
    train_records = [render_record(tokenizer, r) for r in train_records]
    held_records = [render_record(tokenizer, r) for r in held_records]
    fit_preset_lengths(cfg, model_max_positions(tokenizer))
    spec: dict[str, Any] = {
        "format": SPEC_FORMAT,
        "aspect": cfg.aspect,
        "kind": settings.kind,
        "granularity": settings.granularity,
        "max_length": cfg.max_length,
        "max_prompt_length": cfg.max_prompt_length or None,
        "truncation_side": cfg.truncation_side,
        "backbone": cfg.model,
        "trained_on": cfg.data,
    }
    spec.update(kind_spec(settings))

    def encode(prompt: str, response: str) -> EncodedPair | None:
        return encode_pair(tokenizer, prompt, response, cfg.max_length, spec["max_prompt_length"], cfg.truncation_side)

    train_examples, too_long = encode_examples(encode, train_records, cfg.aspect, settings)
    if too_long:
        console.print(
            f"train-rm: {too_long} training record(s) have a response longer than --max-length {cfg.max_length} "
            "tokens and are left out (the response is never cut; raise --max-length to keep them)",
            soft_wrap=True,
        )
    if not train_examples:
        raise RlhfkitError(f"{cfg.data}: no training record fits --max-length {cfg.max_length}")
    if settings.kind == "segment" and not any(any(e.labels) for e in train_examples):
        console.print(f"train-rm: note: no training segment has a {cfg.aspect} error; the RM can only learn 'no error'")

    labels = {"num_labels": 2, "id2label": SEGMENT_LABELS, "label2id": {v: k for k, v in SEGMENT_LABELS.items()}} if settings.kind == "segment" else {"num_labels": 1}
    # Full fine-tuning keeps fp32 master weights; a frozen LoRA base may use the compute dtype.
    model = load_pretrained(
        reward_model_class(settings.kind),
        cfg.model,
        dtype=cfg.dtype if cfg.lora_r else "float32",
        device=str(device),
        trust_remote_code=cfg.trust_remote_code,
        **labels,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    limit = model_max_positions(model)
    if limit is not None and cfg.max_length > limit:
        raise RlhfkitError(f"--max-length {cfg.max_length} exceeds the {limit} positions {cfg.model} allows; lower --max-length")
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
        held_metrics.update(evaluate_reward_model(rm, held_records, cfg.aspect, cfg.batch_size, cfg.seed))
        keys = ("accuracy", "error_f1", "error_auc", "pairwise_accuracy", "mse")
        return {k: held_metrics[k] for k in keys if k in held_metrics}

    result = fit(
        model,
        train_examples,
        make_collate(settings.kind, tokenizer.pad_token_id),
        make_loss_fn(settings.kind, settings.error_class_weight),
        LoopSettings.from_config(cfg, compute_dtype),
        run,
        evaluate=evaluate if held_records else None,
        tokenizer=tokenizer,
        data_fingerprint=_fingerprint(cfg.data, cfg, settings),
        description=f"train-rm {cfg.aspect}",
        count_fn=make_count_fn(settings.kind),
        item_lengths=[example_rows(e) for e in train_examples],
    )

    model.eval()
    if settings.kind != "segment":
        spec["normalization"] = normalization(rm, train_records, cfg)

    main = is_main_process()
    # A stale spec beside weights being replaced would make a half-trained directory look usable.
    if main:
        (out / SPEC_FILE).unlink(missing_ok=True)
    with full_parameters(model):  # gathered from the ZeRO-3 shards: every process enters
        saved = save_model(model, tokenizer, out, merge_lora=True) if main else model
    metrics = {
        "aspect": cfg.aspect,
        "kind": settings.kind,
        "held_out": held_metrics,
        "beats_baseline": beats_baseline(held_metrics),
        "beats_baseline_clearly": beats_baseline_clearly(held_metrics),
        "steps": result.steps,
        "train_examples": len(train_examples),
        "train_records": len(train_records),
        "held_out_records": len(held_records),
        "train_records_too_long": too_long,
        **training_summary(result, parameters),
        "saved_model_class": type(saved).__name__,
        "resumed_from_step": result.resumed_from,
    }
    if settings.kind != "segment":
        metrics["normalization"] = spec["normalization"]
        metrics["ties"] = cfg.ties
        metrics["train_ties"] = sum(1 for r in train_records if isinstance(r, Preference) and r.tie)
    run.write_json(METRICS_FILE, metrics)
    # Written last: a directory with rlhfkit_rm.json is a complete reward model.
    if main:
        write_json(out / SPEC_FILE, spec)
    run.close()
    console.print(f"train-rm: {_summary(held_metrics)}; reward model saved to {out}", soft_wrap=True)
    return metrics


def run_train_shared(cfg: TrainRMConfig) -> dict:
    """`--shared-backbone`: one backbone with a head per aspect, each aspect's loss on its own data.

    Every micro-batch holds examples of one aspect (fit's item groups); the epoch's batches
    of all aspects are shuffled together, so the aspects alternate at random, each in
    proportion to its number of batches, and every optimizer step of --grad-accum batches
    may mix them. The held-out split of each aspect is the one a separate RM of that aspect
    makes (same records, same seed), so rm_metrics.json can be read beside separate RMs'.
    """
    from transformers import AutoModel

    from rlhfkit.rewards.shared_backbone import (
        HEADS_FILE,
        SHARED_KIND,
        AspectRewardModel,
        MultiAspectRewardModel,
        SharedBackboneScorer,
    )

    cfg.validate_shared()
    configs = {one.aspect: one for one in cfg.per_aspect()}
    weights = cfg.weights()
    settings = {aspect: one.settings() for aspect, one in configs.items()}
    kinds = {aspect: s.kind for aspect, s in settings.items()}
    records = {aspect: load_aspect_records(one.data, aspect, settings[aspect], cfg.ties) for aspect, one in configs.items()}
    splits = {aspect: split_by_prompt(rs, cfg.eval_fraction, cfg.seed) for aspect, rs in records.items()}
    out = Path(cfg.out)
    run = RunDir(out, "train-rm", cfg)

    device = resolve_device(cfg.device)
    compute_dtype = resolve_dtype(cfg.dtype, device)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, padding_side="right", trust_remote_code=cfg.trust_remote_code)
    override_chat_template(tokenizer, load_chat_template(cfg.chat_template))
    train_records = {a: [render_record(tokenizer, r) for r in split[0]] for a, split in splits.items()}
    held_records = {a: [render_record(tokenizer, r) for r in split[1]] for a, split in splits.items()}
    limit = model_max_positions(tokenizer)
    if limit is not None and cfg.max_length > limit:
        raise RlhfkitError(f"--max-length {cfg.max_length} exceeds the {limit} positions {cfg.model} allows; lower --max-length")
    max_prompt_length = cfg.max_prompt_length or None

    def encode(prompt: str, response: str) -> EncodedPair | None:
        return encode_pair(tokenizer, prompt, response, cfg.max_length, max_prompt_length, cfg.truncation_side)

    items: list[tuple[str, Any]] = []
    counts: dict[str, dict[str, int]] = {}
    for aspect, rs in train_records.items():
        examples, too_long = encode_examples(encode, rs, aspect, settings[aspect])
        if not examples:
            raise RlhfkitError(f"{configs[aspect].data}: no {aspect} training record fits --max-length {cfg.max_length}")
        if too_long:
            console.print(f"train-rm: {aspect}: {too_long} training record(s) do not fit --max-length {cfg.max_length} and are left out", soft_wrap=True)
        items += [(aspect, e) for e in examples]
        counts[aspect] = {"train_examples": len(examples), "train_records": len(rs), "train_records_too_long": too_long, "held_out_records": len(held_records[aspect])}

    backbone = load_pretrained(AutoModel, cfg.model, dtype="float32", device=str(device), trust_remote_code=cfg.trust_remote_code)
    model = MultiAspectRewardModel(backbone, kinds).to(device)
    parameters = count_parameters(model)
    spec: dict[str, Any] = {
        "format": SPEC_FORMAT,
        "kind": SHARED_KIND,
        "aspect": ",".join(configs),
        "max_length": cfg.max_length,
        "max_prompt_length": max_prompt_length,
        "truncation_side": cfg.truncation_side,
        "backbone": cfg.model,
        "reads": "last_token" if model.causal else "first_token",
        "heads_file": HEADS_FILE,
        "aspects": {},
    }
    for aspect, s in settings.items():
        spec["aspects"][aspect] = {"kind": s.kind, "granularity": s.granularity, "weight": weights[aspect],
                                   "trained_on": configs[aspect].data, **kind_spec(s)}
    console.print(
        f"train-rm: {', '.join(f'{a} ({k})' for a, k in kinds.items())} on one {cfg.model} backbone, "
        f"{parameters.trainable:,} parameters trained on {device}; "
        + ", ".join(f"{a} {c['train_examples']} training examples" for a, c in counts.items()),
        soft_wrap=True,
    )

    def views() -> dict[str, RewardModel]:
        # A fresh scorer: the weights change between evaluations, so nothing cached may be reused.
        scorer = SharedBackboneScorer(model)
        return {aspect: AspectRewardModel(scorer, aspect, tokenizer, spec, device) for aspect in kinds}

    held_metrics: dict[str, dict[str, Any]] = {}

    def evaluate() -> dict[str, float]:
        held_metrics.clear()
        keys = ("accuracy", "error_f1", "error_auc", "pairwise_accuracy", "mse")
        summary = {}
        for aspect, rm in views().items():
            if held_records[aspect]:
                held_metrics[aspect] = evaluate_reward_model(rm, held_records[aspect], aspect, cfg.batch_size, cfg.seed)
                summary.update({f"{aspect}_{k}": held_metrics[aspect][k] for k in keys if k in held_metrics[aspect]})
        model.train()
        return summary

    collates = {aspect: make_collate(kind, tokenizer.pad_token_id) for aspect, kind in kinds.items()}

    def collate(batch_items: list) -> dict:
        aspect = batch_items[0][0]
        return {**collates[aspect]([example for _, example in batch_items]), "aspect": aspect}

    digest = hashlib.sha256()
    for path in dict.fromkeys(one.data for one in configs.values()):
        digest.update(Path(path).read_bytes())
    digest.update(repr((cfg.aspect, settings, weights, cfg.max_length, cfg.max_prompt_length, cfg.ties, cfg.eval_fraction)).encode())
    has_held = any(held_records.values())
    result = fit(
        model,
        items,
        collate,
        make_shared_loss_fn(kinds, weights, {a: s.error_class_weight for a, s in settings.items()}),
        LoopSettings.from_config(cfg, compute_dtype),
        run,
        evaluate=evaluate if has_held else None,
        tokenizer=tokenizer,
        data_fingerprint=digest.hexdigest(),
        description=f"train-rm {cfg.aspect}",
        count_fn=lambda batch: 1,
        item_lengths=[example_rows(e) for _, e in items],
        item_groups=[aspect for aspect, _ in items],
    )

    model.eval()
    scoring = views()
    for aspect, s in settings.items():
        if s.kind != "segment":
            spec["aspects"][aspect]["normalization"] = normalization(scoring[aspect], train_records[aspect], cfg)

    (out / SPEC_FILE).unlink(missing_ok=True)
    save_model(model, tokenizer, out, merge_lora=False)
    per_aspect = {
        aspect: {
            "kind": kinds[aspect],
            "weight": weights[aspect],
            "held_out": held_metrics.get(aspect, {}),
            "beats_baseline": beats_baseline(held_metrics.get(aspect, {})),
            "beats_baseline_clearly": beats_baseline_clearly(held_metrics.get(aspect, {})),
            **counts[aspect],
            **({"normalization": spec["aspects"][aspect]["normalization"]} if kinds[aspect] != "segment" else {}),
        }
        for aspect in kinds
    }
    metrics = {
        "aspect": cfg.aspect,
        "kind": SHARED_KIND,
        "shared_backbone": True,
        "aspects": per_aspect,
        "steps": result.steps,
        **training_summary(result, parameters),
    }
    run.write_json(METRICS_FILE, metrics)
    write_json(out / SPEC_FILE, spec)  # last: a directory with rlhfkit_rm.json is a complete reward model
    run.close()
    for aspect in kinds:
        console.print(f"train-rm: {aspect}: {_summary(held_metrics.get(aspect, {}))}", soft_wrap=True)
    console.print(f"train-rm: shared-backbone reward model of {len(kinds)} aspects saved to {out}", soft_wrap=True)
    return metrics


def _summary(metrics: dict[str, Any]) -> str:
    if "majority_baseline_accuracy" in metrics:
        difference = metrics["accuracy_minus_baseline_ci95"]
        auc = metrics["error_auc_ci95"]
        return (
            f"held-out segment accuracy {metrics['accuracy']:.4f} (majority baseline "
            f"{metrics['majority_baseline_accuracy']:.4f}; "
            + (f"difference 95% CI [{difference[0]:+.3f}, {difference[1]:+.3f}]: " if difference else "")
            + f"{interval_verdict(difference, 0.0)}), error F1 {metrics['error_f1']:.4f}, "
            f"error AUC {metrics['error_auc']:.4f}"
            + (f" (95% CI [{auc[0]:.3f}, {auc[1]:.3f}])" if auc else "")
            + f"; intervals over {metrics['bootstrap_prompts']} prompts"
        )
    if "pairwise_accuracy" in metrics:
        interval = metrics["pairwise_accuracy_ci95"]
        return (
            f"held-out pairwise accuracy {metrics['pairwise_accuracy']:.4f} on {metrics['pairs']} pairs "
            f"of {metrics['bootstrap_prompts']} prompts (baseline 0.5; "
            + (f"95% CI [{interval[0]:.3f}, {interval[1]:.3f}]: " if interval else "")
            + f"{interval_verdict(interval, metrics['pairwise_baseline_accuracy'])})"
        )
    if "mse" in metrics:
        return f"held-out MSE {metrics['mse']:.4f} (predicting the mean: {metrics['mean_baseline_mse']:.4f})"
    return "no held-out data"


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
    metrics = {
        "aspect": cfg.aspect,
        "kind": rm.kind,
        "reward_model": cfg.model,
        "eval_only": True,
        "held_out": held_metrics,
        "beats_baseline": beats_baseline(held_metrics),
        "beats_baseline_clearly": beats_baseline_clearly(held_metrics),
    }
    run.write_json(METRICS_FILE, metrics)
    run.close()
    console.print(f"train-rm --eval-only: {_summary(held_metrics)}", soft_wrap=True)
    return metrics
