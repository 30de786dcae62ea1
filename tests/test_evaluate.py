"""The paper's evaluation protocol (FixScaleCrop) beside full-image evaluation."""

import numpy as np
import pytest
import torch

from seg.evaluate import FixScaleCropCollate, fix_scale_crop, pad_collate


def test_fix_scale_crop_geometry_by_hand() -> None:
    """A 40x30 (w x h) image at crop 15: short side 30 -> 15, width int(40*15/30) = 20, centre
    offset round(2.5) = 2 (Python rounds half to even), so columns 2..16 of the resized image."""
    mask = np.zeros((30, 40), np.uint8)
    mask[:, :4] = 1   # -> resized columns 0..1: cut off by the crop
    mask[:, 36:] = 2  # -> resized columns 18..19: cut off
    mask[:, 20:] = np.where(mask[:, 20:] == 2, 2, 3)
    image = np.zeros((30, 40, 3), np.uint8)
    img, lab = fix_scale_crop(image, mask, 15)
    assert img.shape == (15, 15, 3) and lab.shape == (15, 15)
    assert set(np.unique(lab)) == {0, 3}
    assert (lab[:, :8] == 0).all() and (lab[:, 8:] == 3).all()  # resized column 10 (the 20 px split) is crop column 8
    tall_img, tall = fix_scale_crop(np.zeros((50, 20, 3), np.uint8), np.zeros((50, 20), np.uint8), 10)
    assert tall.shape == (10, 10)


def test_fixscalecrop_collate_scores_only_the_centre_crop() -> None:
    items = [("a", np.zeros((30, 40, 3), np.uint8), None, np.ones((30, 40), np.uint8)),
             ("b", np.zeros((20, 20, 3), np.uint8), None, np.ones((20, 20), np.uint8))]
    images, masks = FixScaleCropCollate(16)(items)
    assert images.shape == (2, 3, 16, 16) and masks.shape == (2, 16, 16) and bool((masks == 1).all())
    full_images, full_masks = pad_collate(items)
    assert full_images.shape == (2, 3, 30, 40) and int((full_masks == 255).sum()) == 30 * 40 - 20 * 20
    torch.testing.assert_close(images[1], torch.nn.functional.interpolate(full_images[1:2, :, :20, :20], size=16,
                                                                          mode="bilinear", align_corners=False)[0],
                               atol=0.05, rtol=0)  # same picture, resampled (PIL vs torch bilinear)


def test_unknown_protocol_is_refused() -> None:
    from engine.errors import BadInputError
    from seg.evaluate import evaluate

    with pytest.raises(BadInputError, match="protocol 'centre'"):
        evaluate(torch.nn.Identity(), [1], 2, torch.device("cpu"), protocol="centre")
