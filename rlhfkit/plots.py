"""Every rlhfkit plot is drawn here, in one style: titled by stage and run, lines that stay
visible where they coincide, PNG files (atomic) or inline SVG for the HTML report.

matplotlib's object API with the Agg canvas (no pyplot): no global figure state, no display.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from rlhfkit.io import atomic_write

# One colour, dash pattern and marker per line, in this order: two lines with the same
# values still show both (the second's dashes over the first), and colour-blind readers
# tell them apart by pattern.
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
DASHES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 8,
    "legend.framealpha": 0.8,
    "axes.formatter.useoffset": False,
    "svg.fonttype": "none",  # SVG text stays text (small, selectable, searchable)
    "svg.hashsalt": "rlhfkit",  # the same figure gives the same SVG
}


@dataclass
class Series:
    """One line: its label, x and y values (`markers_only`: points not joined, e.g. two evals)."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    markers_only: bool = False
    band: tuple[Sequence[float], Sequence[float]] | None = None  # shaded (low, high) around y


@dataclass
class Panel:
    """One axes: a title, axis labels and its lines."""

    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    ylim: tuple[float, float] | None = None
    integer_x: Sequence[int] | None = None  # ticks at exactly these integers (rounds, epochs)
    reference_y: float | None = None  # a dotted horizontal line (chance, 0.5 accuracy)


def merge_coinciding(series: Sequence[Series]) -> list[Series]:
    """Lines with the same x and y drawn once, labelled `a = b` (a holistic run's total is its
    one weighted reward: two coinciding lines would hide one under the other)."""
    merged: list[Series] = []
    for line in series:
        twin = next((m for m in merged if list(m.x) == list(line.x) and _same(m.y, line.y)), None)
        if twin is None:
            merged.append(Series(line.label, list(line.x), list(line.y), line.markers_only, line.band))
        else:
            twin.label = f"{twin.label} = {line.label}"
    return merged


def _same(a: Sequence[float], b: Sequence[float]) -> bool:
    # Equal to float32 rounding (metrics.jsonl values are float32 sums printed as float64).
    return len(a) == len(b) and all(math.isclose(u, v, rel_tol=1e-6, abs_tol=1e-9) for u, v in zip(a, b))


@contextmanager
def _styled() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(STYLE):
        yield


def draw(suptitle: str, panels: Sequence[Panel], *, columns: int | None = None, width: float = 5.0, height: float = 3.6):
    """A figure of `panels` (side by side, `columns` per row) under `suptitle`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, MaxNLocator

    columns = columns or len(panels)
    rows = -(-len(panels) // columns)
    with _styled():
        figure = Figure(figsize=(width * columns, height * rows + 0.4), dpi=100, layout="constrained")
        FigureCanvasAgg(figure)
        figure.suptitle(suptitle, fontsize=11, fontweight="bold")
        for index, panel in enumerate(panels):
            axes = figure.add_subplot(rows, columns, index + 1)
            for number, line in enumerate(merge_coinciding(panel.series)):
                colour = COLOURS[number % len(COLOURS)]
                style = {"color": colour, "label": line.label, "marker": MARKERS[number % len(MARKERS)],
                         "markersize": 4 if len(line.x) <= 40 else 0}
                if line.markers_only:
                    axes.plot(line.x, line.y, linestyle="none", **{**style, "markersize": 6})
                else:
                    axes.plot(line.x, line.y, linestyle=DASHES[number % len(DASHES)], linewidth=1.6, **style)
                if line.band is not None:
                    axes.fill_between(line.x, line.band[0], line.band[1], color=colour, alpha=0.15)
            if panel.reference_y is not None:
                axes.axhline(panel.reference_y, color="grey", linewidth=0.8, linestyle=":")
            if panel.ylim is not None:
                axes.set_ylim(*panel.ylim)
            if panel.integer_x is not None:
                ticks = list(panel.integer_x)
                axes.xaxis.set_major_locator(FixedLocator(ticks))
                axes.set_xlim(min(ticks) - 0.3, max(ticks) + 0.3)
            else:  # every x axis counts steps or rounds
                axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.set_title(panel.title)
            axes.set_xlabel(panel.xlabel)
            axes.set_ylabel(panel.ylabel)
            if panel.series:
                axes.legend(loc="best")
    return figure


def save_png(figure, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`figure` written to `path` as PNG, atomically (rendered in memory first); `metadata`
    goes into the PNG's text chunks (compare marks the files it wrote)."""
    buffer = io.BytesIO()
    with _styled():
        figure.savefig(buffer, format="png", metadata=metadata)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())


def svg_text(figure) -> str:
    """`figure` as an inline `<svg>` element (for the HTML report; no XML prolog)."""
    buffer = io.StringIO()
    with _styled():
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def reward_keys(metrics: Sequence[str]) -> dict[str, list[str]]:
    """PPO's reward metrics by kind, in the agreed naming: `weighted` (reward/total and each
    reward/weighted/<source>: what enters the total), `raw` (reward/raw/<source>: each RM's own
    units) and `normalized`. Runs from before that naming logged `reward/<source>`, each
    source's weighted sum: read as weighted."""
    kinds: dict[str, list[str]] = {"weighted": [], "raw": [], "normalized": []}
    for key in metrics:
        parts = key.split("/")
        if parts[0] != "reward" or len(parts) < 2:
            continue
        if parts[1] in kinds and len(parts) > 2:
            kinds[parts[1]].append(key)
        elif len(parts) == 2:
            kinds["weighted"].append(key)
    kinds["weighted"].sort(key=lambda key: key != "reward/total")  # the total first
    return kinds


def _short(key: str) -> str:
    """`reward/weighted/fact` -> `fact`, `reward/total` -> `total`."""
    return key.rsplit("/", 1)[-1]


def ppo_panels(series: dict[str, list[tuple[int, float]]]) -> list[Panel]:
    """The panels of a PPO run's metrics.jsonl ({metric: [(step, value)]}): rewards (weighted
    and raw), KL, response length, entropy and losses, each where the run logged it."""

    def lines(keys: Sequence[str]) -> list[Series]:
        return [Series(_short(key), *zip(*series[key])) for key in keys if series.get(key)]

    kinds = reward_keys(series)
    # Under --normalize-rewards the normalised and weighted values (and their total) are about 0
    # at every step by construction, so their curves would show batch noise as a trend: only
    # the reward models' own scores are drawn then.
    normalized = bool(kinds["normalized"])
    specs = [
        ("reward, weighted (enters the total)", "reward per response", [] if normalized else kinds["weighted"]),
        ("reward, raw (each source's own units)", "reward per response", kinds["raw"]),
        ("KL(policy || reference)", "KL per response", ["kl"]),
        ("response length", "tokens", ["response_length"]),
        ("entropy", "nats per token", ["entropy"]),
        ("losses", "loss", ["policy_loss", "value_loss"]),
    ]
    return [Panel(title, "PPO step", ylabel, lines(keys)) for title, ylabel, keys in specs if lines(keys)]


def colour_scale(values: Sequence[float]) -> float:
    """The |reward| drawn at full colour in a heat map: the 95th percentile of |values|, so one
    outlier does not wash out the rest (1.0 when there are none)."""
    magnitudes = sorted(abs(v) for v in values)
    return magnitudes[int(0.95 * (len(magnitudes) - 1))] if magnitudes and magnitudes[-1] > 0 else 1.0


def reward_colour(value: float, scale: float) -> str:
    """A token's heat-map colour: green for a positive reward, red for a negative one, more
    opaque up to |value| = scale."""
    strength = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    rgb = "0,160,60" if value >= 0 else "220,40,40"
    return f"rgba({rgb},{0.08 + 0.8 * strength:.3f})"
