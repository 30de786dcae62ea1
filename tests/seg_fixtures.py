"""Fabricated real + synthetic shards and manifests for the seg tests.

Scenes are learnable on purpose (a coloured square of class c on noise, the colour
giving the class away), so a few training steps visibly lower the loss. Synthetic
samples are the real ones with λ-scaled noise; several λ values share each shard so
that per-λ key filtering inside shards is exercised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.manifest import DatasetInfo, sample_row, shard_rows, skip_row, write_manifest
from engine.shards import UNLABELLED, Sample, ShardWriter, shard_name, synthetic_key

CLASS_NAMES = ["background", "red", "green", "blue"]
COLOURS = {1: (220, 40, 40), 2: (40, 200, 40), 3: (40, 60, 220)}


def make_scene(i: int, split: str, size: int = 32) -> Sample:
    """Real sample ``i``: one square of class 1..3 on grey noise, a cross-shaped scribble."""
    rng = np.random.default_rng([i, 0 if split == "train" else 1])
    cls = 1 + i % 3
    image = rng.integers(60, 140, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    s = size // 3 + int(rng.integers(0, size // 4))
    y, x = (int(v) for v in rng.integers(0, size - s, 2))
    mask[y : y + s, x : x + s] = cls
    image[mask == cls] = COLOURS[cls]
    scribble = np.full((size, size), UNLABELLED, np.uint8)
    scribble[y + s // 2, x + 1 : x + s - 1] = cls  # a stroke through the object
    scribble[1, :] = 0  # and one along the top border (background)
    if y <= 1:
        scribble[1, x : x + s] = cls
    source_id = f"{split}{i:04d}"
    meta = {"source_id": source_id, "split": split, "w": 0.0, "lambda": 0.0, "seed": 0,
            "classes": sorted({0, cls}), "model": "", "steps": 0}
    return Sample(key=source_id, image=image, scribble=scribble, mask=mask, meta=meta)


def synthetic(real: Sample, lam: float, seed: int = 0) -> Sample:
    """A 'generated' variant of ``real`` at encode ratio ``lam`` (noise grows with λ)."""
    rng = np.random.default_rng([seed, int(lam * 100), int(real.key[-4:])])
    noise = rng.normal(0, 80 * lam, real.image.shape)
    image = np.clip(real.image.astype(float) + noise, 0, 255).astype(np.uint8)
    meta = {**real.meta, "w": 2.0, "lambda": lam, "seed": seed, "model": "fake"}
    return Sample(synthetic_key(real.meta["source_id"], 2.0, lam, seed), image, real.scribble, real.mask, meta)


def _write(samples: list[Sample], folder: Path, prefix: str, per_shard: int, kind: str, extra_rows: list[dict] | None = None) -> Path:
    rows: list[dict] = []
    for s, start in enumerate(range(0, len(samples), per_shard)):
        chunk = samples[start : start + per_shard]
        with ShardWriter(folder / shard_name(prefix, s)) as writer:
            for sample in chunk:
                writer.write(sample)
            info = writer.close()
        rows += shard_rows([sample_row(x) for x in chunk], info, folder)
    return write_manifest(rows + (extra_rows or []), folder / "manifest.parquet", DatasetInfo(CLASS_NAMES, kind))


def make_real(root: Path, n_train: int = 24, n_val: int = 8, per_shard: int = 8, size: int = 32) -> Path:
    """Real manifest (train + val, λ = 0) plus one skipped row that must be ignored."""
    samples = [make_scene(i, "train", size) for i in range(n_train)] + [make_scene(i, "val", size) for i in range(n_val)]
    skipped = skip_row("broken0001", "train", "unreadable image")
    return _write(samples, root / "real", "real", per_shard, "real", [skipped])


def make_synthetic(root: Path, lambdas: tuple[float, ...] = (0.2, 0.5, 1.0), n_train: int = 24, per_shard: int = 20, size: int = 32,
                   seeds: tuple[int, ...] = (0,), folder: str = "synthetic") -> Path:
    """Synthetic manifest: every real train scene at every λ (and seed), λ values mixed within shards."""
    samples = [synthetic(make_scene(i, "train", size), lam, seed) for i in range(n_train) for lam in lambdas for seed in seeds]
    return _write(samples, root / folder, "synth", per_shard, "synthetic")
