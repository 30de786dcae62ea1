"""Image files and image bytes: every read and write of pixels goes through here.

Readers of real data (VOC, folder) read files with :func:`read_rgb` / :func:`read_labels`,
which turn every PIL error into a :class:`BadInputError` naming the file and read label
PNGs as class indices (palette mode), never as colours. Shards encode and decode their
members with :func:`encode_image` / :func:`encode_png` / :func:`decode_image`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from engine.errors import BadInputError


def read_rgb(path: Path) -> np.ndarray:
    """HxWx3 uint8 image; missing, unreadable or truncated files raise naming the file."""
    if not path.is_file():
        raise BadInputError(str(path), "image file is missing")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB")).copy()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadInputError(str(path), f"cannot read image: {exc}", "the file is corrupt or truncated") from None


def read_labels(path: Path) -> np.ndarray:
    """HxW uint8 class-id map from a palette (mode P) or grey (mode L) PNG.

    Palette PNGs (VOC, ScribbleSup) store the class id as the palette index; converting
    them to RGB would turn ids into colours, so the indices are read directly.
    """
    if not path.is_file():
        raise BadInputError(str(path), "label PNG is missing")
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise BadInputError(
                    str(path), f"label PNG has mode {img.mode}", "expected one channel: palette (P) or grey (L) class ids"
                )
            return np.asarray(img).astype(np.uint8, copy=True)
    except (OSError, ValueError) as exc:
        if isinstance(exc, BadInputError):
            raise
        raise BadInputError(str(path), f"cannot read label PNG: {exc}", "the file is corrupt or truncated") from None


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_palette_png(labels: np.ndarray, palette: np.ndarray) -> bytes:
    """A class-id map as a palette PNG (mode P): the id is the palette index, as VOC and
    ScribbleSup label files are stored, so viewers show colours and :func:`read_labels` reads ids."""
    if labels.dtype != np.uint8 or labels.ndim != 2:
        raise BadInputError("label map", f"expected an HxW uint8 class-id map, got {labels.shape} {labels.dtype}")
    img = Image.frombytes("P", (labels.shape[1], labels.shape[0]), np.ascontiguousarray(labels).tobytes())
    img.putpalette(palette.astype(np.uint8).tobytes())
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_image(array: np.ndarray, fmt: str) -> bytes:
    """Encode an RGB uint8 array as ``png`` (lossless) or ``jpg`` (quality 95)."""
    if fmt == "png":
        return encode_png(array)
    if fmt == "jpg":
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="JPEG", quality=95)
        return buf.getvalue()
    raise BadInputError(f"image format {fmt!r}", "must be 'png' or 'jpg'")


def decode_image(data: bytes, mode: str) -> np.ndarray:
    """PNG or JPEG bytes -> array in PIL ``mode`` (``RGB`` images, ``L`` class-id maps)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert(mode) if img.mode != mode else img).copy()
