"""The built-in procedural scribble dataset: the embedded default, no download needed.

A faithful miniature of a natural-image scribble task, sized for 2 CPU cores: each scene
is a soft two-colour gradient background with 1-3 objects of 6 classes that differ by
SHAPE (disc, square, triangle, star, ring, cross). Colour is a weak cue: every class has
its own hue centre, but the spread overlaps the neighbouring classes and a third of the
objects take a random hue. Objects overlap (later ones occlude earlier ones and the mask
shows only visible parts), and sizes, positions, rotations and aspect ratios vary, so a
segmenter has to learn shape, which takes many images (README, "learning curve").

The appearance is deliberately smooth -- gradient fills, anti-aliased edges, soft
lighting, no pixel-scale texture or noise -- because a tiny generator must be able to
learn it: the paper's generator (SD 1.5) models its images well, and a miniature of the
paper needs a base model that models these well too (``jobs/pretrain_base.py``).

Sample ``i`` of a split depends only on ``(seed, split, i)``: its generator is seeded
from that triple, so it is identical however many samples are made and in which order.
The ``corpus`` split is the base model's pretraining set: a stream disjoint from the
labelled ``train``/``val``/``test`` splits. Shapes are drawn from continuous
coordinates, so any size works (32, 64, 128, 512 ...).
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
SPLIT_STREAM = {"train": 0, "val": 1, "test": 2, "corpus": 3}
# Hue centre per object class (0..1); spread _HUE_SIGMA overlaps the neighbouring classes.
_HUE = {1: 0.00, 2: 0.16, 3: 0.33, 4: 0.50, 5: 0.66, 6: 0.83}
_HUE_SIGMA = 0.08
_RANDOM_HUE_P = 0.25
_SUPERSAMPLE = 4  # anti-aliasing: coverage from a 4x4 sub-pixel grid


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    ang = np.pi / 2 + np.arange(2 * points) * np.pi / points
    rad = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)


_POLYGONS = {
    2: np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]),
    3: np.array([[0.0, 1.0], [-0.866, -0.5], [0.866, -0.5]]) * 1.05,
    4: _star(),
    6: np.array(
        [[-0.35, -1], [0.35, -1], [0.35, -0.35], [1, -0.35], [1, 0.35], [0.35, 0.35],
         [0.35, 1], [-0.35, 1], [-0.35, 0.35], [-1, 0.35], [-1, -0.35], [-0.35, -0.35]]
    ),
}


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of class ``cls`` in its canonical frame (unit radius)."""
    if cls == 1:
        return u * u + v * v <= 1.0
    if cls == 5:
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    pts = np.stack([u.ravel(), v.ravel()], 1)
    return PolyPath(_POLYGONS[cls]).contains_points(pts).reshape(u.shape)


def _colour(rng: np.random.Generator, hue: float, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    """RGB in [0, 1] of ``hue`` with saturation and value drawn from the given ranges."""
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(*sat), rng.uniform(*val)))


def _gradient(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    """``H x W x 3`` linear blend from ``c1`` to ``c2`` along a random direction."""
    a = rng.uniform(0, 2 * np.pi)
    along = yy * np.sin(a) + xx * np.cos(a)
    t = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


@dataclass
class Scene:
    """One procedural sample: RGB image, full mask and its synthetic scribble."""

    image: np.ndarray
    mask: np.ndarray
    scribble: np.ndarray


def make_scene(index: int, seed: int = 0, size: int = 32, split: str = "train") -> Scene:
    """Scene ``index`` of ``split``; a pure function of ``(seed, split, index, size)``."""
    rng = np.random.default_rng([seed, SPLIT_STREAM[split], index])
    yy, xx = np.mgrid[0:size, 0:size].astype(float) + 0.5
    # Sub-pixel grid for anti-aliased coverage (the mask takes the pixel centres).
    sub = (np.arange(size * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    syy, sxx = np.meshgrid(sub, sub, indexing="ij")
    hue = rng.random()
    img = _gradient(rng, yy, xx, _colour(rng, hue, (0.1, 0.6), (0.3, 0.95)),
                    _colour(rng, hue + rng.normal(0, 0.15), (0.1, 0.6), (0.3, 0.95)))
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 3))):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        radius = rng.uniform(0.25, 0.42) * size
        cy, cx = rng.uniform(0.15, 0.85, 2) * size
        a = rng.uniform(0, 2 * np.pi)
        stretch = rng.uniform(0.8, 1.25)

        def inside(py: np.ndarray, px: np.ndarray) -> np.ndarray:
            dy, dx = (py - cy) / radius, (px - cx) / radius
            u = (dx * np.cos(a) + dy * np.sin(a)) * stretch
            v = (-dx * np.sin(a) + dy * np.cos(a)) / stretch
            return _shape_mask(cls, u, v)

        where = inside(yy, xx)
        if not where.any():
            continue
        cover = inside(syy, sxx).reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean((1, 3))[..., None]
        hue = rng.random() if rng.random() < _RANDOM_HUE_P else _HUE[cls] + rng.normal(0, _HUE_SIGMA)
        c1 = _colour(rng, hue, (0.45, 1.0), (0.35, 1.0))
        c2 = np.clip(c1 * rng.uniform(0.55, 0.9) + rng.normal(0, 0.05, 3), 0, 1)  # shaded side
        img = img * (1 - cover) + _gradient(rng, yy, xx, c1, c2) * cover
        mask[where] = cls  # later objects occlude earlier ones
    # Soft global lighting from one side.
    a = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0, 0.2) * ((yy * np.sin(a) + xx * np.cos(a)) / size - 0.5)
    image = (np.clip(img * light[..., None], 0, 1) * 255).round().astype(np.uint8)
    return Scene(image=image, mask=mask, scribble=scribble_from_mask(mask, rng))


def _load(index: int, seed: int, size: int, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scene = make_scene(index, seed, size, split)
    return scene.image, scene.scribble, scene.mask


def procedural_records(num_train: int, num_val: int, size: int = 32, seed: int = 0, num_test: int = 0) -> list[SourceRecord]:
    """Lazy records ``proc-{split}-{i:06d}`` of the built-in dataset (picklable loaders):
    train, then val (for choices), then test (held out for reported numbers)."""
    return [
        SourceRecord(f"proc-{split}-{i:06d}", split, partial(_load, i, seed, size, split))
        for split, n in (("train", num_train), ("val", num_val), ("test", num_test))
        for i in range(n)
    ]


def preview_grid(n: int = 8, size: int = 32, seed: int = 0, split: str = "train") -> np.ndarray:
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
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zoom", type=int, default=6, help="nearest-neighbour upscaling for viewing")
    args = parser.parse_args()
    grid = preview_grid(args.n, args.size, args.seed)
    Image.fromarray(grid).resize((grid.shape[1] * args.zoom, grid.shape[0] * args.zoom), Image.NEAREST).save(args.out)
