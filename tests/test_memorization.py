"""benchmarks/memorization.py: copies of their own source are caught, new images are not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.manifest import DatasetInfo, sample_row, shard_rows, write_manifest
from engine.shards import Sample, ShardWriter, read_shard, shard_name
from gen_fixtures import CLASS_NAMES, make_real_set
from scripts import load_script


def write_synthetic(root: Path, images: dict[str, np.ndarray]) -> Path:
    """A synthetic manifest: one λ = 1 image per source id, as given."""
    with ShardWriter(root / shard_name("syn", 0)) as writer:
        rows = []
        for i, (sid, image) in enumerate(images.items()):
            meta = {"source_id": sid, "split": "train", "w": 2.0, "lambda": 1.0, "seed": i, "classes": [0],
                    "model": "test", "steps": 1}
            sample = Sample(f"syn-{sid}", image, np.zeros(image.shape[:2], np.uint8), None, meta)
            writer.write(sample)
            rows.append(sample_row(sample))
    return write_manifest(shard_rows(rows, writer.close(), root), root / "manifest.parquet",
                          DatasetInfo(CLASS_NAMES, "synthetic"))


def test_copies_are_caught_and_distances_match_a_direct_computation(tmp_path: Path) -> None:
    mem = load_script("benchmarks/memorization.py")
    real_manifest = make_real_set(tmp_path / "real", n_train=6)
    sources = {s.key: s.image for p in sorted((tmp_path / "real").glob("*.tar")) for s in read_shard(p)
               if s.meta["split"] == "train"}
    ids = sorted(sources)
    # Half are exact copies of their own source; the other half copy the next source.
    images = {sid: sources[sid if k % 2 == 0 else ids[(k + 1) % len(ids)]] for k, sid in enumerate(ids)}
    synthetic = write_synthetic(tmp_path / "syn", images)
    assert mem.main(["--real", str(real_manifest), "--synthetic", str(synthetic), "--json", str(tmp_path / "m.json")]) == 0
    result = json.loads((tmp_path / "m.json").read_text())[str(synthetic)]

    assert result["samples"] == 6 and result["sources"] == 6
    assert result["nearest_is_own"] == pytest.approx(0.5)
    assert result["chance"] == pytest.approx(1 / 6)

    def l1(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())

    own = np.mean([l1(images[s], sources[s]) for s in ids])
    other = np.mean([np.mean([l1(images[s], sources[t]) for t in ids if t != s]) for s in ids])
    assert result["l1_own"] == pytest.approx(own, rel=1e-5)
    assert result["l1_other"] == pytest.approx(other, rel=1e-5)
    assert result["l1_own"] < result["l1_other"]  # the copies pull "own" down


def test_a_set_generated_from_other_sources_is_an_error_naming_the_sample(tmp_path: Path, capsys) -> None:
    mem = load_script("benchmarks/memorization.py")
    real_manifest = make_real_set(tmp_path / "real", n_train=3)
    synthetic = write_synthetic(tmp_path / "syn", {"elsewhere-7": np.zeros((16, 16, 3), np.uint8)})
    assert mem.main(["--real", str(real_manifest), "--synthetic", str(synthetic)]) == 2
    assert "'elsewhere-7', which is not a train image of the real set" in capsys.readouterr().err
