"""DenseCRF loss: the regulariser of RLoss (Tang et al., ECCV 2018), the paper's strongest seg.

Scribbles label a few percent of the pixels; partial cross-entropy says nothing about the
rest. The DenseCRF loss does: for the softmax ``S`` (K classes over N pixels) and the
bilateral affinity ``W_ij = exp(-|p_i - p_j|² / 2σ_xy² - |I_i - I_j|² / 2σ_rgb²)``
it adds ``-weight · Σ_k S_kᵀ W S_k / B``, which is small when pixels that are close and
alike in colour share a class. As in the paper's code (``DenseCRFLoss.py``):

- the image is in 0-255 RGB, the segmentation is the softmax, both downscaled by
  ``scale`` (image nearest, softmax bilinear) with σ_xy scaled alike;
- ``roi`` (the crop's valid pixels) masks the softmax, so padding neither pulls nor is pulled;
- the gradient reaches the softmax only (``-2 W S``); the image is a constant.

The paper filters with a permutohedral lattice (an approximation, C++). Here ``W S`` is
computed exactly, in row blocks of the N×N kernel so memory stays bounded (``max_entries``
kernel values at once) and the backward pass keeps only ``W S`` (K×N), never ``W``.
The cost is O(N²) per image: 1024² at the tiny default's 32 px, 257² = 66k² at VOC's 513 px
with scale 0.5 (a GPU job).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bilateral_features(image: torch.Tensor, sigma_rgb: float, sigma_xy: float) -> torch.Tensor:
    """(B,3,H,W) 0-255 image -> (B,N,5) features whose squared distance is the kernel's exponent × 2."""
    b, _, h, w = image.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=image.dtype, device=image.device),
                            torch.arange(w, dtype=image.dtype, device=image.device), indexing="ij")
    pos = torch.stack([ys, xs]).div(sigma_xy).expand(b, 2, h, w)
    return torch.cat([pos, image / sigma_rgb], dim=1).flatten(2).transpose(1, 2).contiguous()


@torch.no_grad()
def bilateral_filter(feats: torch.Tensor, seg: torch.Tensor, max_entries: int = 1 << 25) -> torch.Tensor:
    """``W S`` for features (B,N,D) and a segmentation (B,N,K): exact, in row blocks of W."""
    b, n, _ = feats.shape
    rows = max(1, min(n, max_entries // n))
    out = torch.empty_like(seg)
    for i in range(b):
        for start in range(0, n, rows):
            d2 = torch.cdist(feats[i, start : start + rows], feats[i]).square_()
            out[i, start : start + rows] = torch.exp_(d2.mul_(-0.5)) @ seg[i]
    return out


class _DenseCRFEnergy(torch.autograd.Function):
    """``-Σ S·(W S)`` with the analytic gradient ``-2 W S`` (W is symmetric)."""

    @staticmethod
    def forward(ctx, seg: torch.Tensor, feats: torch.Tensor, max_entries: int) -> torch.Tensor:  # type: ignore[override]
        ws = bilateral_filter(feats, seg, max_entries)
        ctx.save_for_backward(ws)
        return -(seg * ws).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (ws,) = ctx.saved_tensors
        return -2.0 * grad * ws, None, None


def dense_crf_loss(
    probs: torch.Tensor,
    image: torch.Tensor,
    roi: torch.Tensor,
    weight: float,
    sigma_rgb: float,
    sigma_xy: float,
    scale: float = 1.0,
    max_entries: int = 1 << 25,
) -> torch.Tensor:
    """The RLoss DenseCRF term for a softmax ``probs`` (B,K,H,W), a 0-255 ``image`` (B,3,H,W)
    and a ``roi`` (B,H,W) of valid pixels; averaged over the batch as the paper does."""
    image, roi = image.detach().to(probs.dtype), roi.to(probs.dtype)
    if scale != 1.0:
        image = F.interpolate(image, scale_factor=scale)
        probs = F.interpolate(probs, scale_factor=scale, mode="bilinear", align_corners=False)
        roi = F.interpolate(roi[:, None], scale_factor=scale)[:, 0]
    seg = (probs * roi[:, None]).flatten(2).transpose(1, 2)
    feats = bilateral_features(image, sigma_rgb, sigma_xy * scale)
    return weight * _DenseCRFEnergy.apply(seg, feats, max_entries) / probs.shape[0]
