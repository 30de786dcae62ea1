"""FID of synthetic sets against real images, offline.

Fréchet distance between feature statistics (torchmetrics ``FrechetInceptionDistance``
with a feature extractor we choose), because nothing may be downloaded at run time:

- ``feature: random`` (embedded default): a fixed, seeded random conv net (3 conv
  layers, ReLU, global mean + std pooling). Random-feature FID is not comparable with
  published Inception FID numbers, but it is deterministic, needs no weights, and ranks
  sets by how far their colour/texture/edge statistics are from the real ones, which
  is what a (w, λ) sweep compares.
- ``feature: inception``: the standard FID Inception-v3 from a local weights file
  (``inception_weights``, torch-fidelity's ``pt_inception-2015-12-05-*.pth``); needs
  ``pip install torch-fidelity``. Use it for numbers comparable with the paper.

Both sets are compared at one resolution: real images are fitted (short side resized,
centre crop) to the synthetic images' side, exactly as the generator fitted its sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from engine.errors import BadInputError
from engine.manifest import iter_samples, read_manifest

FEATURES = ("random", "inception")


@dataclass
class FIDConfig:
    """How FID is computed for every generated (w, λ) cell."""

    enabled: bool = True
    feature: str = "random"  # random | inception
    inception_weights: str | None = None  # local file, feature=inception only
    num_features: int = 64  # random net: output width (mean + std pooled, so 2 x channels/2)
    seed: int = 0  # random net: weight init seed
    reference_split: str = "train"  # real images compared against (the generator's sources)
    max_reference: int | None = None  # cap on real images (first N by key); None = all
    batch_size: int = 64
    device: str = "auto"  # auto: cuda when available, else cpu

    def validate(self) -> None:
        if self.feature not in FEATURES:
            raise BadInputError(f"fid.feature={self.feature!r}", f"must be one of {FEATURES}")
        if self.feature == "inception" and not self.inception_weights:
            raise BadInputError("fid.inception_weights", "feature=inception needs the local Inception weights file",
                                "--set fid.inception_weights=/path/to/pt_inception-2015-12-05-6726825d.pth")
        if self.num_features < 2 or self.num_features % 2:
            raise BadInputError(f"fid.num_features={self.num_features}", "must be an even number >= 2")
        if self.batch_size < 1:
            raise BadInputError(f"fid.batch_size={self.batch_size}", "must be >= 1")

    def torch_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def describe(self) -> dict[str, object]:
        """What decides the numbers (a cached score is reused only under the same description)."""
        if self.feature == "inception":
            return {"feature": "inception", "weights": str(self.inception_weights)}
        return {"feature": "random", "num_features": self.num_features, "seed": self.seed}


class RandomFeatures(nn.Module):
    """A fixed random conv net: images in [0, 1] -> ``num_features`` pooled activations.

    Weights are drawn once from a generator seeded with ``seed`` (same features on every
    machine and run); mean and standard deviation pooling over space keep both the
    level and the spread of each filter's response.
    """

    def __init__(self, num_features: int = 64, seed: int = 0) -> None:
        super().__init__()
        width = num_features // 2
        self.num_features = num_features
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, width, 3, stride=2, padding=1), nn.ReLU(),
        )
        gen = torch.Generator().manual_seed(seed)
        for layer in self.net:
            if isinstance(layer, nn.Conv2d):
                fan_in = layer.in_channels * 9
                layer.weight.data = torch.randn(layer.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5
                layer.bias.data.zero_()
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.net((images.float() - 0.5) / 0.25)
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1).double()


def build_metric(cfg: FIDConfig):
    """A torchmetrics FID whose real statistics survive ``reset()`` (one reference, many cells)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if cfg.feature == "random":
        feature: int | nn.Module = RandomFeatures(cfg.num_features, cfg.seed)
        kwargs = {}
    else:
        if not Path(cfg.inception_weights or "").is_file():
            raise BadInputError(str(cfg.inception_weights), "Inception weights file not found")
        feature, kwargs = 2048, {"feature_extractor_weights_path": cfg.inception_weights}
    try:
        metric = FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=True, **kwargs)
    except ModuleNotFoundError as exc:
        raise BadInputError("fid.feature=inception", str(exc).splitlines()[0], "pip install torch-fidelity") from None
    return metric.to(cfg.torch_device())


def fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` at ``size`` x ``size``, fitted the paper's way (``stretch``), as generated sources are by default."""
    from engine.data.geometry import fit_to

    return fit_to(image, np.zeros(image.shape[:2], np.uint8), size)[0]


def manifest_images(manifest: str | Path, split: str | None = None, limit: int | None = None) -> Iterator[np.ndarray]:
    """RGB images of a manifest's ``ok`` rows (optionally one split; ``limit``: the first keys in
    key order), streamed in shard order."""
    table, _ = read_manifest(manifest)
    keys = sorted(k for k, st, sp in zip(*(table.column(c).to_pylist() for c in ("key", "status", "split")))
                  if st == "ok" and (split is None or sp == split))
    chosen = set(keys[:limit] if limit is not None else keys)
    return (sample.image for _, sample in iter_samples(manifest, lambda r: r["key"] in chosen, with_mask=False))


def _batches(images: Iterable[np.ndarray], size: int, batch: int) -> Iterator[torch.Tensor]:
    buf: list[np.ndarray] = []
    for img in images:
        buf.append(img if img.shape[:2] == (size, size) else fit_square(img, size))
        if len(buf) == batch:
            yield torch.from_numpy(np.stack(buf)).permute(0, 3, 1, 2).float().div_(255.0)
            buf = []
    if buf:
        yield torch.from_numpy(np.stack(buf)).permute(0, 3, 1, 2).float().div_(255.0)


class FIDScorer:
    """Reference statistics computed once; ``score`` any number of synthetic sets against them."""

    def __init__(self, cfg: FIDConfig, size: int) -> None:
        self.cfg = cfg
        self.size = size
        self.device = cfg.torch_device()
        self.metric = build_metric(cfg)
        self.reference_samples = 0

    def set_reference(self, images: Iterable[np.ndarray]) -> int:
        for x in _batches(images, self.size, self.cfg.batch_size):
            self.metric.update(x.to(self.device), real=True)
            self.reference_samples += len(x)
        if self.reference_samples < 2:
            raise BadInputError("FID reference", f"has {self.reference_samples} image(s); FID needs at least 2")
        return self.reference_samples

    def score(self, images: Iterable[np.ndarray]) -> tuple[float, int]:
        """(FID, number of images) of one synthetic set."""
        n = 0
        for x in _batches(images, self.size, self.cfg.batch_size):
            self.metric.update(x.to(self.device), real=False)
            n += len(x)
        if n < 2:
            raise BadInputError("synthetic set", f"has {n} image(s); FID needs at least 2")
        value = float(self.metric.compute())
        self.metric.reset()  # fake statistics only (reset_real_features=False)
        return value, n
