"""The experiment's figures (like the seed paper's Figures 4-8), as PNG with the plotted data.

One figure per quantity, one panel per strategy and mode, one line per kill count, over seconds
on the paper's clock (0 = the scheduled start of training, see :mod:`launch.results`):

- ``accuracy.png``: test accuracy, with each failure band (kill to replacement ready, see
  :mod:`launch.results`) shaded in its line's colour;
- ``cpu.png``: CPU percent summed over the job's processes (100 = one core);
- ``memory.png``: resident memory summed over the job's processes, MiB;
- ``gradients.png``: gradients computed by the workers (dashed) and updates in the servers'
  model (solid).

Beside every ``NAME.png`` is ``NAME.json`` with exactly the series and bands plotted, so tests
and readers can check the data without reading pixels. matplotlib runs with the ``Agg`` backend
(no display needed).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from launch.results import RunData

FIGURES = ("accuracy", "cpu", "memory", "gradients")


@dataclass
class Series:
    """One plotted line."""

    label: str
    x: list[float]
    y: list[float]
    kills: int
    dashed: bool = False
    bands: list[list[float]] = field(default_factory=list)
    """Shaded intervals (failure bands) in this line's colour."""


def _rel(run: RunData, t: float) -> float:
    return round(t - run.origin, 3)


def accuracy_series(run: RunData) -> list[Series]:
    shift = run.metrics_origin
    return [
        Series(
            f"{run.cell['kills']} kill(s)",
            [_rel(run, shift + float(r["wall_time"])) for r in run.metrics],
            [float(r["test_accuracy"]) for r in run.metrics],
            run.cell["kills"],
            bands=[[_rel(run, lo), _rel(run, hi)] for lo, hi in run.bands()],
        )
    ]


def _resource_series(run: RunData, key: str, scale: float) -> list[Series]:
    """``key`` summed over processes, per time bin of the sampling interval (each process's
    samples in a bin averaged first)."""
    width = float(run.cell.get("sample_every") or 1.0)
    bins: dict[int, dict[int, list[float]]] = {}
    for s in run.samples:
        b = math.floor((s["time"] - run.origin) / width)
        bins.setdefault(b, {}).setdefault(s["pid"], []).append(s[key] * scale)
    xs = sorted(bins)
    ys = [sum(sum(v) / len(v) for v in bins[b].values()) for b in xs]
    label = f"{run.cell['kills']} kill(s)"
    return [Series(label, [round((b + 0.5) * width, 3) for b in xs], ys, run.cell["kills"])]


def cpu_series(run: RunData) -> list[Series]:
    return _resource_series(run, "cpu_percent", 1.0)


def memory_series(run: RunData) -> list[Series]:
    return _resource_series(run, "rss_bytes", 1.0 / 2**20)


def gradient_series(run: RunData) -> list[Series]:
    shift = run.metrics_origin
    rows = [r for r in run.metrics if r.get("versions") and r.get("computed") is not None]
    xs = [_rel(run, shift + float(r["wall_time"])) for r in rows]
    k = run.cell["kills"]
    return [
        Series(f"{k} kill(s) applied", xs, [float(min(r["versions"])) for r in rows], k),
        Series(f"{k} kill(s) computed", xs, [float(r["computed"]) for r in rows], k, dashed=True),
    ]


SERIES: dict[str, tuple[str, Callable[[RunData], list[Series]]]] = {
    "accuracy": ("test accuracy", accuracy_series),
    "cpu": ("CPU % (all processes)", cpu_series),
    "memory": ("resident memory MiB (all processes)", memory_series),
    "gradients": ("gradients / updates", gradient_series),
}
"""Figure name -> (y-axis label, the series of one run)."""


def panel_name(run: RunData) -> str:
    """The panel a run belongs to: its strategy and mode."""
    return f"{run.cell['strategy']} ({run.cell['mode']})"


def figure_data(name: str, runs: Sequence[RunData]) -> dict[str, Any]:
    """The plotted data of figure ``name``: ``{"ylabel", "panels": {panel: [series...]}}``."""
    ylabel, make = SERIES[name]
    panels: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        panels.setdefault(panel_name(run), []).extend(asdict(s) for s in make(run))
    return {
        "figure": name,
        "ylabel": ylabel,
        "xlabel": "seconds (paper clock: 0 = start of training)",
        "panels": panels,
    }


def render(data: dict[str, Any], path: str, title: str) -> None:
    """Draw ``data`` (from :func:`figure_data`) into the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(data["panels"])
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False, sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes.flat, names, strict=False):
        for s in data["panels"][name]:
            color = colors[s["kills"] % len(colors)]
            ax.plot(s["x"], s["y"], color=color, linestyle="--" if s["dashed"] else "-",
                    linewidth=1.2, label=s["label"])  # fmt: skip
            for lo, hi in s["bands"]:
                ax.axvspan(lo, hi, color=color, alpha=0.12, linewidth=0)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in axes.flat:
        ax.xaxis.set_tick_params(labelbottom=True)  # panels above a hidden one need them too
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(data["xlabel"])
    for ax in axes[:, 0]:
        ax.set_ylabel(data["ylabel"])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_figures(runs: Sequence[RunData], out_dir: str, title: str) -> list[str]:
    """Write every figure of :data:`FIGURES` as ``out_dir/NAME.png`` and ``NAME.json``; return
    the PNG paths. Runs without data leave their panels' lines empty."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name in FIGURES:
        data = figure_data(name, runs)
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(data, f, indent=1)
        path = os.path.join(out_dir, f"{name}.png")
        render(data, path, f"{title}: {name}")
        paths.append(path)
    return paths
