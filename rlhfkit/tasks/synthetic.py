"""A synthetic long-form task whose truth is known, to test fine-grained vs holistic rewards.

The world is a small knowledge base (data/synthetic/knowledge_base.json): entities, each
with one value per attribute ("Mirel was born in Vesk.", "Mirel has a pet owl.", ...). A
prompt asks about one entity; a response is a few sentences, each stating one fact. A
programmatic annotator judges every sentence against the knowledge base:

- factuality error: the sentence gives a value the knowledge base does not have for that
  entity and attribute, or names an entity it does not know ("Wrong-Grounding" /
  "Unverifiable" in QA-Feedback terms);
- relevance error: the sentence is about another entity, repeats an attribute already
  stated, or is not a fact sentence at all ("Irrelevant", "Redundant", "Incoherent");
- completeness: the share of the asked entity's attributes stated correctly;
- holistic score: completeness - (factuality errors + relevance errors) / attributes, so a
  perfect answer (every fact once, nothing else) scores 1 and each bad sentence costs as
  much as a good one earns.

From the same sampled responses the annotator writes both kinds of human feedback the
papers compare: span feedback (SpanFeedback records, error spans on the sentences above)
and pairwise preferences (Preference records: holistic ones from the holistic score,
completeness ones from completeness), so the two reward pipelines learn from the same
samples. Demonstrations for SFT are noisy on purpose: some sentences are false, some off
topic or repeated, some facts left out, as an imperfect initial policy would be.

`make_task` writes the data files a recipe trains on (recipes/synthetic/); `report` judges
the policies' responses with the annotator itself (true error rates, not the learned
reward models) and writes the table and learning curves. `fine_grained_reward` and
`holistic_reward` are the annotator as `py:` reward sources (an oracle control).
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.console import console
from rlhfkit.errors import RlhfkitError
from rlhfkit.io import shipped_path, write_json, write_text
from rlhfkit.metrics import win_rate
from rlhfkit.plots import Panel, Series, draw, save_png
from rlhfkit.recipes import recipe_function, recipe_python_function
from rlhfkit.schema import (
    Critique,
    Demonstration,
    Preference,
    PromptRecord,
    Span,
    SpanFeedback,
    load_records,
    write_records,
)
from rlhfkit.segment import split_sentences

DEFAULT_KB = "data/synthetic/knowledge_base.json"
FACTUALITY, RELEVANCE = "factuality", "relevance"
KB_KEYS = ("questions", "prompt_format", "attributes", "entities")


# --- the knowledge base --------------------------------------------------------------------


@dataclass(frozen=True)
class KnowledgeBase:
    questions: list[str]
    prompt_format: str
    templates: dict[str, str]  # attribute -> "{entity} ... {value}."
    values: dict[str, list[str]]  # attribute -> every value it can take
    entities: dict[str, dict[str, str]]  # entity -> attribute -> its value

    @property
    def attributes(self) -> list[str]:
        return list(self.templates)

    def prompt(self, entity: str, question: int = 0) -> str:
        return self.prompt_format.format(question=self.questions[question].format(entity=entity))

    def sentence(self, entity: str, attribute: str, value: str) -> str:
        return self.templates[attribute].format(entity=entity, value=value)

    @functools.cached_property
    def patterns(self) -> list[tuple[str, re.Pattern]]:
        """One regex per attribute template, capturing the entity and the value."""
        out = []
        for attribute, template in self.templates.items():
            text = re.escape(template.rstrip("."))
            text = text.replace(re.escape("{entity}"), r"(?P<entity>.+?)").replace(re.escape("{value}"), r"(?P<value>.+?)")
            out.append((attribute, re.compile(rf"^{text}\.?$")))
        return out

    def parse(self, sentence: str) -> tuple[str, str, str] | None:
        """(entity, attribute, value) a sentence states, or None if it fits no template."""
        text = " ".join(sentence.split())
        for attribute, pattern in self.patterns:
            match = pattern.match(text)
            if match:
                return match.group("entity"), attribute, match.group("value")
        return None

    def entity_of_prompt(self, prompt: str) -> str:
        """The entity a prompt asks about (the first known name in it)."""
        found = [(prompt.find(name), name) for name in self.entities if re.search(rf"\b{re.escape(name)}\b", prompt)]
        if not found:
            raise RlhfkitError(f"no knowledge-base entity in the prompt {prompt[:80]!r}")
        return min(found)[1]


@functools.lru_cache(maxsize=8)
def load_knowledge_base(path: str = DEFAULT_KB) -> KnowledgeBase:
    """Read and check a knowledge-base JSON file (see data/synthetic/README.md)."""
    try:
        data = json.loads(shipped_path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RlhfkitError(f"{path}: cannot read the knowledge base: {err}") from None
    missing = [k for k in KB_KEYS if k not in data]
    if missing:
        raise RlhfkitError(f"{path}: missing key(s) {', '.join(missing)}")
    templates = {a: spec["template"] for a, spec in data["attributes"].items()}
    values = {a: list(spec["values"]) for a, spec in data["attributes"].items()}
    for attribute, template in templates.items():
        if "{entity}" not in template or "{value}" not in template:
            raise RlhfkitError(f"{path}: the template of {attribute!r} needs {{entity}} and {{value}}")
    for entity, facts in data["entities"].items():
        if set(facts) != set(templates):
            raise RlhfkitError(f"{path}: entity {entity!r} must have exactly the attributes {', '.join(templates)}")
        for attribute, value in facts.items():
            if value not in values[attribute]:
                raise RlhfkitError(f"{path}: {entity}.{attribute} = {value!r} is not one of the attribute's values")
    return KnowledgeBase(list(data["questions"]), data["prompt_format"], templates, values, dict(data["entities"]))


# --- the annotator -------------------------------------------------------------------------


@dataclass
class SentenceJudgement:
    start: int
    end: int
    text: str
    factual_error: str | None  # None, "Wrong-Grounding" or "Unverifiable"
    relevance_error: str | None  # None, "Irrelevant", "Redundant" or "Incoherent"
    covers: str | None = None  # the asked entity's attribute this sentence states correctly


@dataclass
class Judgement:
    """The annotator's verdict on one response."""

    entity: str
    sentences: list[SentenceJudgement]
    attributes: int

    @property
    def factual_errors(self) -> int:
        return sum(s.factual_error is not None for s in self.sentences)

    @property
    def relevance_errors(self) -> int:
        return sum(s.relevance_error is not None for s in self.sentences)

    @property
    def covered(self) -> set[str]:
        return {s.covers for s in self.sentences if s.covers}

    @property
    def completeness(self) -> float:
        return len(self.covered) / self.attributes

    @property
    def holistic(self) -> float:
        return self.completeness - (self.factual_errors + self.relevance_errors) / self.attributes

    def spans(self) -> list[Span]:
        out = []
        for s in self.sentences:
            if s.factual_error:
                out.append(Span(s.start, s.end, s.factual_error, FACTUALITY))
            if s.relevance_error:
                out.append(Span(s.start, s.end, s.relevance_error, RELEVANCE))
        return out


def judge(kb: KnowledgeBase, prompt: str, response: str) -> Judgement:
    """Judge every sentence of `response` (sentences as rlhfkit.segment cuts them)."""
    entity = kb.entity_of_prompt(prompt)
    stated: set[str] = set()
    sentences = []
    for segment in split_sentences(response):
        parsed = kb.parse(segment.text)
        judgement = SentenceJudgement(segment.start, segment.end, segment.text, None, None)
        if parsed is None:
            judgement.relevance_error = "Incoherent"
        else:
            about, attribute, value = parsed
            if about not in kb.entities:
                judgement.factual_error = "Unverifiable"
            elif kb.entities[about][attribute] != value:
                judgement.factual_error = "Wrong-Grounding"
            if about != entity:
                judgement.relevance_error = "Irrelevant"
            elif attribute in stated:
                judgement.relevance_error = "Redundant"
            else:
                stated.add(attribute)
                if judgement.factual_error is None:
                    judgement.covers = attribute
        sentences.append(judgement)
    return Judgement(entity, sentences, len(kb.attributes))


@dataclass
class TrueMetrics:
    """Corpus-level truth: error rates pooled over sentences, means over responses."""

    factual_error_rate: float
    relevance_error_rate: float
    completeness: float
    holistic: float
    sentences_per_response: float
    responses: int

    @classmethod
    def of(cls, judgements: Sequence[Judgement]) -> TrueMetrics:
        if not judgements:
            raise ValueError("no responses to measure")
        sentences = sum(len(j.sentences) for j in judgements)
        return cls(
            factual_error_rate=sum(j.factual_errors for j in judgements) / sentences if sentences else 0.0,
            relevance_error_rate=sum(j.relevance_errors for j in judgements) / sentences if sentences else 0.0,
            completeness=statistics.fmean(j.completeness for j in judgements),
            holistic=statistics.fmean(j.holistic for j in judgements),
            sentences_per_response=sentences / len(judgements),
            responses=len(judgements),
        )


METRIC_NAMES = {
    "factual_error_rate": "factual error rate ↓",
    "relevance_error_rate": "relevance error rate ↓",
    "completeness": "completeness ↑",
    "holistic": "holistic score ↑",
}


# --- noisy responses and the task files ------------------------------------------------------------


@dataclass(frozen=True)
class Noise:
    """How an imperfect responder errs, per sentence (and how long it answers)."""

    false: float = 0.25  # a wrong value for the asked entity
    off_topic: float = 0.2  # a true fact about another entity
    repeat: float = 0.1  # a sentence said again (after each sentence, at random)
    min_sentences: int = 2
    max_sentences: int = 5


def noisy_response(kb: KnowledgeBase, entity: str, noise: Noise, rng: random.Random) -> str:
    """A response about `entity` with facts left out, falsified, off topic or repeated, at random."""
    attributes = kb.attributes[:]
    rng.shuffle(attributes)
    count = rng.randint(noise.min_sentences, min(noise.max_sentences, len(attributes)))
    others = [e for e in kb.entities if e != entity]
    sentences = []
    for attribute in attributes[:count]:
        if rng.random() < noise.off_topic:
            other = rng.choice(others)
            sentences.append(kb.sentence(other, attribute, kb.entities[other][attribute]))
        elif rng.random() < noise.false:
            wrong = [v for v in kb.values[attribute] if v != kb.entities[entity][attribute]]
            sentences.append(kb.sentence(entity, attribute, rng.choice(wrong)))
        else:
            sentences.append(kb.sentence(entity, attribute, kb.entities[entity][attribute]))
        if rng.random() < noise.repeat:
            sentences.append(rng.choice(sentences))
    return " ".join(sentences)


def annotate(kb: KnowledgeBase, prompt: str, responses: Sequence[str], key: str) -> tuple[list[SpanFeedback], list[Preference]]:
    """The annotator's two kinds of feedback on the same responses to one prompt: span
    feedback on each response, and a holistic and a completeness preference for each pair."""
    judgements = [judge(kb, prompt, r) for r in responses]
    feedback = [
        SpanFeedback(id=f"{key}:r{i}", prompt=prompt, response=r, spans=j.spans(), aspects=[RELEVANCE, FACTUALITY],
                     meta={"completeness": j.completeness, "holistic": j.holistic})
        for i, (r, j) in enumerate(zip(responses, judgements))
    ]
    preferences = []
    for a in range(len(responses)):
        for b in range(a + 1, len(responses)):
            if responses[a] == responses[b]:
                continue
            for aspect, score in (("preference", lambda j: j.holistic), ("completeness", lambda j: j.completeness)):
                sa, sb = score(judgements[a]), score(judgements[b])
                chosen, rejected = (a, b) if sa >= sb else (b, a)
                preferences.append(
                    Preference(id=f"{key}:r{a}-r{b}:{aspect}", prompt=prompt, chosen=responses[chosen],
                               rejected=responses[rejected], aspect=aspect, tie=sa == sb)
                )
    return feedback, preferences


RELEVANCE_WORDS = {"Irrelevant": "about someone else", "Redundant": "repeated", "Incoherent": "not a fact"}


def critique(kb: KnowledgeBase, judgement: Judgement) -> str:
    """The annotator's natural-language critique of a judged response: which sentence (1-based)
    is false, off-topic, repeated or not a fact, and which attributes are missing.

    "Sentence 2 is false. Sentence 3 is about someone else. Missing: job, pet." A response
    with nothing wrong or missing gets "Nothing is wrong or missing."
    """
    lines = []
    for number, sentence in enumerate(judgement.sentences, start=1):
        faults = (["false"] if sentence.factual_error else []) + (
            [RELEVANCE_WORDS[sentence.relevance_error]] if sentence.relevance_error else [])
        if faults:
            lines.append(f"Sentence {number} is {' and '.join(faults)}.")
    missing = [a for a in kb.attributes if a not in judgement.covered]
    if missing:
        lines.append(f"Missing: {', '.join(missing)}.")
    return " ".join(lines) or "Nothing is wrong or missing."


def revision(kb: KnowledgeBase, judgement: Judgement) -> str:
    """The annotator's corrected response: sentences about the asked entity kept in order with
    false values corrected, off-topic, repeated and non-fact sentences dropped, then every
    missing attribute stated (in the knowledge base's order): each attribute exactly once."""
    facts = kb.entities[judgement.entity]
    stated: list[str] = []
    for sentence in judgement.sentences:
        parsed = kb.parse(sentence.text)
        if parsed is None:
            continue
        about, attribute, _ = parsed
        if about == judgement.entity and attribute not in stated:
            stated.append(attribute)
    stated += [a for a in kb.attributes if a not in stated]
    return " ".join(kb.sentence(judgement.entity, a, facts[a]) for a in stated)


def critiques_of(kb: KnowledgeBase, feedback: Sequence[SpanFeedback]) -> list[Critique]:
    """The annotator's critique and corrected revision of every judged response."""
    out = []
    for record in feedback:
        judgement = judge(kb, record.prompt, record.response)
        out.append(Critique(id=record.id, prompt=record.prompt, response=record.response,
                            critique=critique(kb, judgement), revision=revision(kb, judgement)))
    return out


@recipe_python_function
def audit_judge(prompts: list[str], responses: list[str], kb: str = DEFAULT_KB) -> list[dict]:
    """The annotator as the judge of `rlhfkit evaluate --audit-rm` (rlhfkit.audit): its error
    spans, and the true score of each sequence RM's aspect (preference: the holistic score;
    completeness: the share of attributes stated correctly)."""
    base = load_knowledge_base(kb)
    out = []
    for prompt, response in zip(prompts, responses):
        j = judge(base, prompt, response)
        out.append({"spans": j.spans(), "scores": {"preference": j.holistic, "completeness": j.completeness}})
    return out


@recipe_function(reads=["kb"], makes=["out"])
def make_task(out: str, kb: str = DEFAULT_KB, entities: int | None = None, demonstrations_per_prompt: int = 12,
              feedback_per_prompt: int = 16, responses_per_comparison: int = 4, false: float = 0.25,
              off_topic: float = 0.2, repeat: float = 0.1, feedback_repeat: float | None = None, seed: int = 0) -> dict:
    """Write the synthetic task's files to `out`: prompts.jsonl (every entity x question
    template), demonstrations.jsonl (noisy responses, the SFT data), span_feedback.jsonl,
    preferences.jsonl and critiques.jsonl (the annotator's feedback on the same fresh noisy
    responses: groups of `responses_per_comparison`, every pair compared; a critique and a
    corrected revision of each), and task.json (the settings).

    `feedback_repeat` (default: `repeat`) is the repeat rate of the responses the annotator
    judges: a policy trained against learned RMs drifts to long, repetitive answers, so RMs
    that are to judge it need repeats in their training data (see recipes/synthetic)."""
    base = load_knowledge_base(kb)
    names = list(base.entities)[: entities or None]
    noise = Noise(false=false, off_topic=off_topic, repeat=repeat)
    feedback_noise = Noise(false=false, off_topic=off_topic, repeat=repeat if feedback_repeat is None else feedback_repeat)
    rng = random.Random(seed)
    prompts, demos, feedback, preferences = [], [], [], []
    for name in names:
        for q in range(len(base.questions)):
            prompt = base.prompt(name, q)
            key = f"{name}:q{q}"
            prompts.append(PromptRecord(id=key, prompt=prompt, meta={"entity": name}))
            demos += [Demonstration(id=f"{key}:d{i}", prompt=prompt, response=noisy_response(base, name, noise, rng))
                      for i in range(demonstrations_per_prompt)]
            for g in range(0, feedback_per_prompt, responses_per_comparison):
                responses = [noisy_response(base, name, feedback_noise, rng) for _ in range(responses_per_comparison)]
                f, p = annotate(base, prompt, responses, f"{key}:g{g // responses_per_comparison}")
                feedback += f
                preferences += p
    target = Path(out)
    write_records(target / "prompts.jsonl", prompts)
    write_records(target / "demonstrations.jsonl", demos)
    write_records(target / "span_feedback.jsonl", feedback)
    write_records(target / "preferences.jsonl", preferences)
    write_records(target / "critiques.jsonl", critiques_of(base, feedback))
    demo_truth = TrueMetrics.of([judge(base, d.prompt, d.response) for d in demos])
    summary = {
        "knowledge_base": kb, "entities": len(names), "prompts": len(prompts), "demonstrations": len(demos),
        "span_feedback": len(feedback), "preferences": len(preferences), "seed": seed,
        "noise": {"false": false, "off_topic": off_topic, "repeat": repeat, "feedback_repeat": feedback_noise.repeat},
        "demonstrations_truth": demo_truth.__dict__,
    }
    write_json(target / "task.json", summary)
    console.print(f"synthetic: {len(prompts)} prompts, {len(demos)} demonstrations, {len(feedback)} span feedback, "
                  f"{len(preferences)} preferences -> {out}")
    return summary


# --- the annotator as a reward (oracle control) ------------------------------------------------


@recipe_python_function
def fine_grained_reward(prompts: list[str], responses: list[str], kb: str = DEFAULT_KB) -> list[list[tuple[int, float]]]:
    """Dense truth: at each sentence end, +1/A for a newly covered fact, -1/A per error
    (A = attributes); the rewards of a response sum to its holistic score."""
    base = load_knowledge_base(kb)
    out = []
    for prompt, response in zip(prompts, responses):
        j = judge(base, prompt, response)
        pairs = [(s.end, ((s.covers is not None) - (s.factual_error is not None) - (s.relevance_error is not None)) / j.attributes)
                 for s in j.sentences]
        out.append(pairs or [(len(response), 0.0)])
    return out


@recipe_python_function
def holistic_reward(prompts: list[str], responses: list[str], kb: str = DEFAULT_KB) -> list[float]:
    """The same total as `fine_grained_reward`, given once at the end of the response."""
    base = load_knowledge_base(kb)
    return [judge(base, p, r).holistic for p, r in zip(prompts, responses)]


# --- the report ----------------------------------------------------------------------------------


@dataclass
class Condition:
    name: str
    runs: list[Path]
    seeds: list[int]
    final: dict[str, list[TrueMetrics]] = field(default_factory=dict)  # evaluation -> one per seed
    curves: list[list[TrueMetrics]] = field(default_factory=list)  # per seed, per PPO step


def rollout_curve(kb: KnowledgeBase, run: Path) -> list[TrueMetrics]:
    """The truth about the responses PPO sampled at each step (its rollouts.jsonl)."""
    path = run / "rollouts.jsonl"
    by_step: dict[int, list[Judgement]] = {}
    for record in load_records(path, "generation"):
        by_step.setdefault(int(record.meta["step"]), []).append(judge(kb, record.prompt, record.response))
    return [TrueMetrics.of(by_step[s]) for s in sorted(by_step)]


def _mean_spread(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def _judged_systems(kb: KnowledgeBase, generations: str) -> dict[str, list[Judgement]]:
    by_system: dict[str, list[Judgement]] = {}
    for record in load_records(generations, "generation"):
        by_system.setdefault(record.model, []).append(judge(kb, record.prompt, record.response))
    return by_system


def _system(by_system: dict[str, list[Judgement]], name: str, source: str) -> TrueMetrics:
    if name not in by_system:
        raise RlhfkitError(f"{source}: no system named {name!r}; systems: {', '.join(by_system)}")
    return TrueMetrics.of(by_system[name])


@recipe_function(reads=["evaluations", "run_pattern", "kb", "evaluate_metrics", "audit", "critique_revise"],
                 writes=["out", "curves"])
def report(out: str, curves: str, evaluations: dict[str, str], run_pattern: str, conditions: list[str],
           seeds: list[int], baseline: str = "SFT", kb: str = DEFAULT_KB, evaluate_metrics: str | None = None,
           title: str = "", notes: str = "", goals: list[dict] | None = None, audit: str | None = None,
           critique_revise: str | None = None) -> dict:
    """Judge every system's evaluation responses with the annotator (truth, not the learned
    RMs); write the tables (`out`, markdown: mean ± sample std over seeds) and the learning
    curves (`curves`, PNG) from each PPO run's sampled rollouts.

    `evaluations`: {label: evaluate's generations.jsonl}, each with systems named `baseline`
    and `{condition}-seed{seed}`; `run_pattern`: a PPO run directory, with {condition} and
    {seed}; `evaluate_metrics`: an evaluate metrics.json whose learned-RM view is added.
    `goals`: comparisons to judge on the first evaluation's holistic score, each
    {"better": condition, "than": condition, "above_baseline": bool} (see `goal_verdicts`);
    `audit`: an `evaluate --audit-rm` audit.json with runs named `{condition}-seed{seed}`;
    `critique_revise`: a `critique-revise run` revisions.jsonl, judged round by round.
    """
    base = load_knowledge_base(kb)
    judged = {label: _judged_systems(base, path) for label, path in evaluations.items()}
    baselines = {label: _system(judged[label], baseline, path) for label, path in evaluations.items()}
    table: list[Condition] = []
    for name in conditions:
        condition = Condition(name, [Path(run_pattern.format(condition=name, seed=s)) for s in seeds], list(seeds))
        for label, path in evaluations.items():
            condition.final[label] = [_system(judged[label], f"{name}-seed{seed}", path) for seed in seeds]
        condition.curves = [rollout_curve(base, run) for run in condition.runs]
        table.append(condition)

    lines = [f"# {title or 'Synthetic task: fine-grained vs holistic rewards'}", ""]
    if notes:
        lines += [notes.strip(), ""]
    lines += [(f"Truth from the programmatic annotator ({kb}), not from the learned reward models. "
               f"PPO rows: mean ± sample std over seeds {', '.join(map(str, seeds))}."), ""]
    for label in evaluations:
        lines += [f"## Evaluation: {label} ({baselines[label].responses} responses per system)", "",
                  "| system | " + " | ".join(METRIC_NAMES.values()) + " | sentences |",
                  "|---" * (len(METRIC_NAMES) + 2) + "|",
                  f"| {baseline} | " + " | ".join(f"{getattr(baselines[label], k):.3f}" for k in METRIC_NAMES)
                  + f" | {baselines[label].sentences_per_response:.2f} |"]
        for condition in table:
            final = condition.final[label]
            cells = [_mean_spread([getattr(m, k) for m in final]) for k in METRIC_NAMES]
            lines.append(f"| {condition.name} | " + " | ".join(cells) + f" | {_mean_spread([m.sentences_per_response for m in final])} |")
        lines.append("")
    steps = min(len(c) for cond in table for c in cond.curves)
    windows = _windows(steps)
    lines += ["## During training (the responses PPO sampled)", "",
              "The annotator's holistic score of each step's rollouts, averaged over step windows; mean ± std over seeds.", "",
              "| condition | " + " | ".join(f"steps {a + 1}-{b}" for a, b in windows) + " |",
              "|---" * (len(windows) + 1) + "|"]
    for condition in table:
        cells = [_mean_spread([statistics.fmean(m.holistic for m in curve[a:b]) for curve in condition.curves]) for a, b in windows]
        lines.append(f"| {condition.name} | " + " | ".join(cells) + " |")
    verdicts = []
    for label in evaluations:
        holistic = {c.name: [m.holistic for m in c.final[label]] for c in table}
        verdicts += [{**v, "evaluation": label} for v in goal_verdicts(goals or [], holistic, baselines[label].holistic, baseline)]
    revisions = judge_revisions(base, critique_revise) if critique_revise else None
    if revisions:
        verdicts += [{**goal, "evaluation": "critique-and-revise rounds"} for goal in revisions["goals"]]
    if verdicts:
        lines += ["", "## Goals (the annotator's holistic score)", "",
                  "| goal | evaluation | measured | met |", "|---|---|---|---|"]
        lines += [f"| {v['goal']} | {v['evaluation']} | {v['measured']} | {'yes' if v['met'] else '**no**'} |" for v in verdicts]
    if revisions:
        lines += revisions["lines"]
    audited = json.loads(Path(audit).read_text(encoding="utf-8")) if audit else None
    if audited:
        lines += audit_summary(audited, [c.name for c in table], seeds)
        plot = Path(audit).with_name("audit.png")
        if plot.is_file():
            lines += ["", f"![RM accuracy per PPO step]({_relative_path(str(plot), Path(out).parent)})"]
    if evaluate_metrics and Path(evaluate_metrics).is_file():
        lines += _learned_rm_view(json.loads(Path(evaluate_metrics).read_text(encoding="utf-8")),
                                  [baseline] + [f"{c.name}-seed{s}" for c in table for s in seeds])
    lines += ["", f"![learning curves]({_relative_path(curves, Path(out).parent)})"]
    text = "\n".join(lines) + "\n"
    write_text(out, text)
    plot_curves(curves, table, f"synthetic task: {Path(curves).parent.name}")
    result = {
        "goals": verdicts,
        "critique_revise": revisions["rounds"] if revisions else None,
        "baseline": {label: m.__dict__ for label, m in baselines.items()},
        "conditions": {c.name: {"seeds": c.seeds, "final": {label: [m.__dict__ for m in ms] for label, ms in c.final.items()},
                                "curves": [[m.__dict__ for m in curve] for curve in c.curves]} for c in table},
    }
    write_json(Path(out).with_suffix(".json"), result)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    console.print(f"synthetic: wrote {out} and {curves}")
    return result


def goal_verdicts(goals: Sequence[dict], holistic: dict[str, list[float]], baseline_score: float, baseline: str) -> list[dict]:
    """Each goal `{"better": A, "than": B, "above_baseline": bool}` judged on per-seed scores:
    met when A's mean beats B's *beyond the spread over seeds* (A's worst seed above B's best
    seed) and, with `above_baseline`, neither mean is below the baseline's."""
    out = []
    for goal in goals:
        a, b = goal["better"], goal["than"]
        if a not in holistic or b not in holistic:
            raise RlhfkitError(f"goal {a} > {b}: conditions are {', '.join(holistic)}")
        beyond = min(holistic[a]) > max(holistic[b])
        text = f"{a} beats {b} beyond the seed spread"
        measured = (f"{a} {_mean_spread(holistic[a])} (seeds {min(holistic[a]):.3f}..{max(holistic[a]):.3f}) vs "
                    f"{b} {_mean_spread(holistic[b])} (seeds {min(holistic[b]):.3f}..{max(holistic[b]):.3f})")
        met = beyond
        if goal.get("above_baseline"):
            text += f", neither below {baseline}"
            above = {name: statistics.fmean(holistic[name]) >= baseline_score for name in (a, b)}
            measured += f"; {baseline} {baseline_score:.3f}" + "".join(
                f"; {name} below {baseline}" for name, ok in above.items() if not ok)
            met = met and all(above.values())
        out.append({"goal": text, "measured": measured, "met": met})
    return out


def judge_revisions(kb: KnowledgeBase, path: str) -> dict:
    """Critique-and-revise judged by the annotator: per round, the share of inputs whose
    response beats / ties / trails its original on the holistic score, the paper's win rate
    (win + tie / 2) and the mean scores. Goals: round 1's win rate above 50%, and the last
    round's above round 1's."""
    records = load_records(path, "generation")
    originals = [judge(kb, r.prompt, r.meta["original_response"]).holistic for r in records]
    count = max(len(r.meta["rounds"]) for r in records)
    rounds = []
    for k in range(count):
        # An input whose rounds stopped early keeps its last response.
        scores = [judge(kb, r.prompt, r.meta["rounds"][min(k, len(r.meta["rounds"]) - 1)]["response"]).holistic
                  if r.meta["rounds"] else original for r, original in zip(records, originals)]
        rounds.append({
            "round": k + 1,
            **win_rate(scores, originals),
            "holistic": statistics.fmean(scores),
            "accepted": sum(bool(r.meta["rounds"]) and k < len(r.meta["rounds"]) and r.meta["rounds"][k]["flag"] is None
                            for r in records) / len(records),
        })
    lines = ["", f"## Critique-and-revise, judged by the annotator ({len(records)} SFT samples)", "",
             (f"Originals: holistic score {statistics.fmean(originals):.3f}. Win: the round's response scores higher "
             "than its original; a flagged revision keeps the previous response. Win rate: win + tie / 2 "
             "(Jin et al. 2023)."), "",
             "| round | win | tie | loss | win rate | holistic score | revisions accepted |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['win']:.1%} | {r['tie']:.1%} | {r['loss']:.1%} | {r['win_rate']:.1%} | {r['holistic']:.3f} "
              f"| {r['accepted']:.1%} |" for r in rounds]
    first, last = rounds[0], rounds[-1]
    measured = f"win rate (win + tie/2) round 1 {first['win_rate']:.1%}, round {last['round']} {last['win_rate']:.1%}"
    goals = [{"goal": "critique-and-revise: win rate over the originals above 50%", "measured": measured,
              "met": first["win_rate"] > 0.5},
             {"goal": f"critique-and-revise: win rate rising from round 1 to {last['round']}", "measured": measured,
              "met": last["win_rate"] > first["win_rate"]}]
    return {"rounds": rounds, "lines": lines, "goals": goals, "originals": statistics.fmean(originals)}


def audit_summary(audited: dict, conditions: Sequence[str], seeds: Sequence[int]) -> list[str]:
    """The RM audit per condition: each learned RM's accuracy on the policy's own rollouts in
    the first and last quarter of training, and what it and the truth say (mean ± std over seeds)."""
    from rlhfkit.audit import step_windows, window_mean

    lines = ["", "## Reward-model audit on each arm's own rollouts", "",
             ("Each learned RM against the annotator on the responses PPO sampled (`rlhfkit evaluate --audit-rm`; "
             "segment RMs: segment accuracy, sequence RMs: pairwise accuracy on same-prompt pairs). First / last: "
             "the first and the last quarter of the PPO steps. For segment RMs the truth is the true error rate "
             "and the RM's view the error rate it flags; for sequence RMs the annotator's mean score and the "
             "RM's mean normalised score."), "",
             "| arm | RM | accuracy first | accuracy last | truth first → last | RM's view first → last |",
             "|---|---|---|---|---|---|"]
    for condition in conditions:
        runs = [audited["runs"].get(f"{condition}-seed{seed}") for seed in seeds]
        if not all(runs):
            continue
        for rm, kind in audited["kinds"].items():
            truth_key, view_key = ("true_error_rate", "rm_error_rate") if kind == "segment" else ("judge_score", "rm_score")
            cells: dict[str, list[float]] = {}
            for run in runs:
                rows = run["rms"][rm]
                windows = step_windows(len(rows))
                (a0, b0), (a1, b1) = windows[0], windows[-1]
                for key in ("accuracy", truth_key, view_key):
                    for tag, (a, b) in (("first", (a0, b0)), ("last", (a1, b1))):
                        value = window_mean(rows[a:b], key)
                        if value is not None:
                            cells.setdefault(f"{key} {tag}", []).append(value)
            shown = {key: _mean_spread(values) for key, values in cells.items()}
            cell = [shown.get(key, "–") for key in ("accuracy first", "accuracy last", f"{truth_key} first", f"{truth_key} last",
                                                     f"{view_key} first", f"{view_key} last")]
            lines.append(f"| {condition} | {rm} | {cell[0]} | {cell[1]} | {cell[2]} → {cell[3]} | {cell[4]} → {cell[5]} |")
    return lines


def _relative_path(target: str, base: Path) -> str:
    import os

    return os.path.relpath(Path(target).resolve(), base.resolve())


def _windows(steps: int, count: int = 4) -> list[tuple[int, int]]:
    size = max(1, steps // count)
    bounds = list(range(0, steps, size))[:count] + [steps]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def _learned_rm_view(metrics: dict, systems: list[str]) -> list[str]:
    """What the learned reward models said about the same responses (from evaluate)."""
    rows = metrics.get("systems", {})
    keys = [k for k in ("error_rate/factuality", "error_rate/relevance", "reward/raw/completeness", "reward/raw/preference")
            if any(k in rows.get(s, {}) for s in systems)]
    if not keys:
        return []
    lines = ["", "## What the learned reward models said about the same responses", "",
             "| system | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for system in systems:
        if system in rows:
            lines.append(f"| {system} | " + " | ".join(f"{rows[system].get(k, float('nan')):.3f}" for k in keys) + " |")
    return lines


def plot_curves(path: str, table: list[Condition], title: str) -> None:
    """Four panels (the true metrics of the sampled rollouts) over PPO steps: each
    condition's mean over seeds, with the range over seeds shaded."""
    panels = []
    for key, label in METRIC_NAMES.items():
        series = []
        for condition in table:
            steps = min(len(c) for c in condition.curves)
            values = [[getattr(c[t], key) for c in condition.curves] for t in range(steps)]
            series.append(Series(f"{condition.name} (mean of {len(condition.curves)} seeds)", list(range(1, steps + 1)),
                                 [statistics.fmean(v) for v in values], band=([min(v) for v in values], [max(v) for v in values])))
        panels.append(Panel(label, "PPO step (sampled rollouts)", label, series))
    save_png(draw(title, panels, columns=2, width=5.5, height=3.5), path)
