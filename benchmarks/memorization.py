"""Memorization: are a cell's synthetic images new scenes, or copies of their own source?

A ControlNet trained on few labelled scenes can learn to redraw each one from its scribble.
Its λ = 1 samples then score well on FID against those scenes and follow their scribbles,
but they add no new shapes, and a segmenter gains nothing from them. FID and the judge
cannot tell such copies from new scenes; this check can. For every synthetic image
(streamed from its manifest) it takes the mean absolute pixel difference to every real
train image and reports:

- the mean L1 distance to the image's own source and to the other sources (0-255 scale);
- the share of images whose nearest real train image is their own source. Chance is
  1 / number of sources. Near 100 % means the images are copies.

    python benchmarks/memorization.py --real runs/headline/real/manifest.parquet \\
        --synthetic runs/headline-x8/synthetic/w2p00-l1p00/manifest.parquet
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from seg.judge import manifest_samples


def train_images(real: Path) -> dict[str, np.ndarray]:
    """The real train split's images by source id (float32, for distances)."""
    samples = manifest_samples(real, lambda row: row["split"] == "train", with_mask=False)
    return {s.meta.get("source_id", s.key): s.image.astype(np.float32) for s in samples}


def memorization(synthetic: Path, real: dict[str, np.ndarray]) -> dict[str, float]:
    """L1 to own / other sources and the nearest-is-own share of one synthetic manifest."""
    ids = sorted(real)
    index = {sid: i for i, sid in enumerate(ids)}
    stack = np.stack([real[i] for i in ids])  # (S, H, W, C)
    own, other, nearest_own, n = 0.0, 0.0, 0, 0
    for sample in manifest_samples(synthetic, lambda row: True, with_mask=False):
        source = index[sample.meta["source_id"]]
        dist = np.abs(stack - sample.image.astype(np.float32)).mean(axis=(1, 2, 3))
        own += dist[source]
        other += (dist.sum() - dist[source]) / (len(ids) - 1)
        nearest_own += int(np.argmin(dist) == source)
        n += 1
    if n == 0:
        raise SystemExit(f"error: {synthetic}: no synthetic images")
    return {"images": n, "sources": len(ids), "l1_own": float(own / n), "l1_other": float(other / n),
            "nearest_is_own": nearest_own / n, "chance": 1 / len(ids)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=Path, required=True, help="real manifest (its train split: the sources)")
    parser.add_argument("--synthetic", type=Path, nargs="+", required=True, help="synthetic manifest(s), one per cell")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    real = train_images(args.real)
    results = {}
    for manifest in args.synthetic:
        r = results[str(manifest)] = memorization(manifest, real)
        print(f"{manifest}: L1 to own source {r['l1_own']:.1f}, to the others {r['l1_other']:.1f}; nearest real "
              f"image is its own source for {100 * r['nearest_is_own']:.1f} % (chance {100 * r['chance']:.1f} %)",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
