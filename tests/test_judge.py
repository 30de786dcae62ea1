"""The judge (seg.judge): agreement numbers against a brute-force reference, pairing, determinism, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import BadInputError
from engine.shards import UNLABELLED
from engine.data.geometry import fit_sample
from seg.judge import (
    Agreement, JudgeConfig, derangement, judge_on_real, manifest_samples, predict, score, train_judge,
)
from seg_fixtures import CLASS_NAMES, make_real, make_scene

K = len(CLASS_NAMES)


def brute_force(pred: np.ndarray, target: np.ndarray, k: int) -> tuple[float, float, float]:
    """(mIoU, pixel accuracy, foreground IoU) from a numpy confusion matrix, 255 ignored."""
    valid = target != UNLABELLED
    conf = np.zeros((k, k), np.int64)
    np.add.at(conf, (target[valid], pred[valid]), 1)
    inter, union = np.diag(conf), conf.sum(0) + conf.sum(1) - np.diag(conf)
    miou = float(np.mean(inter[union > 0] / union[union > 0]))
    fg_p, fg_t = (pred > 0) & valid, (target > 0) & valid
    return miou, float(inter.sum() / valid.sum()), float((fg_p & fg_t).sum() / (fg_p | fg_t).sum())


def test_agreement_by_hand():
    pred = np.array([[[0, 1], [1, 1]]], np.uint8)
    own = np.array([[[0, 1], [0, UNLABELLED]]], np.uint8)
    acc = Agreement(K)
    acc.update(pred, own, np.zeros_like(own))
    out = acc.compute()
    # class 0: 1 of {(0,0),(1,0)}; class 1: 1 of {(0,1),(1,0)}; (1,1) is void
    assert out["judge_miou"] == pytest.approx(0.5) and out["pixel_acc"] == pytest.approx(2 / 3)
    assert out["fg_iou"] == pytest.approx(0.5) and out["samples"] == 1
    # all-background mismatched mask: class 0 IoU 1/4, class 1 IoU 0 (predicted, never true)
    assert out["judge_miou_mismatched"] == pytest.approx(0.125) and out["fg_iou_mismatched"] == 0.0
    assert out["judge_margin"] == pytest.approx(0.375)


def test_agreement_matches_brute_force_over_batches():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, K, (6, 8, 8)).astype(np.uint8)
    own = np.where(rng.random((6, 8, 8)) < 0.2, UNLABELLED, rng.integers(0, K - 1, (6, 8, 8))).astype(np.uint8)
    mis = own[derangement(6)]
    acc = Agreement(K)
    for i in (0, 2, 5):  # uneven batches accumulate to the whole-set numbers
        j = {0: 2, 2: 5, 5: 6}[i]
        acc.update(pred[i:j], own[i:j], mis[i:j])
    out = acc.compute()
    for suffix, target in (("", own), ("_mismatched", mis)):
        miou, pix, fg = brute_force(pred, target, K)
        assert out[f"judge_miou{suffix}"] == pytest.approx(miou)
        assert out[f"pixel_acc{suffix}"] == pytest.approx(pix)
        assert out[f"fg_iou{suffix}"] == pytest.approx(fg)
    assert out["samples"] == 6


@pytest.mark.parametrize("n", range(2, 30))
def test_derangement_has_no_fixed_point(n):
    d = derangement(n)
    assert sorted(d) == list(range(n)) and not np.any(d == np.arange(n))


@pytest.mark.parametrize("n", [0, 1])
def test_derangement_needs_two(n):
    with pytest.raises(BadInputError, match=">= 2"):
        derangement(n)


def _arrays(n: int, split: str, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    scenes = [make_scene(i, split, size) for i in range(n)]
    return np.stack([s.image for s in scenes]), np.stack([s.mask for s in scenes])


def test_training_is_deterministic_and_leaves_global_rng_alone():
    images, masks = _arrays(8, "train")
    cfg = JudgeConfig(steps=2, batch_size=4)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = train_judge(images, masks, K, cfg)
    assert torch.equal(torch.rand(3), before)
    b = train_judge(images, masks, K, cfg)
    c = train_judge(images, masks, K, JudgeConfig(steps=2, batch_size=4, seed=1))
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(x, y), name
    assert any(not torch.equal(x, z) for x, z in zip(a.state_dict().values(), c.state_dict().values()))
    assert predict(a, images).shape == masks.shape


def test_judge_learns_own_above_mismatched():
    """Scenes whose square's colour names its class: after a few steps own must beat mismatched clearly."""
    images, masks = _arrays(32, "train")
    net = train_judge(images, masks, K, JudgeConfig(steps=40, batch_size=16, lr=1e-2))
    out = score(net, *_arrays(12, "val"), K)
    assert out["judge_margin"] > 0.2 and out["fg_iou"] > out["fg_iou_mismatched"] + 0.2, out


def test_holdout_ceiling():
    images, masks = _arrays(10, "val")
    _, ceiling = judge_on_real(images, masks, K, JudgeConfig(steps=1, batch_size=2))
    assert ceiling["samples"] == 2  # last 20 % of 10
    _, none = judge_on_real(images[:5], masks[:5], K, JudgeConfig(steps=1, batch_size=2))  # 1 image: no pairing
    assert none is None


def test_manifest_samples_and_fitting(tmp_path):
    manifest = make_real(tmp_path, n_train=6, n_val=3, per_shard=4, size=24)
    val = [fit_sample(s, 12) for s in manifest_samples(manifest, lambda r: r["split"] == "val")]
    assert sorted(s.key for s in val) == ["val0000", "val0001", "val0002"]
    assert all(s.image.shape == (12, 12, 3) and s.mask.shape == s.scribble.shape == (12, 12) for s in val)
    assert set(np.unique(val[0].mask)) <= set(np.unique(make_scene(0, "val", 24).mask))  # nearest: no new labels
    picked = list(manifest_samples(manifest, lambda r: r["source_id"] in {"train0001", "broken0001"}, with_mask=False))
    assert [s.key for s in picked] == ["train0001"] and picked[0].mask is None  # skipped rows never come back
