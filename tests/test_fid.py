"""Offline FID: deterministic random features, sensible ordering, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import BadInputError
from engine.fid import FIDConfig, FIDScorer, RandomFeatures, build_metric


def _images(n: int, seed: int, brightness: float = 1.0, size: int = 16) -> list[np.ndarray]:
    """Smooth random blobs: a stand-in image distribution (brightness shifts it)."""
    rng = np.random.default_rng(seed)
    base = rng.random((n, 4, 4, 3))
    up = base.repeat(size // 4, 1).repeat(size // 4, 2)
    return list(np.clip(up * 255 * brightness, 0, 255).astype(np.uint8))


def test_random_features_are_fixed_by_seed():
    x = torch.rand(3, 3, 16, 16)
    a, b, c = RandomFeatures(64, seed=0)(x), RandomFeatures(64, seed=0)(x), RandomFeatures(64, seed=1)(x)
    assert a.shape == (3, 64) and torch.equal(a, b) and not torch.equal(a, c)


def test_fid_orders_sets_by_distance_to_the_reference():
    scorer = FIDScorer(FIDConfig(batch_size=16), size=16)
    assert scorer.set_reference(_images(80, seed=0)) == 80
    same, n = scorer.score(_images(80, seed=1))  # same distribution, other samples
    darker, _ = scorer.score(_images(80, seed=2, brightness=0.6))
    darkest, _ = scorer.score(_images(80, seed=3, brightness=0.3))
    assert n == 80 and 0 <= same < darker < darkest
    again, _ = scorer.score(_images(80, seed=1))  # scoring resets only the synthetic statistics
    assert again == pytest.approx(same, rel=1e-6)


def test_images_are_fitted_to_one_size():
    scorer = FIDScorer(FIDConfig(), size=16)
    scorer.set_reference(_images(20, seed=0, size=32))  # real images larger than the synthetic ones
    value, n = scorer.score(_images(20, seed=1, size=16))
    assert n == 20 and np.isfinite(value)


def test_fid_errors():
    with pytest.raises(BadInputError, match="inception_weights"):
        FIDConfig(feature="inception").validate()
    with pytest.raises(BadInputError, match="not found"):
        build_metric(FIDConfig(feature="inception", inception_weights="/nonexistent/pt_inception.pth"))
    scorer = FIDScorer(FIDConfig(), size=16)
    with pytest.raises(BadInputError, match="at least 2"):
        scorer.set_reference(_images(1, seed=0))
