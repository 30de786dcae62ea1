"""jobs.show: counts per (w, λ, split), tag ranges, and a contact sheet whose tiles are the samples."""

from __future__ import annotations

import numpy as np
from PIL import Image

from engine.plots import DPI, GRID_CELL_IN, GRID_MARGIN_IN, GRID_TOP_IN, TILE_PX, grid_px, upscale
from engine.render import overlay_scribble
from engine.show import LABEL_IN, TITLE_IN, main, pick, summarize
from engine.shards import read_shard
from seg_fixtures import make_real, make_synthetic


def test_counts_per_group_and_tag_ranges(tmp_path, capsys):
    manifest = make_synthetic(tmp_path, lambdas=(0.2, 1.0), n_train=5, seeds=(0, 3))
    summary, rows = summarize(manifest)
    assert summary.counts == {("train", 2.0, 0.2): 10, ("train", 2.0, 1.0): 10}
    assert summary.ranges["seed"] == "0 … 3" and summary.ranges["sources"] == "5"
    real = make_real(tmp_path, n_train=4, n_val=2)
    summary, _ = summarize(real)
    assert summary.counts == {("train", 0.0, 0.0): 4, ("val", 0.0, 0.0): 2} and summary.skipped == 1
    assert main([str(real), "--no-sheet"]) == 0
    out = capsys.readouterr().out
    assert "real set, 6 samples, 1 skipped" in out and "train       0      0        4" in out


def test_pick_takes_one_sample_per_source_before_a_second():
    rows = [{"split": "train", "w": 2.0, "lambda": 1.0, "source_id": s, "key": f"{s}-{k}"} for s in "ab" for k in range(3)]
    assert [r["key"] for r in pick(rows, 3, 8)[("train", 2.0, 1.0)]] == ["a-0", "b-0", "a-1"]


def test_contact_sheet_tiles_are_the_samples_with_their_scribbles(tmp_path):
    manifest = make_real(tmp_path, n_train=5, n_val=3, per_shard=3)
    sheet = tmp_path / "sheet.png"
    assert main([str(manifest), "--sheet", str(sheet), "--per-group", "4", "--columns", "3"]) == 0
    png = np.asarray(Image.open(sheet).convert("RGB"))
    assert png.shape[1::-1] == grid_px(3, 3, LABEL_IN, TITLE_IN)  # train: 2 rows of 3 (4 samples), val: 1 row (3)
    samples = {s.key: s for shard in sorted(manifest.parent.glob("*.tar")) for s in read_shard(shard)}
    for r, c, key in [(0, 0, "train0000"), (1, 0, "train0003"), (2, 1, "val0001")]:
        left = round((LABEL_IN + c * GRID_CELL_IN + GRID_MARGIN_IN) * DPI)
        top = round((GRID_TOP_IN + r * (GRID_CELL_IN + TITLE_IN) + GRID_MARGIN_IN) * DPI)
        expected = upscale(overlay_scribble(samples[key].image, samples[key].scribble))
        assert np.array_equal(png[top:top + TILE_PX, left:left + TILE_PX], expected), key


def test_bad_input_is_an_error_not_a_traceback(tmp_path, capsys):
    assert main([str(tmp_path / "nope.parquet")]) == 2
    assert "manifest not found" in capsys.readouterr().err
    assert main([str(make_real(tmp_path)), "--columns", "0"]) == 2
