"""fit_to: the three resize modes against hand-computed geometry."""

import numpy as np
import pytest

from engine.data.geometry import fit_to
from engine.errors import BadInputError


def _striped(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """An image whose first and last columns are labelled 1 and 2 (border strokes); the rest 3."""
    img = np.full((h, w, 3), 100, np.uint8)
    lab = np.full((h, w), 3, np.uint8)
    lab[:, : w // 8] = 1
    lab[:, -(w // 8):] = 2
    return img, lab


def test_stretch_keeps_every_border_stroke_and_distorts_the_aspect() -> None:
    img, lab = _striped(30, 40)  # 4:3, as VOC
    i2, l2 = fit_to(img, lab, 16, "stretch")
    assert i2.shape == (16, 16, 3) and l2.shape == (16, 16)
    assert (l2[:, 0] == 1).all() and (l2[:, -1] == 2).all()
    assert (l2 == 1).sum() == 16 * 2  # the 5 of 40 columns, nearest-resampled to 2 of 16


def test_crop_keeps_the_aspect_and_loses_the_long_side_ends() -> None:
    img, lab = _striped(30, 40)
    i2, l2 = fit_to(img, lab, 15, "crop")
    assert i2.shape == (15, 15, 3)
    assert set(np.unique(l2)) == {3}  # the 20 px short side -> 15; the 20-px-wide centre survives, strokes cut off


def test_pad_keeps_everything_and_pads_with_unlabelled() -> None:
    img, lab = _striped(20, 40)
    i2, l2 = fit_to(img, lab, 20, "pad")
    assert i2.shape == (20, 20, 3)
    assert (l2[:5] == 255).all() and (l2[-5:] == 255).all() and (i2[:5] == 0).all()  # 10 rows of content, centred
    assert set(np.unique(l2[5:15])) == {1, 2, 3}


def test_square_input_at_size_is_returned_as_is_and_bad_mode_refused() -> None:
    img, lab = _striped(16, 16)
    for mode in ("stretch", "crop", "pad"):
        i2, l2 = fit_to(img, lab, 16, mode)
        assert i2 is img and l2 is lab
    with pytest.raises(BadInputError, match="resize='squash'"):
        fit_to(img, lab, 8, "squash")
