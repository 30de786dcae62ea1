"""The conditioning renderer: fixed VOC-style colours, white background strokes, black unlabelled."""

import numpy as np
import pytest

from engine.errors import BadInputError
from engine.render import PALETTE, render_scribble, voc_palette


def test_voc_palette_matches_reference_entries():
    pal = voc_palette()
    # Known PASCAL VOC colours: aeroplane, bicycle, bird, person (15), tvmonitor (20), void (255).
    assert pal[1].tolist() == [128, 0, 0]
    assert pal[2].tolist() == [0, 128, 0]
    assert pal[3].tolist() == [128, 128, 0]
    assert pal[15].tolist() == [192, 128, 128]
    assert pal[20].tolist() == [0, 64, 128]
    assert pal[255].tolist() == [224, 224, 192]


def test_background_white_unlabelled_black_and_one_colour_per_class():
    assert PALETTE[0].tolist() == [255, 255, 255]
    assert PALETTE[255].tolist() == [0, 0, 0]
    assert len({tuple(c) for c in PALETTE}) == 256  # one-to-one over all ids


def test_render_single_and_batch():
    scr = np.full((4, 5), 255, np.uint8)
    scr[0, :] = 0
    scr[2, 1:3] = 7
    rgb = render_scribble(scr)
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    assert (rgb[0] == 255).all()
    assert (rgb[1] == 0).all()
    assert rgb[2, 1].tolist() == voc_palette()[7].tolist()
    batch = render_scribble(np.stack([scr, scr]))
    assert batch.shape == (2, 4, 5, 3) and (batch[1] == rgb).all()


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.int32), np.zeros(4, np.uint8)])
def test_bad_scribble_raises(bad):
    with pytest.raises(BadInputError, match="scribble"):
        render_scribble(bad)
