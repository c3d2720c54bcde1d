"""Reward sources: everything that turns (prompt, response) into rewards on policy tokens.

A source returns, for each response, a tensor with one reward per policy response token
(zeros where it gives none). Reward models and the policy may use different tokenizers, so
every source reports *where* its rewards belong as character offsets in the response text,
and `token_index_for_char_ends` maps them onto the policy token that completes them.

Kinds of source (`--rm NAME=SPEC`):
- an rlhfkit reward-model directory (segment RMs: a reward at each segment end; sequence
  RMs: the normalised score at the last token), optionally redistributed (R3HF) with
  `--redistribute NAME:token` or `NAME:sentence`;
- `hf:PATH_OR_NAME[@LABEL]`: a Hugging Face sequence classifier (e.g. a toxicity model),
  reward = probability of LABEL (prefix `-` for minus it), scored per sentence by default,
  as the Fine-Grained RLHF detoxification task does;
- `py:module:function`: a Python function `f(prompts, responses)` returning, per response,
  either a float (sequence reward, on the last token) or a list of `(char_end, value)` pairs
  (segment rewards).

A whole-response score (sequence RMs, a `py:` float) lands on the response's last token: EOS
when the response ended, the last generated token when it was cut off (as in the reference).
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from rlhfkit.errors import RlhfkitError
from rlhfkit.rewards.placement import place_rewards, token_index_for_char_ends
from rlhfkit.rewards.redistribution import prefix_differences
from rlhfkit.segment import segment

ALIASES = {"fact": "factuality", "rel": "relevance", "comp": "completeness", "pref": "preference"}
GRANULARITIES = ("token", "sentence")


def canonical_name(name: str) -> str:
    """`fact` -> `factuality`; an aspect of a shared-backbone RM too: `fg.fact` -> `fg.factuality`."""
    model, dot, aspect = name.rpartition(".")
    if dot and model:
        return f"{model}.{ALIASES.get(aspect, aspect)}"
    return ALIASES.get(name, name)


def reward_model_name(name: str, rm_paths: dict[str, str]) -> str | None:
    """The --rm a reward name refers to: itself, or MODEL for MODEL.ASPECT (a shared-backbone RM's aspect)."""
    if name in rm_paths:
        return name
    model, dot, _ = name.rpartition(".")
    return model if dot and model in rm_paths else None


@dataclass
class TokenRewards:
    """One source's rewards for a batch: per response, a (T_i,) tensor on policy tokens and a
    (T_i,) bool tensor marking where a reward is given (a reward of 0 is still a reward)."""

    per_token: list[torch.Tensor]
    given: list[torch.Tensor]

    def padded(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.zeros(len(self.per_token), length)
        given = torch.zeros(len(self.per_token), length, dtype=torch.bool)
        for i, (row, row_given) in enumerate(zip(self.per_token, self.given)):
            values[i, : row.shape[0]] = row
            given[i, : row_given.shape[0]] = row_given
        return values, given

    @classmethod
    def dense(cls, rows: list[torch.Tensor]) -> TokenRewards:
        return cls(rows, [torch.ones(row.shape[0], dtype=torch.bool) for row in rows])

    @classmethod
    def placed(cls, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> TokenRewards:
        return cls([values for values, _ in rows], [given for _, given in rows])


def _place_at_last_token(value: float, spans: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole-response score on the response's last token: EOS when the response ended (EOS
    has no text, so it completes no segment), the last generated token when it was cut off.

    As the reference (`PreferenceReward`: the score at index length - 1 of the response mask),
    TRL and lm-human-preferences do: the decision to stop is what completes the response.
    """
    given = torch.zeros(len(spans), dtype=torch.bool)
    if not spans:
        return torch.zeros(0), given
    given[-1] = True
    return place_rewards(len(spans), [len(spans) - 1], [value]), given


def _place(char_ends_and_values: Sequence[tuple[int, float]], spans: list[tuple[int, int]], text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment rewards at the policy tokens completing each char end (and where they were given)."""
    given = torch.zeros(len(spans), dtype=torch.bool)
    if not spans:
        return torch.zeros(0), given
    ends = [end for end, _ in char_ends_and_values]
    if any(end > start for start, end in spans):
        positions = token_index_for_char_ends(spans, ends, text=text)
    else:  # an empty response (EOS only): everything lands on its last token
        positions = [len(spans) - 1] * len(ends)
    given[positions] = True
    return place_rewards(len(spans), positions, [value for _, value in char_ends_and_values]), given


class RewardSource:
    name: str
    description: str

    def token_rewards(self, prompts: list[str], responses: list[str], spans: list[list[tuple[int, int]]]) -> TokenRewards:
        raise NotImplementedError


class RewardModelSource(RewardSource):
    """An rlhfkit reward model: segment rewards at segment ends, or the sequence score at the end."""

    def __init__(self, name: str, reward_model, redistribute: Optional[str] = None, batch_size: int = 8):
        self.name, self.rm, self.redistribute, self.batch_size = name, reward_model, redistribute, batch_size
        if redistribute and reward_model.kind == "segment":
            raise RlhfkitError(
                f"--redistribute {name}: '{name}' is a segment reward model, which is already dense; "
                "redistribution applies to sequence-level (preference/regression) reward models"
            )
        if redistribute and not reward_model.scores_prefixes:
            raise RlhfkitError(
                f"--redistribute {name}: '{name}' is an encoder reward model ({type(reward_model.model).__name__}), which "
                "reads the whole text at once, so it cannot score every prefix in one pass as R3HF needs (and one pass "
                "per prefix costs a forward pass per token); train the RM on a causal backbone (e.g. the SFT policy)"
            )
        self.description = f"{reward_model.kind} RM ({reward_model.aspect})" + (
            f", redistributed per {redistribute}" if redistribute else ""
        )

    def token_rewards(self, prompts, responses, spans):
        if self.redistribute:
            return TokenRewards.dense(self._redistributed(prompts, responses, spans))
        scored = self.rm.score(prompts, responses, batch_size=self.batch_size)
        if self.rm.kind != "segment":
            return TokenRewards.placed([_place_at_last_token(s.values[0], row_spans) for s, row_spans in zip(scored, spans)])
        return TokenRewards.placed(
            [
                _place(list(zip(s.char_ends, s.values)), row_spans, response)
                for s, row_spans, response in zip(scored, spans, responses)
            ]
        )

    def _redistributed(self, prompts, responses, spans) -> list[torch.Tensor]:
        """R3HF: a policy token's reward is the change of the RM's prefix score it causes.

        The RM scores every prefix of the response in one forward pass, at its own tokens.
        Per-token redistribution reads that score wherever an RM token ends; per-sentence
        (the Fine-Grained RLHF dense toxicity reward) reads it only where a sentence ends.
        Either way a policy token's prefix score is the last score read at or before its
        end (the prompt's score before any), and the rewards are the differences, so they
        telescope to R(x, y) - R(x) whatever the two tokenizers are. Scores the RM reads
        after the text (at special tokens its template appends, such as an EOS) belong to
        the policy's final token: its EOS when the response ended, so ending the response
        earns the change that ending causes in the RM's score.
        """
        scores, rm_char_ends, prompt_scores = self.rm.prefix_scores(prompts, responses, batch_size=self.batch_size)
        rows = []
        for response, row_scores, row_ends, prompt_score, row_spans in zip(
            responses, scores, rm_char_ends, prompt_scores, spans
        ):
            if self.redistribute == "sentence" and row_ends:
                rm_spans = list(zip([0] + row_ends[:-1], row_ends))
                sentence_ends = [s.end for s in segment(response, "sentence")] or [len(response)]
                picked = token_index_for_char_ends(rm_spans, sentence_ends)
                picked += [i for i, end in enumerate(row_ends) if end > len(response)]  # after the text
                row_scores, row_ends = row_scores[picked], [row_ends[i] for i in picked]
            rows.append(_prefix_scores_on_policy_tokens(row_scores, row_ends, float(prompt_score), row_spans))
        # The differences of all rows in one call: rows padded to the longest, each masked to
        # its own tokens (every token reads the score, so a padded tail changes nothing).
        lengths = [row.shape[0] for row in rows]
        padded = torch.zeros(len(rows), max(lengths, default=0))
        mask = torch.zeros(padded.shape)
        for i, row in enumerate(rows):
            padded[i, : lengths[i]] = row
            mask[i, : lengths[i]] = 1.0
        if padded.numel() == 0:
            return [torch.zeros(n) for n in lengths]
        rewards = prefix_differences(padded, mask, prompt_scores.reshape(-1))
        return [rewards[i, :n] for i, n in enumerate(lengths)]


def _prefix_scores_on_policy_tokens(read_scores: torch.Tensor, read_char_ends: list[int], prompt_score: float, spans) -> torch.Tensor:
    """Score of each policy token's prefix: the last score read at or before the token's end
    (the prompt's score before any), and the last score read at the last token.

    A token has read every score up to the first one that ends after it: reads and token
    ends are taken as running maxima, so out-of-order offsets give what one scan over both
    in order gives (the reference loop in tests/test_reward_placement.py).
    """
    if not spans:
        return torch.empty(0)
    if not read_char_ends:
        return torch.full((len(spans),), prompt_score)
    read_ends = torch.tensor(read_char_ends).cummax(dim=0).values
    token_ends = torch.tensor([end for _, end in spans]).cummax(dim=0).values
    count = torch.searchsorted(read_ends, token_ends, right=True)  # scores read by each token
    read = read_scores.to(torch.float32)
    out = torch.where(count > 0, read[(count - 1).clamp(min=0)], torch.tensor(prompt_score, dtype=torch.float32))
    out[-1] = read[-1]
    return out


class PythonFunctionSource(RewardSource):
    """`py:module:function`: a programmatic judge (the synthetic task, unit tests, heuristics)."""

    def __init__(self, name: str, target: str):
        module_name, _, function_name = target.rpartition(":")
        # Like `python -m`, a judge module in the working directory is importable.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            self.fn: Callable = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError, ValueError) as err:
            raise RlhfkitError(f"reward '{name}': cannot import '{target}' ({err}); expected py:module:function") from None
        try:
            inspect.signature(self.fn).bind([], [])
        except TypeError as err:
            raise RlhfkitError(f"reward '{name}': py:{target} must take (prompts, responses) ({err})") from None
        except ValueError:  # a builtin without a signature: checked when called
            pass
        self.name, self.target, self.description = name, target, f"python function {target}"

    def token_rewards(self, prompts, responses, spans):
        try:
            results = list(self.fn(list(prompts), list(responses)))
        except Exception as err:  # the user's function: one line (the traceback with --debug)
            raise RlhfkitError(f"reward '{self.name}': py:{self.target} raised {type(err).__name__}: {err}") from err
        if len(results) != len(responses):
            raise RlhfkitError(f"reward '{self.name}' returned {len(results)} values for {len(responses)} responses")
        out = []
        for result, response, row_spans in zip(results, responses, spans):
            if isinstance(result, (int, float)):
                out.append(_place_at_last_token(float(result), row_spans))
            else:
                out.append(_place([(int(e), float(v)) for e, v in result], row_spans, response))
        return TokenRewards.placed(out)


class ClassifierSource(RewardSource):
    """`hf:MODEL[@LABEL]`: a Hugging Face sequence classifier scored after every sentence.

    Reward at a sentence end = change in P(LABEL) (negated with a leading '-' on the label,
    e.g. `hf:unitary/toxic-bert@-toxic`), the dense toxicity reward of Fine-Grained RLHF.
    """

    def __init__(self, name: str, target: str, device: torch.device, batch_size: int = 8):
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        from rlhfkit.models import check_model_kind, load_pretrained

        path, _, label = target.partition("@")
        sign = -1.0 if label.startswith("-") else 1.0
        label = label.lstrip("-")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            check_model_kind(path, AutoConfig.from_pretrained(path), "sequence classifier")
        except OSError as err:
            raise RlhfkitError(f"reward '{name}': cannot load classifier '{path}': {err}") from None
        except RlhfkitError as err:
            raise RlhfkitError(f"--rm {name}=hf:{target}: {err}") from None
        self.model = load_pretrained(AutoModelForSequenceClassification, path, dtype="float32", device=str(device)).eval()
        labels = self.model.config.id2label
        if label:
            matches = [i for i, lab in labels.items() if lab.lower() == label.lower()]
            if not matches:
                raise RlhfkitError(f"reward '{name}': label '{label}' not in {sorted(labels.values())}")
            self.label_index = matches[0]
        else:
            self.label_index = max(labels)
        self.sign, self.device, self.batch_size = sign, device, batch_size
        self.name, self.description = name, f"classifier {path} [{labels[self.label_index]}], per sentence"

    @torch.no_grad()
    def _probs(self, texts: list[str]) -> list[float]:
        probs = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True, truncation=True).to(self.device)
            logits = self.model(**batch).logits.float()
            p = logits.sigmoid() if self.model.config.problem_type == "multi_label_classification" else logits.softmax(-1)
            probs.extend(p[:, self.label_index].tolist())
        return probs

    def token_rewards(self, prompts, responses, spans):
        out = []
        for response, row_spans in zip(responses, spans):
            sentences = segment(response, "sentence") if response.strip() else []
            prefixes = [response[: s.end] for s in sentences] or [response]
            probs = self._probs([""] + prefixes)
            values = [self.sign * (probs[i + 1] - probs[i]) for i in range(len(prefixes))]
            ends = [s.end for s in sentences] or [len(response)]
            out.append(_place(list(zip(ends, values)), row_spans, response))
        return TokenRewards.placed(out)


def parse_weights(text: str) -> dict[str, float]:
    """`fact=0.3,rel=0.5` -> {"factuality": 0.3, "relevance": 0.5}."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise RlhfkitError(f"--rewards: '{item}' is not NAME=WEIGHT (e.g. fact=0.3,rel=0.5,comp=0.3)")
        try:
            weight = float(value)
        except ValueError:
            raise RlhfkitError(f"--rewards: the weight of '{name}' is not a number: '{value}'") from None
        if not math.isfinite(weight):
            raise RlhfkitError(f"--rewards: the weight of '{name}' must be a finite number, got {value}")
        weights[canonical_name(name.strip())] = weight
    if not weights:
        raise RlhfkitError("--rewards is empty; give NAME=WEIGHT pairs, e.g. fact=0.3,rel=0.5,comp=0.3")
    return weights


def parse_named(items: Sequence[str], option: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise RlhfkitError(f"{option}: '{item}' is not NAME=VALUE")
        key = canonical_name(name.strip())
        if key in out:  # a later one would silently replace the earlier
            raise RlhfkitError(f"{option} {key} is given twice ({out[key]} and {value.strip()}); give each name once")
        out[key] = value.strip()
    return out


def parse_redistribute(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, _, granularity = item.partition(":")
        granularity = granularity or "token"
        if granularity not in GRANULARITIES:
            raise RlhfkitError(f"--redistribute {item}: granularity must be one of {', '.join(GRANULARITIES)}")
        out[canonical_name(name)] = granularity
    return out


def build_reward_sources(
    weights: dict[str, float],
    rm_paths: dict[str, str],
    redistribute: dict[str, str],
    *,
    device: torch.device,
    dtype: str = "auto",
    batch_size: int = 8,
) -> dict[str, RewardSource]:
    """Resolve every weighted reward name to a source; unknown names list the known ones."""
    from rlhfkit.rewards.reward_model import load_reward_model

    unknown = sorted(name for name in weights if reward_model_name(name, rm_paths) is None)
    if unknown:
        known = ", ".join(sorted(rm_paths)) or "none"
        raise RlhfkitError(
            f"--rewards names {', '.join(unknown)} but no reward model is given for it; "
            f"give --rm NAME=PATH (known: {known}; aliases: {', '.join(f'{k}={v}' for k, v in ALIASES.items())})"
        )
    stray = sorted(set(redistribute) - set(weights))
    if stray:
        raise RlhfkitError(f"--redistribute names {', '.join(stray)}, which is not in --rewards")
    sources: dict[str, RewardSource] = {}
    # A shared-backbone RM loads once; its aspects' sources share one forward pass per batch.
    aspects_of: dict[str, dict] = {}
    for name in weights:
        model_name = reward_model_name(name, rm_paths)
        spec = rm_paths[model_name]
        if model_name != name or _is_shared(spec):
            if model_name not in aspects_of:
                aspects_of[model_name] = _shared_aspects(model_name, spec, device, dtype)
            aspects = aspects_of[model_name]
            aspect = name[len(model_name) + 1 :]
            if model_name == name or aspect not in aspects:
                raise RlhfkitError(
                    f"--rewards {name}: --rm {model_name}={spec} is a shared-backbone reward model; name its aspects "
                    f"as {', '.join(f'{model_name}.{a}' for a in aspects)}"
                )
            sources[name] = RewardModelSource(name, aspects[aspect], redistribute.get(name), batch_size)
        elif spec.startswith("py:"):
            sources[name] = PythonFunctionSource(name, spec[3:])
        elif spec.startswith("hf:"):
            sources[name] = ClassifierSource(name, spec[3:], device, batch_size)
        else:
            if not Path(spec).exists():
                raise RlhfkitError(f"--rm {name}={spec}: no such directory")
            sources[name] = RewardModelSource(
                name, load_reward_model(spec, device=device, dtype=dtype), redistribute.get(name), batch_size
            )
    return sources


def _is_shared(spec: str) -> bool:
    from rlhfkit.models import model_dir
    from rlhfkit.rewards.reward_model import SHARED_KIND, SPEC_FILE, read_spec

    return (model_dir(spec) / SPEC_FILE).is_file() and read_spec(spec)["kind"] == SHARED_KIND


def _shared_aspects(model_name: str, spec: str, device: torch.device, dtype: str) -> dict:
    """{aspect: RewardModel} of a shared-backbone --rm (an error for anything else)."""
    from rlhfkit.rewards.reward_model import SHARED_KIND, read_spec
    from rlhfkit.rewards.shared_backbone import load_reward_models

    if spec.startswith(("py:", "hf:")) or not Path(spec).exists():
        raise RlhfkitError(f"--rm {model_name}={spec}: NAME.ASPECT rewards need a shared-backbone reward-model directory here")
    kind = read_spec(spec)["kind"]
    if kind != SHARED_KIND:
        raise RlhfkitError(
            f"--rm {model_name}={spec} is a single-aspect {kind} reward model; name it {model_name} in --rewards "
            "(NAME.ASPECT is for a shared-backbone model trained with `train-rm --shared-backbone`)"
        )
    return load_reward_models(spec, device=device, dtype=dtype)
