"""rlhfkit report and the plotting helper: the HTML parsed and checked against the run's files
(small hand-made runs whose values can be counted by hand)."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from rlhfkit.config import build_config
from rlhfkit.errors import RlhfkitError
from rlhfkit.plots import Panel, Series, draw, merge_coinciding, reward_keys
from rlhfkit.stages.report import ReportConfig, run_report


class Elements(HTMLParser):
    """Every element's tag, attributes and the text directly inside it, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[dict] = []
        self.open: list[dict] = []

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, "attrs": dict(attrs), "text": ""}
        self.elements.append(element)
        if tag not in ("meta", "br", "link", "input"):
            self.open.append(element)

    def handle_endtag(self, tag):
        while self.open and self.open.pop()["tag"] != tag:
            pass

    def handle_data(self, data):
        if self.open:
            self.open[-1]["text"] += data

    def having(self, tag: str, cls: str | None = None) -> list[dict]:
        return [e for e in self.elements if e["tag"] == tag and (cls is None or cls in e["attrs"].get("class", "").split())]


def parse(path: Path) -> Elements:
    parser = Elements()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def generation(id_: str, response_tokens: list[str], token_rewards: list[float], meta: dict) -> dict:
    return {"type": "generation", "schema_version": 1, "id": id_, "prompt": "question: why?",
            "response": "".join(response_tokens), "model": "m", "tokens": response_tokens,
            "token_rewards": token_rewards, "meta": meta}


@pytest.fixture
def ppo_run(tmp_path: Path) -> Path:
    run = tmp_path / "exp" / "ppo-fg"
    run.mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps({
        "stage": "ppo", "config": {"rewards": "fact=0.5,rel=0.3", "steps": 2}, "command": ["rlhfkit", "ppo"],
        "versions": {"rlhfkit": "0.1.0"}}))
    # Today's names (reward/<source>) in step 1, the agreed ones (reward/weighted|raw/<source>) in step 2.
    write_jsonl(run / "metrics.jsonl", [
        {"step": 1, "reward/total": 0.5, "reward/fact": 0.5, "kl": 0.0, "response_length": 3.0, "policy_loss": 0.1},
        {"step": 2, "reward/total": 0.8, "reward/weighted/fact": 0.5, "reward/raw/fact": 1.0, "kl": 0.02, "response_length": 4.0, "policy_loss": 0.05},
    ])
    write_jsonl(run / "rollouts.jsonl", [
        generation("step1-0", ["Yes", " it", " is"], [0.0, -0.5, 1.0], {"step": 1, "source_token_rewards": {"fact": [0.0, -1.0, 2.0]}}),
        generation("step1-1", ["No", "."], [0.25, 0.25], {"step": 1, "source_token_rewards": {"fact": [0.5, 0.5]}}),
        generation("step2-0", ["Maybe"], [-2.0], {"step": 2, "source_token_rewards": {"fact": [-4.0]}}),
    ])
    return run


def test_report_shows_the_runs_rollouts_and_curves(ppo_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    run_report(build_config(ReportConfig, runs=[str(ppo_run)], out=str(out)))
    page = parse(out)

    rollouts = page.having("div", "rollout")
    assert [r["attrs"]["data-step"] for r in rollouts] == ["1", "1", "2"]
    # Each rollout's reward is the sum of its token_rewards: 0 - 0.5 + 1 = 0.5; 0.25 + 0.25 = 0.5; -2.
    assert [float(r["attrs"]["data-reward"]) for r in rollouts] == [0.5, 0.5, -2.0]
    # One heat-map row per source plus the total: 2 rows x 3 rollouts, the source named first.
    assert [row["attrs"]["data-source"] for row in page.having("div", "heat")] == ["fact", "total"] * 3
    tokens = page.having("span", "t")
    assert [t["text"] for t in tokens[:6]] == ["Yes", " it", " is", "Yes", " it", " is"]
    # Token titles carry the file's values: fact row [0, -1, 2], total row [0, -0.5, 1].
    assert [t["attrs"]["title"] for t in tokens[:6]] == ["fact +0.0000", "fact -1.0000", "fact +2.0000",
                                                         "total +0.0000", "total -0.5000", "total +1.0000"]
    # Full colour at the 95th percentile of |fact| over the run: sorted |fact| = [0, 0.5, 0.5, 1, 2, 4],
    # index int(0.95 * 5) = 4 -> 2.0; so +2 is full green (0.08 + 0.8 = 0.88) and -1 half red (0.48).
    assert "rgba(0,160,60,0.880)" in tokens[2]["attrs"]["style"]
    assert "rgba(220,40,40,0.480)" in tokens[1]["attrs"]["style"]
    # The step filter offers the logged steps; the prompt is shown, not folded away.
    assert [o["attrs"]["value"] for o in page.having("option") if o["attrs"].get("value", "").isdigit()] == ["1", "2"]
    assert page.having("div", "prompt")[0]["text"] == "question: why?"
    # Curves: an inline SVG titled by stage and run; weighted and raw panels both drawn.
    html = out.read_text(encoding="utf-8")
    assert "<svg" in html and "ppo: ppo-fg" in html
    assert "reward, weighted (enters the total)" in html and "reward, raw (each source" in html
    # Nothing is fetched: no element loads a URL (SVG's xmlns URIs are names, not requests).
    assert not [e for e in page.elements if any(k in ("src", "href") and ":" in v for k, v in e["attrs"].items() if v)]
    assert "<link" not in html and "@import" not in html
    assert json.loads(page.having("pre", "config")[0]["text"]) == {"rewards": "fact=0.5,rel=0.3", "steps": 2}


def test_report_of_an_experiment_directory(ppo_run: Path, tmp_path: Path) -> None:
    exp = ppo_run.parent
    redistributed = exp / "redistribute"
    # Annotator span [4, 9) covers the tokens "is a" ([3, 5) and [5, 7)... by characters): tokens
    # "It " [0, 3), "is " [3, 6), "fine" [6, 10); the span overlaps the second and the third.
    write_jsonl(redistributed / "tokens.jsonl", [generation("r0", ["It ", "is ", "fine"], [0.1, 0.2, -0.3], {
        "reward_model": "runs/rm-pref", "annotator_spans": [{"start": 4, "end": 9, "label": "Wrong", "aspect": "factuality"}]})])
    (redistributed / "tokens.run_config.json").write_text(json.dumps({"stage": "redistribute", "config": {"out": str(redistributed / "tokens.jsonl")}}))
    rm = exp / "rm"
    rm.mkdir()
    (rm / "run_config.json").write_text(json.dumps({"stage": "train-rm", "config": {}}))
    (rm / "rm_metrics.json").write_text(json.dumps({"held_out": {"pairwise_accuracy": 0.625, "pairs": 8}}))
    cr = exp / "cr"
    cr.mkdir()
    (cr / "run_config.json").write_text(json.dumps({"stage": "critique-revise", "config": {}}))
    write_jsonl(cr / "revisions.jsonl", [{"type": "generation", "schema_version": 1, "id": "x", "prompt": "p", "response": "a c",
        "meta": {"original_response": "a b", "rounds": [{"round": 1, "critique": "no b", "response": "a c"}]}}])
    (cr / "results.md").write_text("| round | win |\n|---|---|\n| 1 | 50.0% |\n")
    audit = exp / "audit"
    audit.mkdir()
    (audit / "run_config.json").write_text(json.dumps({"stage": "evaluate", "config": {}}))
    (audit / "audit.md").write_text("| rm | steps 1-2 |\n|---|---|\n| fact | 0.750 |\n")
    out = tmp_path / "exp.html"
    run_report(build_config(ReportConfig, runs=[str(exp)], out=str(out)))
    page = parse(out)

    assert sorted(s["attrs"]["data-stage"] for s in page.having("section", "run")) == ["critique-revise", "evaluate", "ppo", "redistribute", "train-rm"]
    spanned = [t["text"] for t in page.having("span", "span")]
    assert spanned == ["is ", "fine"]
    assert [row["attrs"]["data-source"] for row in page.having("div", "heat")][-1] == "rm-pref"
    held_out = {cells[0]["text"]: cells[1]["text"] for cells in zip(page.having("td")[::2], page.having("td")[1::2])}
    assert held_out["pairwise_accuracy"] == "0.625" and held_out["pairs"] == "8"
    # "a b" -> "a c": b removed, c added.
    assert [e["text"] for e in page.having("del")] == ["removed", "b"]
    assert [e["text"] for e in page.having("ins")] == ["added", "c"]
    assert sorted(e["text"] for e in page.having("td") if e["text"] in ("50.0%", "0.750")) == ["0.750", "50.0%"]


def test_report_bad_input(tmp_path: Path) -> None:
    with pytest.raises(RlhfkitError, match="not a run directory"):
        run_report(build_config(ReportConfig, runs=[str(tmp_path)], out=str(tmp_path / "r.html")))
    with pytest.raises(RlhfkitError, match="--out must be an .html file"):
        build_config(ReportConfig, runs=[str(tmp_path)], out=str(tmp_path / "r.txt"))


def test_reward_keys_read_both_namings() -> None:
    kinds = reward_keys(["reward/fact", "reward/total", "reward/raw/rel", "reward/weighted/rel", "reward/normalized/rel", "kl"])
    assert kinds == {"weighted": ["reward/total", "reward/fact", "reward/weighted/rel"],
                     "raw": ["reward/raw/rel"], "normalized": ["reward/normalized/rel"]}


def test_coinciding_lines_drawn_once() -> None:
    # A holistic run: reward/total is its one source's weighted reward (weight 1).
    lines = merge_coinciding([Series("total", [1, 2], [0.5, 0.7]), Series("pref", [1, 2], [0.5, 0.7]), Series("kl", [1, 2], [0.5, 0.6])])
    assert [line.label for line in lines] == ["total = pref", "kl"]


def test_win_rate_plot_ticks_losses_and_limits() -> None:
    from rlhfkit.stages.critique_revise import win_rate_panel

    # win rate = win + tie/2 = 0.25 + 0.75/2 = 0.625
    rows = [{"round": r, "win": 0.25, "tie": 0.75, "loss": 0.0, "win_rate": 0.625} for r in (1, 2, 3)]
    panel = win_rate_panel(rows)
    assert panel.series[0].label == "win rate, win + tie/2 (rlhfkit)" and list(panel.series[0].y) == [62.5] * 3
    axes = draw("critique-revise run: x", [panel]).axes[0]
    assert list(axes.get_xticks()) == [1, 2, 3]  # the rounds run, not the paper's 5
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert labels == ["win rate, win + tie/2 (rlhfkit)", "win (rlhfkit)", "tie (rlhfkit)", "loss (rlhfkit)",
                      "win rate (paper: Jin et al. 2023)"]
    assert axes.get_ylim()[0] < 0  # a 0% line is not drawn on the frame
    assert axes.get_title() == "revised vs original response" and axes.figure.get_suptitle() == "critique-revise run: x"


def test_loss_plot_evaluations_are_points() -> None:
    panel = Panel("loss", "step", "loss", [Series("train loss", [1, 2, 3], [3.0, 2.0, 1.5]),
                                            Series("held-out loss", [0, 3], [3.1, 1.9], markers_only=True)])
    held_out = draw("sft: run", [panel]).axes[0].get_lines()[1]
    assert held_out.get_linestyle() == "None"  # two evaluations are not joined into a "trend"


def test_a_segment_rms_calibration_is_plotted_not_tabled(tmp_path, monkeypatch):
    from rlhfkit import reporting

    drawn = []
    real_draw = reporting.draw
    monkeypatch.setattr(reporting, "draw", lambda title, panels, **kw: drawn.append((title, panels)) or real_draw(title, panels, **kw))
    rm = tmp_path / "rm-fact"
    rm.mkdir()
    (rm / "run_config.json").write_text(json.dumps({"stage": "train-rm", "config": {}}))
    bins = [{"low": 0.0, "high": 0.1, "segments": 1, "mean_error_probability": 0.05, "error_rate": 0.0},
            {"low": 0.9, "high": 1.0, "segments": 3, "mean_error_probability": 0.95, "error_rate": 2 / 3}]
    (rm / "rm_metrics.json").write_text(json.dumps({"held_out": {"accuracy": 0.75, "segments": 4, "calibration": bins}}))
    out = tmp_path / "rm.html"
    run_report(build_config(ReportConfig, runs=[str(rm)], out=str(out)))
    page = parse(out)

    assert len(page.having("div", "calibration")) == 1 and len(page.having("svg")) == 1
    held_out = {cells[0]["text"]: cells[1]["text"] for cells in zip(page.having("td")[::2], page.having("td")[1::2])}
    assert held_out == {"accuracy": "0.75", "segments": "4"}  # the bins are drawn, not listed
    [(title, [panel])] = drawn
    diagonal, rm_line = panel.series
    assert title == "train-rm: rm-fact" and (list(diagonal.x), list(diagonal.y)) == ([0.0, 1.0], [0.0, 1.0])
    assert list(rm_line.x) == [0.05, 0.95] and list(rm_line.y) == [0.0, 2 / 3]


def test_a_damaged_run_file_is_one_line(tmp_path: Path) -> None:
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "run_config.json").write_text("[1, 2]")
    with pytest.raises(RlhfkitError, match=r"run_config.json: not a JSON object"):
        run_report(build_config(ReportConfig, runs=[str(rm)], out=str(tmp_path / "a.html")))
    (rm / "run_config.json").write_text(json.dumps({"stage": "train-rm", "config": {}}))
    (rm / "rm_metrics.json").write_bytes(b'{"held_out": "\xff"}')
    with pytest.raises(RlhfkitError, match=r"rm_metrics.json: not UTF-8 text \(byte 14\)"):
        run_report(build_config(ReportConfig, runs=[str(rm)], out=str(tmp_path / "b.html")))
    assert not (tmp_path / "a.html").exists() and not (tmp_path / "b.html").exists()
