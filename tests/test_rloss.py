"""The DenseCRF loss against a brute-force dense computation written from the paper's formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from seg.rloss import dense_crf_loss


def brute_force(probs: np.ndarray, image: np.ndarray, roi: np.ndarray, weight: float, s_rgb: float, s_xy: float) -> float:
    """-weight/B Σ_b Σ_k Σ_ij W_ij S_ik S_jk with W from explicit double loops over pixel pairs."""
    b, k, h, w = probs.shape
    total = 0.0
    for n in range(b):
        pix = [(y, x) for y in range(h) for x in range(w)]
        for (y1, x1) in pix:
            for (y2, x2) in pix:
                rgb = float(((image[n, :, y1, x1] - image[n, :, y2, x2]) ** 2).sum())
                kern = math.exp(-((y1 - y2) ** 2 + (x1 - x2) ** 2) / (2 * s_xy**2) - rgb / (2 * s_rgb**2))
                s1 = probs[n, :, y1, x1] * roi[n, y1, x1]
                s2 = probs[n, :, y2, x2] * roi[n, y2, x2]
                total += kern * float((s1 * s2).sum())
    return -weight * total / b


@pytest.fixture
def tiny() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    image = torch.randint(0, 256, (2, 3, 5, 4), generator=g).double()
    roi = torch.ones(2, 5, 4, dtype=torch.float64)
    roi[1, :, 3:] = 0  # a padded column, as after a crop beyond the image
    return logits, image, roi


def test_value_matches_brute_force(tiny) -> None:
    logits, image, roi = tiny
    probs = logits.softmax(1)
    got = dense_crf_loss(probs, image, roi, weight=0.5, sigma_rgb=40.0, sigma_xy=2.0).item()
    want = brute_force(probs.numpy(), image.numpy(), roi.numpy(), 0.5, 40.0, 2.0)
    assert got == pytest.approx(want, rel=1e-9)


def test_row_blocks_do_not_change_the_value(tiny) -> None:
    logits, image, roi = tiny
    probs = logits.softmax(1)
    whole = dense_crf_loss(probs, image, roi, 1.0, 15.0, 3.0)
    blocks = dense_crf_loss(probs, image, roi, 1.0, 15.0, 3.0, max_entries=20 * 3)  # 3 rows at a time
    assert blocks.item() == pytest.approx(whole.item(), rel=1e-12)


def test_gradient_matches_autograd_of_the_dense_formula(tiny) -> None:
    """The analytic -2WS backward equals autograd through an explicit N×N kernel."""
    logits, image, roi = tiny
    b, k, h, w = logits.shape
    lg = logits.clone().requires_grad_(True)
    dense_crf_loss(lg.softmax(1), image, roi, 0.7, 20.0, 1.5).backward()

    ref = logits.clone().requires_grad_(True)
    feats = []
    ys, xs = np.mgrid[0:h, 0:w]
    for n in range(b):
        f = np.concatenate([ys.reshape(1, -1) / 1.5, xs.reshape(1, -1) / 1.5, image[n].reshape(3, -1).numpy() / 20.0])
        d2 = ((f[:, :, None] - f[:, None, :]) ** 2).sum(0)
        feats.append(torch.from_numpy(np.exp(-0.5 * d2)))
    s = (ref.softmax(1) * roi[:, None]).reshape(b, k, -1)
    energy = sum(-(s[n] @ feats[n] * s[n]).sum() for n in range(b))
    (0.7 * energy / b).backward()
    torch.testing.assert_close(lg.grad, ref.grad, rtol=1e-9, atol=1e-12)


def test_gradient_reaches_only_the_softmax_and_not_padding(tiny) -> None:
    logits, image, roi = tiny
    lg = logits.clone().requires_grad_(True)
    img = image.clone().requires_grad_(True)
    dense_crf_loss(lg.softmax(1), img, roi, 1.0, 15.0, 2.0).backward()
    assert img.grad is None
    assert torch.all(lg.grad[1, :, :, 3:] == 0)  # masked pixels get nothing
    assert lg.grad[0].abs().sum() > 0


def test_smooth_segmentation_of_a_flat_region_has_lower_energy() -> None:
    """The regulariser prefers one label over a uniform-coloured region to a split one."""
    image = torch.full((1, 3, 6, 6), 128.0)
    roi = torch.ones(1, 6, 6)
    one = torch.zeros(1, 2, 6, 6)
    one[:, 0] = 1
    split = one.clone()
    split[:, :, :, 3:] = split[:, :, :, 3:].flip(1)
    assert dense_crf_loss(one, image, roi, 1.0, 15.0, 3.0) < dense_crf_loss(split, image, roi, 1.0, 15.0, 3.0)


def test_scale_downsamples_as_the_paper_does() -> None:
    """scale 0.5 equals the full-scale loss of the (nearest / bilinear) downscaled inputs with σ_xy halved."""
    g = torch.Generator().manual_seed(1)
    probs = torch.randn(1, 2, 8, 8, generator=g, dtype=torch.float64).softmax(1)
    image = torch.randint(0, 256, (1, 3, 8, 8), generator=g).double()
    roi = torch.ones(1, 8, 8, dtype=torch.float64)
    got = dense_crf_loss(probs, image, roi, 1.0, 15.0, 4.0, scale=0.5).item()
    small_img = image[:, :, ::2, ::2]
    small_probs = torch.nn.functional.interpolate(probs, scale_factor=0.5, mode="bilinear", align_corners=False)
    want = brute_force(small_probs.numpy(), small_img.numpy(), np.ones((1, 4, 4)), 1.0, 15.0, 2.0)
    assert got == pytest.approx(want, rel=1e-9)


def test_training_loss_composes_pce_batch_average_and_crf(tiny) -> None:
    from seg.loss import LossConfig, partial_cross_entropy, training_loss

    logits, image, roi = tiny
    scribble = torch.full((2, 5, 4), 255)
    scribble[:, 0, 0], scribble[:, 4, 3] = 1, 2
    pce = partial_cross_entropy(logits, scribble)
    plain, parts = training_loss(LossConfig(name="pce"), logits, scribble, image, roi)
    assert plain.item() == pytest.approx(pce.item()) and parts == {}
    paper, _ = training_loss(LossConfig(name="pce", batch_average=True), logits, scribble, image, roi)
    assert paper.item() == pytest.approx(pce.item() / 2)  # the paper's CE: divided by the batch size again
    cfg = LossConfig(name="rloss", crf_weight=0.3, sigma_rgb=20.0, sigma_xy=2.0, scale=1.0)
    total, parts = training_loss(cfg, logits, scribble, image, roi)
    crf = brute_force(logits.softmax(1).numpy(), image.numpy(), roi.numpy(), 0.3, 20.0, 2.0)
    assert parts["crf"] == pytest.approx(crf, rel=1e-6) and total.item() == pytest.approx(pce.item() + crf, rel=1e-6)
