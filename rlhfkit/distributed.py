"""The seam between the training stages and data parallelism: DeepSpeed configuration,
the collectives, and the learners a training loop steps.

`rlhfkit launch` starts a stage once per GPU under the `deepspeed` launcher, which gives
every process RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in its environment.
A stage then calls `init_distributed()` and works on `shard(items, rank, world_size)` of its
data; every collective here is a no-op in a single process, and a training loop calls a
`Learner` (`backward`, `step`, `loss_scale`) that is plain PyTorch in one process and a
DeepSpeed engine (`DeepSpeedLearner`) under `--deepspeed`, so the same stage code runs
unchanged with and without the launcher.

The DeepSpeed JSON is generated from the stage's own options (`deepspeed_config`), so the
batch size, accumulation, clipping and precision DeepSpeed uses can never disagree with the
ones the stage validated and logged; a user JSON can add or change anything else.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from rlhfkit.errors import RlhfkitError
from rlhfkit.schema import read_json_file

ZERO_PRESETS = {"zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3}
DTYPES = ("float32", "bfloat16", "float16")
# The keys DeepSpeed derives the global batch from; a user JSON may not contradict them.
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
# Bytes of optimizer state per parameter, besides the fp32 master weights of mixed precision.
OPTIMIZER_STATE_BYTES = {"adam": 8, "sgd": 4}  # Adam: momentum + variance; SGD: momentum (fp32)

T = TypeVar("T")


class DeepSpeedOption(NamedTuple):
    """What a stage's `--deepspeed` value asks for."""

    zero_stage: int
    user_config: str | None  # a JSON whose keys override the generated config


def resolve_deepspeed_option(value: str) -> DeepSpeedOption:
    """`zero0`..`zero3` → that ZeRO stage; a path to a .json file → a user config (ZeRO stage
    from the file, 0 if it has none)."""
    if value in ZERO_PRESETS:
        return DeepSpeedOption(ZERO_PRESETS[value], None)
    if value.endswith(".json"):
        if not Path(value).is_file():
            raise RlhfkitError(f"--deepspeed: {value}: file not found")
        return DeepSpeedOption(0, value)
    raise RlhfkitError(
        f"--deepspeed must be one of {', '.join(ZERO_PRESETS)} or a path to a DeepSpeed .json file, got '{value}'"
    )


def deepspeed_config(
    *,
    zero_stage: int,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    dtype: str,
    max_grad_norm: float,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    user_config: str | None = None,
) -> dict:
    """The DeepSpeed config for a stage's options, with `user_config` (a JSON path) merged over it.

    The user JSON wins key by key (nested sections are merged, not replaced); a value of
    "auto" keeps the generated one. A batch key that contradicts the stage's options is an
    error, because the stage sized its data loading and learning-rate schedule from them.
    """
    user = _read_user_config(user_config) if user_config is not None else {}
    # The JSON's own ZeRO stage decides which stage-specific settings are generated.
    user_zero = user.get("zero_optimization", {})
    if not isinstance(user_zero, dict):
        raise RlhfkitError(f"{user_config}: zero_optimization must be a JSON object")
    zero_stage = user_zero.get("stage", zero_stage)
    if zero_stage not in ZERO_PRESETS.values():
        raise RlhfkitError(f"ZeRO stage must be 0, 1, 2 or 3, got {zero_stage}")
    if dtype not in DTYPES:
        raise RlhfkitError(f"DeepSpeed dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    _check_offload(zero_stage, offload_optimizer, offload_params)

    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage >= 2:
        zero.update(overlap_comm=True, contiguous_gradients=True)
    if zero_stage == 3:
        # Without this, saving under ZeRO-3 writes each rank's empty placeholder tensors
        # instead of the full 16-bit weights that from_pretrained can load.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}

    generated = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": max_grad_norm,
        "bf16": {"enabled": dtype == "bfloat16"},
        # loss_scale 0 = dynamic loss scaling, the only safe choice without tuning.
        "fp16": {"enabled": dtype == "float16", "loss_scale": 0},
        "zero_optimization": zero,
        # The stage logs its own metrics; DeepSpeed's periodic prints would interleave them.
        "steps_per_print": 2**31 - 1,
    }
    if user_config is None:
        return generated
    for key in BATCH_KEYS:
        if key in user and user[key] != "auto" and user[key] != generated[key]:
            raise RlhfkitError(
                f"{user_config}: {key} is {user[key]} but the stage's options give {generated[key]} "
                f"(micro batch {micro_batch_size} x grad accum {grad_accum} x {world_size} processes); "
                f"remove {key} from the JSON or change the stage's options"
            )
    return _merge(generated, user, user_config)


def _check_offload(zero_stage: int, offload_optimizer: bool, offload_params: bool) -> None:
    if offload_optimizer and zero_stage == 0:
        raise RlhfkitError("optimizer offload needs ZeRO stage 1, 2 or 3 (e.g. --deepspeed zero2)")
    if offload_params and zero_stage != 3:
        raise RlhfkitError("parameter offload needs ZeRO stage 3 (--deepspeed zero3)")


def _read_user_config(path: str) -> dict:
    if not Path(path).is_file():
        raise RlhfkitError(f"{path}: DeepSpeed config not found")
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise RlhfkitError(f"{path}: a DeepSpeed config must be a JSON object")
    return data


def _merge(base: dict, override: dict, source: str, prefix: str = "") -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if value == "auto":
            # "auto" is the HF Trainer convention for "fill from the training options";
            # DeepSpeed itself cannot read it, so only keys generated here can be auto.
            if key not in base:
                raise RlhfkitError(
                    f"{source}: '{prefix}{key}' is \"auto\" but rlhfkit does not generate it; give a value"
                )
            continue
        if isinstance(value, dict):
            section = base.get(key) if isinstance(base.get(key), dict) else {}
            merged[key] = _merge(section, value, source, f"{prefix}{key}.")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def zero_memory_per_gpu(
    n_params: float,
    world_size: int,
    zero_stage: int,
    dtype_bytes: int = 2,
    optimizer: str = "adam",
    offload: bool = False,
) -> dict[str, float]:
    """Model-state memory per GPU in bytes, as in the ZeRO paper (Rajbhandari et al. 2020, §5).

    With Ψ parameters in 16-bit mixed precision, a GPU holds 2Ψ of parameters, 2Ψ of
    gradients and KΨ of optimizer state, K = 12 for Adam (fp32 master weights, momentum,
    variance). Stage 1 shards the optimizer state over the N GPUs, stage 2 also the
    gradients, stage 3 also the parameters. In fp32 (`dtype_bytes=4`) there is no separate
    master copy. `offload` (ZeRO-Offload) keeps the optimizer state, still sharded, in CPU
    memory instead: it is reported under "cpu_optimizer_states" and not in "total".
    Activations, buffers and fragmentation come on top.
    """
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise RlhfkitError(f"optimizer must be one of {', '.join(OPTIMIZER_STATE_BYTES)}, got '{optimizer}'")
    if zero_stage not in ZERO_PRESETS.values():
        raise RlhfkitError(f"ZeRO stage must be 0, 1, 2 or 3, got {zero_stage}")
    master_weights = 4 if dtype_bytes < 4 else 0
    per_param_optimizer = OPTIMIZER_STATE_BYTES[optimizer] + master_weights
    params = dtype_bytes * n_params / (world_size if zero_stage >= 3 else 1)
    grads = dtype_bytes * n_params / (world_size if zero_stage >= 2 else 1)
    optimizer_states = per_param_optimizer * n_params / (world_size if zero_stage >= 1 else 1)
    on_gpu_optimizer = 0.0 if offload else optimizer_states
    return {
        "params": params,
        "grads": grads,
        "optimizer_states": on_gpu_optimizer,
        "cpu_optimizer_states": optimizer_states if offload else 0.0,
        "total": params + grads + on_gpu_optimizer,
    }


def world_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment; (0, 0, 1) without one."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("LOCAL_RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
    )


def is_main_process() -> bool:
    """Rank 0: the process that writes run files, checkpoints and progress bars."""
    return world_info()[0] == 0


def init_distributed(backend: str | None = None) -> None:
    """Join the process group the launcher set up (gloo on CPU, nccl on CUDA by default).

    A no-op in a single process, so stages can always call it.
    """
    rank, local_rank, world_size = world_info()
    if world_size == 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        # nccl needs each process bound to its own GPU before the first collective.
        torch.cuda.set_device(local_rank)
    import deepspeed  # slow to import (~seconds) and only needed with several processes

    deepspeed.init_distributed(
        dist_backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"),
        verbose=rank == 0,
    )


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where a tensor handed to a collective must live: this process's GPU under NCCL (which
    cannot reduce CPU tensors), the CPU under gloo."""
    if _distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum `tensor` over all processes and return the sum (`tensor` itself in one process).

    The tensor is moved to `collective_device()` first, so a caller holding statistics on
    another device (reward-source outputs live on the CPU, the model's on its GPU) cannot
    hand NCCL a CPU tensor; the sum is returned on the collective device. Matches
    rlhfkit.rl.advantages' `all_reduce` hook (a collective: every rank must call it with the
    same shape in the same order).
    """
    if _distributed():
        tensor = tensor.to(collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait until every process gets here (e.g. rank 0 finished writing a file the others read)."""
    if _distributed():
        dist.barrier()


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's contiguous block of `items`.

    Block sizes differ by at most one (the first len(items) % world_size ranks get one
    more), so every item is in exactly one shard and concatenating the shards in rank order
    gives `items` back in order, which is how per-rank outputs are put together. Shards can
    differ in length by one: a loop that runs a collective per batch must run the same
    number of batches on every rank.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    return list(items[start : start + base + (1 if rank < extra else 0)])


# --- DeepSpeed engines: the part of the stages' training that `--deepspeed` switches on --------

# The option help of the training stages (sft, train-rm, ppo), so the three say the same.
DEEPSPEED_HELP = (
    "Train data-parallel in a DeepSpeed engine: zero0..zero3 (ZeRO stage) or a DeepSpeed JSON whose keys override "
    "the config generated from this stage's options. Start several processes with `rlhfkit launch`."
)
OFFLOAD_OPTIMIZER_HELP = "With --deepspeed zero1-3: keep the optimizer state in CPU memory (ZeRO-Offload)."
OFFLOAD_PARAMS_HELP = "With --deepspeed zero3: keep the parameters in CPU memory between uses (ZeRO-Infinity)."


def require_deepspeed():
    """The deepspeed module, or one clear error when it is not installed."""
    try:
        import deepspeed
    except ImportError:
        raise RlhfkitError("--deepspeed needs the deepspeed package, which is not installed here: pip install deepspeed") from None
    return deepspeed


def check_deepspeed_options(deepspeed: str | None, offload_optimizer: bool, offload_params: bool) -> None:
    """Validate a stage's --deepspeed / --offload-* options against each other and the launcher.

    Several processes without --deepspeed would each train their own copy of the model on
    their own shard, so that is an error rather than a silent N-fold waste.
    """
    world_size = world_info()[2]
    if deepspeed is None:
        if offload_optimizer or offload_params:
            raise RlhfkitError("--offload-optimizer and --offload-params need --deepspeed (zero1-3 and zero3 respectively)")
        if world_size > 1:
            raise RlhfkitError(
                f"this is one of {world_size} processes (WORLD_SIZE={world_size}) but --deepspeed is not set, so each "
                "would train its own copy; add --deepspeed zero2 (or zero1, zero3)"
            )
        return
    # The JSON's batch keys are checked when the engine is built.
    _check_offload(deepspeed_zero_stage(deepspeed), offload_optimizer, offload_params)


def deepspeed_zero_stage(deepspeed: str) -> int:
    """The ZeRO stage of a --deepspeed value (a JSON's own stage where it gives one)."""
    zero_stage, user_config = resolve_deepspeed_option(deepspeed)
    if user_config is not None:
        zero_stage = _read_user_config(user_config).get("zero_optimization", {}).get("stage", zero_stage)
    return zero_stage


def check_zero3_accumulation(zero_stage: int, grad_accum: int, instead: str) -> None:
    """Refuse ZeRO-3 with gradient accumulation, which loses gradients here.

    The ZeRO-3 optimizer counts micro-batches in the engine's forward, and the stages run the
    engine's module instead, so each micro-batch's gradient replaces the one before it
    (measured with DeepSpeed 0.19.8 on 2 processes: half the one-process gradient norm for
    2 accumulated micro-batches). `instead` says what to use.
    """
    if zero_stage == 3 and grad_accum > 1:
        raise RlhfkitError(f"--deepspeed zero3 with --grad-accum > 1 is not supported yet; {instead}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def stage_deepspeed_config(
    deepspeed: str,
    *,
    micro_batch_size: int,
    grad_accum: int,
    dtype: torch.dtype,
    max_grad_norm: float,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> dict:
    """The DeepSpeed config of a stage's `--deepspeed VALUE` with its batch, precision and clipping."""
    zero_stage, user_config = resolve_deepspeed_option(deepspeed)
    return deepspeed_config(
        zero_stage=zero_stage,
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        world_size=world_info()[2],
        dtype=dtype_name(dtype),
        max_grad_norm=max_grad_norm,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        user_config=user_config,
    )


def _join_process_group() -> None:
    """init_distributed, and a one-process group when no launcher started this process
    (DeepSpeed needs a process group even for one process)."""
    from rlhfkit.console import console

    console.quiet = not is_main_process()  # in case RANK was set after rlhfkit.console was imported
    init_distributed()
    if dist.is_initialized():
        return
    # DeepSpeed's engine refuses to start without LOCAL_RANK, which a launcher sets: this
    # process is rank 0 of 1 (`sft --deepspeed zero2` on one GPU, no launcher).
    os.environ.setdefault("LOCAL_RANK", "0")
    with socket.socket() as sock:  # a free local port for the one-process rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group(
        "nccl" if torch.cuda.is_available() else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )


def deepspeed_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """Wrap a trained model and its optimizer in a DeepSpeed engine (data parallel + ZeRO).

    The stage's own optimizer is used (ZeRO shards its state), so the optimizer, weight decay
    groups and learning-rate schedule are the same with and without DeepSpeed; the stage
    keeps stepping its scheduler itself.
    """
    deepspeed = require_deepspeed()
    _join_process_group()
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def deepspeed_inference_module(model: torch.nn.Module, config: dict) -> torch.nn.Module:
    """A frozen model (PPO's reference) for inference under DeepSpeed.

    Under ZeRO-3 its parameters are sharded over the processes like the trained models'
    (an engine without optimizer: forward only); under ZeRO 0-2 each process keeps a plain
    eval copy, since sharding only pays off where the trained models' are sharded too.
    """
    model.eval().requires_grad_(False)
    if config["zero_optimization"]["stage"] != 3:
        return model
    deepspeed = require_deepspeed()
    _join_process_group()
    inference_config = {k: v for k, v in config.items() if k != "gradient_clipping"}
    zero = dict(inference_config["zero_optimization"])
    zero.pop("offload_optimizer", None)  # no optimizer to offload
    inference_config["zero_optimization"] = zero
    engine, *_ = deepspeed.initialize(model=model, config=inference_config)
    return engine.module


def is_zero3_partitioned(model: torch.nn.Module) -> bool:
    """Whether ZeRO-3 holds `model`'s parameters as shards (a process sees placeholders)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def full_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block every process sees `model`'s full parameters (gathered from the
    ZeRO-3 shards; changes are not written back). A no-op for unsharded models.

    A collective under ZeRO-3: every process must enter it, even those that only wait for
    rank 0 to save.
    """
    if not is_zero3_partitioned(model):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield


def all_gather_objects(obj: Any) -> list[Any]:
    """`obj` of every process, in rank order ([obj] in a single process)."""
    if not _distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


# --- the training seam: the calls a training loop makes, the same with and without DeepSpeed ---


class Learner:
    """One trained model's optimizer, learning-rate schedule and gradient clipping, in one process.

    A training loop backpropagates every micro-batch of a step (`backward`, or
    `backward_together` for models whose losses share a graph) and then calls `step`: the
    gradient norm is taken and clipped, the optimizer and the schedule step, the gradients
    are cleared. `DeepSpeedLearner` answers the same calls with a DeepSpeed engine, so the
    loop reads the same on one process or many; what differs is said where it differs:

    - `loss_scale(count, global_count)`: what a loss that is a mean over `count` of the
      step's `global_count` terms (tokens, items; of all processes) is multiplied by before
      `backward`, so that the step's gradient is the mean over all of them;
    - `reduces_in_backward`: whether `backward` already reduces the gradients over the
      processes (DeepSpeed), so that a loss's normaliser must be known before it; in one
      process the summed gradients can instead be divided at `step(grad_divisor=...)`.
    """

    reduces_in_backward = False

    def __init__(self, params, optimizer: torch.optim.Optimizer, scheduler: Any, max_grad_norm: float):
        self.params = list(params)
        self.optimizer = optimizer
        self.scheduler = scheduler
        # 0 means no clipping, as DeepSpeed's gradient_clipping reads it (the norm is still taken).
        self.max_grad_norm = max_grad_norm if max_grad_norm > 0 else math.inf
        self.device = self.params[0].device

    @property
    def engines(self) -> list:
        """The DeepSpeed engines whose checkpoints hold this learner's optimizer state (none here)."""
        return []

    def loss_scale(self, count: float, global_count: float) -> float:
        return count / max(global_count, 1.0)

    def backward(self, loss: Tensor, *, last: bool = True) -> None:
        """Accumulate the gradient of `loss`; `last`: the step's last micro-batch (see DeepSpeedLearner)."""
        loss.backward()

    def step(self, *, grad_divisor: float | None = None, skip_nonfinite: bool = False) -> float:
        """Apply the accumulated gradient; returns its norm before clipping.

        `grad_divisor` divides the gradient first (the count a summed loss is normalised by,
        when it is known only after the backward). With `skip_nonfinite` a NaN/inf norm
        leaves the model and the schedule as they were (the caller then stops).
        """
        if grad_divisor is not None:
            torch._foreach_div_([p.grad for p in self.params if p.grad is not None], grad_divisor)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        if math.isfinite(grad_norm) or not skip_nonfinite:
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm


class DeepSpeedLearner(Learner):
    """A Learner whose model and optimizer train in a DeepSpeed engine (data parallel + ZeRO).

    The engine clips (its `gradient_clipping`, from the stage's max grad norm) and steps the
    stage's optimizer; the stage's learning-rate schedule is stepped here, as in one process.
    """

    reduces_in_backward = True

    def __init__(self, engine: Any, scheduler: Any):
        self.engine = engine
        self.scheduler = scheduler
        self.device = engine.device

    @property
    def engines(self) -> list:
        return [self.engine]

    def loss_scale(self, count: float, global_count: float) -> float:
        # DeepSpeed averages the processes' gradients (divides their sum by the number of
        # processes), so each process's share is multiplied by that number to give the sum.
        return count * world_info()[2] / max(global_count, 1.0)

    def backward(self, loss: Tensor, *, last: bool = True) -> None:
        # The boundary is set explicitly, not by the engine's micro-step counter: a step can
        # have fewer micro-batches than gradient_accumulation_steps (an epoch's last).
        # scale_wrt_gas=False: the caller's loss_scale already normalises the loss.
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, *, grad_divisor: float | None = None, skip_nonfinite: bool = False) -> float:
        """The engine's step; returns the global gradient norm before clipping (NaN where the
        engine does not report it). The engine has taken its step before the norm is known, so
        `skip_nonfinite` cannot hold a bad step back here."""
        if grad_divisor is not None:
            raise ValueError("the gradients are reduced during backward: scale the loss with loss_scale instead")
        if self.engine.zero_optimization_stage() == 0:
            # Without ZeRO, DeepSpeed clips but does not report the norm; the gradients are
            # already averaged over the processes here, so this is the global norm.
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            grad_norm = float(torch.nn.utils.get_total_norm(grads))
            self.engine.step()
        else:
            self.engine.step()
            reported = self.engine.get_global_grad_norm()
            grad_norm = float("nan") if reported is None else float(reported)
        if self.scheduler is not None:
            self.scheduler.step()
        return grad_norm


def backward_together(losses: Sequence[tuple[Learner, Tensor]], *, last: bool = True) -> None:
    """Backpropagate the losses of several learners for one micro-batch.

    In one process they are summed and backpropagated once: they may share a graph (PPO's
    value head on the policy's trunk). A DeepSpeed engine backpropagates its own loss, since
    it reduces its own gradients in that backward.
    """
    if any(learner.reduces_in_backward for learner, _ in losses):
        for learner, loss in losses:
            learner.backward(loss, last=last)
        return
    total = losses[0][1]
    for _, loss in losses[1:]:
        total = total + loss
    total.backward()


def sum_over_processes(value: Tensor) -> float:
    """A scalar summed over all processes, in float64."""
    return all_reduce_sum(value.double().reshape(1)).item()


def mean_over_processes(values: Tensor) -> float:
    """The mean of per-item values (e.g. one per rollout) over the items of all processes.

    The count is made on the values' own device (a CPU count stacked with GPU values fails),
    and all_reduce_sum moves the pair to the collective's device."""
    if world_info()[2] == 1:
        return values.mean().item()
    values = values.double()
    total = all_reduce_sum(torch.stack([values.sum(), torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device)]))
    return (total[0] / total[1]).item()


def token_means(values: dict[str, Tensor], tokens: Tensor) -> dict[str, float]:
    """Per-token means over this process's `tokens` valid tokens (0-dim tensors) as the means
    over the valid tokens of all processes: one all-reduce of the token-weighted sums.

    In one process every value comes back as it was: for a float32 x and a count n < 2^24,
    x * n needs at most 48 of float64's 53 bits, so x * n / n is x exactly.
    """
    local_tokens = tokens.to(torch.float64)
    names = list(values)
    sums = all_reduce_sum(torch.stack([values[name].detach().double() * local_tokens for name in names] + [local_tokens]))
    global_tokens = max(sums[-1].item(), 1.0)
    return {name: (value / global_tokens).item() for name, value in zip(names, sums[:-1])}
