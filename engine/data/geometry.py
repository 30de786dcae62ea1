"""Fitting a sample to the model's square resolution, the same way everywhere.

The ControlNet trains and samples at one square size; real images are not square. How an
image becomes square decides what the label means, so the trainer, the generator, FID and
the judge all fit through :func:`fit_to` with one ``resize`` mode:

- ``stretch`` (the paper, ``cv2.resize`` to 512²): both sides to ``size``, aspect ratio
  lost, nothing cut off;
- ``crop``: short side to ``size``, centre crop; keeps the aspect, loses the long side's
  ends (about 25 % of a 4:3 VOC image, border strokes included);
- ``pad``: long side to ``size``, the rest padded (image black, labels unlabelled 255).

Images resample bicubically, class maps with nearest neighbour so class ids stay exact.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from engine.errors import BadInputError
from engine.render import render_scribble
from engine.shards import UNLABELLED, Sample

RESIZE_MODES = ("stretch", "crop", "pad")
DEFAULT_RESIZE = "stretch"  # the paper's


def check_resize(mode: str, where: str) -> None:
    """Refuse an unknown resize mode, naming the config field."""
    if mode not in RESIZE_MODES:
        raise BadInputError(f"{where}={mode!r}", f"must be one of {RESIZE_MODES}")


def fit_to(image: np.ndarray, label: np.ndarray, size: int, mode: str = DEFAULT_RESIZE) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (HxWx3 uint8) and its class map ``label`` (HxW) at ``size`` x ``size``."""
    check_resize(mode, "resize")
    h, w = label.shape
    if (h, w) == (size, size):
        return image, label
    if mode == "stretch":
        nh, nw = size, size
    else:
        scale = size / (min(h, w) if mode == "crop" else max(h, w))
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if mode == "crop":
            nh, nw = max(size, nh), max(size, nw)
    img = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
    lab = np.asarray(Image.fromarray(label).resize((nw, nh), Image.NEAREST))
    if mode == "pad":
        out_img = np.zeros((size, size, 3), np.uint8)
        out_lab = np.full((size, size), UNLABELLED, np.uint8)
        top, left = (size - nh) // 2, (size - nw) // 2
        out_img[top:top + nh, left:left + nw] = img
        out_lab[top:top + nh, left:left + nw] = lab
        return out_img, out_lab
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[top:top + size, left:left + size], lab[top:top + size, left:left + size]


def fit_sample(sample: Sample, size: int, resize: str = DEFAULT_RESIZE) -> Sample:
    """``sample`` at ``size`` x ``size`` (image, scribble and mask alike), as the generator fits its sources."""
    image, scribble = fit_to(sample.image, sample.scribble, size, resize)
    mask = None if sample.mask is None else fit_to(sample.image, sample.mask, size, resize)[1]
    return Sample(sample.key, image, scribble, mask, sample.meta)


def fit_colour_hint(scribble: np.ndarray, size: int, mode: str = DEFAULT_RESIZE) -> np.ndarray:
    """The colour hint of ``scribble`` at ``size`` x ``size`` as the paper makes it
    (``data.py:187``: the colour-coded scribble resized with ``cv2.INTER_CUBIC``): rendered at
    the source's own size, then fitted like the image, bicubically (PIL's kernel, a = -0.5,
    where OpenCV's is a = -0.75), so stroke edges blend into their neighbours' colours. What
    the ControlNet sees with ``hint_resize: cubic``; ``nearest`` renders the fitted scribble."""
    return fit_to(render_scribble(scribble), scribble, size, mode)[0]
