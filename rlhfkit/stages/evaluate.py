"""`rlhfkit evaluate`: compare systems on the papers' metrics, one table row per system.

Systems are policies (`--policy NAME=DIR` or `--policy DIR`: the response to every prompt of
`--prompts` is generated, greedily unless `--sample`) and/or existing outputs
(`--generations FILE`: `generation` records; a file holds one system per distinct `model`
field, and records without one belong to a system named after the file's stem). Every
system must answer the same prompts (matched by prompt text; a prompt asked k times is
matched k times), so the rows and the pairwise comparisons are over the same items.

Per system (metrics.json keys; reward names as in every rlhfkit log, rlhfkit.runs):
- `reward/raw/NAME`: mean reward per response of each `--rm NAME=DIR` (an `rlhfkit train-rm`
  model), in the RM's own units: the sum of the segment rewards for segment RMs, the score
  for sequence RMs (a regression RM's in its labels' units);
- with `--rewards NAME=WEIGHT,...` (ppo's weights): `reward/weighted/NAME` (weight x raw) and
  `reward/total` (their sum); a source with a negative weight is best where it is lowest;
- `error_rate/NAME` (segment RMs): segments the RM flags as errors (P(error) > 0.5) / all
  segments, pooled over the responses (the Fine-Grained RLHF papers' error rates);
- `rouge_l` when the prompts carry references (best reference per response; see
  rlhfkit.metrics); `distinct_1/2/3` and `mean_length` over whitespace words;
- `perplexity` of the responses under `--reference-lm` (each response alone; see metrics);
- pairwise win/tie/loss of every pair of systems, judged by `--judge NAME` (a
  preference/regression RM among `--rm`; default: the first one): A wins an item when its
  score beats B's by more than `--tie-margin`; the win rate is win + tie / 2.

Uncertainty: a 95% percentile-bootstrap interval over prompts (all of a prompt's responses
resampled together; rlhfkit.metrics.bootstrap_interval, seeded by --seed) of every metric
(metrics.json `intervals`, and in results.md) and of every pairwise win rate, whose verdict
is "A clearly better" / "B clearly better" only when the interval excludes 50%. The best
system of each column is "clearly" best when the interval of its difference to the runner-up
(the same resamples for both) excludes 0. With fewer than 2 prompts there is no interval.
distinct-n's interval sits at or below its value: a prompt drawn twice repeats its n-grams,
which only lowers the distinct share, so read it as the range below the value.

Reward-hacking audit (rlhfkit.audit): `--audit-rm NAME=DIR` (repeatable) `--audit-judge
py:module:function` `--rollouts [NAME=]RUN/rollouts.jsonl` (repeatable) replays PPO's logged
rollouts through each RM and the judge and writes audit.json, audit.md and audit.png: per
step, a segment RM's segment accuracy (its error verdict vs the judge's error spans of its
aspect, plus true/flagged error rates and error recall) and a sequence RM's pairwise
accuracy (over same-prompt pairs of a step that the judge does not tie, the share the RM
orders as the judge does; an RM tie counts one half). The judge returns, per response,
{"spans": [Span...], "scores": {aspect: true score}}. With no --policy/--generations,
evaluate runs the audit only.

Writes to `--out`: `generations.jsonl` (every system's responses as `generation` records,
with each RM's reward in `meta.rewards` and each segment RM's [flagged, all] segments in
`meta.error_flags`), `metrics.json`, `results.md` (a short table: per
aspect the error rate and reward, the judge's score, ROUGE-L and length, with a sentence
naming the best system per column; the other metrics below it) and run_config.json.

`--paper TABLE.json` adds published numbers as a table of their own under the results:
    {"source": "Wu et al. 2023, Table 2", "rows": [{"system": "FG-RLHF", "metrics":
     {"rouge_l": 0.492, "error_rate/relevance": 0.128}}]}
Metric names are the keys above, values on the same scale (fractions, not percentages),
so a column of the same name means the same measure.
"""

from __future__ import annotations

import gc
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from rlhfkit.audit import AUDIT_MARKDOWN, check_audit_inputs, run_audit
from rlhfkit.chat import (
    APPLY_CHAT_TEMPLATE_HELP,
    load_chat_template,
    override_chat_template,
    render_prompt,
)
from rlhfkit.config import DEFAULT_SEED, REQUIRED, check_sampling, opt
from rlhfkit.console import console
from rlhfkit.errors import RlhfkitError
from rlhfkit.generation import SamplingConfig, generate, model_max_positions
from rlhfkit.io import write_text
from rlhfkit.lengths import fit_default_lengths
from rlhfkit.metrics import (
    Statistic,
    distinct_n,
    distinct_n_statistic,
    perplexity_terms,
    prompt_interval,
    ratio_statistic,
    rouge_l_scores,
    whitespace_tokens,
    win_rate,
)
from rlhfkit.models import load_policy, resolve_device
from rlhfkit.paper_tables import load_paper_table
from rlhfkit.rewards.reward_model import (
    SEQUENCE_KINDS,
    SHARED_KIND,
    load_reward_model,
    read_spec,
    spec_aspects,
)
from rlhfkit.rewards.shared_backbone import load_reward_models
from rlhfkit.rewards.sources import canonical_name, parse_named, parse_weights
from rlhfkit.runs import (
    OVERWRITE_HELP,
    RAW_REWARD_PREFIX,
    TOTAL_REWARD_KEY,
    RunDir,
    progress_bar,
    raw_reward_key,
    set_seed,
    weighted_reward_key,
)
from rlhfkit.schema import Generation, PromptRecord, check_data_file, load_records, write_records

METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.md"
GENERATIONS_FILE = "generations.jsonl"
DISTINCT_NS = (1, 2, 3)


@dataclass
class EvaluateConfig:
    out: str = opt(REQUIRED, "Output directory: generations.jsonl, metrics.json, results.md.", panel="Output")
    policy: list[str] = opt([], "A policy to generate with: NAME=DIR or DIR (name: the directory's name), repeatable.", panel="Model")
    prompts: str | None = opt(None, "JSONL of `prompt` records (needed with --policy; their `references` give ROUGE-L).", panel="Data")
    generations: list[str] = opt([], "JSONL of `generation` records to score as they are, repeatable (system: the `model` field, else the file stem).", panel="Data")
    rm: list[str] = opt([], "Reward model NAME=DIR (an `rlhfkit train-rm` output), repeatable.", panel="Rewards")
    judge: str | None = opt(None, "The --rm NAME (preference or regression) that judges pairwise win rates (default: the first such RM).", panel="Rewards")
    rewards: str | None = opt(
        None,
        "The --rm weights as ppo's --rewards, NAME=WEIGHT,... (e.g. helpfulness=1,verbosity=-0.2): adds reward/weighted/NAME "
        "and reward/total, and a source with a negative weight is best where its score is lowest.",
        panel="Rewards",
    )
    reference_lm: str | None = opt(None, "Causal LM (hub id or directory) for the perplexity of the responses.", panel="Model")
    paper: str | None = opt(None, 'Published numbers to add as rows: JSON {"source": "...", "rows": [{"system": "...", "metrics": {"rouge_l": 0.49}}]}.', panel="Output")
    max_prompts: int | None = opt(None, "Only the first N prompts of --prompts.", panel="Data")
    sample: bool = opt(False, "Sample instead of greedy decoding.", panel="Generation")
    temperature: float = opt(0.7, "Sampling temperature (with --sample).", panel="Generation")
    top_k: int = opt(0, "Top-k sampling (with --sample; 0 = off).", panel="Generation")
    top_p: float = opt(1.0, "Top-p sampling (with --sample).", panel="Generation")
    max_new_tokens: int = opt(200, "Max response tokens (Fine-Grained RLHF QA: 200).", panel="Generation")
    max_prompt_length: int = opt(1024, "Max prompt tokens; longer prompts are an error.", panel="Generation")
    batch_size: int = opt(8, "Batch size for generation, reward models and perplexity.", panel="Training")
    tie_margin: float = opt(0.0, "Judge score difference (normalised units) at or below which a pair is a tie.", panel="Generation")
    dtype: str = opt("auto", "Model dtype: auto (bf16 on supporting GPUs, fp32 on CPU), float32, bfloat16.", panel="Model")
    device: str = opt("auto", "Device: auto, cpu, cuda, cuda:N.", panel="Distributed")
    trust_remote_code: bool = opt(False, "Allow model code from the hub repository (policies, reference LM).", panel="Model")
    seed: int = opt(DEFAULT_SEED, "Seed for sampling.", panel="Training")
    chat_template: str | None = opt(None, "Jinja chat template file for conversational prompts (default: each policy tokenizer's own, if any).", panel="Model")
    overwrite: bool = opt(False, OVERWRITE_HELP, panel="Output")
    audit_rm: list[str] = opt([], "Reward model NAME=DIR to audit on --rollouts against --audit-judge, repeatable. Per PPO step: a segment RM's segment accuracy (its error verdict, P(error) > 0.5, equals the judge's), a sequence RM's pairwise accuracy (share of same-prompt pairs of the step, judge ties left out, that it orders as the judge does; an RM tie counts 1/2). Writes audit.json/.md/.png.", panel="Rewards")
    audit_judge: str | None = opt(None, "py:module:function knowing the truth for --audit-rm: per response {'spans': [Span...], 'scores': {aspect: score}}.", panel="Rewards")
    rollouts: list[str] = opt([], "A PPO run's rollouts.jsonl to audit, NAME=FILE or FILE (name: the run directory), repeatable.", panel="Data")
    apply_chat_template: bool = opt(False, APPLY_CHAT_TEMPLATE_HELP + " Reward models render prompts as they were trained (saved with each RM).", panel="Data")

    def validate(self) -> None:
        load_chat_template(self.chat_template)
        if not self.policy and not self.generations and not self.audit_rm:
            raise RlhfkitError("nothing to evaluate: give --policy DIR (with --prompts) and/or --generations FILE, or --audit-rm")
        if (self.audit_rm or self.audit_judge or self.rollouts) and not (self.audit_rm and self.audit_judge and self.rollouts):
            raise RlhfkitError("the audit needs all of --audit-rm NAME=DIR, --audit-judge py:module:function and --rollouts FILE")
        rm_kinds(self.audit_rm)
        if self.policy and not self.prompts:
            raise RlhfkitError("--policy needs --prompts (JSONL of `prompt` records) to generate from")
        given = [("--prompts", self.prompts)] + [("--generations", path) for path in self.generations]
        given += [("--rollouts", r.partition("=")[2] or r) for r in self.rollouts]
        for option, path in given:
            if path is not None:
                check_data_file(path, option)
        if self.paper is not None and not Path(self.paper).is_file():
            raise RlhfkitError(f"--paper {self.paper}: no such file")
        for name in ("max_new_tokens", "max_prompt_length", "batch_size"):
            if getattr(self, name) < 1:
                raise RlhfkitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise RlhfkitError(f"--max-prompts must be >= 1, got {self.max_prompts}")
        if self.tie_margin < 0:
            raise RlhfkitError(f"--tie-margin must be >= 0, got {self.tie_margin}")
        if self.sample:
            check_sampling(self.temperature, self.top_k, self.top_p)
        if self.sample and self.temperature <= 0:
            raise RlhfkitError(f"--temperature must be > 0, got {self.temperature}")
        policy_names = [name for name, _ in parse_policies(self.policy)]
        duplicates = sorted(name for name, count in Counter(policy_names).items() if count > 1)
        if duplicates:
            raise RlhfkitError(f"--policy: system name(s) {', '.join(duplicates)} given twice; name them with NAME=DIR")
        reward_weights(self.rm, self.rewards)
        judge_name(self.rm, self.judge)
        if self.paper:
            load_paper_table(self.paper)


# --- options ------------------------------------------------------------------------------


def parse_policies(specs: list[str]) -> list[tuple[str, str]]:
    """[(system name, path or hub id)] from `NAME=DIR` or `DIR` items."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if sep and name and "/" not in name and path:
            out.append((name.strip(), path.strip()))
        else:
            out.append((Path(spec.rstrip("/")).name or spec, spec))
    return out


def rm_kinds(rm_specs: list[str]) -> dict[str, tuple[str, str]]:
    """{name: (path, kind)} of the --rm options, read from each RM's rlhfkit_rm.json; a
    shared-backbone RM `--rm fg=DIR` gives one entry per aspect, `fg.factuality`, ..."""
    paths = parse_named(rm_specs, "--rm")
    if len(paths) != len(rm_specs):
        raise RlhfkitError("--rm: a reward-model name is given twice")
    kinds: dict[str, tuple[str, str]] = {}
    for name, path in paths.items():
        spec = read_spec(path)
        if spec["kind"] == SHARED_KIND:
            kinds.update({f"{name}.{aspect}": (path, kind) for aspect, kind in spec_aspects(spec).items()})
        else:
            kinds[name] = (path, spec["kind"])
    return kinds


def reward_weights(rm_specs: list[str], rewards: str | None) -> dict[str, float]:
    """--rewards as {RM name: weight} (empty without it); each name must be an --rm's."""
    kinds = rm_kinds(rm_specs)
    if rewards is None:
        return {}
    weights = parse_weights(rewards)
    unknown = sorted(set(weights) - set(kinds))
    if unknown:
        valid = ", ".join(kinds) if kinds else "none (add --rm NAME=DIR)"
        raise RlhfkitError(f"--rewards names {', '.join(unknown)}, which no --rm is; valid: {valid}")
    return weights


def judge_name(rm_specs: list[str], judge: str | None) -> str | None:
    """The RM that judges win rates: --judge (checked), else the first sequence RM, else None."""
    kinds = rm_kinds(rm_specs)
    if judge is None:
        return next((name for name, (_, kind) in kinds.items() if kind in SEQUENCE_KINDS), None)
    name = canonical_name(judge)
    if name not in kinds:
        valid = ", ".join(kinds) if kinds else "none (add --rm NAME=DIR)"
        raise RlhfkitError(f"--judge {judge}: no --rm of that name; valid: {valid}")
    if kinds[name][1] not in SEQUENCE_KINDS:
        raise RlhfkitError(
            f"--judge {judge}: the {name} reward model is a {kinds[name][1]} model; a judge must be a "
            f"{' or '.join(SEQUENCE_KINDS)} model (one score per response)"
        )
    return name


# --- systems ------------------------------------------------------------------------------


@dataclass
class System:
    name: str
    source: str  # the policy or the generations file
    records: list[Generation]
    generated: bool = False
    scores: dict[str, list[float]] = field(default_factory=dict)  # RM name -> reward per response
    # segment RM name -> per response, (segments flagged as errors, segments)
    flagged: dict[str, list[tuple[int, int]]] = field(default_factory=dict)


def prompt_keys(prompts: list[str]) -> list[tuple[str, int]]:
    """(prompt, occurrence): the k-th time a prompt is asked matches the k-th time elsewhere."""
    seen: Counter = Counter()
    keys = []
    for prompt in prompts:
        keys.append((prompt, seen[prompt]))
        seen[prompt] += 1
    return keys


def generation_systems(paths: list[str]) -> list[System]:
    systems: dict[str, System] = {}
    for path in paths:
        for record in load_records(path, "generation"):
            name = record.model or Path(path).stem
            if name in systems and systems[name].source != path:
                raise RlhfkitError(
                    f"{path}: system '{name}' also comes from {systems[name].source}; give the records distinct `model` fields"
                )
            systems.setdefault(name, System(name, path, [])).records.append(replace(record, model=name))
    return list(systems.values())


def align_systems(systems: list[System], order: list[str], order_name: str) -> None:
    """Put every system's records in the order of `order`'s prompts (those of `order_name`);
    a system with a different prompt set is an error."""
    reference = prompt_keys(order)
    position = {key: i for i, key in enumerate(reference)}
    for system in systems:
        keys = prompt_keys([r.prompt for r in system.records])
        extra = [key for key in keys if key not in position]
        missing = len(reference) - (len(keys) - len(extra))
        if extra or missing:
            raise RlhfkitError(
                f"systems answer different prompts: '{system.name}' ({system.source}) has {len(extra)} prompt(s) "
                f"that {order_name} lacks and lacks {missing} of its {len(reference)}; every system must "
                "answer the same prompts"
            )
        ranked = sorted(zip(keys, system.records), key=lambda pair: position[pair[0]])
        system.records = [record for _, record in ranked]


def generate_system(name: str, path: str, prompts: list[PromptRecord], cfg: EvaluateConfig, device: torch.device) -> System:
    model, tokenizer, is_encoder_decoder = load_policy(
        path, dtype=cfg.dtype, device=str(device), trust_remote_code=cfg.trust_remote_code
    )
    override_chat_template(tokenizer, load_chat_template(cfg.chat_template))
    if not is_encoder_decoder:
        fit_default_lengths(cfg, model_max_positions(model), ("max_prompt_length", "max_new_tokens"), "evaluate")
    sampling = SamplingConfig(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        do_sample=cfg.sample,
    )
    records = []
    with progress_bar(f"generate {name}", len(prompts)) as advance:
        for index, begin in enumerate(range(0, len(prompts), cfg.batch_size)):
            batch = prompts[begin : begin + cfg.batch_size]
            texts = [render_prompt(tokenizer, p.prompt, p.meta, cfg.apply_chat_template) for p in batch]
            rollout = generate(
                model,
                tokenizer,
                texts,
                sampling,
                max_prompt_length=cfg.max_prompt_length,
                is_encoder_decoder=is_encoder_decoder,
                generator_seed=cfg.seed + index if cfg.sample else None,
                templated={text for text, p in zip(texts, batch) if text != p.prompt},
            )
            for prompt, text, finished in zip(batch, rollout.texts, rollout.finished.tolist()):
                records.append(
                    Generation(
                        id=f"{name}:{prompt.id}",
                        prompt=prompt.prompt,
                        response=text,
                        model=name,
                        meta={"prompt_id": prompt.id, "finished": bool(finished), **prompt.meta},
                    )
                )
            advance(len(batch))
    return System(name, path, records, generated=True)


def free_device_memory() -> None:
    """Hand a dropped model's GPU memory back before the next one loads (one model at a time)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


# --- metrics ------------------------------------------------------------------------------


def score_systems(systems: list[System], rms: dict[str, tuple[str, str]], cfg: EvaluateConfig, device: torch.device) -> None:
    """Each RM's reward of every response (into `system.scores`) and, for a segment RM, each
    response's flagged and all segments (into `system.flagged`).

    Each distinct (prompt, response) is scored once, so identical responses of two systems
    get identical scores (and tie under the judge).
    """
    shared: dict[str, dict] = {}  # a shared-backbone RM's aspects, loaded once: one forward pass per batch for all
    for name, (path, kind) in rms.items():
        if read_spec(path)["kind"] == SHARED_KIND:
            if path not in shared:
                shared = {path: load_reward_models(path, device=device, dtype=cfg.dtype)}  # the previous one is freed
            rm = shared[path][name.rpartition(".")[2]]
        else:
            rm = load_reward_model(path, device=device, dtype=cfg.dtype)
        pairs = list(dict.fromkeys((r.prompt, r.response) for s in systems for r in s.records))
        metas = {}
        for system in systems:
            for r in system.records:
                metas.setdefault((r.prompt, r.response), r.meta)
        # A prompt reaches the RM as it was trained on it: through the RM tokenizer's chat
        # template for conversational records (and plain ones under its --apply-chat-template).
        prompts = [rm.render_prompt(p, metas[(p, r)]) for p, r in pairs]
        rewards = rm.score(prompts, [r for _, r in pairs], batch_size=cfg.batch_size)
        by_pair = dict(zip(pairs, rewards))
        for system in systems:
            scored = [by_pair[(r.prompt, r.response)] for r in system.records]
            system.scores[name] = [sum(s.values) for s in scored]
            if kind == "segment":
                system.flagged[name] = [(sum(1 for p in s.error_probs or [] if p > 0.5), len(s.error_probs or [])) for s in scored]
        del rm
        free_device_memory()


def system_metrics(
    system: System,
    rms: dict[str, tuple[str, str]],
    weights: dict[str, float],
    references: dict[str, list[str]],
    ppl_terms: list[tuple[float, int]] | None,
) -> tuple[dict[str, float], dict[str, tuple[int, Statistic]]]:
    """The system's metrics, and each one's statistic of resampled prompts (for its interval)."""
    responses = [r.response for r in system.records]
    prompts = [r.prompt for r in system.records]
    ones = [1.0] * len(responses)
    metrics: dict[str, float] = {"n": len(responses)}
    statistics: dict[str, tuple[int, Statistic]] = {}

    def mean_of(key: str, values: list[float]) -> None:
        metrics[key] = sum(values) / len(values)
        statistics[key] = ratio_statistic(prompts, values, ones)

    for name, (_, kind) in rms.items():
        mean_of(raw_reward_key(name), system.scores[name])
        if kind == "segment":
            errors, segments = [f for f, _ in system.flagged[name]], [n for _, n in system.flagged[name]]
            metrics[f"error_rate/{name}"] = sum(errors) / sum(segments) if sum(segments) else 0.0
            statistics[f"error_rate/{name}"] = ratio_statistic(prompts, errors, segments)
    for name, weight in weights.items():
        mean_of(weighted_reward_key(name), [weight * score for score in system.scores[name]])
    if weights:
        mean_of(TOTAL_REWARD_KEY, [sum(w * system.scores[name][i] for name, w in weights.items()) for i in range(len(responses))])
    with_refs = [(r.prompt, r.response, references[r.prompt]) for r in system.records if references.get(r.prompt)]
    if with_refs:
        scores = rouge_l_scores([p for _, p, _ in with_refs], [refs for _, _, refs in with_refs])
        metrics["rouge_l"] = sum(scores) / len(scores)
        statistics["rouge_l"] = ratio_statistic([q for q, _, _ in with_refs], scores, [1.0] * len(scores))
        metrics["rouge_l_n"] = len(with_refs)
    for n in DISTINCT_NS:
        metrics[f"distinct_{n}"] = distinct_n(responses, n)
        statistics[f"distinct_{n}"] = distinct_n_statistic(prompts, responses, n)
    mean_of("mean_length", [float(len(whitespace_tokens(r))) for r in responses])
    if ppl_terms is not None:
        nll, tokens = [t[0] for t in ppl_terms], [float(t[1]) for t in ppl_terms]
        metrics["perplexity"] = math.exp(sum(nll) / sum(tokens)) if sum(tokens) else float("nan")
        units, log_perplexity = ratio_statistic(prompts, nll, tokens)
        statistics["perplexity"] = (units, lambda indices: np.exp(log_perplexity(indices)))
    return metrics, statistics


def metric_intervals(statistics: dict[str, tuple[int, Statistic]], seed: int) -> dict[str, list[float] | None]:
    """{metric: its 95% bootstrap interval over prompts} (None with fewer than 2 prompts)."""
    return {key: prompt_interval(statistic, units, seed) for key, (units, statistic) in statistics.items()}


def lower_is_better(key: str, weights: dict[str, float]) -> bool:
    """Error rates, and the raw score of a source the weights penalise."""
    return key.startswith("error_rate/") or (key.startswith(RAW_REWARD_PREFIX) and weights.get(key.removeprefix(RAW_REWARD_PREFIX), 0.0) < 0)


def ranked(table: dict[str, dict[str, float]], key: str, weights: dict[str, float]) -> list[str]:
    """The systems with the metric, best first."""
    values = {name: metrics[key] for name, metrics in table.items() if metrics.get(key) is not None}
    return sorted(values, key=lambda name: values[name], reverse=not lower_is_better(key, weights))


def clearly_best(
    table: dict[str, dict[str, float]], statistics: dict[str, dict[str, tuple[int, Statistic]]], columns: list[str],
    weights: dict[str, float], seed: int,
) -> dict[str, bool | None]:
    """Per column, whether the best system is clearly ahead of the runner-up: the 95% bootstrap
    interval of their difference (both on the same resampled prompts) excludes 0. None where
    there is no runner-up, a tie at the top, or no interval."""
    verdicts: dict[str, bool | None] = {}
    for key in columns:
        order = ranked(table, key, weights)
        if len(order) < 2 or table[order[0]][key] == table[order[1]][key]:
            verdicts[key] = None
            continue
        (units, best), (_, second) = statistics[order[0]][key], statistics[order[1]][key]
        interval = prompt_interval(lambda indices, best=best, second=second: best(indices) - second(indices), units, seed)
        verdicts[key] = None if interval is None else (interval[0] > 0 or interval[1] < 0)
    return verdicts


def pairwise_win_rates(systems: list[System], judge: str, tie_margin: float, seed: int) -> list[dict]:
    """Every pair's win/tie/loss and win rate under the judge, with the win rate's 95% bootstrap
    interval over prompts and a verdict (clearly better only when the interval excludes 50%)."""
    rows = []
    for i, a in enumerate(systems):
        for b in systems[i + 1 :]:
            row = {"a": a.name, "b": b.name, **win_rate(a.scores[judge], b.scores[judge], tie_margin)}
            outcomes = [1.0 if x - y > tie_margin else 0.0 if y - x > tie_margin else 0.5
                        for x, y in zip(a.scores[judge], b.scores[judge])]
            units, statistic = ratio_statistic([r.prompt for r in a.records], outcomes, [1.0] * len(outcomes))
            interval = prompt_interval(statistic, units, seed)
            row["win_rate_ci95"] = interval
            if interval is not None and interval[0] > 0.5:
                row["verdict"] = f"{a.name} clearly better"
            elif interval is not None and interval[1] < 0.5:
                row["verdict"] = f"{b.name} clearly better"
            else:
                row["verdict"] = "no clear difference"
            rows.append(row)
    return rows


# --- the report ---------------------------------------------------------------------------


def format_value(key: str, value) -> str:
    if value is None:
        return "–"
    if key == "n":
        return str(int(value))
    if key.startswith("error_rate/"):
        return f"{value:.1%}"
    if key.startswith("reward/"):
        return f"{value:+.4f}"
    if key in ("mean_length", "perplexity") or abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.4f}"


def column_label(key: str, judge: str | None = None, weights: dict[str, float] | None = None) -> str:
    """A readable header: `error_rate/factuality` -> `factuality errors`."""
    prefix, _, name = key.partition("/")
    if prefix == "error_rate":
        return f"{name} errors"
    if key == TOTAL_REWARD_KEY:
        return "weighted total"
    if key.startswith(RAW_REWARD_PREFIX):
        name = key.removeprefix(RAW_REWARD_PREFIX)
        label = f"{name} score (judge)" if name == judge else f"{name} reward"
        return label + (" (penalised)" if (weights or {}).get(name, 0.0) < 0 else "")
    if prefix == "reward":
        return key
    return {"rouge_l": "ROUGE-L", "mean_length": "length (words)", "distinct_1": "distinct-1", "distinct_2": "distinct-2",
            "distinct_3": "distinct-3"}.get(key, key)


def main_columns(table: dict[str, dict[str, float]], weights: dict[str, float] | None = None) -> list[str]:
    """Per aspect its error rate (segment RMs) and raw reward, the weighted total (with
    --rewards), then ROUGE-L and length."""
    keys = list(dict.fromkeys(key for metrics in table.values() for key in metrics))
    columns = []
    for key in keys:
        if key.startswith(RAW_REWARD_PREFIX):
            errors = "error_rate/" + key.removeprefix(RAW_REWARD_PREFIX)
            columns += [errors, key] if errors in keys else [key]
    columns += [TOTAL_REWARD_KEY] if weights and TOTAL_REWARD_KEY in keys else []
    return columns + [key for key in ("rouge_l", "mean_length") if key in keys]


def format_cell(key: str, value, interval: list[float] | None) -> str:
    """The value, with its 95% interval when there is one."""
    text = format_value(key, value)
    return text if value is None or interval is None else f"{text} [{format_value(key, interval[0])}, {format_value(key, interval[1])}]"


def markdown_rows(columns: list[str], labels: list[str], rows: list[tuple[str, dict]], intervals: dict[str, dict] | None = None) -> list[str]:
    lines = ["| system | " + " | ".join(labels) + " |", "|---" + "|---:" * len(columns) + "|"]
    for name, metrics in rows:
        bounds = (intervals or {}).get(name, {})
        lines.append(f"| {name} | " + " | ".join(format_cell(key, metrics.get(key), bounds.get(key)) for key in columns) + " |")
    return lines


def best_systems_sentence(
    table: dict[str, dict[str, float]], columns: list[str], judge: str | None,
    weights: dict[str, float] | None = None, clearly: dict[str, bool | None] | None = None,
) -> str:
    """One sentence naming the best system on each compared metric (ties: all of them), and
    whether it is clearly ahead of the runner-up (`clearly`, see clearly_best)."""
    if len(table) < 2:
        return "One system only, so nothing to compare."
    weights = weights or {}

    def best(key: str) -> str:
        order = ranked(table, key, weights)
        target = table[order[0]][key]
        winners = [name for name in order if table[name][key] == target]
        if len(winners) == len(table):
            return f"{column_label(key, judge, weights)}: all tie ({format_value(key, target)})"
        named = winners[0] if len(winners) == 1 else ", ".join(winners[:-1]) + " and " + winners[-1]
        verdict = {True: ", clearly", False: ", not clearly"}.get((clearly or {}).get(key), "")
        return f"{column_label(key, judge, weights)}: {named} ({format_value(key, target)}{verdict})"

    compared = [key for key in columns if key != "mean_length"]
    penalised = "; lowest for a penalised source" if any(w < 0 for w in weights.values()) else ""
    return (
        f"Best system per column (lowest error rate; highest reward, score and ROUGE-L{penalised}"
        + ("; clearly: the 95% interval of its lead over the runner-up excludes 0" if clearly else "") + "): "
        + "; ".join(best(key) for key in compared) + "."
    )


def render_results(
    table: dict[str, dict[str, float]],
    pairwise: list[dict],
    judge: str | None,
    tie_margin: float,
    paper: dict | None,
    description: str,
    *,
    intervals: dict[str, dict] | None = None,
    weights: dict[str, float] | None = None,
    clearly: dict[str, bool | None] | None = None,
) -> str:
    """results.md: a main table people can read (per-aspect error rate and reward, the judge's
    score, ROUGE-L, length), a sentence on what it shows, the other metrics, the published
    numbers in a table of their own (on the paper's scale), and pairwise win rates."""
    columns = main_columns(table, weights)
    rows = list(table.items())
    lines = ["# rlhfkit evaluate", "", description, ""]
    if intervals:
        lines += ["Each value with its 95% bootstrap interval over prompts [low, high].", ""]
    lines += markdown_rows(columns, [column_label(key, judge, weights) for key in columns], rows, intervals)
    lines += ["", best_systems_sentence(table, columns, judge, weights, clearly)]
    weighted = [key for key in next(iter(table.values()), {}) if key.startswith("reward/weighted/")]
    others = weighted + [key for key in ("n", "distinct_1", "distinct_2", "distinct_3", "perplexity") if any(key in m for m in table.values())]
    lines += ["", "## Other metrics", ""]
    lines += markdown_rows(others, [column_label(key) for key in others], rows, intervals)
    if paper:
        paper_columns = list(dict.fromkeys(key for row in paper["rows"] for key in row["metrics"]))
        lines += ["", "## Published numbers", ""]
        if paper["source"]:
            lines += [f"From {paper['source']}. Their models and scales, not comparable with the rows above unless the column is the same.", ""]
        lines += markdown_rows(paper_columns, [column_label(key) for key in paper_columns],
                               [(row["system"], row["metrics"]) for row in paper["rows"]])
    if pairwise:
        lines += [
            "",
            f"## Pairwise win rates (judge: {judge}, tie margin {tie_margin:g})",
            "",
            ("A's win rate = A wins + tie / 2, with its 95% bootstrap interval over prompts; clearly better only when "
             "the interval excludes 50%."),
            "",
            "| A | B | A wins | tie | B wins | A's win rate | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in pairwise:
            interval = row.get("win_rate_ci95")
            rate = f"{row['win_rate']:.1%}" + (f" [{interval[0]:.1%}, {interval[1]:.1%}]" if interval else "")
            lines.append(f"| {row['a']} | {row['b']} | {row['win']:.1%} | {row['tie']:.1%} | {row['loss']:.1%} | {rate} | "
                         f"{row.get('verdict', '–')} |")
    return "\n".join(lines) + "\n"


# --- the stage ----------------------------------------------------------------------------


def audit(cfg: EvaluateConfig, out: Path, device: torch.device) -> dict:
    """The reward-hacking audit (--audit-rm) into `out` (rlhfkit.audit)."""
    paths = {name: path for name, (path, _) in rm_kinds(cfg.audit_rm).items()}
    result = run_audit(out, paths, cfg.audit_judge, cfg.rollouts, device=device, dtype=cfg.dtype, batch_size=cfg.batch_size)
    console.print(f"evaluate: wrote the reward-model audit to {out / AUDIT_MARKDOWN}")
    return result


def run_evaluate(cfg: EvaluateConfig) -> dict:
    """Evaluate policies and/or existing generations: rewards, error rates, ROUGE-L, distinct-n,
    length, perplexity and pairwise win rates; writes metrics.json and a results.md table.

    Published numbers (--paper TABLE.json, {"source": ..., "rows": [{"system": ..., "metrics":
    {...}}]}) are added as extra rows.
    """
    if cfg.audit_rm:
        check_audit_inputs(cfg.audit_judge, cfg.rollouts)  # before anything is written
        if not (cfg.policy or cfg.generations):
            return {"audit": audit(cfg, RunDir(cfg.out, "evaluate", cfg).path, resolve_device(cfg.device))}
    rms = rm_kinds(cfg.rm)
    weights = reward_weights(cfg.rm, cfg.rewards)
    judge = judge_name(cfg.rm, cfg.judge)
    paper = load_paper_table(cfg.paper) if cfg.paper else None
    prompts: list[PromptRecord] = load_records(cfg.prompts, "prompt") if cfg.prompts else []
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    references: dict[str, list[str]] = {}
    for record in prompts:
        references.setdefault(record.prompt, record.references)

    # Read and check every input before any model loads.
    from_files = generation_systems(cfg.generations)
    policies = parse_policies(cfg.policy)
    names = [name for name, _ in policies] + [s.name for s in from_files]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise RlhfkitError(f"system name(s) {', '.join(duplicates)} used by more than one --policy/--generations")
    if policies:
        order, order_name = [p.prompt for p in prompts], f"--prompts {cfg.prompts}"
    else:
        order, order_name = [r.prompt for r in from_files[0].records], f"'{from_files[0].name}' ({from_files[0].source})"
    align_systems(from_files, order, order_name)

    device = resolve_device(cfg.device)
    set_seed(cfg.seed)
    run = RunDir(cfg.out, "evaluate", cfg)
    systems = []
    for name, path in policies:
        systems.append(generate_system(name, path, prompts, cfg, device))
        free_device_memory()
    systems += from_files
    console.print(f"evaluate: {len(systems)} system(s) x {len(order)} prompt(s); reward models: {', '.join(rms) or 'none'}")

    score_systems(systems, rms, cfg, device)
    perplexities: dict[str, list[tuple[float, int]] | None] = {s.name: None for s in systems}
    if cfg.reference_lm:
        model, tokenizer, is_encoder_decoder = load_policy(
            cfg.reference_lm, dtype=cfg.dtype, device=str(device), trust_remote_code=cfg.trust_remote_code
        )
        if is_encoder_decoder:
            raise RlhfkitError(f"--reference-lm {cfg.reference_lm} is an encoder-decoder model; perplexity needs a causal LM")
        for system in systems:
            perplexities[system.name] = perplexity_terms(model, tokenizer, [r.response for r in system.records], batch_size=cfg.batch_size)
        del model
        free_device_memory()

    audited = audit(cfg, run.path, device) if cfg.audit_rm else None
    measured = {s.name: system_metrics(s, rms, weights, references, perplexities[s.name]) for s in systems}
    table = {name: metrics for name, (metrics, _) in measured.items()}
    statistics = {name: stats for name, (_, stats) in measured.items()}
    intervals = {name: metric_intervals(stats, cfg.seed) for name, stats in statistics.items()}
    clearly = clearly_best(table, statistics, main_columns(table, weights), weights, cfg.seed)
    pairwise = pairwise_win_rates(systems, judge, cfg.tie_margin, cfg.seed) if judge and len(systems) > 1 else []
    if len(systems) > 1 and not judge:
        console.print("evaluate: no preference/regression --rm given, so no pairwise win rates")

    decoding = (
        f"sampling (temperature {cfg.temperature}, top-k {cfg.top_k}, top-p {cfg.top_p})" if cfg.sample else "greedy decoding"
    )
    description = f"{len(order)} prompts; generated systems: {decoding}, at most {cfg.max_new_tokens} new tokens."
    if "rouge_l" not in next(iter(table.values())):
        description += " No references, so no ROUGE-L."
    write_records(
        run.path / GENERATIONS_FILE,
        (
            replace(record, meta={**record.meta, "rewards": {name: system.scores[name][i] for name in rms},
                                  **({"error_flags": {name: list(flags[i]) for name, flags in system.flagged.items()}}
                                     if system.flagged else {})})
            for system in systems
            for i, record in enumerate(system.records)
        ),
    )
    result = {
        "prompts": len(order),
        "systems": table,
        "intervals": {"level": 0.95, "over": "prompts", "seed": cfg.seed, "systems": intervals},
        "weights": weights or None,
        "pairwise": {"judge": judge, "tie_margin": cfg.tie_margin, "pairs": pairwise} if pairwise else None,
        "paper": paper,
    }
    if audited:
        result["audit"] = audited
    run.write_json(METRICS_FILE, result)
    report = render_results(table, pairwise, judge, cfg.tie_margin, paper, description, intervals=intervals, weights=weights, clearly=clearly)
    write_text(run.path / RESULTS_FILE, report)
    console.print(report, markup=False, highlight=False, soft_wrap=True)
    console.print(f"evaluate: wrote {run.path / RESULTS_FILE}, {METRICS_FILE} and {GENERATIONS_FILE}")
    return result
