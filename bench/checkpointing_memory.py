"""Peak CPU memory of one training step with and without --gradient-checkpointing.

A Llama of SmolLM2-135M's shape (30 layers, 576 wide, 9 heads / 3 KV heads, 49,152-token
vocabulary; random weights, built from config), fp32, one forward + backward on a batch of
random tokens. Each setting runs in a fresh process: after a warm-up step on 8 tokens (so the
gradients exist), the figure is the process's peak RSS minus its RSS before the timed step,
i.e. what the step's activations (and their gradients) add. Checkpointing is switched on as
rlhfkit.models does it (transformers' non-reentrant checkpointing of every layer).

    python bench/checkpointing_memory.py [--batch 2 --length 512]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True}


def measure(checkpointing: bool, batch: int, length: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rlhfkit.models import enable_gradient_checkpointing

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_135M))
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (batch, length))
    model(input_ids=ids[:, :8], labels=ids[:, :8]).loss.backward()
    before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    started = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"checkpointing": checkpointing, "step_MiB": (peak - before) / 2**20, "seconds": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--worker", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker == "on", args.batch, args.length)))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    for setting in ("off", "on"):
        done = subprocess.run([sys.executable, __file__, "--worker", setting, "--batch", str(args.batch), "--length", str(args.length)],
                              env=env, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"gradient checkpointing {setting:>3}: step peak {result['step_MiB']:,.0f} MiB above the model, {result['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
