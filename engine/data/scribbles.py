"""Synthesise scribbles from full masks, the way scribble-supervision research does.

Used for the built-in procedural dataset and for VOC val images that have a mask but no
scribble. For every connected region of every class (background included) we erode the
region, take the longest path through its skeleton, keep a random contiguous piece of it
and dilate that to a few pixels. Eroding by the stroke width first keeps every stroke
strictly inside its region, so scribble pixels always agree with the mask. Regions that
vanish under erosion, and blobs whose skeleton is a dot (a disc's medial axis is its
centre), get a short straight stroke through their centre instead. About 3 % of the
pixels end up labelled; everything else is 255 (unlabelled), like ScribbleSup.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from engine.shards import UNLABELLED

_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
_EIGHT = np.ones((3, 3), dtype=bool)


def stroke_width(height: int, width: int) -> int:
    """Stroke width in px: 3 at 512 px (ScribbleSup), scaled with size; 2 at 64, 1 below 48."""
    side = min(height, width)
    return max(2 if side >= 48 else 1, round(3 * side / 512))


def _bfs(skel: np.ndarray, start: tuple[int, int]) -> tuple[tuple[int, int], dict]:
    """Farthest skeleton pixel from ``start`` (8-connected) and the BFS parent map."""
    parent = {start: None}
    queue = deque([start])
    last = start
    h, w = skel.shape
    while queue:
        last = y, x = queue.popleft()
        for dy, dx in _NEIGHBOURS:
            n = (y + dy, x + dx)
            if 0 <= n[0] < h and 0 <= n[1] < w and skel[n] and n not in parent:
                parent[n] = last
                queue.append(n)
    return last, parent


def _longest_path(skel: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ordered (y, x) pixels of an (approximately) longest path through a skeleton.

    Two BFS passes (the classic tree-diameter trick) starting from a random pixel.
    """
    ys, xs = np.nonzero(skel)
    i = int(rng.integers(len(ys)))
    a, _ = _bfs(skel, (int(ys[i]), int(xs[i])))
    b, parent = _bfs(skel, a)
    path = []
    node = b
    while node is not None:
        path.append(node)
        node = parent[node]
    return np.array(path)


def _line(centre: np.ndarray, angle: float, half: float, n: int) -> np.ndarray:
    t = np.linspace(-half, half, n)
    return np.stack([centre[0] + t * np.sin(angle), centre[1] + t * np.cos(angle)], 1).round().astype(int)


def _region_stroke(region: np.ndarray, width: int, budget: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean stroke (before dilation) of about ``budget`` px for one region, inside its interior."""
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    interior = dist > width
    if not interior.any():
        # Too thin to erode: a short stroke through the deepest point, clipped to the region.
        centre = np.array(np.unravel_index(int(np.argmax(dist)), dist.shape))
        interior = region
        half = min(budget / 2, max(1.0, float(dist.max())))
        pts = _line(centre, rng.uniform(0, np.pi), half, 2 * int(half) + 1)
    else:
        path = _longest_path(skeletonize(interior), rng)
        extent = np.sqrt(interior.sum())
        if len(path) >= 0.5 * extent:
            n = int(np.clip(round(budget), 1, len(path)))
            start = int(rng.integers(len(path) - n + 1))
            pts = path[start : start + n]
        else:
            # Blob whose medial axis is (nearly) a point: a line through its centre instead.
            centre = path[len(path) // 2]
            half = min(budget, extent) / 2
            pts = _line(centre, rng.uniform(0, np.pi), half, max(2, int(2 * half) + 1))
    stroke = np.zeros_like(region)
    pts = pts[(pts[:, 0] >= 0) & (pts[:, 0] < region.shape[0]) & (pts[:, 1] >= 0) & (pts[:, 1] < region.shape[1])]
    stroke[pts[:, 0], pts[:, 1]] = True
    return stroke & interior


def scribble_from_mask(
    mask: np.ndarray,
    rng: np.random.Generator,
    width: int | None = None,
    target: float = 0.03,
    min_area: int = 4,
    ignore: int = UNLABELLED,
) -> np.ndarray:
    """Scribble map (HxW uint8, 255 = unlabelled) synthesised from a full mask.

    ``width`` is the stroke width in px (default :func:`stroke_width`). ``target`` is the
    labelled fraction aimed at: the total stroke length ``target*H*W/width`` is shared by
    the regions in proportion to their linear size (sqrt of area) and jittered by +-30 %;
    a stroke never runs past its region's skeleton, so big images with 3 px strokes stay
    below the target. Regions smaller than ``min_area`` px and pixels equal to ``ignore``
    (VOC's void boundary) get no stroke. The same ``rng`` state gives the same scribble.
    """
    mask = np.asarray(mask)
    h, w = mask.shape
    width = width or stroke_width(h, w)
    # Dilating a point by a width x width square stays inside a region eroded by `width`.
    footprint = np.ones((width, width), dtype=bool)
    regions = []
    for cls in np.unique(mask):
        if cls == ignore:
            continue
        labels, _ = ndimage.label(mask == cls, structure=_EIGHT)
        for idx, box in enumerate(ndimage.find_objects(labels), start=1):
            # Crop with a margin so erosion and dilation see the region's surroundings.
            y0, y1 = max(0, box[0].start - width), min(h, box[0].stop + width)
            x0, x1 = max(0, box[1].start - width), min(w, box[1].stop + width)
            region = labels[y0:y1, x0:x1] == idx
            if region.sum() >= min_area:
                regions.append((int(cls), (slice(y0, y1), slice(x0, x1)), region))
    out = np.full((h, w), UNLABELLED, dtype=np.uint8)
    scale = np.sqrt([r[2].sum() for r in regions])
    total = target * h * w / width
    for (cls, box, region), s in zip(regions, scale):
        budget = total * s / scale.sum() * rng.uniform(0.7, 1.3)
        stroke = _region_stroke(region, width, budget, rng)
        out[box][ndimage.binary_dilation(stroke, footprint) & region] = cls
    return out
