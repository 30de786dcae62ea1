"""Training losses: partial cross-entropy on scribbles, optionally + the RLoss DenseCRF term.

Scribbles label a few percent of the pixels; every other pixel is 255 and carries no
cross-entropy gradient. ``F.cross_entropy(ignore_index=255)`` averages over the labelled
pixels of the whole batch. A batch without any labelled pixel (possible after a crop)
gives 0 instead of NaN, so one unlucky crop cannot poison the weights.

``loss.name: rloss`` adds the DenseCRF regulariser on all pixels (``seg.rloss``), the loss
behind the paper's strongest numbers; its defaults are the paper's VOC settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.errors import BadInputError
from engine.shards import UNLABELLED
from seg.rloss import dense_crf_loss


@dataclass
class LossConfig:
    """``pce`` (partial CE) or ``rloss`` (partial CE + weight · DenseCRF loss, Tang et al. 2018).

    The DenseCRF defaults are the paper's (``train_withdensecrfloss.py``): weight 2e-9,
    σ_rgb 15, σ_xy 100 at 513-px crops, computed at scale 0.5. The term grows with the
    pixel count times σ_xy², so another resolution needs its own weight.
    """

    name: str = "pce"
    # The paper's CE (rloss utils/loss.py, batch_average=True) is the labelled-pixel mean
    # divided again by the batch size: at batch 12 its step is 12x smaller
    # than a plain mean's. true reproduces it (the VOC config); false is the plain mean.
    batch_average: bool = False
    crf_weight: float = 2e-9
    sigma_rgb: float = 15.0
    sigma_xy: float = 100.0
    scale: float = 0.5

    def validate(self) -> None:
        if self.name not in ("pce", "rloss"):
            raise BadInputError(f"loss.name={self.name!r}", "choose 'pce' or 'rloss'")
        if self.crf_weight < 0 or self.sigma_rgb <= 0 or self.sigma_xy <= 0 or not 0 < self.scale <= 1:
            raise BadInputError("loss.crf_weight / sigma_rgb / sigma_xy / scale",
                                "need crf_weight >= 0, sigmas > 0 and 0 < scale <= 1")


def partial_cross_entropy(logits: torch.Tensor, scribble: torch.Tensor, ignore_index: int = UNLABELLED) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (B,C,H,W) over pixels where ``scribble`` (B,H,W) != ignore_index."""
    if not bool((scribble != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, scribble.long(), ignore_index=ignore_index)


def training_loss(
    cfg: LossConfig, logits: torch.Tensor, scribble: torch.Tensor, rgb: torch.Tensor, roi: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss to minimise and its parts for the log. ``rgb`` is the 0-255 image and
    ``roi`` the crop's valid pixels (both only read by ``rloss``)."""
    pce = partial_cross_entropy(logits, scribble)
    if cfg.batch_average:
        pce = pce / logits.shape[0]
    if cfg.name == "pce":
        return pce, {}
    crf = dense_crf_loss(logits.softmax(1), rgb, roi, cfg.crf_weight, cfg.sigma_rgb, cfg.sigma_xy, cfg.scale)
    return pce + crf, {"pce": pce.item(), "crf": crf.item()}
