"""`rlhfkit critique-revise`: learn from natural-language feedback by critiquing and revising
(Jin et al. 2023, "Data-Efficient Alignment of Large Language Models with Human Feedback
Through Natural Language", arXiv 2311.14543).

One model learns two tasks, and then improves responses by applying them in turn:
- critique: (prompt, response) -> a critique of the response;
- revision: (prompt, response, critique) -> a revised response.

`critique-revise train --data critiques.jsonl --model M --out DIR` turns every `critique`
record (annotate-import writes them; the QA-Feedback sample gives 400) into one
demonstration per task and fine-tunes M on them with `rlhfkit sft`'s training (LoRA,
checkpoints and resume included). A record with an empty revision trains the critique
task only; one with an empty critique the revision task only. The demonstrations are kept
in DIR/critique_revise_data.jsonl, and the templates in DIR/critique_revise.json, which
`run` reads so the model is prompted exactly as it was trained.

`critique-revise run --model DIR --input responses.jsonl --rounds N --out DIR2` reads any
records with a prompt and a response (`generation` records, `critique` records...) and, each
round, critiques the current response and revises it. A revision is *flagged* and the
previous response kept when it is (checked in this order):
  input_too_long its critique or revision input does not fit --max-prompt-length even with
                 the {prompt} field cut away (a long response, or a critique that ran on), so
                 nothing was generated for it;
  empty          nothing but whitespace;
  truncated      cut off at --max-new-tokens without an end-of-sequence token
                 (--accept-truncated keeps such revisions);
  repeats_input  the response it revises, verbatim (whitespace aside);
  too_short      fewer than --min-length-ratio (default 0.5) times the characters of the
                 response it revises (0 turns this check off).
Output `revisions.jsonl`: one `generation` record per input (same id and prompt) whose
`response` is the final response, with `meta.original_response` and `meta.rounds`: per
round {round, critique, critique_finished, revision, revision_finished, flag (null when
accepted), response (the response after the round)}. `summary.json` and `results.md`
count accepted and flagged revisions per round.

With `--judge RM_DIR` (a preference or regression `rlhfkit train-rm` model) the judge scores
the original responses and every round's responses; each round reports the share of inputs
whose response beats its original by more than --tie-margin (win), trails it (loss) or
neither (tie; an unchanged response always ties), and the paper's win rate, win + tie / 2
(Jin et al. 2023 count a tie half), in results.md, winrates.json and winrates.png, beside
the paper's 56.6% win rate after one round and 65.9% after five.

`--model` may be any policy (self-critique): without a critique_revise.json beside it the
default templates are used, and `run` says so.

Templates are Python format strings (literal braces doubled) with the fields {prompt},
{response} and {critique}; `--critique-template` / `--revision-template` override them.
The defaults:

    critique: "{prompt}\\n\\nResponse: {response}\\n\\nWhat is wrong or missing in this response?\\nCritique:"
    revision: "{prompt}\\n\\nResponse: {response}\\n\\nCritique: {critique}\\n\\n"
              "Rewrite the response so that it addresses the critique.\\nRevised response:"

The task's target (critique or revision text, stripped of surrounding whitespace) follows
the template directly; generated text is stripped the same way. A formatted input longer
than --max-prompt-length tokens loses tokens from the left of its {prompt} (the question of
a QA prompt comes first, but the response and critique being worked on are what matter).
"""

from __future__ import annotations

import gc
import json
import string
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from rlhfkit.chat import (
    MESSAGES_KEY,
    has_chat_template,
    load_chat_template,
    override_chat_template,
    render_prompt,
)
from rlhfkit.config import REQUIRED, build_config, check_sampling, opt
from rlhfkit.console import console
from rlhfkit.distributed import is_main_process
from rlhfkit.errors import RlhfkitError
from rlhfkit.finetune import FinetuneOptions, SFTConfig, run_sft
from rlhfkit.generation import SamplingConfig, generate, model_max_positions
from rlhfkit.io import config_to_dict, write_json, write_text
from rlhfkit.lengths import fit_generation_lengths
from rlhfkit.metrics import win_rate
from rlhfkit.model_card import push_to_hub
from rlhfkit.models import load_policy, model_dir, model_output_dir, resolve_device
from rlhfkit.plots import Panel, Series, draw, save_png
from rlhfkit.rewards.reward_model import SEQUENCE_KINDS, load_reward_model, read_spec
from rlhfkit.runs import RunDir, progress_bar, set_seed
from rlhfkit.schema import (
    Critique,
    Demonstration,
    Generation,
    check_data_file,
    load_records,
    write_records,
)

ACTIONS = ("train", "run")
DEFAULT_CRITIQUE_TEMPLATE = "{prompt}\n\nResponse: {response}\n\nWhat is wrong or missing in this response?\nCritique:"
DEFAULT_REVISION_TEMPLATE = (
    "{prompt}\n\nResponse: {response}\n\nCritique: {critique}\n\n"
    "Rewrite the response so that it addresses the critique.\nRevised response:"
)
TEMPLATE_FIELDS = {"critique": {"prompt", "response"}, "revision": {"prompt", "response", "critique"}}
TEMPLATES_FILE = "critique_revise.json"
DATA_FILE = "critique_revise_data.jsonl"
REVISIONS_FILE = "revisions.jsonl"
FLAGS = ("input_too_long", "empty", "truncated", "repeats_input", "too_short")
PAPER = "Jin et al. 2023 (arXiv 2311.14543)"
PAPER_WIN_RATES = {1: 0.566, 5: 0.659}
"""The paper's win rate, (wins + ties / 2) / N, of revised over original responses after 1 and 5 rounds
(after one round, ChatGPT: 57 wins, 67 ties, 36 losses of 160 = 56.6%)."""


@dataclass
class CritiqueReviseConfig(FinetuneOptions):
    action: str = opt(REQUIRED, "train (fine-tune a critique-and-revise model) or run (critique and revise responses).", argument=True, panel="Data")
    model: str = opt(REQUIRED, "train: the base model (hub id or directory); run: the critique-and-revise model (or any policy: self-critique).", panel="Model")
    out: str = opt(REQUIRED, "Output directory. train: the model + critique_revise.json; run: revisions.jsonl, results.md (+ winrates with --judge).", panel="Output")
    data: str | None = opt(None, "[train] JSONL of `critique` records (annotate-import writes critiques.jsonl).", panel="Data")
    input: str | None = opt(None, "[run] JSONL of records with prompt and response (e.g. `generation` records).", panel="Data")
    rounds: int = opt(1, "[run] Critique-and-revise rounds (the paper: up to 5).", panel="Generation")
    judge: str | None = opt(None, "[run] Preference/regression reward-model directory that judges each round against the originals.", panel="Rewards")
    max_inputs: int | None = opt(None, "[run] Only the first N records of --input.", panel="Data")
    critique_template: str | None = opt(None, "Critique prompt, a format string with {prompt} {response} (default: the model's critique_revise.json, else the built-in one).", panel="Data")
    revision_template: str | None = opt(None, "Revision prompt, a format string with {prompt} {response} {critique} (default: as --critique-template).", panel="Data")
    min_length_ratio: float = opt(0.5, "[run] Flag a revision shorter than this times the response it revises, in characters (0 = off).", panel="Generation")
    accept_truncated: bool = opt(False, "[run] Keep revisions cut off at --max-new-tokens (by default they are flagged).", panel="Generation")
    tie_margin: float = opt(0.0, "[run] Judge score difference (normalised units) at or below which a round's response ties its original.", panel="Generation")
    max_new_tokens: int = opt(256, "[run] Max tokens of each critique and revision.", panel="Generation")
    max_prompt_length: int = opt(1024, "[run] Max tokens of a formatted critique/revision input; longer ones lose tokens from the left of their {prompt}.", panel="Generation")
    sample: bool = opt(False, "[run] Sample instead of greedy decoding.", panel="Generation")
    temperature: float = opt(0.7, "[run] Sampling temperature (with --sample).", panel="Generation")
    top_k: int = opt(0, "[run] Top-k sampling (with --sample; 0 = off).", panel="Generation")
    top_p: float = opt(1.0, "[run] Top-p sampling (with --sample).", panel="Generation")
    batch_size: int = opt(4, "train: demonstrations per micro-batch; run: inputs per generation / judge batch.", panel="Training")

    def validate(self) -> None:
        if self.action not in ACTIONS:
            raise RlhfkitError(f"unknown action '{self.action}'; valid: {', '.join(ACTIONS)}")
        own = {"train": ("data", "push_to_hub"), "run": ("input", "judge", "max_inputs")}
        for action, names in own.items():
            for name in names:
                if action != self.action and getattr(self, name) is not None:
                    raise RlhfkitError(f"--{name.replace('_', '-')} is an option of `critique-revise {action}`, not `{self.action}`")
        for name, template in (("critique", self.critique_template), ("revision", self.revision_template)):
            if template is not None:
                check_template(name, template)
        if self.batch_size < 1:
            raise RlhfkitError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.action == "train":
            self._validate_train()
        else:
            self._validate_run()

    def _validate_train(self) -> None:
        if self.data is None:
            raise RlhfkitError("`critique-revise train` needs --data (JSONL of `critique` records)")
        check_data_file(self.data, "--data")
        self.validate_finetune()

    def _validate_run(self) -> None:
        if self.input is None:
            raise RlhfkitError("`critique-revise run` needs --input (JSONL of records with prompt and response)")
        check_data_file(self.input, "--input")
        if self.rounds < 1:
            raise RlhfkitError(f"--rounds must be >= 1, got {self.rounds}")
        for name in ("max_new_tokens", "max_prompt_length"):
            if getattr(self, name) < 1:
                raise RlhfkitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_inputs is not None and self.max_inputs < 1:
            raise RlhfkitError(f"--max-inputs must be >= 1, got {self.max_inputs}")
        if not 0 <= self.min_length_ratio <= 1:
            raise RlhfkitError(f"--min-length-ratio must be in [0, 1], got {self.min_length_ratio}")
        if self.tie_margin < 0:
            raise RlhfkitError(f"--tie-margin must be >= 0, got {self.tie_margin}")
        if self.sample:
            check_sampling(self.temperature, self.top_k, self.top_p)
        if self.judge is not None:
            kind = read_spec(self.judge)["kind"]
            if kind not in SEQUENCE_KINDS:
                raise RlhfkitError(
                    f"--judge {self.judge} is a {kind} reward model; a judge must be a "
                    f"{' or '.join(SEQUENCE_KINDS)} model (one score per response)"
                )


# --- templates ----------------------------------------------------------------------------


def check_template(task: str, template: str) -> None:
    """A template must parse, use only its task's fields, and include {response}."""
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise RlhfkitError(f"--{task}-template: not a valid format string ({err}); write literal braces as {{{{ }}}}") from None
    unknown = sorted(used - TEMPLATE_FIELDS[task])
    if unknown:
        raise RlhfkitError(
            f"--{task}-template uses unknown field(s) {', '.join('{' + u + '}' for u in unknown)}; "
            f"valid: {', '.join('{' + f + '}' for f in sorted(TEMPLATE_FIELDS[task]))}"
        )
    if "response" not in used:
        raise RlhfkitError(f"--{task}-template must include {{response}}")


@dataclass(frozen=True)
class Templates:
    critique: str = DEFAULT_CRITIQUE_TEMPLATE
    revision: str = DEFAULT_REVISION_TEMPLATE

    def format(self, task: str, fields: dict[str, str]) -> str:
        return getattr(self, task).format(**fields)


def resolve_templates(cfg: CritiqueReviseConfig) -> Templates:
    """Command line > the model's critique_revise.json (run only) > the defaults (saying so)."""
    saved_path = model_dir(cfg.model) / TEMPLATES_FILE
    saved = {}
    if cfg.action == "run" and saved_path.is_file():
        try:
            saved = json.loads(saved_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise RlhfkitError(f"{saved_path}: invalid JSON: {err.msg}") from None
    elif cfg.action == "run":
        console.print(
            f"critique-revise: {cfg.model} has no {TEMPLATES_FILE} (not trained by `critique-revise train`): "
            "self-critique with the default templates",
            soft_wrap=True,
        )
    templates = Templates(
        critique=cfg.critique_template or saved.get("critique_template", DEFAULT_CRITIQUE_TEMPLATE),
        revision=cfg.revision_template or saved.get("revision_template", DEFAULT_REVISION_TEMPLATE),
    )
    check_template("critique", templates.critique)
    check_template("revision", templates.revision)
    return templates


# --- train --------------------------------------------------------------------------------


def as_user_turn(task_text: str) -> dict:
    """A formatted task as one user turn (`meta["messages"]`): with a chat template, the
    model is trained and run on the templated turn; without one, on the text as it is."""
    return {MESSAGES_KEY: [{"role": "user", "content": task_text}]}


def demonstrations_from_critiques(records: Sequence[Critique], templates: Templates) -> tuple[list[Demonstration], Counter]:
    """One demonstration per task a record can teach; counts per task."""
    demos: list[Demonstration] = []
    counts: Counter = Counter()
    for record in records:
        critique, revision = record.critique.strip(), record.revision.strip()
        fields = {"prompt": record.prompt, "response": record.response, "critique": critique}
        if critique:
            prompt = templates.format("critique", fields)
            demos.append(Demonstration(id=f"{record.id}:critique", prompt=prompt, response=critique, meta={"task": "critique", **as_user_turn(prompt)}))
            counts["critique"] += 1
        if revision:
            prompt = templates.format("revision", fields)
            demos.append(Demonstration(id=f"{record.id}:revision", prompt=prompt, response=revision, meta={"task": "revision", **as_user_turn(prompt)}))
            counts["revision"] += 1
    return demos, counts


def run_train(cfg: CritiqueReviseConfig) -> Path:
    records = load_records(cfg.data, "critique")
    templates = resolve_templates(cfg)
    demos, counts = demonstrations_from_critiques(records, templates)
    if not demos:
        raise RlhfkitError(f"{cfg.data}: every record has an empty critique and an empty revision; nothing to train on")
    out = Path(cfg.out)
    console.print(
        f"critique-revise: {len(records)} critique records -> {counts['critique']} critique and "
        f"{counts['revision']} revision demonstrations ({len(records) - counts['revision']} without a revision)",
        soft_wrap=True,
    )
    sft_options = {f.name: getattr(cfg, f.name) for f in fields(FinetuneOptions)}
    # The demonstrations are sft's input, so they are written outside --out (which sft owns)
    # and copied in once the model is saved.
    with tempfile.TemporaryDirectory(prefix="rlhfkit-critique-revise-") as staging:
        data = Path(staging) / DATA_FILE
        write_records(data, demos)
        # Uploaded below, once the templates that `run` needs are in the model directory.
        sft_options["push_to_hub"] = None
        run_sft(build_config(SFTConfig, model=cfg.model, data=str(data), out=str(out), **sft_options),
                stage="critique-revise train", card_data=cfg.data)
    write_records(out / DATA_FILE, demos)
    write_json(
        model_output_dir(out) / TEMPLATES_FILE,
        {
            "critique_template": templates.critique,
            "revision_template": templates.revision,
            "base_model": cfg.model,
            "demonstrations": dict(counts),
            "config": config_to_dict(cfg),
        },
    )
    console.print(f"critique-revise: templates saved to {model_output_dir(out) / TEMPLATES_FILE}")
    if cfg.push_to_hub and is_main_process():
        push_to_hub(out, cfg.push_to_hub)
    return out


# --- run: the rounds ----------------------------------------------------------------------


@dataclass
class Completion:
    """A generated text and whether it ended with end-of-sequence (False: cut at max tokens)."""

    text: str
    finished: bool
    input_fits: bool = True  # False: the input did not fit --max-prompt-length, nothing was generated


Generator = Callable[[str, list[dict[str, str]]], list[Completion]]
"""generator(task, fields) -> one completion per fields dict; task is "critique" (fields:
prompt, response) or "revision" (prompt, response, critique). The model-backed one is
`ModelGenerator`; tests substitute scripted ones."""


@dataclass(frozen=True)
class RevisionGuard:
    min_length_ratio: float = 0.5
    accept_truncated: bool = False

    def flag(self, previous: str, revision: Completion) -> str | None:
        """Why `revision` must not replace `previous` (one of FLAGS), or None to accept it."""
        text = revision.text.strip()
        if not text:
            return "empty"
        if not revision.finished and not self.accept_truncated:
            return "truncated"
        if " ".join(text.split()) == " ".join(previous.split()):
            return "repeats_input"
        if len(text) < self.min_length_ratio * len(previous.strip()):
            return "too_short"
        return None


@dataclass
class RoundOutcome:
    round: int
    critique: str
    critique_finished: bool
    revision: str
    revision_finished: bool
    flag: str | None
    response: str  # the response after this round: the revision, or the previous one when flagged


def critique_and_revise(
    items: Sequence[tuple[str, str]], rounds: int, generator: Generator, guard: RevisionGuard
) -> list[list[RoundOutcome]]:
    """Run `rounds` rounds over (prompt, response) items; per item, the outcome of every round.

    Every item is critiqued every round, from its current response (the last accepted one).
    """
    current = [response for _, response in items]
    history: list[list[RoundOutcome]] = [[] for _ in items]
    for round_number in range(1, rounds + 1):
        critiques = generator("critique", [{"prompt": p, "response": r} for (p, _), r in zip(items, current)])
        if len(critiques) != len(items):
            raise ValueError(f"the generator returned {len(critiques)} critiques for {len(items)} inputs")
        # An item whose critique could not be generated is not revised from an empty critique.
        revised = [i for i, c in enumerate(critiques) if c.input_fits]
        generated = generator(
            "revision",
            [{"prompt": items[i][0], "response": current[i], "critique": critiques[i].text.strip()} for i in revised],
        )
        if len(generated) != len(revised):
            raise ValueError(f"the generator returned {len(generated)} revisions for {len(revised)} inputs")
        revisions = [Completion("", False, input_fits=False)] * len(items)
        for i, revision in zip(revised, generated):
            revisions[i] = revision
        for i, (critique, revision) in enumerate(zip(critiques, revisions)):
            fits = critique.input_fits and revision.input_fits
            flag = guard.flag(current[i], revision) if fits else "input_too_long"
            if flag is None:
                current[i] = revision.text.strip()
            history[i].append(
                RoundOutcome(
                    round=round_number,
                    critique=critique.text.strip(),
                    critique_finished=critique.finished,
                    revision=revision.text.strip(),
                    revision_finished=revision.finished,
                    flag=flag,
                    response=current[i],
                )
            )
    return history


class ModelGenerator:
    """The Generator of a loaded model: formats the task's template, fits it into
    `max_prompt_length` tokens (cutting {prompt} from the left), generates in batches."""

    def __init__(self, model, tokenizer, is_encoder_decoder: bool, templates: Templates, sampling: SamplingConfig,
                 *, max_prompt_length: int, batch_size: int, seed: int):
        self.model = model
        self.tokenizer = tokenizer
        self.is_encoder_decoder = is_encoder_decoder
        self.templates = templates
        self.sampling = sampling
        self.max_prompt_length = max_prompt_length
        self.batch_size = batch_size
        self.seed = seed
        self.calls = 0
        self.prompts_cut = 0
        self.inputs_too_long = 0

    def n_tokens(self, text: str) -> int:
        # A templated input carries its own special tokens: generate adds none to it.
        return len(self.tokenizer(text, add_special_tokens=not has_chat_template(self.tokenizer))["input_ids"])

    def format(self, task: str, fields: dict[str, str]) -> str:
        """The task's input, rendered as a user turn by the chat template when there is one."""
        text = self.templates.format(task, fields)
        return render_prompt(self.tokenizer, text, as_user_turn(text))

    def fit(self, task: str, fields: dict[str, str]) -> str | None:
        """The task's input in at most `max_prompt_length` tokens, its {prompt} cut from the
        left as needed; None when even no prompt at all leaves too many (counted)."""
        text = self.format(task, fields)
        excess = self.n_tokens(text) - self.max_prompt_length
        if excess <= 0:
            return text
        prompt_ids = self.tokenizer(fields["prompt"], add_special_tokens=False)["input_ids"]
        cut = excess
        # Decoding and re-encoding can move a token boundary, so check again after each cut.
        while cut <= len(prompt_ids):
            kept = self.tokenizer.decode(prompt_ids[cut:], skip_special_tokens=True)
            text = self.format(task, {**fields, "prompt": kept})
            excess = self.n_tokens(text) - self.max_prompt_length
            if excess <= 0:
                self.prompts_cut += 1
                return text
            cut += excess
        self.inputs_too_long += 1
        return None

    def __call__(self, task: str, fields_list: list[dict[str, str]]) -> list[Completion]:
        fitted = [self.fit(task, fields) for fields in fields_list]
        texts = [text for text in fitted if text is not None]
        completions: list[Completion] = []
        with progress_bar(task, len(texts)) as advance:
            for begin in range(0, len(texts), self.batch_size):
                batch = texts[begin : begin + self.batch_size]
                rollout = generate(
                    self.model,
                    self.tokenizer,
                    batch,
                    self.sampling,
                    max_prompt_length=self.max_prompt_length,
                    is_encoder_decoder=self.is_encoder_decoder,
                    generator_seed=self.seed + self.calls if self.sampling.do_sample else None,
                    templated=set(batch) if has_chat_template(self.tokenizer) else (),
                )
                self.calls += 1
                completions.extend(Completion(t, bool(f)) for t, f in zip(rollout.texts, rollout.finished.tolist()))
                advance(len(batch))
        generated = iter(completions)
        return [next(generated) if text is not None else Completion("", False, input_fits=False) for text in fitted]


# --- run: judging and reporting -----------------------------------------------------------


def round_win_rates(
    score: Callable[[list[str], list[str]], list[float]],
    items: Sequence[tuple[str, str]],
    history: list[list[RoundOutcome]],
    tie_margin: float,
) -> list[dict]:
    """Per round, win/tie/loss of the round's responses over the originals under `score`.

    Each distinct (prompt, response) is scored once, so an unchanged response ties.
    """
    rounds = len(history[0]) if history else 0
    pairs = list(dict.fromkeys([(p, r) for p, r in items] + [(p, h.response) for (p, _), rows in zip(items, history) for h in rows]))
    by_pair = dict(zip(pairs, score([p for p, _ in pairs], [r for _, r in pairs])))
    original = [by_pair[(p, r)] for p, r in items]
    rows = []
    for k in range(rounds):
        revised = [by_pair[(p, h[k].response)] for (p, _), h in zip(items, history)]
        rows.append(
            {
                "round": k + 1,
                **win_rate(revised, original, tie_margin),
                "mean_score": sum(revised) / len(revised),
                "paper_win_rate": PAPER_WIN_RATES.get(k + 1),
            }
        )
    return rows


def round_counts(history: list[list[RoundOutcome]]) -> list[dict]:
    """Per round: accepted revisions, flagged ones by reason, and responses changed from the original."""
    rounds = len(history[0]) if history else 0
    rows = []
    for k in range(rounds):
        flags = Counter(h[k].flag for h in history if h[k].flag)
        rows.append({"round": k + 1, "accepted": sum(1 for h in history if h[k].flag is None), "flagged": {f: flags[f] for f in FLAGS if flags[f]}})
    return rows


def render_results(counts: list[dict], win_rates: list[dict] | None, n_inputs: int, judge: str | None, tie_margin: float) -> str:
    lines = ["# rlhfkit critique-revise", "", f"{n_inputs} inputs, {len(counts)} round(s)."]
    if win_rates:
        lines.append(
            f"Win / tie / loss: share of inputs whose response after the round beats, ties or trails the original "
            f"under the judge {judge} (tie margin {tie_margin:g}); win rate: win + tie / 2, the paper's formula; "
            f"paper: {PAPER}."
        )
    header = "| round | accepted | flagged |"
    rule = "|---|---|---|"
    if win_rates:
        header += " win | tie | loss | win rate | paper win rate |"
        rule += "---|---|---|---|---|"
    lines += ["", header, rule]
    for i, row in enumerate(counts):
        flagged = ", ".join(f"{name} {n}" for name, n in row["flagged"].items()) or "0"
        line = f"| {row['round']} | {row['accepted']} | {flagged} |"
        if win_rates:
            w = win_rates[i]
            paper = f"{w['paper_win_rate']:.1%}" if w["paper_win_rate"] is not None else "–"
            line += f" {w['win']:.1%} | {w['tie']:.1%} | {w['loss']:.1%} | {w['win_rate']:.1%} | {paper} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot_win_rates(path: Path, win_rates: list[dict], title: str) -> None:
    save_png(draw(title, [win_rate_panel(win_rates)], width=6, height=4), path)


def win_rate_panel(win_rates: list[dict]) -> Panel:
    """Win, tie and loss rates per round (ours) and the paper's published wins: one tick per
    round run, the paper's points only at rounds we ran."""
    rounds = [row["round"] for row in win_rates]
    # The paper's win rate counts a tie as half a win; win, tie and loss are drawn beside it.
    series = [Series("win rate, win + tie/2 (rlhfkit)", rounds, [100 * row["win_rate"] for row in win_rates])]
    series += [Series(f"{outcome} (rlhfkit)", rounds, [100 * row[outcome] for row in win_rates])
               for outcome in ("win", "tie", "loss")]
    paper = {r: v for r, v in PAPER_WIN_RATES.items() if r in rounds}
    if paper:
        series.append(Series("win rate (paper: Jin et al. 2023)", list(paper), [100 * v for v in paper.values()], markers_only=True))
    # Limits a little beyond 0 and 100, so a 0% or 100% line is not drawn on the frame.
    return Panel("revised vs original response", "critique-and-revise round", "% of inputs",
                 series, ylim=(-4, 104), integer_x=rounds)


def read_inputs(path: str, limit: int | None) -> list:
    records = load_records(path)
    for lineno, record in enumerate(records, start=1):
        if not (hasattr(record, "prompt") and hasattr(record, "response")):
            raise RlhfkitError(
                f"{path}: record {lineno} is a '{record.type_name}' record, which has no prompt and response; "
                "give generation, demonstration, critique, span_feedback or score records"
            )
    return records[:limit] if limit else records


def model_generator(cfg: CritiqueReviseConfig, templates: Templates, device: torch.device) -> ModelGenerator:
    model, tokenizer, is_encoder_decoder = load_policy(cfg.model, dtype=cfg.dtype, device=str(device), trust_remote_code=cfg.trust_remote_code)
    override_chat_template(tokenizer, load_chat_template(cfg.chat_template))
    fit_generation_lengths(cfg, model_max_positions(model), "critique-revise", cfg.model, is_encoder_decoder)
    sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, do_sample=cfg.sample)
    return ModelGenerator(model, tokenizer, is_encoder_decoder, templates, sampling,
                          max_prompt_length=cfg.max_prompt_length, batch_size=cfg.batch_size, seed=cfg.seed)


def run_rounds(cfg: CritiqueReviseConfig, generator: Generator | None = None) -> dict:
    """`critique-revise run`; `generator` replaces the model (tests script it)."""
    records = read_inputs(cfg.input, cfg.max_inputs)
    items = [(r.prompt, r.response) for r in records]
    templates = resolve_templates(cfg)
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    run = RunDir(cfg.out, "critique-revise", cfg)
    if generator is None:
        generator = model_generator(cfg, templates, device)
    guard = RevisionGuard(cfg.min_length_ratio, cfg.accept_truncated)
    history = critique_and_revise(items, cfg.rounds, generator, guard)
    if isinstance(generator, ModelGenerator) and generator.prompts_cut:
        console.print(f"critique-revise: {generator.prompts_cut} input(s) had their prompt cut from the left to fit --max-prompt-length")
    if isinstance(generator, ModelGenerator) and generator.inputs_too_long:
        console.print(
            f"critique-revise: {generator.inputs_too_long} input(s) did not fit --max-prompt-length "
            f"{cfg.max_prompt_length} even without their prompt (a long response or critique); their revisions are "
            "flagged input_too_long and the response kept (raise --max-prompt-length to revise them)",
            soft_wrap=True,
        )
    # The policy's memory is freed before the judge loads.
    generator = None
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()

    write_records(
        run.path / REVISIONS_FILE,
        (
            Generation(
                id=record.id,
                prompt=record.prompt,
                response=rows[-1].response,
                model=f"critique-revise-{cfg.rounds}",
                meta={"original_response": record.response, "rounds": [asdict(h) for h in rows], "input_meta": record.meta},
            )
            for record, rows in zip(records, history)
        ),
    )
    counts = round_counts(history)
    for row in counts:
        run.log_metrics(step=row["round"], accepted=row["accepted"], **{f"flagged/{k}": v for k, v in row["flagged"].items()})

    win_rates = None
    if cfg.judge:
        judge = load_reward_model(cfg.judge, device=device, dtype=cfg.dtype)

        def score(prompts: list[str], responses: list[str]) -> list[float]:
            return [s.values[0] for s in judge.score(prompts, responses, batch_size=cfg.batch_size)]

        win_rates = round_win_rates(score, items, history, cfg.tie_margin)
        write_json(
            run.path / "winrates.json",
            {
                "judge": cfg.judge,
                "judge_aspect": judge.aspect,
                "tie_margin": cfg.tie_margin,
                "inputs": len(items),
                "rounds": win_rates,
                "paper": {"source": PAPER, "win_rate_by_round": {str(k): v for k, v in PAPER_WIN_RATES.items()}},
            },
        )
        plot_win_rates(run.path / "winrates.png", win_rates, f"critique-revise run: {run.path.name}")
    summary = {"inputs": len(items), "rounds": counts, "win_rates": win_rates}
    run.write_json("summary.json", summary)
    report = render_results(counts, win_rates, len(items), cfg.judge, cfg.tie_margin)
    write_text(run.path / "results.md", report)
    console.print(report, markup=False, highlight=False, soft_wrap=True)
    console.print(f"critique-revise: wrote {run.path / REVISIONS_FILE} and results.md")
    return summary


# What `critique-revise ACTION --help` shows: its own description, without the other action's options.
_SHARED = {"model", "out", "batch_size", "dtype", "device", "seed", "trust_remote_code", "chat_template",
           "overwrite", "report_to", "critique_template", "revision_template"}
_RUN_ONLY = {f.name for f in fields(CritiqueReviseConfig) if f.metadata.get("help", "").startswith("[run]")} | {"input", "judge", "max_inputs"}
_TRAIN_ONLY = ({f.name for f in fields(FinetuneOptions)} | {"data"}) - _SHARED
ACTION_HELP = {
    "train": (
        ("Fine-tune a critique-and-revise model (Jin et al. 2023): each `critique` record of --data becomes a "
         "critique demonstration (prompt, response -> critique) and a revision demonstration (prompt, response, "
         "critique -> revised response), trained with sft's loop; the templates are saved with the model."),
        _RUN_ONLY,
    ),
    "run": (
        ("Critique and revise each response of --input --rounds times with a critique-and-revise model (or any "
         "policy: self-critique); flags degenerate revisions (empty, cut off, unchanged, much shorter) and, with "
         "--judge, reports each round's win, tie and loss rates over the originals beside the paper's."),
        _TRAIN_ONLY,
    ),
}
"""action -> (its --help description, the options it does not take)."""


def run_critique_revise(cfg: CritiqueReviseConfig):
    """Critique-and-revise with natural-language feedback (Jin et al. 2023).

    `critique-revise train --data critiques.jsonl --model M --out DIR` fine-tunes M on the two
    tasks (critique a response; revise it given the critique). `critique-revise run --model DIR
    --input responses.jsonl --rounds N --out DIR2 [--judge RM_DIR]` critiques and revises each
    response N times, keeps every round, flags degenerate revisions (empty, cut off, unchanged,
    much shorter) and, with a judge, reports each round's win rate over the originals beside
    the paper's (56.6% after one round, 65.9% after five).
    """
    if cfg.action == "train":
        return run_train(cfg)
    return run_rounds(cfg)
