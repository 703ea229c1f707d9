"""The report's figures, drawn with matplotlib's object API (Agg canvas, no pyplot state):
component errors per layer, ours-vs-reference logits, and the logit-lens heatmap."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DPI = 90


def available() -> bool:
    """True when matplotlib is installed (the ``verify`` extra)."""
    return importlib.util.find_spec("matplotlib") is not None


def _figure(width: float, height: float):  # -> matplotlib.figure.Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def component_errors(rows: Sequence[dict], path: Path) -> Path:
    """Grouped bars: relative error of each component (x) for each checked layer (colour),
    log scale, with each component's threshold as a black tick. Exact results (0) are drawn
    at the floor of the axis."""
    floor = 1e-12
    names = list(dict.fromkeys(r["component"] for r in rows))
    layers = list(dict.fromkeys(r["layer"] for r in rows if r["layer"] is not None))
    groups = layers + ([None] if any(r["layer"] is None for r in rows) else [])
    fig = _figure(max(8.0, 0.45 * len(names) + 2), 4.2)
    ax = fig.subplots()
    width = 0.8 / max(1, len(groups))
    for gi, layer in enumerate(groups):
        xs, ys = [], []
        for r in rows:
            if r["layer"] == layer:
                xs.append(names.index(r["component"]) + (gi - (len(groups) - 1) / 2) * width)
                ys.append(max(r["rel"], floor))
        ax.bar(xs, ys, width=width, bottom=floor, label="global" if layer is None else f"layer {layer}")
    thresholds = {r["component"]: r["threshold"] for r in rows}
    for i, name in enumerate(names):
        ax.hlines(max(thresholds[name], floor), i - 0.45, i + 0.45, colors="black", linewidth=1.5)
    ax.set_yscale("log")
    ax.set_ylim(floor, 1.0)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("relative error vs float64 (log)")
    ax.set_title("Engine vs manual float64 calculation, per component (black: threshold)")
    ax.legend(fontsize=8, ncols=len(groups))
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=DPI)
    return path


def logit_scatter(reference: np.ndarray, panels: Sequence[tuple[str, np.ndarray]], path: Path,
                  max_points: int = 20000, seed: int = 0) -> Path:
    """One panel per ``(label, logits)``: those logits (y) against the float64 reference (x)
    over the same positions, a random subset of ``max_points`` points, with y = x."""
    ref = reference.reshape(-1)
    pick = np.random.default_rng(seed).choice(ref.size, size=min(max_points, ref.size), replace=False)
    fig = _figure(4.2 * len(panels), 4.0)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    lo, hi = float(ref.min()), float(ref.max())
    for ax, (label, values) in zip(axes, panels):
        v = values.reshape(-1)
        d = np.abs(v.astype(np.float64) - ref)
        ax.scatter(ref[pick], v[pick], s=2, alpha=0.4, linewidths=0)
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
        ax.set_xlabel("float64 reference logit")
        ax.set_ylabel(f"{label} logit")
        ax.set_title(f"{label}: max |Δ| = {d.max():.2e}", fontsize=10)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=DPI)
    return path


def lens_heatmap(probs: np.ndarray, token_labels: Sequence[str], layer_labels: Sequence[str], path: Path,
                 title: str) -> Path:
    """Heatmap of log10 probability (rows: tokens, columns: depth), clipped at 1e-6."""
    fig = _figure(max(6.0, 0.28 * len(layer_labels) + 2.5), 0.36 * len(token_labels) + 1.6)
    ax = fig.subplots()
    img = ax.imshow(np.log10(np.clip(probs, 1e-6, 1.0)), aspect="auto", cmap="viridis", vmin=-6, vmax=0)
    ax.set_yticks(range(len(token_labels)), token_labels, fontsize=8)
    ax.set_xticks(range(len(layer_labels)), layer_labels, fontsize=7, rotation=90)
    ax.set_xlabel("residual stream after (emb = embedding, then each block)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(img, ax=ax, label="log10 probability")
    fig.savefig(path, dpi=DPI)
    return path
