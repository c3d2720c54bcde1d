"""Learning check: does `rlhfkit ppo` raise a reward that is known to be learnable?

The reward is programmatic (`tests/judges.py`): one point for every word of the response
that contains the letter "e". Fine-grained, it is paid at the end of each word
(`words_with_e`); holistic, the same total is paid once at the end (`words_with_e_holistic`).
The policy is a tiny randomly initialised GPT-2 built offline, so anything it learns, PPO
taught it. Prints the reward curve of each run and writes `learning_curves.png`.

    python bench/learning_check.py --out runs/learning-check [--steps 30] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rlhfkit.config import build_config
from rlhfkit.schema import PromptRecord, write_records
from rlhfkit.stages import ppo

QUESTIONS = [
    "Who wrote the album Bloom?", "When was the bridge opened?", "Where is the river Nile?",
    "What is the capital of France?", "Who painted the ceiling?", "When did the war end?",
    "Who won the cup?", "What is the tallest tower?",
]
REWARDS = {"fine-grained": "words_with_e", "holistic": "words_with_e_holistic"}


def build_tiny_policy(out: Path) -> Path:
    from rlhfkit.stages.init_model import InitModelConfig, run_init_model

    if not (out / "config.json").exists():
        run_init_model(build_config(InitModelConfig, out=str(out), corpus=[str(REPO / "data/qa_feedback/feedback.json")]))
    return out


def run_one(policy: Path, prompts: Path, out: Path, reward: str, seed: int, steps: int, advantage: str) -> list[float]:
    cfg = build_config(
        ppo.PPOConfig, policy=str(policy), prompts=str(prompts), out=str(out), rewards="e=1",
        rm=[f"e=py:tests.judges:{REWARDS[reward]}"], steps=steps, prompts_per_step=8, samples_per_prompt=4,
        minibatch_size=16, ppo_epochs=4, max_new_tokens=12, max_prompt_length=64, lr=3e-3, kl_coef=0.0,
        save_every=10**6, temperature=1.0, top_k=0, advantage=advantage, seed=seed,
        # gamma 1 / lambda 0.95 is the paper's fine-grained setting (0.99 for holistic).
        lam=0.95 if reward == "fine-grained" else 0.99,
    )
    ppo.run_ppo(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["reward/total"] for row in rows if "reward/total" in row]


def learning_curves(out: Path, steps: int, seeds: list[int], advantage: str = "gae") -> dict[str, list[list[float]]]:
    out.mkdir(parents=True, exist_ok=True)
    policy = build_tiny_policy(out / "tiny-policy")
    prompts = out / "prompts.jsonl"
    write_records(prompts, [PromptRecord(id=f"p{i}", prompt=f"question: {q} answer:") for i, q in enumerate(QUESTIONS)])
    curves: dict[str, list[list[float]]] = {}
    for reward in REWARDS:
        for seed in seeds:
            curves.setdefault(reward, []).append(run_one(policy, prompts, out / f"{reward}-seed{seed}", reward, seed, steps, advantage))
    return curves


def window_means(curve: list[float], width: int = 5) -> tuple[float, float]:
    return sum(curve[:width]) / width, sum(curve[-width:]) / width


def plot(curves: dict[str, list[list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, runs), colour in zip(curves.items(), ("tab:green", "tab:blue")):
        for i, curve in enumerate(runs):
            ax.plot(range(1, len(curve) + 1), curve, color=colour, alpha=0.8, label=name if i == 0 else None)
    ax.set_xlabel("PPO step"), ax.set_ylabel("words containing 'e' per response"), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs/learning-check")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--advantage", default="gae", choices=["gae", "grpo", "rloo"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    curves = learning_curves(args.out, args.steps, args.seeds, args.advantage)
    for name, runs in curves.items():
        for seed, curve in zip(args.seeds, runs):
            first, last = window_means(curve)
            print(f"{name:13s} seed {seed}: first 5 steps {first:.2f} -> last 5 steps {last:.2f}   "
                  + " ".join(f"{v:.2f}" for v in curve))
    plot(curves, args.out / "learning_curves.png")
    (args.out / "learning_curves.json").write_text(json.dumps(curves))
    print(f"curves: {args.out / 'learning_curves.png'}")


if __name__ == "__main__":
    main()
