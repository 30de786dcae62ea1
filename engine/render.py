"""Scribble map -> conditioning image: the ONE renderer used by training and sampling.

A ControlNet only ever sees what this function draws, so training and generation must
share it byte for byte. Colours follow the PASCAL VOC palette (class ``c`` gets VOC
colour ``c``) with two changes the conditioning needs: background strokes (class 0,
black in VOC) are drawn WHITE so that "this is background" is visible to the network,
and unlabelled pixels (255) are BLACK, i.e. "no information". No VOC colour is white
(channels never exceed 224) and only VOC class 0 is black, so the mapping stays
one-to-one over ids 0..254.
"""

from __future__ import annotations

import numpy as np

from engine.errors import BadInputError
from engine.shards import UNLABELLED

BACKGROUND_COLOUR = (255, 255, 255)
UNLABELLED_COLOUR = (0, 0, 0)
OVERLAY_ALPHA = 0.6  # scribble strokes drawn over a sample: the image stays visible beneath them


def voc_palette(n: int = 256) -> np.ndarray:
    """The standard PASCAL VOC bit-interleaved colour map, ``n x 3`` uint8."""
    ids = np.arange(n)
    pal = np.zeros((n, 3), dtype=np.int64)
    for bit in range(8):
        for ch in range(3):
            pal[:, ch] |= ((ids >> (3 * bit + ch)) & 1) << (7 - bit)
    return pal.astype(np.uint8)


def scribble_palette() -> np.ndarray:
    """256 x 3 palette used for conditioning: VOC colours, white background, black 255."""
    pal = voc_palette(256)
    pal[0] = BACKGROUND_COLOUR
    pal[UNLABELLED] = UNLABELLED_COLOUR
    return pal


PALETTE = scribble_palette()
PALETTE.setflags(write=False)


def render_scribble(scribble: np.ndarray) -> np.ndarray:
    """Colour-code a scribble map (``[...,] H x W`` uint8 class ids) to ``[...,] H x W x 3`` uint8.

    Works on a single map or a batch (any leading dims), since it is one table lookup.
    """
    scribble = np.asarray(scribble)
    if scribble.dtype != np.uint8 or scribble.ndim < 2:
        raise BadInputError(
            "scribble", f"expected an HxW uint8 class-id map, got shape {scribble.shape} {scribble.dtype}"
        )
    return PALETTE[scribble]


def overlay_scribble(image: np.ndarray, scribble: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """``image`` with the scribble's class colours (:func:`render_scribble`) blended in at its
    labelled pixels; unlabelled (255) pixels keep the image. How every picture of a sample in
    this project shows its labels (report grids, contact sheets)."""
    blend = np.rint(alpha * render_scribble(scribble) + (1.0 - alpha) * image)
    return np.where((scribble != UNLABELLED)[..., None], blend, image).astype(np.uint8)
