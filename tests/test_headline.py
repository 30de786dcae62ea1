"""The headline script on fabricated shards: every scheme x seed runs, the table is right, reruns reuse."""

from __future__ import annotations

import json
import statistics

import pytest

from scripts import load_script
from seg_fixtures import make_real, make_synthetic

TINY = ["--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "augment.crop=16", "--set", "data.workers=0",
        "--set", "model.width=8", "--set", 'model.backbone_weights=""', "--set", "train.eval_every=0", "--set", "train.log_every=1", "--set", "scheme.fixed_lambda=0.5"]


@pytest.mark.slow
def test_headline_table_over_schemes_and_seeds(tmp_path, capsys, monkeypatch):
    headline = load_script("benchmarks/headline.py")
    real, synth = make_real(tmp_path, n_train=32, size=24), make_synthetic(tmp_path, (0.2, 0.5, 1.0), n_train=32, size=24)
    argv = ["--real", str(real), "--synthetic", str(synth), "--fraction", "1/4", "--seeds", "0", "1", "--out", str(tmp_path / "h"), *TINY]
    assert headline.main(argv) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| scheme") and "---" not in ln]
    assert [r.split("|")[1].strip() for r in rows] == ["real", "fixed", "uniform", "adaptive"]
    assert "(8 images)" in out  # 1/4 of 32 real training sources
    for row in rows:
        scheme = row.split("|")[1].strip()
        mious = [json.loads((tmp_path / "h" / f"{scheme}-seed{s}" / "summary.json").read_text())["miou"] for s in (0, 1)]
        assert f"{100 * statistics.mean(mious):.2f} ± {100 * statistics.stdev(mious):.2f}" in row
    fixed = json.loads((tmp_path / "h" / "fixed-seed0" / "summary.json").read_text())
    assert set(fixed["lam_counts"]) <= {"0.0", "0.5"} and fixed["synthetic_samples"] == {"0.2": 8, "0.5": 8, "1.0": 8}
    assert (tmp_path / "h" / "headline.md").read_text().strip() in out

    monkeypatch.setattr(headline, "train", lambda *a, **k: pytest.fail("finished runs must be reused"))
    assert headline.main(argv) == 0
    capsys.readouterr()
    # ... but never under another config or other inputs: the summaries found are refused, named.
    assert headline.main(argv + ["--set", "optim.lr=0.5"]) == 2
    assert "differs in optim.lr" in capsys.readouterr().err
    other = make_synthetic(tmp_path / "other", (0.2, 0.5, 1.0), n_train=32, per_shard=7, size=24)  # other shards
    assert headline.main([*argv[:3], str(other), *argv[4:]]) == 2
    assert "differs in input:manifest1" in capsys.readouterr().err


def test_headline_bad_fraction(tmp_path, capsys):
    assert load_script("benchmarks/headline.py").main(["--real", "x.parquet", "--fraction", "2", "--out", str(tmp_path)]) == 2
    assert "must be in (0, 1]" in capsys.readouterr().err
