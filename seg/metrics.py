"""Segmentation metrics on full masks: per-class IoU, mIoU and pixel accuracy.

torchmetrics accumulates the confusion statistics (and syncs them across ranks under
torch.distributed). A class that appears neither in the prediction nor in the ground
truth of the whole evaluation set has no IoU (NaN) and is left out of the mean, the
usual VOC convention; 255 pixels (void borders) are ignored.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from engine.shards import UNLABELLED


class SegMetrics:
    """Accumulate predictions against masks; :meth:`compute` gives a JSON-ready dict."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", ignore_index: int = UNLABELLED) -> None:
        self.metrics = MetricCollection(
            {
                "iou": MulticlassJaccardIndex(num_classes, average="none", ignore_index=ignore_index, zero_division=math.nan),
                "pixel_acc": MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index),
            }
        ).to(device)

    def update(self, pred: torch.Tensor, mask: torch.Tensor) -> None:
        """``pred`` (B,H,W) class ids or (B,C,H,W) logits; ``mask`` (B,H,W) with 255 = void."""
        if pred.ndim == 4:
            pred = pred.argmax(1)
        self.metrics.update(pred, mask.long())

    def compute(self) -> dict[str, float | list[float | None]]:
        out = self.metrics.compute()
        iou = out["iou"].double().cpu()
        valid = ~torch.isnan(iou)
        return {
            "miou": float(iou[valid].mean()) if bool(valid.any()) else float("nan"),
            "per_class_iou": [None if math.isnan(v) else float(v) for v in iou.tolist()],
            "pixel_acc": float(out["pixel_acc"]),
        }

    def reset(self) -> None:
        self.metrics.reset()
