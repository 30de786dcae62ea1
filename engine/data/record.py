"""What a data source yields, and the checks every record passes before ingest.

Readers (VOC, folder, procedural) return :class:`SourceRecord` objects whose loading is
lazy, so one unreadable file fails (or is skipped) on its own without stopping a scan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from engine.errors import BadInputError
from engine.shards import UNLABELLED, Sample, check_key


@dataclass
class SourceRecord:
    """One real sample before decoding: an id, its split and a loader.

    ``load`` returns ``(image HxWx3 uint8, scribble HxW uint8, mask HxW uint8 | None)``
    and raises :class:`BadInputError` naming the file when something is wrong.
    """

    source_id: str
    split: str
    load: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray | None]]


def validate_arrays(
    where: str, image: np.ndarray, scribble: np.ndarray, mask: np.ndarray | None, num_classes: int
) -> None:
    """Shape/range checks shared by all readers; raise naming ``where``."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise BadInputError(where, f"image must be HxWx3 uint8, got shape {image.shape} {image.dtype}")
    if scribble.shape != image.shape[:2]:
        raise BadInputError(
            where,
            f"scribble is {scribble.shape[1]}x{scribble.shape[0]} but image is {image.shape[1]}x{image.shape[0]}",
            "scribble and image must have the same size",
        )
    for name, arr in (("scribble", scribble), ("mask", mask)):
        if arr is None:
            continue
        if arr.shape != image.shape[:2]:
            raise BadInputError(where, f"{name} size {arr.shape[::-1]} differs from image {image.shape[1::-1]}")
        bad = np.unique(arr[(arr >= num_classes) & (arr != UNLABELLED)])
        if bad.size:
            raise BadInputError(
                where, f"{name} has class id(s) {bad.tolist()} out of range 0..{num_classes - 1} (255 = unlabelled)"
            )
    if not (scribble != UNLABELLED).any():
        raise BadInputError(where, "scribble is empty (no labelled pixel)")


def to_sample(record: SourceRecord, num_classes: int) -> Sample:
    """Load and validate a record; the result is a real (λ = 0) sample."""
    check_key(record.source_id)
    image, scribble, mask = record.load()
    validate_arrays(record.source_id, image, scribble, mask, num_classes)
    classes = sorted(int(c) for c in np.unique(scribble) if c != UNLABELLED)
    meta = {"source_id": record.source_id, "split": record.split, "w": 0.0, "lambda": 0.0, "seed": 0,
            "classes": classes, "model": "", "steps": 0}
    return Sample(key=record.source_id, image=image, scribble=scribble, mask=mask, meta=meta)
