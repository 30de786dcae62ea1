"""The built-in procedural dataset and the scribble synthesiser."""

import numpy as np
import pytest

from engine.data.procedural import CLASS_NAMES, make_scene, procedural_records
from engine.data.scribbles import scribble_from_mask, stroke_width
from engine.shards import UNLABELLED


def test_same_seed_and_index_give_identical_arrays_regardless_of_order():
    a = make_scene(7, seed=3)
    for i in (0, 1, 2):  # generating other samples in between changes nothing
        make_scene(i, seed=3)
    b = make_scene(7, seed=3)
    for x, y in ((a.image, b.image), (a.mask, b.mask), (a.scribble, b.scribble)):
        np.testing.assert_array_equal(x, y)
    # Records load the same sample whether listed among 5 or 50.
    small, big = procedural_records(5, 0, seed=3), procedural_records(50, 0, seed=3)
    for x, y in zip(small[4].load(), big[4].load()):
        np.testing.assert_array_equal(x, y)


def test_different_index_seed_or_split_gives_different_scenes():
    base = make_scene(0, seed=0).image
    assert not np.array_equal(base, make_scene(1, seed=0).image)
    assert not np.array_equal(base, make_scene(0, seed=1).image)
    assert not np.array_equal(base, make_scene(0, seed=0, split="val").image)


@pytest.fixture(scope="module")
def scenes():
    return [make_scene(i, seed=0) for i in range(50)]


def test_all_classes_appear_over_50_scenes(scenes):
    in_masks = set().union(*(np.unique(s.mask).tolist() for s in scenes))
    in_scribbles = set().union(*(np.unique(s.scribble).tolist() for s in scenes)) - {UNLABELLED}
    assert len(CLASS_NAMES) >= 6 and CLASS_NAMES[0] == "background"
    assert in_masks == set(range(len(CLASS_NAMES)))
    assert in_scribbles == set(range(len(CLASS_NAMES)))


def test_scenes_have_1_to_2_objects_and_are_uint8(scenes):
    for s in scenes:
        assert s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8
        assert s.mask.shape == s.scribble.shape == (32, 32)
        assert 2 <= len(np.unique(s.mask)) <= 3  # background + 1-2 object classes


def test_appearance_is_smooth_no_pixel_scale_texture(scenes):
    # Inside an object, away from its edges, neighbouring pixels differ by a few grey
    # levels at most (gradient fills): no noise, stripes, checker or dots for a tiny
    # generator to spend itself on.
    from scipy import ndimage

    steps = []
    for s in scenes:
        inner = np.zeros_like(s.mask, bool)  # object interiors, away from every edge
        for c in np.unique(s.mask):
            inner |= ndimage.binary_erosion(s.mask == c, iterations=2) & (c > 0)
        img = s.image.astype(int)
        dx = np.abs(np.diff(img, axis=1)).max(-1)[inner[:, 1:] & inner[:, :-1]]
        steps.append(dx)
    steps = np.concatenate(steps)
    assert np.percentile(steps, 99) <= 12, np.percentile(steps, 99)


def test_corpus_split_is_a_disjoint_stream():
    a, b = make_scene(0, split="corpus"), make_scene(0, split="train")
    assert not np.array_equal(a.image, b.image)


def test_scribble_fraction_agreement_and_background_stroke(scenes):
    fractions = np.array([(s.scribble != UNLABELLED).mean() for s in scenes])
    assert 0.01 <= fractions.min() and fractions.max() <= 0.06, (fractions.min(), fractions.max())
    assert 0.02 <= fractions.mean() <= 0.045
    labelled = np.concatenate([s.scribble[s.scribble != UNLABELLED] for s in scenes])
    truth = np.concatenate([s.mask[s.scribble != UNLABELLED] for s in scenes])
    assert (labelled == truth).mean() >= 0.99
    assert sum((s.scribble == 0).any() for s in scenes) >= 0.9 * len(scenes), "scenes need a background stroke"
    # Every visible object class of a scene is scribbled (regions of >= a few px).
    covered = np.mean([set(np.unique(s.mask)) <= set(np.unique(s.scribble)) for s in scenes])
    assert covered >= 0.9


def test_colour_alone_does_not_identify_the_class(scenes):
    # Mean hue-ish colour per object overlaps across classes: nearest-class-mean on pixel
    # colour must be far from perfect, otherwise shape would not matter.
    pix = {c: np.concatenate([s.image[s.mask == c] for s in scenes]).astype(float) for c in range(1, len(CLASS_NAMES))}
    means = np.stack([pix[c].mean(0) for c in pix])
    correct = total = 0
    for i, c in enumerate(pix):
        pred = np.argmin(((pix[c][:, None, :] - means[None]) ** 2).sum(-1), 1)
        correct += (pred == i).sum()
        total += len(pred)
    assert correct / total < 0.6


@pytest.mark.parametrize("size", [32, 128, 512])
def test_other_sizes(size):
    s = make_scene(3, seed=0, size=size)
    assert s.image.shape == (size, size, 3)
    frac = (s.scribble != UNLABELLED).mean()
    assert 0.005 <= frac <= 0.08
    lab = s.scribble != UNLABELLED
    assert (s.scribble[lab] == s.mask[lab]).mean() >= 0.99


def test_stroke_width_scales_with_size():
    assert stroke_width(512, 512) == 3 and stroke_width(64, 64) == 2 and stroke_width(32, 32) == 1
    assert stroke_width(1024, 768) == 4


def test_small_region_gets_a_centre_stroke_and_void_is_ignored():
    mask = np.zeros((64, 64), np.uint8)
    mask[30:33, 40:43] = 2  # 3x3: vanishes under erosion
    mask[10:40, 5:30] = 1
    mask[9, 5:30] = 255  # void boundary
    s = scribble_from_mask(mask, np.random.default_rng(0))
    assert (s == 2).any() and (s == 1).any() and (s == 0).any()
    assert not (s[mask == 255] != UNLABELLED).any()
    lab = s != UNLABELLED
    assert (s[lab] == mask[lab]).all()
    np.testing.assert_array_equal(s, scribble_from_mask(mask, np.random.default_rng(0)))
