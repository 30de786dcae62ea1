"""Figures shared by the library and the report: fixed-size matplotlib plots.

Every plot is :data:`PLOT_PX` pixels (no tight bounding box), so reports and docs images
have stable sizes. ``engine.pretrain_base`` draws its loss curve here; the experiment
report (``experiments.report``) draws all its figures with these helpers.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

DPI = 100
PLOT_IN = (7.2, 4.2)
PLOT_PX = (round(PLOT_IN[0] * DPI), round(PLOT_IN[1] * DPI))  # (width, height) of every plot
TILE_PX = 128  # side of a picture tile in pixels (the axes; the grid cell adds a margin)
GRID_MARGIN_IN = 0.04  # around each tile
GRID_CELL_IN = TILE_PX / DPI + 2 * GRID_MARGIN_IN
GRID_LEFT_IN, GRID_TOP_IN, GRID_PAD_IN = 0.75, 0.75, 0.08


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


def plot_intervals(labels: list[str], points: list[list[float]], means: list[float | None],
                   intervals: list[list[float] | None], title: str, xlabel: str, path: Path,
                   marks: dict[str, float] | None = None) -> str:
    """A forest plot: one row per label, its single values (dots, e.g. one per draw), its mean
    (diamond) and interval (bar), with vertical ``marks`` (name -> x, e.g. 0 and a target):
    paired differences read at a glance against where they would have to be."""
    fig, ax = axes(title, xlabel, "", legend=False)
    fig.subplots_adjust(left=0.25)
    ax.set_position((0.25, 0.14, 0.71, 0.76))  # room for the labels on the left
    rows = np.arange(len(labels))[::-1]  # the first label on top
    for y, pts, mean, ci in zip(rows, points, means, intervals):
        if ci:
            ax.plot(ci, [y, y], "-", color="C0", lw=2.5, alpha=0.7)
        ax.plot(pts, [y] * len(pts), "k.", alpha=0.6)
        if mean is not None:
            ax.plot([mean], [y], "D", color="C3")
            ax.annotate(f"{mean:+.2f}", (mean, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=9)
    for i, (name, x) in enumerate((marks or {}).items()):
        ax.axvline(x, color="grey" if x == 0 else f"C{i + 2}", ls="--", lw=1)
        ax.annotate(name, (x, rows.max() + 0.5), ha="center", fontsize=8, color="grey")
    ax.set_yticks(rows)
    ax.set_yticklabels(labels)
    ax.set_ylim(-0.6, len(labels) - 0.2)
    return save_figure(fig, path)


def plot_loss(lines: list[dict[str, Any]], title: str, path: Path) -> str:
    """A training loss curve (log scale) from ``loss.jsonl`` records (``step``, ``loss``)."""
    fig, ax = axes(title, "step", "loss", legend=False)
    ax.plot([x["step"] for x in lines], [x["loss"] for x in lines])
    ax.set_yscale("log")
    return save_figure(fig, path)


def upscale(picture: np.ndarray, side: int = TILE_PX) -> np.ndarray:
    """``picture`` repeated by the whole factor that makes it at least ``side`` pixels (nearest
    neighbour): a 32 px sample stays sharp, so a person sees where its shapes sit."""
    factor = max(1, -(-side // max(picture.shape[:2])))
    return picture.repeat(factor, axis=0).repeat(factor, axis=1)


def grid_px(rows: int, cols: int, left_in: float = GRID_LEFT_IN, title_in: float = 0.0) -> tuple[int, int]:
    """(width, height) in pixels of a :class:`TileGrid` of ``rows`` x ``cols`` tiles."""
    w_in = left_in + cols * GRID_CELL_IN + GRID_PAD_IN
    h_in = GRID_TOP_IN + rows * (GRID_CELL_IN + title_in) + GRID_PAD_IN
    return round(w_in * DPI), round(h_in * DPI)


class TileGrid:
    """A figure of ``rows`` x ``cols`` pictures, each :data:`TILE_PX` pixels (upscaled, no
    smoothing), with row labels on the left (``left_in`` inches), room above every row for
    tile titles (``title_in`` inches; the first row's sit in the top margin) and a title on top:
    the report's sample grids and ``jobs.show``'s contact sheets. Its size is :func:`grid_px`."""

    def __init__(self, rows: int, cols: int, left_in: float = GRID_LEFT_IN, title_in: float = 0.0) -> None:
        width, height = grid_px(rows, cols, left_in, title_in)
        self.fig = pyplot().figure(figsize=(width / DPI, height / DPI), dpi=DPI)
        self.fw, self.fh, self.left_in, self.row_in = width / DPI, height / DPI, left_in, GRID_CELL_IN + title_in

    def tile(self, r: int, c: int):
        """The axes of tile (r, c), without a frame (it would cover the tile's outer pixels)."""
        left = (self.left_in + c * GRID_CELL_IN + GRID_MARGIN_IN) / self.fw
        bottom = 1 - (GRID_TOP_IN + r * self.row_in + GRID_CELL_IN - GRID_MARGIN_IN) / self.fh
        ax = self.fig.add_axes((left, bottom, TILE_PX / DPI / self.fw, TILE_PX / DPI / self.fh))
        ax.set_axis_off()
        return ax

    def show(self, r: int, c: int, picture: np.ndarray, title: str = "", fontsize: float = 10):
        """Draw ``picture`` upscaled in tile (r, c), with an optional title above it."""
        ax = self.tile(r, c)
        ax.imshow(upscale(picture), interpolation="nearest")
        if title:
            ax.set_title(title, fontsize=fontsize)
        return ax

    def row_label(self, r: int, text: str, fontsize: float = 10) -> None:
        self.fig.text(0.1 / self.fw, 1 - (GRID_TOP_IN + r * self.row_in + 0.5 * GRID_CELL_IN) / self.fh, text, va="center",
                      fontsize=fontsize)

    def title(self, text: str) -> None:
        self.fig.text(0.5, 1 - 0.2 / self.fh, text, ha="center", va="center", fontsize=11, weight="bold")

    def save(self, path: Path) -> str:
        return save_figure(self.fig, path)
