"""Figures shared by the library and the report: fixed-size matplotlib plots and sample tiles.

Every plot is :data:`PLOT_PX` pixels (no tight bounding box), so reports and docs images
have stable sizes. ``engine.pretrain_base`` draws its loss curve here; the experiment
report (``experiments.report``) draws all its figures with these helpers. A sample is
shown the same way wherever it appears (the report's grids, the ControlNet's TensorBoard
previews, ``engine.preview``): its scribble drawn over it (:func:`overlay_scribble`),
enlarged without smoothing (:func:`upscale`).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from engine.render import render_scribble
from engine.shards import UNLABELLED

DPI = 100
PLOT_IN = (7.2, 4.2)
PLOT_PX = (round(PLOT_IN[0] * DPI), round(PLOT_IN[1] * DPI))  # (width, height) of every plot
TILE_PX = 128  # side of a sample tile in pixels (the report's grids, the ControlNet's TensorBoard previews)
OVERLAY_ALPHA = 0.6  # scribble strokes drawn over a sample: the image stays visible beneath them


def fmt_g(x: float) -> str:
    return f"{x:g}"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> str:
    fig.savefig(path, dpi=DPI)  # no bbox_inches: the pixel size stays exactly figsize x dpi
    pyplot().close(fig)
    return path.name


def axes(title: str, xlabel: str, ylabel: str, legend: bool = True):
    """A plot of :data:`PLOT_PX` pixels; room on the right for a legend when there is one."""
    plt = pyplot()
    fig = plt.figure(figsize=PLOT_IN, dpi=DPI)
    ax = fig.add_axes((0.1, 0.14, 0.68 if legend else 0.86, 0.76))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def legend(ax, title: str) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title=title, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)


def plot_lines(series: dict[str, list[tuple[float, float, float]]], title: str, xlabel: str, ylabel: str,
               path: Path, baseline: tuple[float, float] | None = None, legend_title: str = "",
               log_x: bool = False) -> str:
    """One line per series of (x, mean, std) points; std drawn as error bars when > 0."""
    fig, ax = axes(title, xlabel, ylabel)
    xs_all = sorted({x for pts in series.values() for x, _, _ in pts})
    for label, pts in series.items():
        pts = sorted(pts)
        xs, ys, es = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
        ax.errorbar(xs, ys, yerr=es if any(es) else None, marker="o", capsize=3, label=label)
    if baseline is not None:
        ax.axhline(baseline[0], color="0.4", linestyle="--", label="real only")
        if baseline[1] > 0:
            ax.axhspan(baseline[0] - baseline[1], baseline[0] + baseline[1], color="0.5", alpha=0.1, lw=0)
    if log_x:
        ax.set_xscale("log")
    ax.set_xticks(xs_all)
    ax.set_xticklabels([fmt_g(x) for x in xs_all])
    ax.minorticks_off()
    legend(ax, legend_title)
    return save_figure(fig, path)


def plot_bars(labels: list[str], values: list[list[float]], title: str, ylabel: str, path: Path) -> str:
    """Bar per label at the mean; error bar = std and dots = single seeds when there are several."""
    fig, ax = axes(title, "", ylabel, legend=False)
    x = np.arange(len(labels))
    means = [statistics.mean(v) if v else 0.0 for v in values]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
    colours = [f"C{i}" for i in range(len(labels))]
    ax.bar(x, means, yerr=stds if any(stds) else None, capsize=5, color=colours, alpha=0.8)
    for i, v in enumerate(values):
        if len(v) > 1:
            ax.plot([i] * len(v), v, "k.", alpha=0.6)
        top = max([means[i] + stds[i]] + v)  # above the error bar and the seed dots
        ax.annotate(f"{means[i]:.2f}", (i, top), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=9)
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    hi = max([m + s for m, s in zip(means, stds)] + [max(v) for v in values if v] + [1e-6])
    ax.set_ylim(0.0, hi * 1.12)  # bars start at 0: differences are shown at their true scale
    return save_figure(fig, path)


def plot_loss(lines: list[dict[str, Any]], title: str, path: Path) -> str:
    """A training loss curve (log scale) from ``loss.jsonl`` records (``step``, ``loss``)."""
    fig, ax = axes(title, "step", "loss", legend=False)
    ax.plot([x["step"] for x in lines], [x["loss"] for x in lines])
    ax.set_yscale("log")
    return save_figure(fig, path)


def overlay_scribble(image: np.ndarray, scribble: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """``image`` with the scribble's class colours (:func:`render_scribble`) blended in at its
    labelled pixels; unlabelled (255) pixels keep the image."""
    blend = np.rint(alpha * render_scribble(scribble) + (1.0 - alpha) * image)
    return np.where((scribble != UNLABELLED)[..., None], blend, image).astype(np.uint8)


def upscale(picture: np.ndarray, side: int = TILE_PX) -> np.ndarray:
    """``picture`` repeated by the whole factor that makes it at least ``side`` pixels (nearest neighbour)."""
    factor = max(1, -(-side // max(picture.shape[:2])))
    return picture.repeat(factor, axis=0).repeat(factor, axis=1)
