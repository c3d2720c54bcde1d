"""`rlhfkit redistribute`: show a sequence reward model's score spread over tokens (R3HF).

For each (prompt, response) the reward model scores every prefix in one forward pass; a
token's reward is the change of the score it causes, r_t = R(x, y<=t) - R(x, y<t), with
R(x, y<1) the prompt's score, so the rewards sum to R(x, y) - R(x). With `--granularity
sentence` the score is read only where sentences end (the Fine-Grained RLHF dense toxicity
reward). Scores are the RM's normalised scores (mean 0 / std 1 on its normalisation set),
so token rewards are in units of the RM's standard deviation.

Writes the rewards as JSONL (`generation` records with `tokens` and `token_rewards`) and an
HTML page that colours every token by its reward: what people look at to debug an RM.
`ppo --redistribute NAME` uses the same code (rlhfkit.rewards.sources) on policy tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from rlhfkit.config import DEFAULT_SEED, REQUIRED, check_numbers, opt
from rlhfkit.console import console
from rlhfkit.errors import RlhfkitError
from rlhfkit.io import config_to_dict, write_json, write_text
from rlhfkit.reporting import rollouts_html
from rlhfkit.rewards.shared_backbone import load_sequence_aspect
from rlhfkit.rewards.sources import GRANULARITIES, RewardModelSource
from rlhfkit.runs import check_out_file, package_versions, progress_bar, set_seed
from rlhfkit.schema import Generation, load_records, write_records


@dataclass
class RedistributeConfig:
    rm: str = opt(REQUIRED, "A sequence-level (preference/regression) rlhfkit reward model directory, or a shared-backbone one (see --aspect).", panel="Rewards")
    aspect: Optional[str] = opt(None, "With a shared-backbone --rm: its sequence aspect to redistribute (default: its only one).", panel="Rewards")
    input: str = opt(REQUIRED, "JSONL of records with prompt and response (e.g. `generation` records).", panel="Data")
    out: str = opt(REQUIRED, "Output JSONL of generation records with per-token rewards.", panel="Output")
    html: Optional[str] = opt(None, "Also write an HTML heat map of the token rewards to this .html file.", panel="Output")
    granularity: str = opt("token", "Read the prefix score at every token, or only at sentence ends: token | sentence.", panel="Rewards")
    batch_size: int = opt(8, "Scoring batch size.", panel="Training")
    limit: int = opt(0, "Only the first N records (0 = all).", panel="Data")
    dtype: str = opt("auto", "RM dtype: auto, float32, bfloat16.", panel="Model")
    device: str = opt("auto", "Device: auto, cpu, cuda.", panel="Distributed")
    seed: int = opt(DEFAULT_SEED, "Random seed (recorded; scoring is deterministic).", panel="Training")

    def validate(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise RlhfkitError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got '{self.granularity}'")
        check_numbers(self, at_least_one=("batch_size",), non_negative=("limit",))
        outputs = ("out", "html")
        check_out_file(self.out, self, "--out", ".jsonl", outputs)
        if self.html is not None:
            check_out_file(self.html, self, "--html", ".html", outputs)


def run_redistribute(cfg: RedistributeConfig) -> dict:
    """Spread a sequence reward model's score over response tokens (R3HF) and show it as a heat map."""
    records = load_records(cfg.input, option="--input")
    if any(not (hasattr(r, "prompt") and hasattr(r, "response")) for r in records):
        raise RlhfkitError(f"--input {cfg.input}: every record needs a prompt and a response (e.g. `generation` records)")
    if cfg.limit:
        records = records[: cfg.limit]
    set_seed(cfg.seed)
    rm = load_sequence_aspect(cfg.rm, cfg.aspect, "--rm", device=None if cfg.device == "auto" else cfg.device, dtype=cfg.dtype)
    source = RewardModelSource(Path(cfg.rm).name, rm, redistribute=cfg.granularity, batch_size=cfg.batch_size)

    outputs = []
    with progress_bar("redistribute", len(records)) as advance:
        for start in range(0, len(records), cfg.batch_size):
            batch = records[start : start + cfg.batch_size]
            prompts, responses = [r.prompt for r in batch], [r.response for r in batch]
            # Show the rewards on the RM's own tokens: there is no policy tokenizer here.
            _, rm_char_ends, prompt_scores = rm.prefix_scores(prompts, responses, batch_size=cfg.batch_size)
            # The RM's tokens after the text (an EOS) get empty spans at the end, as a policy's EOS.
            spans = [_spans_from_ends([min(end, len(r)) for end in ends]) for ends, r in zip(rm_char_ends, responses)]
            rewards = source.token_rewards(prompts, responses, spans).per_token
            for record, response, row_spans, row_rewards, prompt_score in zip(batch, responses, spans, rewards, prompt_scores):
                outputs.append(
                    Generation(
                        id=record.id,
                        prompt=record.prompt,
                        response=response,
                        model=getattr(record, "model", ""),
                        tokens=[response[s:e] for s, e in row_spans],
                        token_rewards=[round(float(v), 6) for v in row_rewards],
                        meta={
                            "reward_model": str(cfg.rm),
                            "granularity": cfg.granularity,
                            "prompt_score": round(float(prompt_score), 6),
                            "sequence_score": round(float(prompt_score) + float(row_rewards.sum()), 6),
                            **({"annotator_spans": [asdict(span) for span in record.spans]} if getattr(record, "spans", None) else {}),
                        },
                    )
                )
            advance(len(batch))

    write_records(cfg.out, outputs)
    summary = {
        "records": len(outputs),
        "mean_sequence_score": sum(g.meta["sequence_score"] for g in outputs) / len(outputs),
        "mean_tokens": sum(len(g.tokens) for g in outputs) / len(outputs),
    }
    out_path = Path(cfg.out)
    write_json(
        out_path.with_suffix(".run_config.json"),
        {"stage": "redistribute", "config": config_to_dict(cfg), "versions": package_versions(), "summary": summary},
    )
    if cfg.html:
        write_text(cfg.html, rollouts_html(out_path, f"Token rewards of {cfg.rm}", config_to_dict(cfg)))
    console.print(
        f"redistribute: {summary['records']} record(s), mean sequence score {summary['mean_sequence_score']:+.4f}, "
        f"{summary['mean_tokens']:.1f} tokens each -> {cfg.out}" + (f" (heat map: {cfg.html})" if cfg.html else ""),
        soft_wrap=True,
    )
    return summary


def _spans_from_ends(ends: list[int]) -> list[tuple[int, int]]:
    starts = [0] + ends[:-1]
    return [(s, max(s, e)) for s, e in zip(starts, ends)]
