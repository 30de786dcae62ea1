"""The report of a sweep: tables, plots and sample grids as ``index.md`` + ``index.html``.

Everything is read back from the run folder, never from memory, so a report can be
rebuilt at any time (``python -m experiments.report runs/demo``) and tests can build one from
fabricated files. Inputs (paths relative to the run folder):

- ``<report dir>/sweep.json``: the sweep record (grid, cells, seg runs, stage timings);
- each cell's ``manifest.parquet`` (the ``seconds`` column: cost per sample) and
  ``summary.json`` (generation totals, images/s);
- ``fid.json``, ``judge.json``, ``memorization.json`` and ``label_scores.json`` (any may be absent); each seg run's ``summary.json``;
  the ControlNet's ``loss.jsonl``;
- the real manifest and the synthetic shards, for the sample grids;
- the repo's ``docs/results/headline.json`` (the pre-registered headline, :func:`render_headline`),
  or, while it is absent, the command that makes it.

A sweep's own scheme table is not the result: with one seed per scheme it ranks nothing; the
report says so (:func:`seeds_note`) and points to the headline. All cells of an invocation share
one actor pool, whose stats every cell's ``summary.json`` repeats: :func:`generation_pools`
counts each pool once.

Figures have fixed pixel sizes (no tight bounding box), see :data:`PLOT_PX` and
:func:`engine.plots.grid_px`. Sample grid tiles are :data:`engine.plots.TILE_PX` pixels: a 32 px sample is drawn
4x with nearest-neighbour, its scribble over it, so a person can see whether the
generated shapes sit where the strokes are.
"""

from __future__ import annotations

import argparse
import html
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from engine import storage
from engine.atomic import write_text
from engine.data.geometry import DEFAULT_RESIZE
from engine.errors import BadInputError
from engine.plots import TILE_PX, TileGrid, fmt_g, plot_bars, plot_intervals, plot_lines, plot_loss
from engine.manifest import iter_samples, read_manifest
from engine.render import OVERLAY_ALPHA, overlay_scribble, render_scribble
from engine.shards import Sample
from experiments.intervals import t_interval
from seg.schemes import SCHEMES



# -- formatting --------------------------------------------------------------------------------
def fmt_num(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def fmt_miou(x: float | None) -> str:
    """mIoU as a percentage with 2 decimals (the paper's unit)."""
    return "–" if x is None else f"{100 * x:.2f}"


def fmt_pm(values: Sequence[float]) -> str:
    """``mean ± std`` (sample std) in mIoU percent; just the value for one seed."""
    if not values:
        return "–"
    if len(values) == 1:
        return fmt_miou(values[0])
    return f"{fmt_miou(statistics.mean(values))} ± {100 * statistics.stdev(values):.2f}"


# -- page model (rendered both to Markdown and HTML) ----------------------------------------------
@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Page:
    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, table: Table) -> None:
        self.blocks.append(("table", table))

    def img(self, file: str, alt: str) -> None:
        self.blocks.append(("img", (file, alt)))

    def markdown(self) -> str:
        return "\n".join([f"# {self.title}", "", blocks_markdown(self.blocks)])

    def html(self) -> str:
        e = html.escape
        style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
                 "table{border-collapse:collapse;margin:1em 0}caption{text-align:left;color:#555;padding:.3em 0}"
                 "th,td{border:1px solid #ccc;padding:.3em .7em;text-align:right}th{background:#f3f3f3}"
                 "td:first-child,th:first-child{text-align:left}img{max-width:100%}figure{margin:1em 0}"
                 "figcaption{color:#555;font-size:.9em}code{background:#f3f3f3;padding:0 .2em}")
        return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{e(self.title)}</title>"
                f"<style>{style}</style></head><body>\n<h1>{e(self.title)}</h1>\n" + blocks_html(self.blocks)
                + "\n</body></html>\n")


def blocks_markdown(blocks: Sequence[tuple[str, Any]]) -> str:
    """Page blocks (``h2``, ``p``, ``img``, ``table``) as Markdown, each followed by a blank line."""
    out: list[str] = []
    for kind, item in blocks:
        if kind == "h2":
            out += [f"## {item}", ""]
        elif kind == "p":
            out += [item, ""]
        elif kind == "img":
            out += [f"![{item[1]}]({item[0]})", ""]
        else:
            if item.caption:
                out += [item.caption, ""]
            out.append("| " + " | ".join(item.header) + " |")
            out.append("|" + "|".join(" --- " for _ in item.header) + "|")
            out += ["| " + " | ".join(row) + " |" for row in item.rows]
            out.append("")
    return "\n".join(out)


def blocks_html(blocks: Sequence[tuple[str, Any]]) -> str:
    """Page blocks as HTML elements, one a line."""
    e = html.escape
    body = []
    for kind, item in blocks:
        if kind == "h2":
            body.append(f"<h2>{e(item)}</h2>")
        elif kind == "p":
            body.append(f"<p>{_inline_code(e(item))}</p>")
        elif kind == "img":
            body.append(f'<figure><img src="{e(item[0])}" alt="{e(item[1])}"><figcaption>{e(item[1])}</figcaption></figure>')
        else:
            cap = f"<caption>{_inline_code(e(item.caption))}</caption>" if item.caption else ""
            head = "".join(f"<th>{e(h)}</th>" for h in item.header)
            rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in item.rows)
            body.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    return "\n".join(body)


def _inline_code(text: str) -> str:
    """`code` spans of the Markdown paragraphs as <code> in HTML."""
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


# -- reading the run folder -----------------------------------------------------------------------
@dataclass
class CellData:
    name: str
    w: float
    lam: float
    manifest: Path
    seconds: list[float]  # per sample (the manifest's `seconds` column)
    steps: int
    summary: dict[str, Any]
    fid: float | None = None
    judge: dict[str, Any] | None = None  # the cell's entry of judge.json
    memorization: dict[str, Any] | None = None  # the cell's entry of memorization.json
    label_scores: dict[str, Any] | None = None  # the cell's entry of label_scores.json


@dataclass
class SegData:
    name: str
    scheme: str
    w: float | None
    lambdas: list[float]
    seed: int
    studies: list[str]
    summary: dict[str, Any] | None

    @property
    def miou(self) -> float | None:
        return None if self.summary is None else float(self.summary["miou"])


@dataclass
class RunData:
    root: Path
    out_dir: Path  # the report folder
    record: dict[str, Any]
    cells: list[CellData]
    seg: list[SegData]
    fid: dict[str, Any]
    judge: dict[str, Any]
    memorization: dict[str, Any]
    label_scores: dict[str, Any]

    @property
    def ws(self) -> list[float]:
        return sorted({c.w for c in self.cells})

    @property
    def lambdas(self) -> list[float]:
        return sorted({c.lam for c in self.cells})

    @property
    def resize(self) -> str:
        """How the generator fitted its sources (the sweep config's ``sampler.resize``)."""
        return self.record.get("config", {}).get("generate", {}).get("sampler", {}).get("resize", DEFAULT_RESIZE)

    def cell(self, w: float, lam: float) -> CellData | None:
        return next((c for c in self.cells if abs(c.w - w) < 5e-3 and abs(c.lam - lam) < 5e-3), None)

    def located(self, recorded: str) -> storage.Location:
        """A location the sweep recorded: relative to the run folder, or a URL as it is."""
        return recorded if not storage.is_local(recorded) else self.root / recorded

    def controlnet_loss(self) -> list[dict[str, Any]]:
        """The ControlNet's loss log (``loss.jsonl`` beside its model folder); empty when absent."""
        path = storage.join(storage.parent(self.located(self.record.get("model_dir", "controlnet/final"))), "loss.jsonl")
        if not storage.is_file(path):
            return []
        return [json.loads(ln) for ln in storage.read_text(path).splitlines() if ln.strip()]


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def load_run(root: str | Path, report_dir: str = "report") -> RunData:
    """Everything the report shows, read from the run folder ``root``."""
    root = Path(root)
    record = _read_json(root / report_dir / "sweep.json")
    if record is None:
        raise BadInputError(str(root / report_dir / "sweep.json"), "sweep record not found", "run the sweep (python -m jobs.sweep) first")
    fid = _read_json(root / "fid.json") or {"cells": {}}
    judge = _read_json(root / "judge.json") or {"cells": {}}
    memo = _read_json(root / "memorization.json") or {"cells": {}}
    scores = _read_json(root / "label_scores.json") or {"cells": {}}
    cells = []
    for c in record.get("cells", []):
        manifest = root / c["manifest"]
        if not manifest.is_file():
            continue
        table, _ = read_manifest(manifest)
        ok = [s == "ok" for s in table.column("status").to_pylist()]
        seconds = [s for s, good in zip(table.column("seconds").to_pylist(), ok) if good]
        steps = max(table.column("steps").to_pylist() or [0])
        summary = _read_json(manifest.parent / "summary.json") or {}
        cells.append(CellData(c["name"], float(c["w"]), float(c["lambda"]), manifest, seconds, int(steps or 0), summary,
                              fid["cells"].get(c["name"], {}).get("fid"), judge["cells"].get(c["name"]),
                              memo["cells"].get(c["name"]), scores["cells"].get(c["name"])))
    seg = [SegData(r["name"], r["scheme"], r["w"], list(r["lambdas"]), int(r["seed"]), list(r["studies"]),
                   _read_json(root / r["dir"] / "summary.json")) for r in record.get("seg_runs", [])]
    return RunData(root, root / report_dir, record, cells, seg, fid, judge, memo, scores)


def read_sample(manifest: storage.Location, key: str) -> Sample:
    """One sample by key (``engine.manifest.iter_samples`` reads only its shard)."""
    for _, sample in iter_samples(manifest, lambda row: row["key"] == key, with_mask=False):
        return sample
    raise BadInputError(str(manifest), f"has no sample {key!r}")


def sample_grid(run: RunData, source_id: str, path: Path, seed_index: int = 0) -> str:
    """Rows λ, columns w; the source image and its rendered scribble in the first two columns.

    Every image tile shows its sample's scribble over it (:func:`engine.render.overlay_scribble`),
    all tiles upscaled to :data:`engine.plots.TILE_PX` (:class:`engine.plots.TileGrid`).
    """
    from engine.data.geometry import fit_to

    ws, lams = run.ws, run.lambdas
    grid = TileGrid(len(lams), 2 + len(ws))
    size = None
    for r, lam in enumerate(lams):
        for c, w in enumerate(ws):
            cell = run.cell(w, lam)
            key = _pick_key(cell.manifest, source_id, seed_index) if cell else None
            if key is None:
                ax = grid.tile(r, 2 + c)
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, color="0.5")
                continue
            sample = read_sample(cell.manifest, key)
            size = sample.image.shape[0]
            grid.show(r, 2 + c, overlay_scribble(sample.image, sample.scribble), f"w = {fmt_g(w)}" if r == 0 else "")
        grid.row_label(r, f"λ = {fmt_g(lam)}")
    src = read_sample(run.located(run.record["real_manifest"]), source_id)
    image, scribble = (src.image, src.scribble) if size is None else fit_to(src.image, src.scribble, size, run.resize)
    grid.show(0, 0, overlay_scribble(image, scribble), "source")
    grid.show(0, 1, render_scribble(scribble), "scribble")
    grid.title(source_id)
    return grid.save(path)


def _pick_key(manifest: Path, source_id: str, seed_index: int) -> str | None:
    """The ``seed_index``-th sample of ``source_id`` in manifest order (the plan's seed order)."""
    table, _ = read_manifest(manifest)
    keys = [k for k, s, st in zip(table.column("key").to_pylist(), table.column("source_id").to_pylist(),
                                   table.column("status").to_pylist()) if s == source_id and st == "ok"]
    return keys[min(seed_index, len(keys) - 1)] if keys else None


def grid_sources(run: RunData, count: int) -> list[str]:
    """The first ``count`` source ids (sorted) that have a sample in every cell."""
    if not run.cells or count == 0:
        return []
    common: set[str] | None = None
    for cell in run.cells:
        table, _ = read_manifest(cell.manifest)
        ids = {s for s, st in zip(table.column("source_id").to_pylist(), table.column("status").to_pylist()) if st == "ok"}
        common = ids if common is None else common & ids
    return sorted(common or ())[:count]


# -- sections ----------------------------------------------------------------------------------------
def _mean_std(values: Iterable[float]) -> tuple[float, float]:
    v = list(values)
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def _seeds_by(runs: Iterable[SegData], key) -> dict[Any, list[float]]:
    out: dict[Any, list[float]] = defaultdict(list)
    for r in runs:
        if r.miou is not None:
            out[key(r)].append(r.miou)
    return dict(out)


def section_overview(page: Page, run: RunData) -> None:
    rec = run.record
    page.p(f"Run folder `{run.root}`; started {rec.get('started', '?')}, finished {rec.get('finished', 'not yet')}; "
           f"wall time {fmt_num(rec.get('wall_seconds'), 1)} s on {rec.get('machine', {}).get('cpus', '?')} CPU core(s). "
           f"Grid: w ∈ {{{', '.join(map(fmt_g, run.ws))}}} × λ ∈ {{{', '.join(map(fmt_g, run.lambdas))}}}; "
           f"{len(run.seg)} segmentation run(s).")
    stages = rec.get("stages", {})
    if stages:
        rows = []
        for name, info in stages.items():
            notes = ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("seconds", "cpu_seconds", "images"))
            rows.append([name, fmt_num(info.get("seconds"), 1), fmt_num(info.get("cpu_seconds"), 1),
                         str(info.get("images", "–")), notes])
        page.table(Table(["stage", "wall s", "driver CPU s", "images", "notes"], rows,
                         "Stages of the last invocation (reused = finished earlier and skipped). Driver CPU s is the "
                         "main process only (Ray actors excluded)."))


@dataclass
class Pool:
    """One actor pool of the generate stage: the cells it served, its wall time, the images it made."""

    cells: list[str]
    seconds: float  # the pool's wall time (from when every replica had loaded its model)
    images: int  # images it generated (resumed shards of earlier pools not counted)
    actors: int | None = None
    device: str | None = None

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None


def generation_pools(cells: Sequence[CellData]) -> list[Pool]:
    """The actor pools that generated ``cells``, each once.

    ``run_generate_sets`` serves every cell of an invocation with ONE pool and writes the
    pool's stats into each cell's ``summary.json`` (``generate_seconds``, ``actors``,
    ``sets_in_pool``, ``pool_samples_this_run``): summing them over cells counts the pool's
    wall time once per cell. Cells whose pool stats are equal were served by one pool (a
    ``pool`` id, where a summary has one, decides instead). A summary without pool stats
    (generated alone, or before pools were shared) is its own pool.
    """
    pools: dict[Any, Pool] = {}
    for c in sorted(cells, key=lambda c: (c.w, c.lam)):
        s = c.summary
        if "pool" in s:
            key: Any = ("pool", json.dumps(s["pool"], sort_keys=True))
        elif "sets_in_pool" in s:
            key = tuple(json.dumps(s.get(k), sort_keys=True) for k in
                        ("generate_seconds", "pool_samples_this_run", "sets_in_pool", "actors", "device",
                         "actor_deaths", "unit_failures"))
        else:
            key = ("cell", c.name)
        if key not in pools:
            images = s.get("pool_samples_this_run", s.get("samples_this_run", s.get("samples", len(c.seconds))))
            pools[key] = Pool([], float(s.get("generate_seconds") or 0.0), int(images), s.get("actors"), s.get("device"))
        pools[key].cells.append(c.name)
    return list(pools.values())


def section_compute(page: Page, run: RunData) -> None:
    page.h("Compute")
    totals = []
    lines = run.controlnet_loss()
    if lines:
        totals.append(["ControlNet training", fmt_num(lines[-1]["seconds"], 1), str(sum(x["samples"] for x in lines)),
                       f"{lines[-1]['step']} steps"])
    pools = generation_pools(run.cells)
    timed = [p for p in pools if p.seconds > 0]
    if run.cells:
        gen_s, made = sum(p.seconds for p in timed), sum(p.images for p in timed)
        totals.append(["generation (all cells)", fmt_num(gen_s, 1), str(sum(len(c.seconds) for c in run.cells)),
                       f"{len(timed)} actor pool(s) for {len(run.cells)} cell(s): {made} images generated at "
                       f"{fmt_num(made / gen_s if gen_s else None, 3)} images/s (pool wall time)"])
    for name, scores in (("FID", run.fid), ("judge", run.judge), ("memorization", run.memorization),
                         ("label scores", run.label_scores)):
        seconds = sum(c.get("seconds", 0.0) for c in scores["cells"].values())
        if seconds:
            totals.append([name, fmt_num(seconds, 1), str(sum(c.get("samples", 0) for c in scores["cells"].values())), ""])
    seg_done = [r for r in run.seg if r.summary]
    if seg_done:
        totals.append(["segmentation training", fmt_num(sum(r.summary["seconds"] for r in seg_done), 1), "–",
                       f"{len(seg_done)} run(s), {sum(r.summary['steps'] for r in seg_done)} steps"])
    if totals:
        page.table(Table(["work", "seconds", "images", "notes"], totals,
                         "Compute per kind of work (all invocations). Generation: every cell of an invocation is "
                         "generated on one shared actor pool, so its seconds are the pools' wall times, each counted "
                         "once, and images/s is the images those pools generated over that time."))
    if not run.cells:
        return
    label = {name: f"pool {i + 1}" for i, p in enumerate(pools) for name in p.cells}
    page.table(Table(["pool", "cells", "actors", "device", "wall s", "images generated", "images / s"],
                     [[f"pool {i + 1}", ", ".join(p.cells), "–" if p.actors is None else str(p.actors), p.device or "–",
                       fmt_num(p.seconds, 1), str(p.images), fmt_num(p.images_per_s, 3)] for i, p in enumerate(pools)],
                     "Generation per actor pool (each cell's summary.json repeats its pool's wall time and rate; "
                     "they are counted here once per pool)."))
    rows = []
    for c in sorted(run.cells, key=lambda c: (c.w, c.lam)):
        rows.append([c.name, fmt_g(c.w), fmt_g(c.lam), str(len(c.seconds)), str(c.steps),
                     fmt_num(statistics.mean(c.seconds) if c.seconds else None, 4), fmt_num(sum(c.seconds), 1),
                     label[c.name]])
    page.table(Table(["cell", "w", "λ", "images", "steps", "s / image", "sampler s", "pool"], rows,
                     "Generation per (w, λ) cell: steps are the denoiser steps of each image (the update rule is "
                     "the config's `sampler.scheduler`); s / image is the mean of the manifest's per-sample `seconds` "
                     "(sampler time on one actor) and sampler s their sum, the cell's share of its pool's actor "
                     "time; the pool's wall time and images / s are in the pool table."))
    by_lam = cost_by_lambda(run.cells)
    top = by_lam[max(by_lam)][0]
    page.table(Table(["λ", "s / synthetic image", "relative to λ = " + fmt_g(max(by_lam)), "images"],
                     [[fmt_g(lam), fmt_num(v, 4), fmt_num(v / top if top else None, 2), str(n)]
                      for lam, (v, n) in sorted(((k, (v[0], v[1])) for k, v in by_lam.items()))],
                     "Cost per synthetic image by λ (all w): with `truncate` spacing a sample at λ runs ⌈λ·N⌉ of N "
                     "steps, so cost grows with λ; with `paper` spacing it does not."))
    series = defaultdict(list)
    for c in run.cells:
        if c.seconds:
            series[f"w = {fmt_g(c.w)}"].append((c.lam, statistics.mean(c.seconds), 0.0))
    page.img(plot_lines(dict(series), "Cost per synthetic image", "encode ratio λ", "seconds / image",
                        run.out_dir / "cost_by_lambda.png", legend_title="guidance"), "cost per synthetic image by λ")


def cost_by_lambda(cells: Sequence[CellData]) -> dict[float, tuple[float, int]]:
    """λ -> (mean seconds per sample, sample count), pooled over all w."""
    pooled: dict[float, list[float]] = defaultdict(list)
    for c in cells:
        pooled[c.lam] += c.seconds
    return {lam: (statistics.mean(v) if v else 0.0, len(v)) for lam, v in pooled.items()}


def section_fid(page: Page, run: RunData) -> None:
    cells = [c for c in run.cells if c.fid is not None]
    if not cells:
        return
    setup = run.fid.get("setup", {})
    page.h("FID by (w, λ)")
    n = sorted({v.get("samples") for v in run.fid["cells"].values()})
    ref = sorted({v.get("reference_samples") for v in run.fid["cells"].values()})
    page.p(f"Fréchet distance of each cell's synthetic images to {ref[0] if len(ref) == 1 else ref} real "
           f"`{setup.get('split', 'train')}` images ({n[0] if len(n) == 1 else n} synthetic images per cell), "
           f"features: `{setup.get('feature', '?')}`"
           + (" (a fixed seeded random conv net: numbers rank cells, they are not Inception FIDs)"
              if setup.get("feature") == "random" else "") + ". Lower is closer to real.")
    rows = [[f"λ = {fmt_g(lam)}"] + [fmt_num(c.fid if (c := run.cell(w, lam)) else None, 3) for w in run.ws]
            for lam in run.lambdas]
    page.table(Table(["FID"] + [f"w = {fmt_g(w)}" for w in run.ws], rows))
    d = run.out_dir
    if len(run.ws) > 1:
        page.img(plot_vs_w(run, cells, lambda c: c.fid, "FID", "FID", d / "fid_vs_w.png"), "FID vs w")
    if len(run.lambdas) > 1:
        series = {f"w = {fmt_g(w)}": [(c.lam, c.fid, 0.0) for c in cells if c.w == w] for w in run.ws}
        page.img(plot_lines(series, "FID vs encode ratio λ", "encode ratio λ", "FID", d / "fid_vs_lambda.png",
                            legend_title="guidance"), "FID vs λ")


def plot_vs_w(run: RunData, cells: Sequence[CellData], value, name: str, ylabel: str, path: Path) -> str:
    """``value(cell)`` against the guidance scale w, one line per λ."""
    series = {f"λ = {fmt_g(lam)}": [(c.w, value(c), 0.0) for c in cells if c.lam == lam] for lam in run.lambdas}
    return plot_lines({k: v for k, v in series.items() if v}, f"{name} vs guidance scale w", "guidance scale w (log scale)",
                      ylabel, path, legend_title="encode ratio", log_x=True)


def section_memorization(page: Page, run: RunData) -> None:
    cells = sorted((c for c in run.cells if c.memorization), key=lambda c: (c.w, c.lam))
    if not cells:
        return
    page.h("Memorization")
    chance = cells[0].memorization["chance"]
    page.p("Are the images new scenes or copies of their sources (`engine.memorization`)? For each synthetic image: "
           "its mean L1 pixel distance (0–255) to its own source and to the other real train images, and whether "
           f"the nearest real train image is its own source (chance {fmt_num(100 * chance, 1)} %). Near 100 % at "
           "λ = 1, where generation starts from pure noise, means the ControlNet redraws its scenes: FID and the "
           "judge score such copies well, but they add no new scenes.")
    rows = [[c.name, fmt_g(c.w), fmt_g(c.lam), fmt_num(m["l1_own"], 1), fmt_num(m["l1_other"], 1),
             fmt_num(100 * m["nearest_is_own"], 1), str(m["samples"])] for c in cells for m in [c.memorization]]
    page.table(Table(["cell", "w", "λ", "L1 to own source", "L1 to the others", "nearest = own (%)", "images"], rows))


def section_label_scores(page: Page, run: RunData) -> None:
    cells = sorted((c for c in run.cells if c.label_scores), key=lambda c: (c.w, c.lam))
    if not cells:
        return
    page.h("Label scores")
    page.p("How well each generated image agrees with its own scribble (`seg.label_scores`): the mIoU, on the "
           "scribbled pixels, of a segmenter trained on the real scribbles only. `data.min_label_score` drops the "
           "samples below a threshold; the quartiles say what a threshold keeps.")
    rows = [[c.name, fmt_g(c.w), fmt_g(c.lam), fmt_num(m["mean"], 3), fmt_num(m["q25"], 3), fmt_num(m["median"], 3),
             fmt_num(m["q75"], 3), str(m["samples"])] for c in cells for m in [c.label_scores] if m.get("samples")]
    page.table(Table(["cell", "w", "λ", "mean", "25 %", "median", "75 %", "images"], rows))


def section_judge(page: Page, run: RunData) -> None:
    cells = sorted((c for c in run.cells if c.judge), key=lambda c: (c.w, c.lam))
    if not cells:
        return
    setup, real = run.judge.get("setup", {}), run.judge.get("real")
    page.h("Judge: do the images follow their scribbles?")
    page.p(f"A segmenter (`seg.judge`: seg's tiny DeepLabV3+, {setup.get('steps', '?')} steps) trained on real "
           f"`{setup.get('split', 'val')}` images with their full masks segments every synthetic image. Its mIoU against "
           "the mask of the image's own source is compared with its mIoU against another source's mask (the chance "
           "level); the margin (own − mismatched, mIoU points) is high when the generated objects sit where the "
           "scribble put them, with its classes. fg IoU is the class-blind version (object vs background)."
           + (f" Ceiling: on {real['samples']} held-out real images the judge scores {fmt_miou(real['judge_miou'])} % "
              f"(mismatched {fmt_miou(real['judge_miou_mismatched'])} %)." if real else ""))
    rows = [[c.name, fmt_g(c.w), fmt_g(c.lam), fmt_num(c.fid, 3), fmt_miou(j["judge_miou"]),
             fmt_miou(j["judge_miou_mismatched"]), fmt_miou(j["judge_margin"]), fmt_miou(j["fg_iou"]),
             fmt_miou(j["fg_iou_mismatched"]), str(j["samples"])] for c in cells for j in [c.judge]]
    page.table(Table(["cell", "w", "λ", "FID", "judge mIoU (%)", "mismatched (%)", "margin (pts)", "fg IoU (%)",
                      "fg IoU mismatched (%)", "samples"], rows, "Per (w, λ) cell: FID (lower = closer to real) beside "
                     "the judge's agreement (higher margin = follows the scribble better)."))
    if len(run.ws) > 1:
        page.img(plot_vs_w(run, cells, lambda c: 100 * c.judge["judge_margin"], "Judge margin",
                           "own − mismatched mIoU (points)", run.out_dir / "judge_margin_vs_w.png"), "judge margin vs w")


def _baseline(run: RunData) -> tuple[float, float] | None:
    real = [r.miou for r in run.seg if r.scheme == "real" and r.miou is not None]
    return (_mean_std(100 * x for x in real)) if real else None


def section_sweep(page: Page, run: RunData, study: str, axis: str) -> None:
    """mIoU by w (``w_sweep``) or by λ (``lambda_sweep``): scheme fixed, one point per cell."""
    runs = [r for r in run.seg if study in r.studies and r.scheme == "fixed"]
    if not runs:
        return
    key = (lambda r: r.w) if axis == "w" else (lambda r: r.lambdas[0])
    other = (lambda r: r.lambdas[0]) if axis == "w" else (lambda r: r.w)
    sym, other_sym = ("w", "λ") if axis == "w" else ("λ", "w")
    by = _seeds_by(runs, key)
    fixed_other = sorted({other(r) for r in runs})
    page.h(f"Downstream mIoU vs {sym}")
    base = _baseline(run)
    page.p(f"Segmentation trained on real + synthetic images of one cell (scheme `fixed`, {other_sym} = "
           f"{', '.join(map(fmt_g, fixed_other))}), evaluated on the real val masks; mean ± std over seeds."
           + (f" Real-only baseline: {fmt_num(base[0])} %." if base else ""))
    fid = {key(r): (c.fid if (c := run.cell(r.w, r.lambdas[0])) else None) for r in runs}
    rows = [[fmt_g(x), fmt_pm(v), str(len(v)), fmt_num(fid.get(x), 3)] for x, v in sorted(by.items())]
    page.table(Table([sym, "mIoU (%)", "seeds", "FID"], rows))
    if by:
        label = f"fixed, {other_sym} = {', '.join(map(fmt_g, fixed_other))}"
        series = {label: [(x, *_mean_std(100 * m for m in v)) for x, v in by.items()]}
        name = "miou_vs_w.png" if axis == "w" else "miou_vs_lambda.png"
        page.img(plot_lines(series, f"Downstream mIoU vs {sym}", "guidance scale w (log scale)" if axis == "w" else "encode ratio λ",
                            "mIoU (%)", run.out_dir / name, baseline=base, log_x=axis == "w"), f"mIoU vs {sym}")


def section_schemes(page: Page, run: RunData) -> None:
    runs = [r for r in run.seg if "schemes" in r.studies]
    if not runs:
        return
    page.h("Schemes: real only vs fixed vs uniform vs adaptive")
    order = [s for s in SCHEMES if any(r.scheme == s for r in runs)]  # the paper's other schemes after the λ-aware ones
    by = _seeds_by(runs, lambda r: r.scheme)
    desc = {}
    for r in runs:
        desc[r.scheme] = "real only" if r.scheme == "real" else f"w = {fmt_g(r.w)}, λ ∈ {{{', '.join(map(fmt_g, r.lambdas))}}}"
    page.p(seeds_note(run, runs, by, order))
    base = statistics.mean(by["real"]) if by.get("real") else None
    rows = []
    for s in order:
        v = by.get(s, [])
        delta = fmt_num(100 * (statistics.mean(v) - base)) if v and base is not None and s != "real" else "–"
        rows.append([s, desc[s], fmt_pm(v), delta, ", ".join(fmt_miou(x) for x in v) or "–", str(len(v))])
    page.table(Table(["scheme", "synthetic data", "mIoU (%)", "Δ vs real", "per seed", "seeds"], rows,
                     "Same step budget for every scheme; mean ± sample std over seeds. A Δ within the seeds' spread "
                     "ranks nothing."))
    page.img(plot_bars(order, [[100 * x for x in by.get(s, [])] for s in order], "mIoU by scheme", "mIoU (%)",
                       run.out_dir / "schemes.png"), "mIoU by scheme (error bars: std over seeds)")


# How far seg seeds alone move the embedded default's mIoU (points): the headline's seed spread,
# docs/embedded-default.md. Quoted where a run has too few seeds to measure its own.
SEED_SPREAD_PTS = (0.5, 1.2)


def seeds_note(run: RunData, runs: Sequence[SegData], by: dict[str, list[float]], order: Sequence[str]) -> str:
    """How many seeds the scheme table rests on and what that allows, from the run's numbers.

    With fewer than 2 seeds for any scheme: that single-seed values rank nothing (the seed
    spread, :data:`SEED_SPREAD_PTS`, against the spread of the scheme means here), and what
    such a budget does show -- the judge margin of the cells the schemes drew from.
    """
    counts = {s: len(by.get(s, [])) for s in order}
    if len(set(counts.values())) == 1:
        text = f"Seeds: {next(iter(counts.values()))} per scheme."
    else:
        text = "Seeds per scheme: " + ", ".join(f"{s} {n}" for s, n in counts.items()) + "."
    stds = [100 * statistics.stdev(v) for v in by.values() if len(v) > 1]
    if stds:
        text += (f" Seg seeds alone move a scheme's mIoU by {fmt_num(min(stds))}–{fmt_num(max(stds))} points "
                 "(sample std) here.")
    if min(counts.values()) >= 2:
        return text
    means = {s: 100 * statistics.mean(v) for s, v in by.items() if v}
    lo, hi = SEED_SPREAD_PTS
    text += (f" Single-seed values rank nothing: seg seeds alone move mIoU by about {lo:g}–{hi:g} points on this setup "
             "(the headline's seed spread, docs/embedded-default.md)")
    if len(means) > 1:
        top, bottom = max(means, key=means.get), min(means, key=means.get)
        text += (f", and the scheme means here span {fmt_num(means[top] - means[bottom])} points "
                 f"({bottom} {fmt_num(means[bottom])} to {top} {fmt_num(means[top])})")
    text += "."
    parts = []
    for w in sorted({r.w for r in runs if r.w is not None}):
        cells = sorted((c for c in run.cells if c.judge and abs(c.w - w) < 5e-3), key=lambda c: c.lam)
        if cells:
            parts.append(f"at w = {fmt_g(w)} by " + _and([f"{fmt_miou(c.judge['judge_margin'])} (λ = {fmt_g(c.lam)})"
                                                          for c in cells]))
    if parts:
        text += (" What this budget can show is whether the images follow their scribbles: the judge's mIoU against "
                 "each image's own source mask exceeds its mIoU against a mismatched mask " + "; ".join(parts)
                 + " points (own − mismatched; the judge section).")
    return text + " The comparison of schemes is the pre-registered headline (section The headline)."


def _and(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# -- the headline: the pre-registered result (docs/results/headline.json) ------------------------
REPO = Path(__file__).resolve().parents[1]
HEADLINE_JSON = REPO / "docs" / "results" / "headline.json"
HEADLINE_CONFIG = "configs/sweeps/headline.yaml"
CONTROL_ARM = "mismatched"  # the control arm of the headline's contrasts (synthetic images, wrong scribbles)


def _command(data: dict[str, Any]) -> str:
    """The command that makes (or resumes) the headline: its config file where the record names one."""
    config = str(data.get("config") or "")
    return f"python -m jobs.sweep --config {config if config.endswith(('.yaml', '.yml')) else HEADLINE_CONFIG}"


def _draw_values(per_draw: Sequence[Any] | None, i: int) -> list[float | None] | None:
    """Draw ``i``'s per-seed values of an arm (None: the draw was not run)."""
    if per_draw is None or i >= len(per_draw) or per_draw[i] is None:
        return None
    return list(per_draw[i])


def _complete(values: list[float | None] | None) -> bool:
    return bool(values) and all(v is not None for v in values)  # type: ignore[union-attr]


def _draw_cell(values: list[float | None] | None, seeds: int) -> str:
    """Mean over a draw's seeds; ``(k/n seeds)`` when only some ran; "–" when none did."""
    done = [v for v in values or [] if v is not None]
    if not done:
        return "–"
    n = max(seeds, len(values or []))
    return fmt_num(statistics.mean(done)) + ("" if len(done) == n else f" ({len(done)}/{n} seeds)")


def _signed(x: float | None) -> str:
    return "–" if x is None else f"{x:+.2f}"


def _interval(ci: Sequence[float] | None) -> str:
    return "–" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _n(stats: dict[str, Any] | None) -> int:
    return int((stats or {}).get("n_draws") or 0)


def _arm_order(data: dict[str, Any]) -> list[str]:
    """The baseline, then the λ-aware arms (the verdict's), then the rest as configured."""
    baseline, arms = data.get("baseline", "?"), data.get("arms", {})
    aware = list(data.get("target", {}).get("lambda_aware", []))
    order = [baseline] * (baseline in arms) + [a for a in aware if a in arms and a != baseline]
    return order + [a for a in arms if a not in order]


def render_headline(data: dict[str, Any]) -> list[tuple[str, Any]]:
    """Report blocks (for :class:`Page`, :func:`blocks_markdown`, :func:`blocks_html`) of a
    ``headline.json``: where it comes from, arms × draws with the paired difference to the
    baseline and its interval, the contrasts, and the verdict (:func:`headline_verdict`)."""
    draws, seeds = list(data.get("draws", [])), list(data.get("seg_seeds", []))
    baseline, arms, paired = data.get("baseline", "?"), data.get("arms", {}), data.get("paired", {})
    commit, frozen = str(data.get("commit", "?")), data.get("frozen_commit")
    blocks: list[tuple[str, Any]] = [("p", (
        f"Pre-registered protocol `{data.get('config') or HEADLINE_CONFIG}` at commit `{commit[:12]}{'+dirty' if commit.endswith('+dirty') else ''}`"
        + (f" (settings frozen at `{str(frozen)[:12]}`)" if frozen else "")
        + f", scored on the `{data.get('split', '?')}` split: {len(draws)} labelled draw(s) "
        f"({', '.join(map(str, draws))}), seg seeds {', '.join(map(str, seeds)) or '?'} in each; mIoU in %. "
        f"Command: `{_command(data)}`."))]
    order = _arm_order(data)
    rows = []
    for arm in order:
        per_draw = arms[arm].get("per_draw")
        values = [_draw_values(per_draw, i) for i in range(len(draws))]
        complete = [statistics.mean(v) for v in values if _complete(v)]  # type: ignore[arg-type]
        d = paired.get(arm) if arm != baseline else None
        rows.append([arm] + [_draw_cell(v, len(seeds)) for v in values]
                    + [fmt_num(statistics.mean(complete) if complete else None),
                       "–" if d is None else _signed(d.get("mean")), "–" if d is None else _interval(d.get("ci95")),
                       "–" if d is None else str(_n(d))])
    blocks.append(("table", Table(
        ["arm"] + [f"draw {x}" for x in draws] + ["mean (complete draws)", f"Δ vs {baseline}", "95 % interval", "n draws"],
        rows, f"mIoU (%) per labelled draw: the mean over that draw's seg seeds (– = not run). Δ: the paired "
              f"difference arm − {baseline} over the complete draws, with its {data.get('interval', '95 % interval')}.")))
    blocks += _seed_spread(data, order)
    contrasts = data.get("contrasts", {})
    if contrasts:
        blocks.append(("table", Table(
            ["contrast", "mean", "95 % interval", "n draws", "per draw"],
            [[name, _signed(c.get("mean")), _interval(c.get("ci95")), str(_n(c)),
              ", ".join(_signed(x) for x in c.get("per_draw") or []) or "–"] for name, c in contrasts.items()],
            "Paired differences (mIoU points) between arms over the complete draws.")))
    memo = {d: cells for d, cells in (data.get("memorization") or {}).items() if cells}
    if memo:
        blocks.append(("p", "Generator check (`engine.memorization`; near 100 % = the images copy their sources): "
                            "share of synthetic images whose nearest real train image is their own source, per draw, "
                            + "; ".join(f"draw {d}: " + ", ".join(f"λ = {fmt_g(c['lambda'])} {fmt_num(100 * c['nearest_is_own'], 1)} %"
                                                              for c in cells.values()) for d, cells in memo.items())
                            + "."))
    stale = list(data.get("stale") or [])
    if stale:
        blocks.append(("p", f"Not counted: {len(stale)} finished run(s) made under another identity than today's "
                            f"({', '.join(f'`{x}`' for x in stale)})."))
    recorded = list(data.get("from_record") or [])
    if recorded:
        blocks.append(("p", f"Counted from the run record (their folders are gone; config fingerprints checked, data "
                            f"not rechecked): {len(recorded)} run(s) of draw(s) "
                            f"{', '.join(sorted({x.split('/')[0].removeprefix('draw-') for x in recorded}, key=int))}."))
    blocks.append(("p", headline_verdict(data)))
    return blocks


def _seed_differences(arm: Sequence[Any] | None, base: Sequence[Any] | None, i: int) -> list[float] | None:
    """Draw ``i``'s arm − baseline per seg seed (the seeds are shared); None unless both are complete."""
    a, b = _draw_values(arm, i), _draw_values(base, i)
    if not (_complete(a) and _complete(b)) or len(a) != len(b):  # type: ignore[arg-type]
        return None
    return [x - y for x, y in zip(a, b)]  # type: ignore[operator]


def _seed_floor(diffs: list[list[float] | None], seeds: int, confidence: float) -> dict[str, float] | None:
    """Between-draw SD of an arm's paired difference against the least that seed noise alone
    gives it, and the interval recomputed with that least where the draws fall below it.

    A draw's difference is the mean of ``seeds`` per-seed differences, so its variance is the
    draws' own plus (seed variance) / seeds: the SD over draws cannot truly be below
    ``seed SD / √seeds`` (the seed SD pooled within draws). Few draws estimate the SD over
    draws poorly and may land under that floor by chance; the t interval then understates
    the uncertainty, and the floor's interval (same mean and degrees of freedom) does not."""
    complete = [d for d in diffs if d and len(d) == seeds]
    n = len(complete)
    if n < 2 or seeds < 2:
        return None
    floor = (statistics.mean(statistics.variance(d) for d in complete) / seeds) ** 0.5
    return {"n": n, "between": statistics.stdev(statistics.mean(d) for d in complete), "floor": floor,
            "interval": t_interval(statistics.mean(x for d in complete for x in d), floor, n, confidence)}


def _seed_spread(data: dict[str, Any], order: list[str]) -> list[tuple[str, Any]]:
    """Each arm's difference to the baseline per draw and seg seed, its SD over draws against
    the seed-noise floor (:func:`_seed_floor`), and the arms whose draws agree more closely than
    seeds alone allow, with the wider interval that the floor gives (a reader must see that,
    not just the t interval)."""
    draws, baseline, seeds = list(data.get("draws", [])), data.get("baseline", "?"), data.get("seg_seeds", [])
    arms = data.get("arms", {})
    base = (arms.get(baseline) or {}).get("per_draw")
    rows, narrow = [], []
    for arm in order:
        if arm == baseline:
            continue
        diffs = [_seed_differences(arms[arm].get("per_draw"), base, i) for i in range(len(draws))]
        if not any(diffs):
            continue
        check = _seed_floor(diffs, len(seeds), 0.95)
        rows.append([arm] + ["–" if d is None else " / ".join(_signed(x) for x in d) for d in diffs]
                    + ([f"{check['between']:.2f}", f"{check['floor']:.2f}"] if check else ["–", "–"]))
        if check and check["between"] < check["floor"]:
            narrow.append(f"{arm} ({_interval(check['interval'])}, {check['n']} draws)")
    if not rows:
        return []
    blocks: list[tuple[str, Any]] = [("table", Table(
        ["arm"] + [f"draw {x}" for x in draws] + ["SD over draws", "seed floor"], rows,
        f"arm − {baseline} per draw and seg seed (seed {' / seed '.join(map(str, seeds))}, the same seed in both arms). "
        f"SD over draws: of each draw's difference (the mean over its seeds). Seed floor: the least that SD can be "
        f"from seed noise alone, the seed SD (pooled within draws) / √{len(seeds)}."))]
    if narrow:
        blocks.append(("p", "Draws that agree more closely than seed noise allows (SD over draws below the seed floor, "
                            "by chance with few draws): their t interval understates the uncertainty. With the floor "
                            "in its place, 95 %: " + ", ".join(narrow) + "."))
    return blocks


def headline_verdict(data: dict[str, Any]) -> str:
    """The verdict, computed from the numbers: the best λ-aware arm by paired mean; whether the
    target (``target.points`` or more with the interval's lower bound above 0) is met, not met or
    cannot be judged yet (fewer than 2 complete draws); the control and adaptive vs fixed."""
    baseline, paired = data.get("baseline", "?"), data.get("paired", {})
    target = data.get("target", {})
    points, aware = float(target.get("points", 0.0)), list(target.get("lambda_aware", []))
    total = len(data.get("draws", []))
    goal = f"Target (≥ {points:g} points over {baseline}, the interval's lower bound above 0)"
    ran = {a: paired[a] for a in aware if _n(paired.get(a)) >= 1 and paired[a].get("mean") is not None}
    if not ran:
        text = (f"Verdict: none of the λ-aware arms ({', '.join(aware)}) has a complete draw beside {baseline} yet. "
                f"{goal}: cannot be judged yet.")
    else:
        best = max(ran, key=lambda a: ran[a]["mean"])
        d = ran[best]
        n, mean, ci = _n(d), float(d["mean"]), d.get("ci95")
        so_far = f"{n} of {total} draws" if total else f"{n} draw(s)"
        text = (f"Verdict: the best λ-aware arm by paired mean is {best}, {mean:+.2f} points over {baseline} ("
                + (f"95 % interval {_interval(ci)}, " if ci else "no interval yet, ") + f"{so_far}). ")
        if n < 2 or not ci:
            text += f"{goal}: cannot be judged yet: {n} complete draw(s), an interval needs at least 2."
        elif mean >= points and ci[0] > 0:
            text += f"{goal}: met" + (f" on {so_far} so far." if total and n < total else ".")
        else:
            why = ([f"the mean {mean:+.2f} is below {points:g}"] if mean < points else []) + \
                  ([f"the interval's lower bound {ci[0]:.2f} is not above 0"] if ci[0] <= 0 else [])
            text += f"{goal}: not met ({' and '.join(why)})" + (f" on {so_far} so far." if total and n < total else ".")
        adjusted = d.get("ci_adjusted")
        if adjusted and len(ran) > 1:  # the best of several arms: its interval widened for the choice (Bonferroni)
            text += (f" Chosen as the best of {len(aware)} arms, its interval widened for that choice (Bonferroni, "
                     f"{100 * float(d.get('adjusted_confidence', 0)):.1f} %) is {_interval(adjusted)}"
                     f"{' (above 0)' if adjusted[0] > 0 else ' (not above 0)'}.")
        if total and n < total:
            text = f"Interim ({n} of {total} draws complete; the verdict stands only when all are in). " + text
    contrasts = data.get("contrasts", {})
    for name in sorted(contrasts, key=lambda k: CONTROL_ARM not in k.split(" - ")):  # the control first
        text += " " + _contrast_sentence(name, contrasts[name])
    return text


def _contrast_sentence(name: str, c: dict[str, Any] | None) -> str:
    """``a - b``: a beat b / b beat a (interval clear of 0), not separated, or not judged yet."""
    a, _, b = (x.strip() for x in name.partition(" - "))
    control = CONTROL_ARM in (a, b)
    who = f"The control ({CONTROL_ARM})" if control else None
    n = _n(c)
    if not c or n == 0 or c.get("mean") is None:
        return f"{a} − {b}: not run yet."
    mean, ci = float(c["mean"]), c.get("ci95")
    nums = f"{a} − {b} = {mean:+.2f} points (" + (f"95 % interval {_interval(ci)}, " if ci else "") + f"{n} draw(s))"
    if n < 2 or not ci:
        return f"{nums}: cannot be judged yet."
    if ci[0] > 0 or ci[1] < 0:
        winner, loser = (a, b) if ci[0] > 0 else (b, a)
        if control:
            verb = "lost against" if loser == CONTROL_ARM else "beat"
            other = winner if loser == CONTROL_ARM else loser
            return f"{who} {verb} {other}: {nums}."
        return f"{winner} beat {loser}: {nums}."
    if control:
        other = a if b == CONTROL_ARM else b
        return f"{who} did not clearly lose against {other}: {nums}, the interval includes 0."
    return f"{a} did not clearly beat {b}: {nums}, the interval includes 0."


def headline_markdown(data: dict[str, Any]) -> str:
    """The headline as a standalone Markdown section (for the README and docs)."""
    return "## The headline\n\n" + blocks_markdown(render_headline(data))


def plot_headline(data: dict[str, Any], path: Path) -> str:
    """Each arm's paired difference to the baseline: per draw (dots), mean and interval, against
    0 and the target."""
    baseline, paired = data.get("baseline", "?"), data.get("paired", {})
    arms = [a for a in _arm_order(data) if a != baseline and _n(paired.get(a))]
    points = [list(paired[a].get("per_draw") or []) for a in arms]
    target = float(data.get("target", {}).get("points", 0.0))
    n = max((_n(paired[a]) for a in arms), default=0)
    return plot_intervals(arms, points, [paired[a].get("mean") for a in arms], [paired[a].get("ci95") for a in arms],
                          f"arm − {baseline}, {data.get('split', '?')} split, {n} draws",
                          "mIoU points", path, {"0": 0.0, f"target +{target:g}": target} if target else {"0": 0.0})


def write_headline_views(data: dict[str, Any], path: Path) -> Path:
    """``headline.md`` and its plot ``headline.png`` beside ``path`` (the ``headline.json``
    that holds ``data``), rendered from its numbers: they are views of the JSON, so rewriting
    them after a change of the rendering changes no number."""
    md = path.with_suffix(".md")
    write_text(md, headline_markdown(data) + "\n")
    plot_headline(data, path.with_suffix(".png"))
    return md


def section_headline(page: Page, path: Path | None = None) -> None:
    """Where the result is: the pre-registered headline (``docs/results/headline.json``), not this run."""
    path = HEADLINE_JSON if path is None else path
    page.h("The headline")
    if not path.is_file():
        page.p("The pre-registered headline (held-out test scenes, several labelled draws, paired intervals) has not "
               f"been run yet: no `{_repo_rel(path)}`. Command: `{_command({})}`. Until then no table in this report "
               "ranks the schemes.")
        return
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BadInputError(str(path), f"is not JSON ({exc})") from None
    page.p(f"The result this project reports is the pre-registered headline, `{_repo_rel(path)}`; this run's own tables "
           "below are a smaller budget.")
    page.blocks += render_headline(data)


def _repo_rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def section_seg_runs(page: Page, run: RunData) -> None:
    if not run.seg:
        return
    page.h("All segmentation runs")
    protocols = sorted({(r.summary or {}).get("eval_protocol", "full") for r in run.seg if r.summary})
    if protocols:
        splits = sorted({(r.summary or {}).get("eval_split", "val") for r in run.seg if r.summary})
        page.p(f"mIoU on the {' / '.join(splits)} split's full masks, evaluated with the "
               + " / ".join(f"`{p}`" for p in protocols) + " protocol (`full`: every pixel at the image's own size; "
               "`fixscalecrop-N`: the paper's centre N x N crop after resizing the short side to N).")
    rows = []
    for r in run.seg:
        s = r.summary or {}
        rows.append([r.name, r.scheme, "–" if r.w is None else fmt_g(r.w), ", ".join(map(fmt_g, r.lambdas)) or "–",
                     str(r.seed), fmt_miou(r.miou), fmt_miou(s.get("pixel_acc")), str(s.get("steps", "–")),
                     fmt_num(s.get("seconds"), 1), ", ".join(r.studies)])
    page.table(Table(["run", "scheme", "w", "λ", "seed", "mIoU (%)", "pixel acc (%)", "steps", "seconds", "studies"], rows))


def section_controlnet(page: Page, run: RunData) -> None:
    lines = run.controlnet_loss()
    if not lines:
        return
    page.h("ControlNet training")
    page.p(f"{lines[-1]['step']} steps in {fmt_num(lines[-1]['seconds'], 1)} s; final logged loss {lines[-1]['loss']:.4f}.")
    page.img(plot_loss(lines, "ControlNet training loss (denoising MSE)", run.out_dir / "controlnet_loss.png"), "ControlNet loss")


def section_samples(page: Page, run: RunData, count: int, seed_index: int) -> None:
    sources = grid_sources(run, count)
    if not sources:
        return
    page.h("Samples")
    page.p("Each grid: the real source image and its scribble (rendered by `engine.render.render_scribble`: white = "
           "background strokes, black = unlabelled), then one synthetic sample per (w, λ), all from the same seed index. "
           f"Every image is enlarged without smoothing (nearest neighbour, {TILE_PX} px tiles) and shows its scribble "
           f"over it at {OVERLAY_ALPHA:.0%} opacity in the scribble's colours; unlabelled pixels show the image. "
           "Small λ stays close to the source; large λ and large w move away from it.")
    for sid in sources:
        page.img(sample_grid(run, sid, run.out_dir / f"samples_{sid}.png", seed_index), f"samples of {sid}")


def build_report(root: str | Path, report_dir: str = "report", progress: bool = False) -> Path:
    """Write ``index.md``, ``index.html`` and the PNGs into ``root/report_dir``; return index.md."""
    from tqdm import tqdm

    run = load_run(root, report_dir)
    cfg = run.record.get("config", {}).get("report", {})
    page = Page(f"ScribbleGen: {run.record.get('title') or run.record.get('name', 'sweep')}")
    sections = [
        lambda: section_overview(page, run),
        lambda: section_headline(page),
        lambda: section_fid(page, run),
        lambda: section_judge(page, run),
        lambda: section_memorization(page, run),
        lambda: section_label_scores(page, run),
        lambda: section_sweep(page, run, "w_sweep", "w"),
        lambda: section_sweep(page, run, "lambda_sweep", "lambda"),
        lambda: section_schemes(page, run),
        lambda: section_samples(page, run, int(cfg.get("grid_sources", 3)), int(cfg.get("seed_index", 0))),
        lambda: section_compute(page, run),
        lambda: section_controlnet(page, run),
        lambda: section_seg_runs(page, run),
    ]
    for section in tqdm(sections, desc="report", unit="section", disable=not progress):
        section()
    out = run.out_dir
    for name, text in (("index.md", page.markdown()), ("index.html", page.html())):
        write_text(out / name, text)
    return out / "index.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="(Re)build the report of a sweep run folder from its files.")
    parser.add_argument("run", nargs="?", help="run folder, e.g. runs/demo")
    parser.add_argument("--report-dir", default="report", help="report folder inside the run (holds sweep.json)")
    parser.add_argument("--headline", type=Path, metavar="JSON",
                        help="instead, rewrite the headline.md beside this headline.json from its numbers "
                             "(e.g. docs/results/headline.json)")
    args = parser.parse_args(argv)
    if (args.run is None) == (args.headline is None):
        parser.error("give a run folder or --headline JSON (one of the two)")
    try:
        if args.headline is not None:
            if not args.headline.is_file():
                raise BadInputError(str(args.headline), "is not a file", "name a headline.json (docs/results/headline.json)")
            print(write_headline_views(json.loads(args.headline.read_text()), args.headline))
            return 0
        print(build_report(args.run, args.report_dir))
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
