"""Label consistency of generated images: does each one agree with its own scribble?

A generated image is trained on with its source's scribble as the label. When the image
does not show those classes where the strokes run, that label teaches the segmenter
wrong. The score of a sample is the mIoU, on the scribbled pixels only, between a
segmenter's prediction on the generated image and the scribble (classes absent from both
left out; one confusion matrix per sample, :func:`scribble_miou`). The segmenter
must learn only from what the seg arms may see -- the labelled scribbles of the draw,
never a full mask of val or test: a seg.train run on the real scribbles (this module's
command) or, in a sweep, a scorer trained on them (``experiments.sweep``'s label-scores
stage). FreeMask filters by a real-trained model's loss the same way; the paper's
``--aug-best-dict`` is a hand-made ranking.

    python -m seg.label_scores --checkpoint runs/x/seg/real-seed0/checkpoints/last.pt \\
        --manifest runs/x/synthetic/w2p00-l1p00/manifest.parquet

writes a copy of the manifest with a ``label_score`` column beside it (``label_scored.parquet``;
``--out`` elsewhere, ``--in-place`` into the manifest itself); ``seg.train`` given that copy and
``data.min_label_score`` keeps the synthetic samples that reach it. A sample whose scribble has
no stroke has nothing to disagree with: its score is NaN and it is kept.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Iterable

import numpy as np
from torch import nn
from tqdm import tqdm

from engine.errors import BadInputError
from engine.identity import file_digest
from engine.manifest import LABEL_SCORE, annotate, iter_samples, read_manifest
from engine.storage import Location, join, name, parent
from engine.shards import UNLABELLED, Sample
from seg.evaluate import load_model
from seg.judge import chunks, predict

SCORED_NAME = "label_scored.parquet"  # a manifest's scored copy, beside it


def scribble_miou(pred: np.ndarray, scribble: np.ndarray, num_classes: int) -> np.ndarray:
    """Per sample (N,), the mIoU of ``pred`` (N,H,W) against ``scribble`` (N,H,W) on the
    scribbled pixels; classes in neither left out; NaN for a sample without a stroke.

    One ``bincount`` of (sample, truth, prediction) over the scribbled pixels gives every
    sample's confusion matrix at once: torchmetrics' per-sample ``mean_iou`` has no ignore
    index and builds one-hot tensors of N x K x H x W (GBs at VOC size).
    """
    n, k = len(pred), num_classes
    keep = scribble != UNLABELLED
    sample = np.broadcast_to(np.arange(n)[:, None, None], scribble.shape)[keep].astype(np.int64)
    index = (sample * k + scribble[keep].astype(np.int64)) * k + pred[keep].astype(np.int64)
    conf = np.bincount(index, minlength=n * k * k).reshape(n, k, k)  # [sample, truth, prediction]
    tp = np.diagonal(conf, axis1=1, axis2=2)
    union = conf.sum(2) + conf.sum(1) - tp
    present = union > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present, tp / np.maximum(union, 1), 0.0).sum(1) / present.sum(1)


def score_samples(net: nn.Module, samples: Iterable[Sample], num_classes: int, batch_size: int = 32) -> dict[str, float]:
    """Sample key -> label score of every sample (one image size per batch), streamed."""
    scores: dict[str, float] = {}
    for batch in chunks(samples, batch_size):
        by_size: dict[tuple[int, ...], list[Sample]] = {}
        for s in batch:
            by_size.setdefault(s.image.shape, []).append(s)
        for group in by_size.values():
            pred = predict(net, np.stack([s.image for s in group]), batch_size)
            values = scribble_miou(pred, np.stack([s.scribble for s in group]), num_classes)
            scores.update((s.key, float(v)) for s, v in zip(group, values))  # NaN: no stroke to check
    return scores


def score_manifest(net: nn.Module, manifest: Location, num_classes: int, note: dict[str, Any],
                   out: Location | None = None, batch_size: int = 32, progress: bool = False) -> dict[str, Any]:
    """Score every synthetic sample (λ > 0) of ``manifest`` and write the ``label_score``
    column into it (or into ``out``); a summary of the scores."""
    samples = (s for _, s in iter_samples(manifest, lambda row: bool(row["lambda"]), with_mask=False))
    if progress:
        table, _ = read_manifest(manifest)
        n = sum(1 for lam, st in zip(table.column("lambda").to_pylist(), table.column("status").to_pylist()) if st == "ok" and lam)
        samples = tqdm(samples, total=n, desc=f"label scores {name(parent(manifest))}", unit="img")
    scores = score_samples(net, samples, num_classes, batch_size)
    annotate(manifest, LABEL_SCORE, scores, out, note)
    return summarize(list(scores.values()))


def summarize(scores: list[float]) -> dict[str, Any]:
    """Count, mean and quartiles of a cell's scores (what a threshold would keep); samples
    without a stroke are counted apart (``no_stroke``: they have no score and are kept)."""
    values = [v for v in scores if not np.isnan(v)]
    if not values:
        return {"samples": len(scores), "no_stroke": len(scores)}
    q = np.quantile(values, [0.25, 0.5, 0.75]).round(4).tolist()
    return {"samples": len(scores), "no_stroke": len(scores) - len(values), "mean": round(float(np.mean(values)), 4),
            "q25": q[0], "median": q[1], "q75": q[2]}


def scored_copy(manifest: Location) -> Location:
    """Where a manifest's scored copy goes by default: beside it, so its shard paths resolve."""
    return join(parent(manifest), SCORED_NAME)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Score each generated image's agreement with its own scribble (mIoU on the scribbled pixels of a "
                    "segmenter's prediction) and write it into the manifest's label_score column; seg.train's "
                    "data.min_label_score then drops the samples below a threshold.")
    parser.add_argument("--checkpoint", required=True,
                        help="a seg.train checkpoint trained on the real scribbles only (OUT/checkpoints/last.pt): the scorer "
                             "may learn only from what the trained arms see, never from val's or test's full masks")
    parser.add_argument("--manifest", required=True, nargs="+", help="synthetic manifest(s) to score")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default=None,
                       help=f"write the scored copy here (one manifest only; default: {SCORED_NAME} beside each manifest, "
                            "so the shards still resolve and the manifest itself, which a sweep's digests name, is untouched)")
    where.add_argument("--in-place", action="store_true", help="write the column into the manifest itself")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        if args.out and len(args.manifest) > 1:
            raise BadInputError("--out", f"given with {len(args.manifest)} manifests", "score one manifest per --out, or drop --out")
        if args.batch_size < 1:
            raise BadInputError(f"--batch-size={args.batch_size}", "must be >= 1")
        net, classes = load_model(args.checkpoint)
        note = {"scorer": str(args.checkpoint), "scorer_digest": file_digest(args.checkpoint), "metric": "scribble_miou"}
        for manifest in args.manifest:
            names = read_manifest(manifest)[1].class_names
            if names != classes:
                raise BadInputError(manifest, f"class names {names} differ from the checkpoint's {classes}")
            out = manifest if args.in_place else args.out or scored_copy(manifest)
            summary = score_manifest(net, manifest, len(classes), note, out, args.batch_size, progress=True)
            print(f"{out}: {summary}")
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
