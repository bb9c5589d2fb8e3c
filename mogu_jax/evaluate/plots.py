"""The report's PNG plots (matplotlib, Agg canvas: no display needed): refusal rate per kind and system, and
the router's mean weights per layer and kind."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mogu_jax.evaluate.table import display_name, headline


def plot_refusal_rates(report: Mapping[str, Any], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    systems = list(report["systems"])
    kinds = list(report["kinds"])
    fig = Figure(figsize=(max(4.0, 1.6 * len(kinds) + 2), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(systems)
    x = np.arange(len(kinds))
    for i, s in enumerate(systems):
        vals = [100 * headline(k, report["metrics"][s][k])[1] for k in kinds]
        bars = ax.bar(x + (i - (len(systems) - 1) / 2) * width, vals, width, label=display_name(s))
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{k}\n({headline(k, report['metrics'][systems[0]][k])[0]})" for k in kinds], fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel("% of prompts")
    ax.set_title("Refusal rate per kind (harmful/jailbreak: clean; benign/borderline: any)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def plot_router_layers(report: Mapping[str, Any], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rr = report["router"]
    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    colors = {"harmful": "tab:red", "jailbreak": "tab:purple", "benign": "tab:green", "borderline": "tab:olive"}
    for j, (key, title) in enumerate((("layer_a", "a (unwilling weight)"), ("layer_b", "b (glad weight)"))):
        ax = fig.add_subplot(1, 2, j + 1)
        for k in report["kinds"]:
            vals = rr[key][k]
            ax.plot(range(len(vals)), vals, marker="o", markersize=3, color=colors.get(k), label=k)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"mean {title} per layer", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
