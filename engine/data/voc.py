"""PASCAL VOC 2012 + ScribbleSup reader (the paper's dataset).

Expected layout under ``root``::

    JPEGImages/<id>.jpg
    SegmentationClassAug/<id>.png          full masks, palette PNG, 255 = void boundary
    pascal_2012_scribble/<id>.png          ScribbleSup scribbles, one channel, 0-20, 255 = unlabelled
    ImageSets/SegmentationAug/train_aug.txt, val.txt

List files hold one id per line; the ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``
pair form of some releases is accepted too (the first token's stem is the id).

``scribble_format: xml`` reads the original ScribbleSup annotations instead: one XML per
image (``pascal_2012/<id>.xml`` by default) with ``<polygon>`` elements, each a ``<tag>``
class name and ``<point><X>..</X><Y>..</Y></point>`` vertices, drawn as polylines of
``stroke_width`` px. A val image without a scribble gets one synthesised from its mask
(tagged ``scribble_source: synthetic`` in the sample's json); a train image without one
is a bad input.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
import zlib
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from engine.data.scribbles import scribble_from_mask
from engine.data.imageio import read_labels, read_rgb
from engine.data.sources import TaggedRecord, VocSource
from engine.errors import BadInputError
from engine.shards import UNLABELLED

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
_DEFAULT_SCRIBBLE_DIR = {"png": "pascal_2012_scribble", "xml": "pascal_2012"}


def read_list(path: Path) -> list[str]:
    """Image ids of a VOC list file (``id`` or ``/JPEGImages/id.jpg /Seg.../id.png`` lines)."""
    if not path.is_file():
        raise BadInputError(str(path), "split list is missing", "expected ImageSets/SegmentationAug/<name>.txt")
    ids = [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise BadInputError(str(path), "split list is empty")
    return ids


def render_xml_scribble(path: Path, height: int, width: int, stroke: int = 3) -> np.ndarray:
    """Draw the polylines of one ScribbleSup XML into an HxW class-id map (255 elsewhere)."""
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as exc:
        raise BadInputError(str(path), f"cannot parse scribble XML: {exc}") from None
    canvas = Image.new("L", (width, height), UNLABELLED)
    draw = ImageDraw.Draw(canvas)
    for polygon in tree.getroot().iter("polygon"):
        tag = (polygon.findtext("tag") or "").strip()
        if tag not in VOC_CLASSES:
            raise BadInputError(str(path), f"unknown class tag {tag!r}", f"expected one of {VOC_CLASSES}")
        try:
            pts = [(float(p.findtext("X")), float(p.findtext("Y"))) for p in polygon.iter("point")]
        except (TypeError, ValueError):
            raise BadInputError(str(path), f"a <point> of a {tag!r} polygon lacks a numeric <X>/<Y>") from None
        cls = VOC_CLASSES.index(tag)
        if len(pts) == 1:
            (x, y), r = pts[0], stroke / 2
            draw.ellipse([x - r, y - r, x + r, y + r], fill=cls)
        elif pts:
            draw.line(pts, fill=cls, width=stroke, joint="curve")
    return np.asarray(canvas).copy()


def _load(
    image: Path, scribble: Path | None, mask: Path | None, fmt: str, stroke: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    rgb = read_rgb(image)
    labels = read_labels(mask) if mask is not None else None
    if scribble is None:  # val image without a scribble: synthesise it from the mask
        rng = np.random.default_rng([seed, zlib.crc32(image.stem.encode())])
        return rgb, scribble_from_mask(labels, rng, width=stroke), labels
    if fmt == "xml":
        return rgb, render_xml_scribble(scribble, rgb.shape[0], rgb.shape[1], stroke), labels
    return rgb, read_labels(scribble), labels


def voc_records(cfg: VocSource) -> tuple[list[TaggedRecord], list[str]]:
    """Train records (scribble required) then val records (mask required) of VOC."""
    root = Path(cfg.root)
    if not (root / "JPEGImages").is_dir():
        raise BadInputError(str(root), "no JPEGImages/ folder here", "set source.voc.root to the VOC2012 folder")
    scribble_dir = root / (cfg.scribble_dir or _DEFAULT_SCRIBBLE_DIR[cfg.scribble_format])
    ext = ".png" if cfg.scribble_format == "png" else ".xml"
    lists = root / "ImageSets" / "SegmentationAug"
    records = []
    for split, name in (("train", cfg.train_list), ("val", cfg.val_list)):
        for sid in read_list(lists / f"{name}.txt"):
            scribble = scribble_dir / f"{sid}{ext}"
            mask = root / "SegmentationClassAug" / f"{sid}.png"
            meta = {}
            if split == "val" and not scribble.is_file():
                scribble, meta = None, {"scribble_source": "synthetic"}
            image = root / "JPEGImages" / f"{sid}.jpg"
            mask = mask if (split == "val" or mask.is_file()) else None
            load = partial(_load, image, scribble, mask, cfg.scribble_format, cfg.stroke_width, cfg.seed)
            origin = ", ".join(str(p) for p in (image, scribble, mask) if p is not None)
            records.append(TaggedRecord(sid, split, load, meta, origin))
    return records, list(VOC_CLASSES)
