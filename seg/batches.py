"""Training batches: real and synthetic samples mixed per batch, λ chosen by the scheme.

Each batch is built inside a DataLoader worker, which knows the global step of every
batch it makes: the DataLoader takes batches from its workers round-robin, so worker
``w`` of ``W`` makes steps ``start + w``, ``start + w + W``, ... and the scheme can be
asked for the λ values allowed at exactly that step's training progress. Per batch:
draw how many samples are synthetic, draw their λ from the scheme, then take the next
sample of the per-λ (and the real) endless stream. Augmentation (random scale, crop,
flip) transforms image, scribble and mask together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import IterableDataset

from engine.errors import BadInputError
from engine.shards import UNLABELLED, Sample
from seg.schemes import SchemeConfig, check_available, draw_lambdas, synthetic_count
from seg.stream import DataIndex, endless

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@dataclass
class AugmentConfig:
    """Random scale-crop-flip of the training samples (the usual segmentation recipe)."""

    crop: int = 64
    scale_min: float = 0.75
    scale_max: float = 1.5
    hflip: bool = True

    def validate(self) -> None:
        if self.crop < 8:
            raise BadInputError(f"augment.crop={self.crop}", "must be >= 8")
        if not 0.0 < self.scale_min <= self.scale_max:
            raise BadInputError(f"augment.scale_min/max={self.scale_min}/{self.scale_max}", "need 0 < scale_min <= scale_max")


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float, normalised with the ImageNet statistics (pretrained backbones expect them)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    return (x - MEAN) / STD


def to_rgb255(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_tensor`` for a (B,3,H,W) batch: the 0-255 colours the DenseCRF loss compares."""
    return (x * STD.to(x.device) + MEAN.to(x.device)) * 255.0


def _resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(torch.uint8)


def augment(
    image: np.ndarray, labels: list[np.ndarray], cfg: AugmentConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Scale by a random factor, pad (labels with 255) to the crop size, crop, maybe flip.

    ``labels`` are HxW class maps (scribble, and the mask when wanted); they get the same
    geometry as the image with nearest-neighbour resampling so class ids stay exact.
    """
    x = to_tensor(image)
    ys = [torch.from_numpy(np.ascontiguousarray(y)) for y in labels]
    h, w = x.shape[1:]
    s = rng.uniform(cfg.scale_min, cfg.scale_max)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    if size != (h, w):
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
        ys = [_resize_label(y, size) for y in ys]
    ph, pw = max(0, cfg.crop - size[0]), max(0, cfg.crop - size[1])
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), value=0.0)
        ys = [F.pad(y, (0, pw, 0, ph), value=UNLABELLED) for y in ys]
    top = int(rng.integers(0, x.shape[1] - cfg.crop + 1))
    left = int(rng.integers(0, x.shape[2] - cfg.crop + 1))
    x = x[:, top : top + cfg.crop, left : left + cfg.crop]
    ys = [y[top : top + cfg.crop, left : left + cfg.crop] for y in ys]
    if cfg.hflip and rng.random() < 0.5:
        x, ys = x.flip(-1), [y.flip(-1) for y in ys]
    return x.contiguous(), [y.contiguous() for y in ys]


class MixedBatches(IterableDataset):
    """Endless-until-budget stream of training batches for steps ``start_step .. total_steps - 1``.

    Yields dicts: ``image`` (B,3,crop,crop) float, ``scribble`` (B,crop,crop) int64 with
    255 = unlabelled, ``roi`` (B,crop,crop) bool (pixels of the image, not crop padding),
    ``lam`` (B,) float64 (0 = real), ``step`` int. Use with
    ``DataLoader(batch_size=None)``.
    """

    def __init__(
        self,
        index: DataIndex,
        scheme: SchemeConfig,
        batch_size: int,
        total_steps: int,
        augment_cfg: AugmentConfig,
        start_step: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 256,
    ) -> None:
        super().__init__()
        self.lambdas = check_available(scheme, index.lambdas)
        if (scheme.name == "real" or scheme.synth_fraction < 1.0) and len(index.real) == 0:
            raise BadInputError(f"scheme {scheme.name!r}", "needs real training samples (λ = 0, split train) but the manifests have none",
                                "pass the real manifest written by ingest")
        self.index, self.scheme = index, scheme
        self.batch_size, self.total_steps, self.start_step = batch_size, total_steps, start_step
        self.augment_cfg, self.seed, self.shuffle_buffer = augment_cfg, seed, shuffle_buffer

    def _stream(self, lam: float) -> Iterator[Sample]:
        group = self.index.real if lam == 0.0 else self.index.synthetic[lam]
        # Same seed on every reader (the shard order must agree for the split to be a
        # partition); it changes with start_step so a resumed run does not replay its start.
        seed = int(np.random.SeedSequence([self.seed, self.start_step, round(lam * 1e4)]).generate_state(1)[0])
        return endless(group, seed, self.shuffle_buffer)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, _, worker, workers = wds.utils.pytorch_worker_info()
        rng = np.random.default_rng([self.seed, rank, worker, self.start_step])
        streams: dict[float, Iterator[Sample]] = {}
        for step in range(self.start_step + worker, self.total_steps, workers):
            progress = step / self.total_steps
            n_synth = synthetic_count(self.batch_size, self.scheme, rng)
            lams = [0.0] * (self.batch_size - n_synth) + draw_lambdas(self.scheme, self.lambdas, progress, n_synth, rng)
            images, scribbles, rois = [], [], []
            for lam in lams:
                if lam not in streams:
                    streams[lam] = self._stream(lam)
                sample = next(streams[lam])
                # A map of ones rides along as a label: padding turns it to 255, which marks the roi.
                inside = np.ones_like(sample.scribble)
                x, (y, valid) = augment(sample.image, [sample.scribble, inside], self.augment_cfg, rng)
                images.append(x)
                scribbles.append(y)
                rois.append(valid == 1)
            yield {
                "image": torch.stack(images),
                "scribble": torch.stack(scribbles).long(),
                "roi": torch.stack(rois),
                "lam": torch.tensor(lams, dtype=torch.float64),
                "step": step,
            }
