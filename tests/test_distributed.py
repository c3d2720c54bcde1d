"""rlhfkit.distributed (DeepSpeed config, ZeRO memory, sharding, collectives, the learners) and `rlhfkit launch`."""

from __future__ import annotations

import json
import os
import shlex
import socket
import stat

import pytest
import torch
import torch.multiprocessing as mp

from rlhfkit import distributed
from rlhfkit.distributed import (
    DeepSpeedLearner,
    Learner,
    all_reduce_sum,
    backward_together,
    barrier,
    deepspeed_config,
    init_distributed,
    is_main_process,
    mean_over_processes,
    resolve_deepspeed_option,
    shard,
    sum_over_processes,
    token_means,
    world_info,
    zero_memory_per_gpu,
)
from rlhfkit.errors import RlhfkitError

MODULE_ENTRY = ["--no_local_rank", "--module", "rlhfkit.cli"]


def dry_run(run_cli, *args):
    """`rlhfkit launch --dry-run ARGS` → the printed command as argv (checked to be one line)."""
    result = run_cli("launch", "--dry-run", *args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    argv = shlex.split(lines[0])
    assert os.path.basename(argv[0]) == "deepspeed"
    return argv


# ---------------------------------------------------------------------------- launch


def test_launch_one_node_eight_gpus(run_cli):
    argv = dry_run(run_cli, "--gpus", "8", "--", "ppo", "--config", "recipes/qa/ppo.yaml", "--deepspeed", "zero2")
    assert argv[1:] == ["--num_gpus", "8", *MODULE_ENTRY, "ppo", "--config", "recipes/qa/ppo.yaml", "--deepspeed", "zero2"]


def test_launch_two_nodes_with_hostfile(run_cli, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# two DGX nodes\nworker-0 slots=8\nworker-1 slots=8  # spare\n\n")
    argv = dry_run(
        run_cli, "--num-nodes", "2", "--gpus", "8", "--hostfile", hosts, "--master-addr", "worker-0",
        "--master-port", "29600", "--", "sft", "--config", "recipes/qa/sft.yaml", "--lr", "1e-5", "--use-lora", "--deepspeed=zero2",
    )
    assert argv[1:] == [
        "--num_nodes", "2", "--num_gpus", "8", "--hostfile", str(hosts),
        "--master_addr", "worker-0", "--master_port", "29600",
        *MODULE_ENTRY, "sft", "--config", "recipes/qa/sft.yaml", "--lr", "1e-5", "--use-lora", "--deepspeed=zero2",
    ]


def test_launch_include_and_quoting(run_cli):
    # Arguments with spaces or shell characters survive the printed line verbatim.
    argv = dry_run(run_cli, "--include", "localhost:0,2", "--", "ppo", "--deepspeed", "zero2", "--out", "run A; B")
    assert argv[1:] == ["--include", "localhost:0,2", *MODULE_ENTRY, "ppo", "--deepspeed", "zero2", "--out", "run A; B"]


def test_launch_command_is_what_deepspeed_parses(run_cli, tmp_path):
    from deepspeed.launcher.runner import parse_args

    hosts = tmp_path / "hosts"
    hosts.write_text("worker-0 slots=8\nworker-1 slots=8\n")
    config = tmp_path / "c.yaml"
    config.write_text("steps: 3\ndeepspeed: zero2\n")  # --deepspeed from the stage's config file
    argv = dry_run(run_cli, "--num-nodes", "2", "--hostfile", hosts, "--", "ppo", "--config", config, "--steps", "3")
    args = parse_args(argv[1:])
    assert (args.num_nodes, args.num_gpus, args.hostfile) == (2, -1, str(hosts))
    assert args.module and args.no_local_rank
    assert (args.user_script, args.user_args) == ("rlhfkit.cli", ["ppo", "--config", str(config), "--steps", "3"])


@pytest.mark.parametrize(
    "args, hostfile_text, message",
    [
        ([], None, "give the stage to run after `--`"),
        (["--", "train-ppo"], None, "unknown stage 'train-ppo'; stages: annotate-import, init-model, sft, train-rm"),
        (["--", "launch", "ppo"], None, "unknown stage 'launch'"),
        (["--num-nodes", "2", "--", "ppo"], None, "--num-nodes 2 needs --hostfile"),
        (["--hostfile", "{missing}", "--", "ppo"], None, "file not found"),
        (["--hostfile", "{hosts}", "--", "ppo"], "worker-0 slots=8\nworker-1 8\n", "hosts:2: expected `HOSTNAME slots=GPUS`, got 'worker-1 8'"),
        (["--hostfile", "{hosts}", "--", "ppo"], "a slots=8\na slots=4\n", "hosts:2: host a is listed twice"),
        (["--num-nodes", "3", "--hostfile", "{hosts}", "--", "ppo"], "a slots=8\nb slots=8\n", "--num-nodes 3 but"),
        (["--include", "localhost:0", "--exclude", "localhost:1", "--", "ppo"], None, "not both"),
        (["--include", "localhost:0", "--gpus", "2", "--", "ppo"], None, "drop --gpus and --num-nodes"),
        # several processes without --deepspeed: each would train its own copy
        (["--gpus", "2", "--", "ppo", "--config", "recipes/qa_feedback/paper/ppo_fine_grained.yaml"], None,
         "`ppo` runs in several processes here but has no --deepspeed in its options or its --config file"),
    ],
)
def test_launch_errors(run_cli, tmp_path, args, hostfile_text, message):
    hosts = tmp_path / "hosts"
    if hostfile_text is not None:
        hosts.write_text(hostfile_text)
    args = [a.format(hosts=hosts, missing=tmp_path / "nope") for a in args]
    result = run_cli("launch", "--dry-run", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "deepspeed" not in result.stdout  # nothing was printed as a command


@pytest.fixture
def fake_deepspeed(tmp_path, monkeypatch):
    """Replace the launcher by a script that records its argv and exits with `exit_code`."""

    def make(exit_code: int):
        script = tmp_path / "deepspeed"
        script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/argv"\nexit {exit_code}\n')
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setattr("rlhfkit.stages.launch.deepspeed_executable", lambda: str(script))
        return tmp_path / "argv"

    return make


def test_launch_runs_the_launcher(run_cli, fake_deepspeed, monkeypatch):
    recorded = fake_deepspeed(0)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    result = run_cli("launch", "--gpus", "2", "--", "ppo", "--config", "a b.yaml", "--deepspeed", "zero2")
    assert result.exit_code == 0, result.output
    assert recorded.read_text().splitlines() == ["--num_gpus", "2", *MODULE_ENTRY, "ppo", "--config", "a b.yaml", "--deepspeed", "zero2"]


def test_launch_exits_with_the_launchers_code(run_cli, fake_deepspeed, monkeypatch):
    fake_deepspeed(3)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    result = run_cli("launch", "--", "sft", "--config", "c.yaml", "--deepspeed", "zero2")
    assert result.exit_code == 3
    assert "the deepspeed launcher exited with code 3" in result.output


def test_every_launch_example_in_the_help_sets_deepspeed():
    # The examples a user copies (--help shows run_launch's docstring and the cli's examples)
    # must not stop at start-up for want of --deepspeed.
    import shlex

    from rlhfkit import cli
    from rlhfkit.stages import launch

    text = "\n".join([launch.__doc__, launch.run_launch.__doc__, *cli.EXAMPLES["launch"]])
    examples = [line.strip() for line in text.splitlines() if line.strip().startswith("rlhfkit launch --") and " -- " in line]
    assert len(examples) >= 4, examples
    for example in examples:
        stage_args = shlex.split(example.split(" -- ", 1)[1])
        assert launch.stage_uses_deepspeed(stage_args), example


@pytest.mark.parametrize(("gpus_here", "message"), [
    (0, "no GPU is visible here (torch.cuda.device_count() is 0)"),
    (1, "--gpus 2 but this machine has 1 GPU(s)"),
])
def test_launch_without_the_gpus_starts_nothing(run_cli, fake_deepspeed, monkeypatch, gpus_here, message):
    recorded = fake_deepspeed(0)
    monkeypatch.setattr("torch.cuda.device_count", lambda: gpus_here)
    result = run_cli("launch", "--gpus", "2", "--", "ppo", "--deepspeed", "zero2")
    assert result.exit_code == 2 and message in result.output
    assert not recorded.exists()  # the launcher never ran


# ------------------------------------------------------------------ deepspeed_config

BASE = {"micro_batch_size": 4, "grad_accum": 2, "world_size": 8, "max_grad_norm": 1.0}


def test_deepspeed_config_zero2_bf16_whole():
    assert deepspeed_config(zero_stage=2, dtype="bfloat16", **BASE) == {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 64,  # 4 x 2 x 8
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "fp16": {"enabled": False, "loss_scale": 0},
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
        "steps_per_print": 2**31 - 1,
    }


@pytest.mark.parametrize(
    "stage, offload_optimizer, offload_params, zero",
    [
        (0, False, False, {"stage": 0}),
        (1, False, False, {"stage": 1}),
        (1, True, False, {"stage": 1, "offload_optimizer": {"device": "cpu", "pin_memory": True}}),
        (2, True, False, {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                          "offload_optimizer": {"device": "cpu", "pin_memory": True}}),
        (3, False, False, {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                           "stage3_gather_16bit_weights_on_model_save": True}),
        (3, True, True, {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                         "stage3_gather_16bit_weights_on_model_save": True,
                         "offload_optimizer": {"device": "cpu", "pin_memory": True},
                         "offload_param": {"device": "cpu", "pin_memory": True}}),
    ],
)
def test_deepspeed_config_zero_sections(stage, offload_optimizer, offload_params, zero):
    config = deepspeed_config(
        zero_stage=stage, dtype="float16", offload_optimizer=offload_optimizer, offload_params=offload_params, **BASE
    )
    assert config["zero_optimization"] == zero
    assert config["fp16"] == {"enabled": True, "loss_scale": 0} and config["bf16"] == {"enabled": False}


def test_deepspeed_config_is_valid_for_deepspeed():
    from deepspeed.runtime.config import DeepSpeedConfig

    # world_size 1: DeepSpeed checks the batch identity against the (absent) process group.
    for stage in range(4):
        config = deepspeed_config(
            zero_stage=stage, micro_batch_size=4, grad_accum=2, world_size=1, dtype="bfloat16",
            max_grad_norm=0.5, offload_optimizer=stage > 0, offload_params=stage == 3,
        )
        parsed = DeepSpeedConfig(config)
        assert parsed.zero_optimization_stage == stage
        assert (parsed.train_batch_size, parsed.gradient_accumulation_steps, parsed.gradient_clipping) == (8, 2, 0.5)
        assert parsed.zero_config.gather_16bit_weights_on_model_save == (stage == 3)
        assert (parsed.zero_config.offload_optimizer is not None) == (stage > 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"zero_stage": 4, "dtype": "bfloat16"}, "ZeRO stage must be 0, 1, 2 or 3, got 4"),
        ({"zero_stage": 2, "dtype": "fp8"}, "float32, bfloat16, float16, got 'fp8'"),
        ({"zero_stage": 0, "dtype": "float32", "offload_optimizer": True}, "optimizer offload needs ZeRO stage 1, 2 or 3"),
        ({"zero_stage": 2, "dtype": "float32", "offload_params": True}, "parameter offload needs ZeRO stage 3"),
    ],
)
def test_deepspeed_config_errors(kwargs, message):
    with pytest.raises(RlhfkitError, match=message.replace("(", r"\(")):
        deepspeed_config(**BASE, **kwargs)


def write_json(path, data):
    path.write_text(json.dumps(data, indent=2))
    return str(path)


def test_user_json_overrides_by_deep_merge(tmp_path):
    user = write_json(tmp_path / "ds.json", {
        "train_batch_size": "auto",
        "gradient_accumulation_steps": 2,  # agrees with the stage: allowed
        "gradient_clipping": 0.3,
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 50000000, "offload_param": {"device": "nvme"}},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
    })
    config = deepspeed_config(zero_stage=0, dtype="bfloat16", offload_params=True, user_config=user, **BASE)
    assert config["train_batch_size"] == 64 and config["gradient_clipping"] == 0.3
    assert config["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-5}}
    # The JSON's stage 3 decides the generated stage-3 settings; its keys win inside the section.
    assert config["zero_optimization"] == {
        "stage": 3, "overlap_comm": True, "contiguous_gradients": True,
        "stage3_gather_16bit_weights_on_model_save": True, "reduce_bucket_size": 50000000,
        "offload_param": {"device": "nvme", "pin_memory": True},
    }
    assert config["bf16"] == {"enabled": True}


@pytest.mark.parametrize(
    "user, message",
    [
        ({"train_batch_size": 128}, "ds.json: train_batch_size is 128 but the stage's options give 64 (micro batch 4 x grad accum 2 x 8 processes)"),
        ({"train_micro_batch_size_per_gpu": 2}, "train_micro_batch_size_per_gpu is 2 but the stage's options give 4"),
        ({"scheduler": {"params": {"warmup_num_steps": "auto"}}}, "'scheduler.params.warmup_num_steps' is \"auto\""),
    ],
)
def test_user_json_conflicts(tmp_path, user, message):
    path = write_json(tmp_path / "ds.json", user)
    with pytest.raises(RlhfkitError) as err:
        deepspeed_config(zero_stage=2, dtype="bfloat16", user_config=path, **BASE)
    assert message in str(err.value)


def test_user_json_invalid(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "zero_optimization": {"stage": 2,}\n}\n')
    with pytest.raises(RlhfkitError, match=r"ds.json:2: invalid JSON"):
        deepspeed_config(zero_stage=2, dtype="bfloat16", user_config=str(path), **BASE)


def test_resolve_deepspeed_option(tmp_path):
    assert [resolve_deepspeed_option(f"zero{i}") for i in range(4)] == [(i, None) for i in range(4)]
    user = write_json(tmp_path / "ds.json", {})
    assert resolve_deepspeed_option(user) == (0, user)
    with pytest.raises(RlhfkitError, match="file not found"):
        resolve_deepspeed_option(str(tmp_path / "missing.json"))
    with pytest.raises(RlhfkitError, match="must be one of zero0, zero1, zero2, zero3 or a path to a DeepSpeed .json file, got 'zero-3'"):
        resolve_deepspeed_option("zero-3")


# --------------------------------------------------------------- zero_memory_per_gpu

def test_zero_memory_matches_the_zero_paper():
    # ZeRO paper, Fig. 1: Ψ = 7.5B, N = 64, K = 12 (mixed-precision Adam).
    # stage 0: (2 + 2 + 12) Ψ           = 16 x 7.5e9         = 120 GB
    # stage 1: (2 + 2) Ψ + 12 Ψ / 64    = 30 + 1.40625       = 31.4 GB
    # stage 2: 2 Ψ + (2 + 12) Ψ / 64    = 15 + 1.640625      = 16.6 GB
    # stage 3: (2 + 2 + 12) Ψ / 64      = 1.875              = 1.9 GB
    totals = [zero_memory_per_gpu(7.5e9, 64, stage)["total"] for stage in range(4)]
    assert totals == pytest.approx([120e9, 31.40625e9, 16.640625e9, 1.875e9])
    assert [round(t / 1e9, 1) for t in totals] == [120.0, 31.4, 16.6, 1.9]
    stage2 = zero_memory_per_gpu(7.5e9, 64, 2)
    assert (stage2["params"], stage2["grads"], stage2["optimizer_states"]) == pytest.approx(
        (15e9, 2 * 7.5e9 / 64, 12 * 7.5e9 / 64)
    )


def test_zero_memory_offload_and_fp32():
    # ZeRO-Offload, stage 2, 1B params on 8 GPUs: GPU keeps 2Ψ params + 2Ψ/8 grads = 2.25 GB;
    # the 12Ψ/8 = 1.5 GB of Adam state per process lives in CPU memory.
    offloaded = zero_memory_per_gpu(1e9, 8, 2, offload=True)
    assert offloaded == pytest.approx(
        {"params": 2e9, "grads": 0.25e9, "optimizer_states": 0.0, "cpu_optimizer_states": 1.5e9, "total": 2.25e9}
    )
    # fp32, no ZeRO: 4Ψ + 4Ψ + 8Ψ (Adam momentum + variance, no master copy) = 16 GB for 1B.
    assert zero_memory_per_gpu(1e9, 8, 0, dtype_bytes=4)["total"] == pytest.approx(16e9)
    # SGD with momentum in mixed precision: 2 + 2 + (4 + 4) = 12 bytes per parameter.
    assert zero_memory_per_gpu(1e9, 1, 0, optimizer="sgd")["total"] == pytest.approx(12e9)
    with pytest.raises(RlhfkitError, match="optimizer must be one of adam, sgd"):
        zero_memory_per_gpu(1e9, 1, 0, optimizer="lion")


# ------------------------------------------------------------ sharding, single process

def test_shard_is_contiguous_and_balanced():
    items = list(range(10))
    assert [shard(items, rank, 4) for rank in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert [shard(["a", "b"], rank, 3) for rank in range(3)] == [["a"], ["b"], []]


@pytest.mark.parametrize("n_items", [0, 1, 7, 12, 13])
@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
def test_shard_covers_every_item_once(n_items, world_size):
    items = [f"item-{i}" for i in range(n_items)]
    shards = [shard(items, rank, world_size) for rank in range(world_size)]
    assert [x for s in shards for x in s] == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shards == [shard(items, rank, world_size) for rank in range(world_size)]


def test_shard_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank 4 is outside 0..3"):
        shard([1, 2], 4, 4)


def test_single_process_helpers_are_no_ops(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert world_info() == (0, 0, 1) and is_main_process()
    init_distributed()
    assert not torch.distributed.is_initialized()
    stats = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(stats) is stats and stats.tolist() == [1.0, 2.0]
    barrier()
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert world_info() == (5, 1, 8) and not is_main_process()


# ------------------------------------------------------------- the learners, one process


def sgd_learner(w: float, max_grad_norm: float) -> tuple[torch.nn.Parameter, Learner]:
    param = torch.nn.Parameter(torch.tensor(w))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)  # halves the lr per step
    return param, Learner([param], optimizer, scheduler, max_grad_norm)


def test_learner_step_divides_clips_steps_and_clears():
    # loss = 6w: gradient 6, divided by 2 -> 3 (the norm returned), clipped to norm 1, so
    # SGD at lr 0.1 moves w from 1 to 0.9; the schedule then halves the lr; the gradient is cleared.
    param, learner = sgd_learner(1.0, max_grad_norm=1.0)
    learner.backward(6 * param)
    assert learner.step(grad_divisor=2.0) == pytest.approx(3.0)
    assert param.item() == pytest.approx(0.9) and param.grad is None
    assert learner.scheduler.get_last_lr() == [0.05]


def test_learner_max_grad_norm_zero_means_no_clipping():
    # --max-grad-norm 0 is "no clipping" (as DeepSpeed reads gradient_clipping 0): gradient 6
    # moves w by lr 0.1 x 6 = 0.6, from 1 to 0.4; clipping to norm 0 would leave it at 1.
    param, learner = sgd_learner(1.0, max_grad_norm=0.0)
    learner.backward(6 * param)
    assert learner.step() == pytest.approx(6.0)
    assert param.item() == pytest.approx(0.4)


def test_learner_step_can_hold_back_a_non_finite_gradient():
    # skip_nonfinite: an inf gradient leaves the weight and the schedule as they were.
    param, learner = sgd_learner(1.0, max_grad_norm=float("inf"))
    learner.backward(param * float("inf"))
    assert learner.step(skip_nonfinite=True) == float("inf")
    assert param.item() == 1.0 and learner.scheduler.get_last_lr() == [0.1] and param.grad is None


def test_loss_scale_is_the_share_of_the_global_count(monkeypatch):
    # 3 of the step's 12 tokens: weight 3/12 in one process; DeepSpeed averages the gradients
    # of 2 processes, so each backpropagates 2 x 3/12 = 0.5.
    assert Learner([torch.nn.Parameter(torch.zeros(()))], None, None, 1.0).loss_scale(3, 12) == 0.25
    monkeypatch.setattr(distributed, "world_info", lambda: (0, 0, 2))
    engine = type("Engine", (), {"device": torch.device("cpu")})()
    assert DeepSpeedLearner(engine, None).loss_scale(3, 12) == 0.5
    with pytest.raises(ValueError, match="scale the loss with loss_scale"):
        DeepSpeedLearner(engine, None).step(grad_divisor=2.0)


def test_backward_together_backpropagates_a_shared_graph_once():
    # Two losses on one trunk h = 2w (PPO's value head on the policy): 3h + 5h has gradient
    # 2 * 3 + 2 * 5 = 16 in w. Two separate backwards would fail (the graph is freed after one).
    w = torch.nn.Parameter(torch.tensor(1.0))
    trunk = 2 * w
    policy, value = Learner([w], None, None, 1.0), Learner([w], None, None, 1.0)
    backward_together([(policy, 3 * trunk), (value, 5 * trunk)])
    assert w.grad.item() == 16.0


def test_process_statistics_in_one_process_are_the_local_ones(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    # x * n / n in float64 is x exactly for a float32 x: the means come back bit for bit.
    value = torch.tensor(0.1, dtype=torch.float32)
    assert token_means({"loss": value}, torch.tensor(7.0)) == {"loss": value.item()}
    assert mean_over_processes(torch.tensor([1.0, 2.0, 6.0])) == 3.0
    assert sum_over_processes(torch.tensor(5.0)) == 5.0


# ------------------------------------------------------------- two real processes

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_process_worker(rank: int, world_size: int, port: int, out_dir: str, through_deepspeed: bool) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    from rlhfkit.rewards.placement import normalize_per_source
    from rlhfkit.rl.advantages import masked_whiten

    if not through_deepspeed:
        # What the deepspeed launcher's environment gives init_process_group (env://).
        torch.distributed.init_process_group("gloo")
    init_distributed()  # joins the group, or is a no-op when it is already joined
    summed = all_reduce_sum(torch.tensor([1.0 + rank, 10.0 * (rank + 1)]))
    # Whitening with the hook uses the global batch: rank 0 holds [1, 2], rank 1 holds [3, 4];
    # the global mean is 2.5 and the (unbiased) variance 5/3, whatever the split.
    values = torch.tensor([[1.0, 2.0]]) + 2 * rank
    whitened = masked_whiten(values, torch.ones_like(values), all_reduce=all_reduce_sum)
    # Rank 0: a loss of 1 over 2 tokens, rollouts [1, 2]; rank 1: a loss of 4 over 1 token,
    # rollouts [3, 4, 5]. Global token mean (1*2 + 4*1) / 3 = 2, rollout mean 15 / 5 = 3.
    means = token_means({"loss": torch.tensor(1.0 + 3 * rank)}, torch.tensor(2.0 - rank))
    rollout_mean = mean_over_processes(torch.tensor([[1.0, 2.0], [3.0, 4.0, 5.0]][rank]))
    # --normalize-rewards per-source over the global batch: rank 0 holds the dense row with
    # sum 0.8 over 4 tokens, rank 1 the row with sum 1.6 over 12 (test_reward_normalization).
    from tests.test_reward_normalization import dense_rows

    rewards, given = dense_rows()
    normalized = normalize_per_source({"dense": rewards[rank : rank + 1]}, {"dense": given[rank : rank + 1]}, all_reduce=all_reduce_sum)
    barrier()
    result = {"summed": summed.tolist(), "whitened": whitened.tolist(), "main": is_main_process(),
              "normalized": normalized["dense"][0].tolist(),
              "token_mean": means["loss"], "rollout_mean": rollout_mean, "tokens": sum_over_processes(torch.tensor(2.0 - rank))}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


def run_two_processes(out_dir, through_deepspeed: bool) -> None:
    # fork: the children inherit the imported torch instead of importing it again (seconds each).
    mp.start_processes(
        _two_process_worker, args=(2, _free_port(), str(out_dir), through_deepspeed), nprocs=2, start_method="fork"
    )
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["summed"] for r in ranks] == [[3.0, 30.0], [3.0, 30.0]]  # [1+2, 10+20] on both
    assert [r["main"] for r in ranks] == [True, False]
    std = (5 / 3) ** 0.5
    whitened = [x for r in ranks for x in r["whitened"][0]]
    assert whitened == pytest.approx([(v - 2.5) / std for v in (1, 2, 3, 4)], abs=1e-5)
    assert [(r["token_mean"], r["rollout_mean"], r["tokens"]) for r in ranks] == [(2.0, 3.0, 3.0)] * 2
    # Each rank alone has one row (std 0: all zeros); together, the global batch's values.
    from tests.test_reward_normalization import DENSE_ROW_0, DENSE_ROW_1, TOL

    assert [r["normalized"] for r in ranks] == [pytest.approx(DENSE_ROW_0, abs=TOL), pytest.approx(DENSE_ROW_1, abs=TOL)]


def test_two_gloo_processes_sum_and_whiten_globally(tmp_path):
    run_two_processes(tmp_path, through_deepspeed=False)


@pytest.mark.slow
def test_init_distributed_through_deepspeed(tmp_path):
    # deepspeed.init_distributed on CPU JIT-compiles DeepSpeed's shared-memory comm op the
    # first time (minutes, cached in ~/.cache/torch_extensions), and importing deepspeed in
    # each process takes ~15 s on 2 cores.
    run_two_processes(tmp_path, through_deepspeed=True)
