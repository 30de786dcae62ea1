"""Memorization: are a cell's synthetic images new scenes, or copies of their own source?

A ControlNet trained on few labelled scenes can learn to redraw each one from its scribble.
Its λ = 1 samples then score well on FID against those scenes and follow their scribbles,
but they add no new shapes. FID and the judge cannot tell such copies from new scenes; this
check can. For every synthetic image it takes the mean absolute pixel difference (0-255) to
every real train image (fitted to the synthetic size as the generator fitted its sources)
and reports the mean L1 distance to the image's own source and to the other sources, and the
share of images whose nearest real train image is their own source: chance is 1 / sources,
near 100 % means copies. Draw 1 of the headline found one this way (docs/results/tried.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine import storage
from engine.data.geometry import fit_sample
from engine.errors import BadInputError
from engine.manifest import iter_samples


@dataclass
class MemorizationConfig:
    """Whether a sweep checks every cell (``memorization.json``), and the memory it may take: the
    real train images are held as float32, so a set larger than ``max_gib`` is skipped with
    the reason recorded (VOC's 10,582 sources at 512 px would need 31 GiB)."""

    enabled: bool = True
    max_gib: float = 2.0

    def skip_reason(self, sources: int, size: int) -> str | None:
        gib = sources * size * size * 3 * 4 / 2**30
        if gib > self.max_gib:
            return (f"{sources} train sources at {size} px need {gib:.1f} GiB as float32, more than "
                    f"memorization.max_gib = {self.max_gib:g}")
        return None


def train_images(real: storage.Location, size: int | None = None, resize: str = "stretch") -> dict[str, np.ndarray]:
    """The real train split's images by source id (float32, for distances), fitted to ``size`` when given."""
    images = {}
    for _, sample in iter_samples(real, lambda row: row["split"] == "train", with_mask=False):
        if size is not None and sample.image.shape[:2] != (size, size):
            sample = fit_sample(sample, size, resize)
        images[sample.meta.get("source_id", sample.key)] = sample.image.astype(np.float32)
    if len(images) < 2:
        raise BadInputError(str(real), f"has {len(images)} train image(s)", "memorization compares against >= 2 sources")
    return images


def memorization(synthetic: storage.Location, real: dict[str, np.ndarray]) -> dict[str, Any]:
    """L1 to own / other sources and the nearest-is-own share of one synthetic manifest's images."""
    ids = sorted(real)
    index = {sid: i for i, sid in enumerate(ids)}
    stack = np.stack([real[i] for i in ids])  # (S, H, W, C)
    own, other, nearest_own, n = 0.0, 0.0, 0, 0
    for _, sample in iter_samples(synthetic, with_mask=False):
        source = index.get(sample.meta["source_id"])
        if source is None:
            raise BadInputError(str(synthetic), f"sample {sample.key} comes from {sample.meta['source_id']!r}, "
                                "which is not a train image of the real set", "pass the real set it was generated from")
        dist = np.abs(stack - sample.image.astype(np.float32)).mean(axis=(1, 2, 3))
        own += dist[source]
        other += (dist.sum() - dist[source]) / (len(ids) - 1)
        nearest_own += int(np.argmin(dist) == source)
        n += 1
    if n == 0:
        raise BadInputError(str(synthetic), "holds no synthetic images")
    return {"samples": n, "sources": len(ids), "l1_own": float(own / n), "l1_other": float(other / n),
            "nearest_is_own": nearest_own / n, "chance": 1 / len(ids)}


def describe(result: dict[str, Any]) -> str:
    """One line a person reads."""
    return (f"L1 to own source {result['l1_own']:.1f}, to the others {result['l1_other']:.1f}; nearest real image is "
            f"its own source for {100 * result['nearest_is_own']:.1f} % (chance {100 * result['chance']:.1f} %)")
