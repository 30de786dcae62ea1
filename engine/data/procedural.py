"""The built-in procedural scribble dataset: the embedded default, no download needed.

Each scene is a cluttered textured background with 1-4 objects of 6 classes that differ
by SHAPE (disc, square, triangle, star, ring, cross) and, only statistically, by colour
and texture. Colour and texture are deliberately weak cues: every class has its own hue
centre and texture preferences, but the hue spread overlaps the neighbouring classes, a
quarter of the objects take a random hue, and the background clutter reuses the same
colours and textures (distractor blobs and bars that are labelled background). Objects
overlap (later ones occlude earlier ones and the mask shows only visible parts), and
sizes, positions, rotations and aspect ratios vary. A segmenter therefore has to learn
shape, which needs far more than a few dozen images.

Sample ``i`` of a split depends only on ``(seed, split, i)``: its generator is seeded
from that triple, so it is identical however many samples are made and in which order.
Shapes are drawn from continuous coordinates, so any size works (32, 64, 128, 512 ...).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from functools import partial

import numpy as np
from matplotlib.path import Path as PolyPath

from engine.data.record import SourceRecord
from engine.data.scribbles import scribble_from_mask

CLASS_NAMES = ["background", "disc", "square", "triangle", "star", "ring", "cross"]
SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}
# Hue centre per object class (0..1); spread _HUE_SIGMA overlaps the neighbouring classes.
_HUE = {1: 0.00, 2: 0.16, 3: 0.33, 4: 0.50, 5: 0.66, 6: 0.83}
_HUE_SIGMA = 0.09
_RANDOM_HUE_P = 0.25
_TEXTURES = ("solid", "stripes", "checker", "noise", "dots", "gradient")
# Per class texture preference (weights over _TEXTURES): a cue, never a rule.
_TEXTURE_W = {
    1: (3, 1, 1, 2, 1, 1),
    2: (1, 1, 3, 1, 1, 2),
    3: (1, 3, 1, 1, 2, 1),
    4: (1, 1, 1, 3, 1, 2),
    5: (2, 2, 1, 1, 3, 1),
    6: (1, 2, 2, 1, 1, 3),
}


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    ang = np.pi / 2 + np.arange(2 * points) * np.pi / points
    rad = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)


_POLYGONS = {
    2: np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]),
    3: np.array([[0.0, 1.0], [-0.866, -0.5], [0.866, -0.5]]) * 1.05,
    4: _star(),
    6: np.array(
        [[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3], [0.3, 0.3],
         [0.3, 1], [-0.3, 1], [-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]]
    ),
}


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of class ``cls`` in its canonical frame (unit radius)."""
    if cls == 1:
        return u * u + v * v <= 1.0
    if cls == 5:
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.5**2)
    pts = np.stack([u.ravel(), v.ravel()], 1)
    return PolyPath(_POLYGONS[cls]).contains_points(pts).reshape(u.shape)


def _colour(rng: np.random.Generator, hue: float) -> np.ndarray:
    """RGB in [0, 1] of ``hue`` with random saturation and value (dull to vivid, dark to bright)."""
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.35, 1.0), rng.uniform(0.35, 1.0)))


def _texture(kind: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """Mixing weight in [0, 1] per pixel for a two-colour texture of the given kind."""
    if kind == "solid":
        return np.zeros_like(yy)
    a = rng.uniform(0, np.pi)
    along = yy * np.sin(a) + xx * np.cos(a)
    period = rng.uniform(0.06, 0.2) * size
    if kind == "stripes":
        return (np.mod(along, period) < period / 2).astype(float)
    if kind == "checker":
        across = -yy * np.cos(a) + xx * np.sin(a)
        return ((np.floor(along / period) + np.floor(across / period)) % 2).astype(float)
    if kind == "noise":
        return rng.random(yy.shape)
    if kind == "dots":
        across = -yy * np.cos(a) + xx * np.sin(a)
        d = (np.mod(along, period) - period / 2) ** 2 + (np.mod(across, period) - period / 2) ** 2
        return (d < (period * 0.3) ** 2).astype(float)
    span = max(float(np.ptp(along)), 1.0)  # gradient
    return (along - along.min()) / span


def _paint(img: np.ndarray, where: np.ndarray, kind: str, hue: float, rng: np.random.Generator,
           yy: np.ndarray, xx: np.ndarray, size: int) -> None:
    """Fill ``img[where]`` with a two-colour texture around ``hue``."""
    c1 = _colour(rng, hue)
    c2 = _colour(rng, hue + rng.normal(0, 0.05))
    t = _texture(kind, rng, yy, xx, size)[where][:, None]
    img[where] = c1 * (1 - t) + c2 * t


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """Cluttered background: textured base, then distractor blobs and bars (label 0)."""
    img = np.zeros((size, size, 3))
    _paint(img, np.ones((size, size), bool), str(rng.choice(_TEXTURES)), rng.random(), rng, yy, xx, size)
    for _ in range(int(rng.integers(2, 7))):
        cy, cx = rng.uniform(0, size, 2)
        hue = rng.random()
        if rng.random() < 0.5:  # soft irregular blob
            r = rng.uniform(0.08, 0.25) * size
            ang = np.arctan2(yy - cy, xx - cx)
            wobble = 1 + 0.3 * np.sin(int(rng.integers(2, 6)) * ang + rng.uniform(0, 6.3))
            where = np.hypot(yy - cy, xx - cx) <= r * wobble
        else:  # long thin bar, like a branch or pole
            a = rng.uniform(0, np.pi)
            across = np.abs(-(yy - cy) * np.cos(a) + (xx - cx) * np.sin(a))
            along = np.abs((yy - cy) * np.sin(a) + (xx - cx) * np.cos(a))
            where = (across <= rng.uniform(0.02, 0.06) * size) & (along <= rng.uniform(0.2, 0.6) * size)
        _paint(img, where, str(rng.choice(_TEXTURES)), hue, rng, yy, xx, size)
    return img


@dataclass
class Scene:
    """One procedural sample: RGB image, full mask and its synthetic scribble."""

    image: np.ndarray
    mask: np.ndarray
    scribble: np.ndarray


def make_scene(index: int, seed: int = 0, size: int = 64, split: str = "train") -> Scene:
    """Scene ``index`` of ``split``; a pure function of ``(seed, split, index, size)``."""
    rng = np.random.default_rng([seed, SPLIT_STREAM[split], index])
    yy, xx = np.mgrid[0:size, 0:size].astype(float) + 0.5
    img = _background(rng, yy, xx, size)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        radius = rng.uniform(0.13, 0.32) * size
        cy, cx = rng.uniform(0.1, 0.9, 2) * size
        a = rng.uniform(0, 2 * np.pi)
        stretch = rng.uniform(0.8, 1.25)
        dy, dx = (yy - cy) / radius, (xx - cx) / radius
        u = (dx * np.cos(a) + dy * np.sin(a)) * stretch
        v = (-dx * np.sin(a) + dy * np.cos(a)) / stretch
        where = _shape_mask(cls, u, v)
        if not where.any():
            continue
        hue = rng.random() if rng.random() < _RANDOM_HUE_P else _HUE[cls] + rng.normal(0, _HUE_SIGMA)
        w = np.array(_TEXTURE_W[cls], float)
        _paint(img, where, str(rng.choice(_TEXTURES, p=w / w.sum())), hue, rng, yy, xx, size)
        mask[where] = cls  # later objects occlude earlier ones
    # Sensor noise and a global illumination gradient over everything.
    gain = 1 + rng.uniform(-0.25, 0.25) * (xx / size - 0.5)[..., None]
    img = img * gain + rng.normal(0, rng.uniform(0.02, 0.07), img.shape)
    image = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return Scene(image=image, mask=mask, scribble=scribble_from_mask(mask, rng))


def _load(index: int, seed: int, size: int, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scene = make_scene(index, seed, size, split)
    return scene.image, scene.scribble, scene.mask


def procedural_records(num_train: int, num_val: int, size: int = 64, seed: int = 0) -> list[SourceRecord]:
    """Lazy records ``proc-{split}-{i:06d}`` of the built-in dataset (picklable loaders)."""
    return [
        SourceRecord(f"proc-{split}-{i:06d}", split, partial(_load, i, seed, size, split))
        for split, n in (("train", num_train), ("val", num_val))
        for i in range(n)
    ]


def preview_grid(n: int = 8, size: int = 64, seed: int = 0, split: str = "train") -> np.ndarray:
    """RGB grid, one row per scene: image | full mask | scribble over the dimmed image.

    Background strokes are drawn white so they stand out from the dark mask background.
    """
    colours = np.zeros((256, 3), np.uint8)
    colours[: len(CLASS_NAMES)] = [(255, 255, 255), (230, 25, 75), (255, 225, 25), (60, 180, 75),
                                   (0, 130, 200), (145, 30, 180), (245, 130, 48)]
    rows = []
    for i in range(n):
        s = make_scene(i, seed, size, split)
        mask = colours[s.mask]
        mask[s.mask == 0] = 40
        over = np.where((s.scribble == 255)[..., None], s.image // 3, colours[s.scribble])
        rows.append(np.concatenate([s.image, mask, over], 1))
    return np.concatenate(rows, 0)


if __name__ == "__main__":
    import argparse

    from PIL import Image

    parser = argparse.ArgumentParser(description="Save a preview grid of procedural scenes (image | mask | scribble).")
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zoom", type=int, default=3, help="nearest-neighbour upscaling for viewing")
    args = parser.parse_args()
    grid = preview_grid(args.n, args.size, args.seed)
    Image.fromarray(grid).resize((grid.shape[1] * args.zoom, grid.shape[0] * args.zoom), Image.NEAREST).save(args.out)
