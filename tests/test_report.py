"""The sweep report, built from a fabricated run folder: files, numbers in tables, PNG sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.config import from_dict
from engine.manifest import DatasetInfo, sample_row, shard_rows, write_manifest
from experiments import report as report_module
from engine.plots import DPI, GRID_LEFT_IN, GRID_TOP_IN, GRID_CELL_IN, GRID_MARGIN_IN, PLOT_PX, TILE_PX, grid_px, upscale
from engine.render import OVERLAY_ALPHA, PALETTE, overlay_scribble
from experiments.report import CellData, build_report, generation_pools
from engine.shards import Sample, ShardWriter, synthetic_key
from experiments.sweep import RECORD, SweepConfig, cell_entries, cell_name, new_record, plan_seg_runs

CLASSES = ["background", "disc", "square"]
SOURCES = [f"src-{i}" for i in range(3)]
W, LAMS = [1.5, 3.0], [0.5, 1.0]
# mIoU by scheme over seeds 0, 1 (fractions); the report prints percent, mean ± sample std.
SCHEME_MIOU = {"real": [0.40, 0.42], "fixed": [0.43, 0.45], "uniform": [0.44, 0.46], "adaptive": [0.47, 0.50]}


def seconds_of(w: float, lam: float, i: int) -> float:
    return 0.1 * lam + 0.01 * i + 0.001 * w


def fid_of(w: float, lam: float) -> float:
    return 10 * lam + w


def judge_of(w: float, lam: float) -> dict:
    """Fabricated judge.json entry of a cell (fractions; the report prints percent)."""
    own, mis = 0.5 + 0.05 * w - 0.2 * lam, 0.2 + 0.01 * w
    return {"w": w, "lambda": lam, "judge_miou": own, "judge_miou_mismatched": mis, "judge_margin": own - mis,
            "fg_iou": 0.6 + 0.01 * w, "fg_iou_mismatched": 0.3, "samples": 3, "seconds": 0.25}


def miou_of(scheme: str, w: float | None, lam: float | None, seed: int) -> float:
    """Fabricated mIoU of a seg run; the scheme study's values win for runs it shares."""
    if (scheme, w, lam) == ("fixed", 1.5, 1.0) or scheme != "fixed":
        return SCHEME_MIOU[scheme][seed]
    return 0.30 + 0.01 * w + 0.1 * lam


def _image(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _scribble(size: int) -> np.ndarray:
    s = np.full((size, size), 255, np.uint8)
    s[2, 1:-1] = 0
    s[size // 2, 2:6] = 1
    return s


def _write_set(folder: Path, prefix: str, samples: list[Sample], kind: str, extra: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with ShardWriter(folder / f"{prefix}-000000.tar") as writer:
        for s in samples:
            writer.write(s)
        info = writer.close()
    rows = shard_rows([sample_row(s) for s in samples], info, folder)
    return write_manifest(rows, folder / "manifest.parquet", DatasetInfo(CLASSES, kind, extra or {}))


POOL_SECONDS = 6.0  # wall time of the one actor pool that generated all 4 cells


def pool_summary(samples: int, seconds: float, cells: int, pooled: int) -> dict:
    """A cell's summary.json as run_generate_sets writes it: the cell's own totals + its pool's stats."""
    return {"samples": samples, "samples_this_run": samples, "shards_resumed": 0, "generate_seconds": seconds,
            "device": "cpu", "actors": 2, "actor_deaths": 0, "unit_failures": 0, "sets_in_pool": cells,
            "pool_samples_this_run": pooled, "seconds": seconds + 1.0, "images_per_s": pooled / seconds}


def fabricate_run(root: Path, seeds: tuple[int, ...] = (0, 1)) -> SweepConfig:
    """A run folder as the sweep leaves it: real set, 4 cells (one actor pool), FID, seg summaries,
    loss log, record."""
    cfg = from_dict(SweepConfig, {
        "out": str(root), "grid": {"w": W, "lambdas": LAMS},
        "studies": {"schemes": {"w": 1.5, "fixed_lambda": 1.0, "seeds": list(seeds)},
                    "w_sweep": {"enabled": True, "lam": 1.0}, "lambda_sweep": {"enabled": True, "w": 1.5}},
        "report": {"grid_sources": 2, "title": "fabricated"},
    })
    real = [Sample(sid, _image(i, 24), _scribble(24), np.zeros((24, 24), np.uint8), {"source_id": sid, "split": "train"})
            for i, sid in enumerate(SOURCES)]
    real.append(Sample("val-0", _image(99, 24), _scribble(24), np.zeros((24, 24), np.uint8), {"source_id": "val-0", "split": "val"}))
    real_manifest = _write_set(root / "real", "real", real, "real")
    manifests = {}
    for w in W:
        for lam in LAMS:
            samples = [Sample(synthetic_key(sid, w, lam, 7), _image(100 + i, 16), _scribble(16), None,
                              {"source_id": sid, "w": w, "lambda": lam, "seed": 7, "steps": int(10 * lam),
                               "seconds": seconds_of(w, lam, i)}) for i, sid in enumerate(SOURCES)]
            folder = root / "synthetic" / cell_name(w, lam)
            manifests[cell_name(w, lam)] = _write_set(folder, "syn", samples, "synthetic", {"plan": {"fingerprint": "x"}})
            (folder / "summary.json").write_text(json.dumps(pool_summary(3, POOL_SECONDS, 4, 12)))
    fid = {"setup": {"feature": "random", "split": "train"},
           "cells": {cell_name(w, lam): {"w": w, "lambda": lam, "fid": fid_of(w, lam), "samples": 3, "reference_samples": 3,
                                         "seconds": 0.5} for w in W for lam in LAMS}}
    (root / "fid.json").write_text(json.dumps(fid))
    judge = {"setup": {"steps": 300, "split": "val"}, "real": {**judge_of(0, 0), "samples": 1},
             "cells": {cell_name(w, lam): judge_of(w, lam) for w in W for lam in LAMS}}
    (root / "judge.json").write_text(json.dumps(judge))
    memo = {"setup": {"enabled": True}, "cells": {cell_name(w, lam): {"w": w, "lambda": lam, "l1_own": 10 * lam, "l1_other": 50.0,
                                                                     "nearest_is_own": lam / 2, "chance": 1 / 3, "samples": 3,
                                                                     "seconds": 0.1} for w in W for lam in LAMS}}
    (root / "memorization.json").write_text(json.dumps(memo))
    scores = {"setup": {"enabled": True}, "cells": {cell_name(w, lam): {"w": w, "lambda": lam, "samples": 3, "mean": 1 - lam / 2,
                                                                       "q25": 0.25, "median": 0.5, "q75": 0.75, "seconds": 0.2}
                                                    for w in W for lam in LAMS}}
    (root / "label_scores.json").write_text(json.dumps(scores))
    runs = plan_seg_runs(cfg)
    for run in runs:
        miou = miou_of(run.scheme, run.w, run.lambdas[0] if run.lambdas else None, run.seed)
        folder = root / "seg" / run.name
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(
            {"scheme": run.scheme, "seed": run.seed, "steps": 20, "seconds": 3.0, "miou": miou, "pixel_acc": 0.9,
             "eval_protocol": "fixscalecrop-513"}))
    (root / "controlnet").mkdir()
    (root / "controlnet" / "loss.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 1.0 / s, "samples": 16, "seconds": 0.5 * s}) + "\n" for s in (10, 20, 30)))
    record = new_record(cfg, runs)
    record.update(real_manifest="real/manifest.parquet", model_dir="controlnet/final",
                  cells=cell_entries(cfg, manifests, root), wall_seconds=123.4,
                  stages={"ingest": {"seconds": 1.5, "images": 4}, "generate": {"seconds": 9.25, "images": 12, "cells": 4}})
    (root / "report").mkdir()
    (root / "report" / RECORD).write_text(json.dumps(record))
    assert real_manifest.is_file()
    return cfg


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("run")
    fabricate_run(root)
    with pytest.MonkeyPatch.context() as mp:  # the repo's own headline result must not change these pages
        mp.setattr(report_module, "HEADLINE_JSON", root / "no-headline.json")
        index = build_report(root)
    return root / "report", index.read_text()


def _row(md: str, first: str) -> list[str]:
    """The cells of the Markdown table row whose first cell is ``first``."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first:
            return cells
    raise AssertionError(f"no table row starting with {first!r}")


def test_report_files(report):
    folder, md = report
    names = {"index.md", "index.html", "fid_vs_w.png", "fid_vs_lambda.png", "miou_vs_w.png", "miou_vs_lambda.png",
             "schemes.png", "cost_by_lambda.png", "controlnet_loss.png", "samples_src-0.png", "samples_src-1.png",
             "judge_margin_vs_w.png"}
    assert names <= {p.name for p in folder.iterdir()}
    assert not (folder / "samples_src-2.png").exists()  # grid_sources = 2
    html = (folder / "index.html").read_text()
    for name in names - {"index.md", "index.html"}:
        assert f"({name})" in md and f'src="{name}"' in html


def test_png_sizes(report):
    folder, _ = report
    for name in ("fid_vs_w.png", "fid_vs_lambda.png", "miou_vs_w.png", "miou_vs_lambda.png", "schemes.png",
                 "cost_by_lambda.png", "controlnet_loss.png", "judge_margin_vs_w.png"):
        with Image.open(folder / name) as im:
            assert im.size == PLOT_PX, name
            assert np.asarray(im.convert("L")).std() > 5, f"{name} looks blank"
    with Image.open(folder / "samples_src-0.png") as im:
        assert im.size == grid_px(len(LAMS), 2 + len(W))  # rows λ; source, scribble, one column per w


def test_overlay_and_upscale():
    rng = np.random.default_rng(0)
    image, scribble = _image(3, 16), _scribble(16)
    drawn = scribble != 255
    for alpha in (1.0, OVERLAY_ALPHA):
        out = overlay_scribble(image, scribble, alpha)
        colour = PALETTE[scribble[drawn]].astype(float)
        assert np.array_equal(out[drawn], np.rint(alpha * colour + (1 - alpha) * image[drawn]).astype(np.uint8))
        assert np.array_equal(out[~drawn], image[~drawn])  # unlabelled: the image, untouched
    assert np.array_equal(overlay_scribble(image, scribble, 1.0)[2, 3], [255, 255, 255])  # background stroke: white
    big = upscale(image)
    assert big.shape == (TILE_PX, TILE_PX, 3) and np.array_equal(big[::TILE_PX // 16, ::TILE_PX // 16], image)
    assert np.array_equal(big[8:16, 24:32], np.broadcast_to(image[1, 3], (8, 8, 3)))  # nearest: whole 8 x 8 blocks
    assert upscale(rng.integers(0, 255, (100, 100, 3))).shape == (200, 200, 3)  # a whole factor, at least TILE_PX
    assert upscale(np.zeros((300, 300, 3))).shape == (300, 300, 3)


def test_grid_tiles_show_upscaled_samples_with_their_scribble(report):
    """The w = 1.5, λ = 0.5 tile of src-0 in the PNG is the sample, upscaled, with its scribble over it."""
    folder, _ = report
    with Image.open(folder / "samples_src-0.png") as im:
        png = np.asarray(im.convert("RGB"))
    left = round((GRID_LEFT_IN + 2 * GRID_CELL_IN + GRID_MARGIN_IN) * DPI)  # column 2: the first w
    top = round((GRID_TOP_IN + GRID_MARGIN_IN) * DPI)  # row 0: the first λ
    expected = upscale(overlay_scribble(_image(100, 16), _scribble(16)))
    assert np.array_equal(png[top:top + TILE_PX, left:left + TILE_PX], expected)


def test_fid_table(report):
    _, md = report
    for lam in LAMS:
        assert _row(md, f"λ = {lam:g}")[1:] == [f"{fid_of(w, lam):.3f}" for w in W]


def test_scheme_table(report):
    _, md = report
    for scheme, vals in SCHEME_MIOU.items():
        mean, std = 100 * np.mean(vals), 100 * np.std(vals, ddof=1)
        row = _row(md, scheme)
        assert row[2] == f"{mean:.2f} ± {std:.2f}"
        assert row[4] == ", ".join(f"{100 * v:.2f}" for v in vals)
        assert row[5] == "2"  # seeds
        if scheme != "real":
            assert row[3] == f"{mean - 100 * np.mean(SCHEME_MIOU['real']):.2f}"


def test_seg_runs_name_the_evaluation_protocol(report):
    _, md = report
    assert "evaluated with the `fixscalecrop-513` protocol" in md


def test_sweep_tables(report):
    _, md = report
    # mIoU vs w at λ = 1 and vs λ at w = 1.5 (seed 0 only); FID column from fid.json
    w_part = md.split("## Downstream mIoU vs w")[1].split("##")[0]
    for w in W:
        assert _row(w_part, f"{w:g}")[1:] == [f"{100 * miou_of('fixed', w, 1.0, 0):.2f}", "1", f"{fid_of(w, 1.0):.3f}"]
    lam_part = md.split("## Downstream mIoU vs λ")[1].split("##")[0]
    for lam in LAMS:
        assert _row(lam_part, f"{lam:g}")[1:3] == [f"{100 * miou_of('fixed', 1.5, lam, 0):.2f}", "1"]
    assert f"Real-only baseline: {100 * np.mean(SCHEME_MIOU['real']):.2f} %" in w_part


def test_judge_table(report):
    _, md = report
    part = md.split("## Judge")[1].split("##")[0]
    for w in W:
        for lam in LAMS:
            j = judge_of(w, lam)
            assert _row(part, cell_name(w, lam))[1:] == [
                f"{w:g}", f"{lam:g}", f"{fid_of(w, lam):.3f}", f"{100 * j['judge_miou']:.2f}",
                f"{100 * j['judge_miou_mismatched']:.2f}", f"{100 * j['judge_margin']:.2f}", f"{100 * j['fg_iou']:.2f}",
                "30.00", "3"]
    assert f"scores {100 * judge_of(0, 0)['judge_miou']:.2f} % (mismatched 20.00 %)" in part  # the held-out ceiling
    assert _row(md, "judge")[1:3] == ["1.0", "12"]  # compute totals: 4 cells x 0.25 s, 3 samples


def test_memorization_table(report):
    _, md = report
    part = md.split("## Memorization")[1].split("\n## ")[0]
    assert "(chance 33.3 %)" in part
    for w in W:
        for lam in LAMS:
            assert _row(part, cell_name(w, lam))[1:] == [f"{w:g}", f"{lam:g}", f"{10 * lam:.1f}", "50.0", f"{100 * lam / 2:.1f}", "3"]
    assert _row(md.split("## Compute")[1], "memorization")[1:3] == [f"{0.1 * len(W) * len(LAMS):.1f}", str(3 * len(W) * len(LAMS))]


def test_label_scores_table(report):
    _, md = report
    part = md.split("## Label scores")[1].split("\n## ")[0]
    for w in W:
        for lam in LAMS:
            assert _row(part, cell_name(w, lam))[1:] == [f"{w:g}", f"{lam:g}", f"{1 - lam / 2:.3f}", "0.250", "0.500", "0.750", "3"]
    assert _row(md.split("## Compute")[1], "label scores")[1:3] == [f"{0.2 * len(W) * len(LAMS):.1f}", str(3 * len(W) * len(LAMS))]


def test_report_without_judge(tmp_path):
    """Runs from before the judge existed (no judge.json) still get their report."""
    fabricate_run(tmp_path)
    (tmp_path / "judge.json").unlink()
    md = build_report(tmp_path).read_text()
    assert "## Judge" not in md and "## FID" in md and not (tmp_path / "report" / "judge_margin_vs_w.png").exists()


def test_compute_tables(report):
    _, md = report
    compute = md.split("## Compute")[1]  # the judge table lists the cells too
    for w in W:
        for lam in LAMS:
            row = _row(compute, cell_name(w, lam))
            assert row[3] == "3" and row[4] == str(int(10 * lam))
            assert row[5] == f"{np.mean([seconds_of(w, lam, i) for i in range(3)]):.4f}"
            assert row[6] == f"{sum(seconds_of(w, lam, i) for i in range(3)):.1f}" and row[7] == "pool 1"
    cost = md.split("Cost per synthetic image by λ")[1]
    top = np.mean([seconds_of(w, 1.0, i) for w in W for i in range(3)])
    for lam in LAMS:
        mean = np.mean([seconds_of(w, lam, i) for w in W for i in range(3)])
        assert _row(cost, f"{lam:g}")[1:] == [f"{mean:.4f}", f"{mean / top:.2f}", "6"]
    assert _row(md, "generate")[1:4] == ["9.2", "–", "12"]  # stage table, this invocation (9.25 -> banker's rounding)
    assert _row(md, "ControlNet training")[1:3] == ["15.0", "48"]


def test_report_needs_record(tmp_path):
    from engine.errors import BadInputError

    with pytest.raises(BadInputError, match="sweep.json"):
        build_report(tmp_path)


# -- generation compute: a shared actor pool counts once --------------------------------------------
def _totals(md: str) -> list[str]:
    return _row(md.split("## Compute")[1], "generation (all cells)")


def test_generation_totals_count_a_shared_pool_once(report):
    """All 4 cells name the same pool (6 s, 12 images): the total is 6 s at 2 images/s, not 4 x 6 s."""
    _, md = report
    total = _totals(md)
    assert total[1:3] == [f"{POOL_SECONDS:.1f}", "12"]
    assert "1 actor pool(s) for 4 cell(s): 12 images generated at 2.000 images/s" in total[3]
    pool = _row(md.split("## Compute")[1], "pool 1")
    assert pool[1] == ", ".join(cell_name(w, lam) for w in W for lam in LAMS)
    assert pool[2:] == ["2", "cpu", "6.0", "12", "2.000"]


def _cell(name: str, summary: dict, images: int = 3) -> CellData:
    return CellData(name, 2.0, 1.0, Path("m.parquet"), [0.5] * images, 10, summary)


def test_generation_pools_two_cells_one_pool():
    t = 396.0
    cells = [_cell("a", pool_summary(128, t, 2, 256), 128), _cell("b", pool_summary(128, t, 2, 256), 128)]
    [pool] = generation_pools(cells)
    assert pool.cells == ["a", "b"] and pool.seconds == t and pool.images == 256
    assert pool.images_per_s == pytest.approx(256 / t)
    # two invocations: two pools; summaries from before pools were shared: a pool per cell
    second = _cell("c", pool_summary(128, 100.0, 1, 128), 128)
    assert [p.cells for p in generation_pools(cells + [second])] == [["a", "b"], ["c"]]
    old = [_cell(n, {"samples": 3, "samples_this_run": 3, "generate_seconds": 2.0}) for n in "xy"]
    assert [(p.cells, p.seconds, p.images) for p in generation_pools(old)] == [(["x"], 2.0, 3), (["y"], 2.0, 3)]


def test_report_totals_over_two_pools(tmp_path):
    """λ = 0.5 cells on one pool (7.5 s), λ = 1 cells on another (12.5 s): 20 s and 12 / 20 images/s."""
    fabricate_run(tmp_path)
    for w in W:
        for lam, t in ((0.5, 7.5), (1.0, 12.5)):
            (tmp_path / "synthetic" / cell_name(w, lam) / "summary.json").write_text(json.dumps(pool_summary(3, t, 2, 6)))
    md = build_report(tmp_path).read_text()
    total = _totals(md)
    assert total[1:3] == ["20.0", "12"] and "2 actor pool(s) for 4 cell(s): 12 images generated at 0.600 images/s" in total[3]
    compute = md.split("## Compute")[1]
    assert _row(compute, "pool 1")[1:] == [f"{cell_name(1.5, 0.5)}, {cell_name(3.0, 0.5)}", "2", "cpu", "7.5", "6", "0.800"]
    assert _row(compute, "pool 2")[5:] == ["6", "0.480"]
    assert _row(compute, cell_name(3.0, 1.0))[7] == "pool 2"


# -- what the scheme table can and cannot say ----------------------------------------------------------
def test_schemes_with_two_seeds_say_so(report):
    _, md = report
    part = md.split("## Schemes")[1].split("##")[0]
    stds = [100 * np.std(v, ddof=1) for v in SCHEME_MIOU.values()]
    assert f"Seeds: 2 per scheme. Seg seeds alone move a scheme's mIoU by {min(stds):.2f}–{max(stds):.2f} points" in part
    assert "rank nothing:" not in part


def test_single_seed_schemes_say_they_rank_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(report_module, "HEADLINE_JSON", tmp_path / "absent.json")
    fabricate_run(tmp_path, seeds=(0,))
    md = build_report(tmp_path).read_text()
    part = md.split("## Schemes")[1].split("##")[0]
    means = {s: 100 * v[0] for s, v in SCHEME_MIOU.items()}
    assert "Seeds: 1 per scheme. Single-seed values rank nothing: seg seeds alone move mIoU by about 0.5–1.2 points" in part
    assert f"the scheme means here span {means['adaptive'] - means['real']:.2f} points (real 40.00 to adaptive 47.00)" in part
    # what the budget can show: the judge margin of the cells the schemes drew from (w = 1.5)
    margins = [f"{100 * judge_of(1.5, lam)['judge_margin']:.2f} (λ = {lam:g})" for lam in LAMS]
    assert f"exceeds its mIoU against a mismatched mask at w = 1.5 by {margins[0]} and {margins[1]} points" in part
    assert _row(part, "fixed")[5] == "1"


# -- the headline section: the pre-registered result, or the command that makes it ---------------------
def test_headline_section_without_a_result(report):
    folder, md = report
    part = md.split("## The headline")[1].split("##")[0]
    assert "has not been run yet" in part and "`python -m jobs.sweep --config configs/sweeps/headline.yaml`" in part
    assert md.index("## The headline") < md.index("## Schemes")
    assert "<code>python -m jobs.sweep --config configs/sweeps/headline.yaml</code>" in (folder / "index.html").read_text()


def test_headline_section_renders_the_result(tmp_path, monkeypatch):
    from test_report_headline import met

    path = tmp_path / "headline.json"
    path.write_text(json.dumps(met()))
    monkeypatch.setattr(report_module, "HEADLINE_JSON", path)
    fabricate_run(tmp_path / "run")
    md = build_report(tmp_path / "run").read_text()
    part = md.split("## The headline")[1].split("\n## ")[0]
    assert "`python -m jobs.sweep --config configs/sweeps/headline.yaml`" in part
    assert _row(part, "fixed")[1:4] == ["33.00", "32.00", "34.00"]
    assert "Target (≥ 3 points over real_classical, the interval's lower bound above 0): met." in part
    html = (tmp_path / "run" / "report" / "index.html").read_text()
    assert "<td>fixed</td><td>33.00</td>" in html and "Target (≥ 3 points" in html
