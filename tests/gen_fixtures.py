"""Test helpers for generation: a fabricated real set and a stand-in sampler.

The stand-in blends each source image with seeded noise by λ, so its output is exact and
cheap to predict; it keeps the fault-injection tests fast. The real tiny model is used
by the end-to-end tests.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Iterator

import numpy as np

from engine.generate.config import SamplerConfig
from engine.manifest import DatasetInfo, sample_row, shard_rows, skip_row, write_manifest
from engine.shards import Sample, ShardWriter, shard_name

CLASS_NAMES = ["background", "cat", "dog"]


def make_real_set(root: Path, n_train: int = 6, n_val: int = 2, per_shard: int = 4, size: int = 16) -> Path:
    """A real-shard manifest with ``n_train`` train and ``n_val`` val sources and one skipped row."""
    ids = [(f"tr{i:03d}", "train") for i in range(n_train)] + [(f"va{i:03d}", "val") for i in range(n_val)]
    rows = []
    for s in range(0, len(ids), per_shard):
        with ShardWriter(root / shard_name("real", s // per_shard)) as writer:
            chunk = []
            for j, (sid, split) in enumerate(ids[s : s + per_shard]):
                rng = np.random.default_rng(s + j)
                image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                scribble = np.full((size, size), 255, np.uint8)
                scribble[2:4, 1:12] = 0
                scribble[8:10, 3:14] = 1 + (s + j) % 2
                classes = sorted(int(c) for c in np.unique(scribble) if c != 255)
                meta = {"source_id": sid, "split": split, "w": 0.0, "lambda": 0.0, "seed": 0, "classes": classes,
                        "model": "", "steps": 0}
                sample = Sample(sid, image, scribble, scribble.copy(), meta)
                writer.write(sample)
                chunk.append(sample_row(sample))
            rows += shard_rows(chunk, writer.close(), root)
    rows.append(skip_row("broken001", "train", "unreadable image"))
    return write_manifest(rows, root / "manifest.parquet", DatasetInfo(CLASS_NAMES, "real"))


class StandInSampler:
    """``out = round((1-λ)·image + λ·noise(seed))``; sleeps ``delay`` s per sample."""

    model_id = "standin"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay

    def steps_for(self, lam: float) -> int:
        return math.ceil(lam * 10)

    def sample(self, images, scribbles, class_names, w, lam, seeds, colours=None):  # noqa: ANN001 (Protocol shape)
        assert len(images) == len(scribbles) == len(class_names) == len(seeds)
        time.sleep(self.delay * len(images))
        return np.stack([expected_standin(img, lam, seed) for img, seed in zip(images, seeds)])


def expected_standin(image: np.ndarray, lam: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(0, 256, image.shape)
    return np.round((1 - lam) * image + lam * noise).astype(np.uint8)


def standin_factory(model_dir: str, device: str, cfg: SamplerConfig, delay: float = 0.0) -> StandInSampler:
    return StandInSampler(delay)


@contextmanager
def local_ray(*by_value: ModuleType) -> Iterator[object]:
    """A private 2-CPU Ray for a test module; ``by_value`` test modules are shipped to actors.

    Actors cannot import modules under tests/, so this module (and any other test module whose
    functions run inside actors) is pickled by value.
    """
    import ray
    from ray import cloudpickle

    for module in (sys.modules[__name__], *by_value):
        cloudpickle.register_pickle_by_value(module)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
