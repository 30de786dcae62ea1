"""Plain-folder reader for your own scribble-labelled images.

Expected layout under ``root``::

    images/<stem>.jpg|.jpeg|.png      RGB images
    scribbles/<stem>.png              one channel (palette or grey): class id per pixel, 255 = unlabelled
    masks/<stem>.png                  optional full masks (evaluation only), same encoding
    classes.txt                       optional: one class name per line, line index = id (0 = background)
    val.txt                           optional: stems that form the val split
    test.txt                          optional: stems that form the held-out test split

Without ``val.txt`` a seeded ``val_fraction`` of the images goes to val (never one that
``test.txt`` names: a test scene stays out of train and val). Without
``classes.txt`` the class count is the largest id found in the scribbles and masks plus
one, named ``class_<id>`` (``background`` for 0). Stems become sample keys, so characters
other than letters, digits, ``_`` and ``-`` are replaced by ``_``.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import numpy as np

from engine.data.imageio import read_labels, read_rgb
from engine.data.sources import FolderSource, TaggedRecord
from engine.errors import BadInputError
from engine.shards import UNLABELLED

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _load(image: Path, scribble: Path, mask: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    return read_rgb(image), read_labels(scribble), read_labels(mask) if mask is not None else None


def _class_names(root: Path, label_files: list[Path]) -> list[str]:
    names_file = root / "classes.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if not names:
            raise BadInputError(str(names_file), "no class names in it")
        return names
    # Scan the label maps for the largest id; unreadable ones are reported later, per record.
    top = 0
    for path in label_files:
        try:
            ids = np.unique(read_labels(path))
        except BadInputError:
            continue
        ids = ids[ids != UNLABELLED]
        top = max(top, int(ids.max()) if ids.size else 0)
    return ["background"] + [f"class_{i}" for i in range(1, top + 1)]


def _stems(path: Path) -> set[str] | None:
    """The stems a split list names, one per line; None when there is no such file."""
    return {line.strip() for line in path.read_text().splitlines() if line.strip()} if path.is_file() else None


def folder_records(cfg: FolderSource) -> tuple[list[TaggedRecord], list[str]]:
    """Records (train, val, then test) and class names of a plain folder."""
    root = Path(cfg.root)
    images = sorted(p for p in (root / "images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise BadInputError(str(root / "images"), "no .jpg/.png images found", "see the folder layout in docs/data.md")
    test = _stems(root / "test.txt") or set()
    val = _stems(root / "val.txt")
    if val is None:
        pool = [p for p in images if p.stem not in test]
        rng = np.random.default_rng(cfg.seed)
        n_val = int(round(cfg.val_fraction * len(pool)))
        val = {pool[i].stem for i in rng.permutation(len(pool))[:n_val]}
    records, seen, label_files = {"train": [], "val": [], "test": []}, {}, []
    for image in images:
        key = re.sub(r"[^A-Za-z0-9_\-]", "_", image.stem)
        if key in seen:
            raise BadInputError(str(image), f"its key {key!r} clashes with {seen[key]}", "rename one of them")
        seen[key] = image
        scribble = root / "scribbles" / f"{image.stem}.png"
        mask = root / "masks" / f"{image.stem}.png"
        mask = mask if mask.is_file() else None
        label_files += [scribble] + ([mask] if mask else [])
        split = "test" if image.stem in test else "val" if image.stem in val else "train"
        origin = ", ".join(str(p) for p in (image, scribble, mask) if p is not None)
        records[split].append(TaggedRecord(key, split, partial(_load, image, scribble, mask), origin=origin))
    return records["train"] + records["val"] + records["test"], _class_names(root, label_files)
