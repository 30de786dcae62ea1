"""Partial cross-entropy: the scribble-supervised loss, on labelled pixels only.

Scribbles label a few percent of the pixels; every other pixel is 255 and must carry no
gradient. ``F.cross_entropy(ignore_index=255)`` averages over the labelled pixels of the
whole batch. A batch without any labelled pixel (possible after a crop) gives 0 instead
of NaN, so one unlucky crop cannot poison the weights.

A dense-CRF regulariser on the unlabelled pixels (the paper's RLoss) is future work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.shards import UNLABELLED


def partial_cross_entropy(logits: torch.Tensor, scribble: torch.Tensor, ignore_index: int = UNLABELLED) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (B,C,H,W) over pixels where ``scribble`` (B,H,W) != ignore_index."""
    if not bool((scribble != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, scribble.long(), ignore_index=ignore_index)
