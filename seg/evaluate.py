"""Evaluate a segmentation model on the full masks of a split (default: val).

Two protocols: ``full`` scores every pixel of every image at its own size; ``fixscalecrop``
is the paper's (rloss ``FixScaleCrop``): short side resized to ``crop`` (image bilinear,
mask nearest), then the centred ``crop`` x ``crop`` square is scored. The summary names it.

Used by ``seg.train`` during and after training, and as a CLI on a saved checkpoint:

    python -m seg.evaluate --checkpoint runs/x/seg/adaptive-seed0/checkpoints/last.pt --shards runs/x/real/manifest.parquet
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from engine.errors import BadInputError
from engine.shards import UNLABELLED
from seg.batches import to_tensor
from seg.metrics import SegMetrics
from seg.stream import EpochDataset, ShardGroup


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A seg.train checkpoint, unpickled with ``weights_only=True`` (tensors and plain data
    only, so a planted file cannot run code); any unreadable file is a bad input."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise BadInputError(str(path), f"cannot read checkpoint: {str(exc).splitlines()[0]}") from None


def load_model(checkpoint: str | Path) -> tuple[nn.Module, list[str]]:
    """The model of a seg.train checkpoint (``OUT/checkpoints/last.pt``), in eval mode on the
    GPU when there is one, and its class names. The backbone file is not read again: the
    checkpoint holds every weight."""
    from engine.config import from_dict
    from seg.models import RANDOM, ModelConfig, build_model

    ckpt = read_checkpoint(checkpoint)
    model_cfg = from_dict(ModelConfig, {**ckpt["config"]["model"], "backbone_weights": RANDOM}, "checkpoint model config")
    model = build_model(model_cfg, len(ckpt["class_names"]))
    model.load_state_dict(ckpt["model"])
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), list(ckpt["class_names"])


PROTOCOLS = ("full", "fixscalecrop")


def fix_scale_crop(image: np.ndarray, mask: np.ndarray, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper's evaluation transform, transcribed: int() sizes, round() offsets, PIL resampling."""
    h, w = mask.shape
    if w > h:
        oh, ow = crop, int(1.0 * w * crop / h)
    else:
        ow, oh = crop, int(1.0 * h * crop / w)
    img = Image.fromarray(image).resize((ow, oh), Image.BILINEAR)
    lab = Image.fromarray(mask).resize((ow, oh), Image.NEAREST)
    x1, y1 = int(round((ow - crop) / 2.0)), int(round((oh - crop) / 2.0))
    box = (x1, y1, x1 + crop, y1 + crop)
    return np.array(img.crop(box)), np.array(lab.crop(box))


class FixScaleCropCollate:
    """``pad_collate`` after the paper's transform on every sample (picklable for DataLoader workers)."""

    def __init__(self, crop: int) -> None:
        self.crop = crop

    def __call__(self, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        _require_masks(items)
        fitted = []
        for key, image, scribble, mask in items:
            img, lab = fix_scale_crop(image, mask, self.crop)
            fitted.append((key, img, scribble, lab))
        return pad_collate(fitted)


def _require_masks(items: list) -> None:
    for key, _, _, mask in items:
        if mask is None:
            raise BadInputError(f"sample {key}", "has no mask.png; evaluation needs full masks", "evaluate on a split ingested with masks")


def pad_collate(items: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack samples of different sizes: images padded with 0 (the mean), masks with 255 (ignored)."""
    _require_masks(items)
    h = max(it[1].shape[0] for it in items)
    w = max(it[1].shape[1] for it in items)
    images = [F.pad(to_tensor(img), (0, w - img.shape[1], 0, h - img.shape[0])) for _, img, _, _ in items]
    masks = [F.pad(torch.from_numpy(m).long(), (0, w - m.shape[1], 0, h - m.shape[0]), value=UNLABELLED) for _, _, _, m in items]
    return torch.stack(images), torch.stack(masks)


@torch.no_grad()
def evaluate(
    model: nn.Module, group: ShardGroup, num_classes: int, device: torch.device, batch_size: int = 16, workers: int = 0,
    protocol: str = "full", crop: int = 513,
) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy of ``model`` on ``group``'s full masks, under
    ``protocol`` (``full`` or the paper's ``fixscalecrop`` at ``crop``).

    Under torch.distributed every rank evaluates its share and the metrics are summed
    across ranks by torchmetrics, so all ranks must call this together.
    """
    if len(group) == 0:
        raise BadInputError("evaluation split", "has no samples", "pass the real manifest, which holds the val split")
    if protocol not in PROTOCOLS:
        raise BadInputError(f"eval protocol {protocol!r}", f"must be one of {PROTOCOLS}")
    collate = pad_collate if protocol == "full" else FixScaleCropCollate(crop)
    was_training = model.training
    model.eval()
    metrics = SegMetrics(num_classes, device)
    loader = DataLoader(EpochDataset(group, with_mask=True), batch_size=batch_size, num_workers=workers, collate_fn=collate)
    for images, masks in loader:
        metrics.update(model(images.to(device)), masks.to(device))
    model.train(was_training)
    return {**metrics.compute(), "samples": len(group), "protocol": protocol if protocol == "full" else f"{protocol}-{crop}"}


def main(argv: list[str] | None = None) -> int:
    from seg.stream import index_manifests

    parser = argparse.ArgumentParser(description="Evaluate a seg.train checkpoint on full masks (mIoU, per-class IoU, pixel accuracy).")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by seg.train (OUT/checkpoints/last.pt)")
    parser.add_argument("--shards", nargs="+", required=True, metavar="MANIFEST", help="manifest(s) holding the split to evaluate")
    parser.add_argument("--split", default="val", help="split to evaluate (default: val)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="full",
                        help="full: every pixel at the image's own size; fixscalecrop: the paper's centre crop (--crop)")
    parser.add_argument("--crop", type=int, default=513, help="fixscalecrop side (the paper: 513)")
    args = parser.parse_args(argv)
    try:
        model, class_names = load_model(args.checkpoint)
        index = index_manifests(args.shards, val_split=args.split)
        device = next(model.parameters()).device
        result = evaluate(model, index.val, len(class_names), device, args.batch_size, args.workers, args.protocol, args.crop)
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["class_names"] = class_names
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
