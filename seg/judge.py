"""The judge: does a synthetic image follow its scribble? A segmenter trained on real images says.

seg's tiny DeepLabV3+ is trained on REAL images with their FULL masks (a measuring
instrument, like FID's feature net; it never sees a synthetic image in training), then
segments synthetic images. Its prediction is scored against the mask of the image's
own source and, as the chance level, against the mask of ANOTHER source (a fixed
derangement, :func:`derangement`). Own above mismatched means the generated objects
sit where the scribble put them, with the classes it named; the margin between the two
is the number to compare across (w, λ) cells. ``fg_iou`` is the class-blind version
(object vs background only): it separates "shapes in the right place" from "right class".

Training runs a fixed number of steps from a fixed seed, so the same data gives the same
judge (on one device and thread count) and cached scores stay comparable with new ones.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from engine.errors import BadInputError
from engine.manifest import read_manifest, resolve_shard
from engine.shards import UNLABELLED, Sample
from seg.batches import derangement, to_tensor
from seg.metrics import SegMetrics
from seg.models import ModelConfig, build_model
from seg.stream import ShardGroup, one_pass


@dataclass
class JudgeConfig:
    """How the judge is trained; ``holdout`` of the real images is kept aside to score the judge itself."""

    enabled: bool = True
    steps: int = 300  # a step count, not a time box: the same judge on every machine
    batch_size: int = 32
    lr: float = 3e-3  # AdamW
    seed: int = 0
    holdout: float = 0.2  # last fraction of the real images (key order): the judge's own score, its ceiling
    device: str = "auto"  # auto: cuda when available, else cpu

    SECTION = "judge"  # the config section errors name (the label scorer reuses this class)

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise BadInputError(f"{self.SECTION}.steps/batch_size={self.steps}/{self.batch_size}", "must be >= 1")
        if self.lr <= 0:
            raise BadInputError(f"{self.SECTION}.lr={self.lr}", "must be > 0")
        if not 0.0 <= self.holdout < 1.0:
            raise BadInputError(f"{self.SECTION}.holdout={self.holdout}", "must be in [0, 1)")

    def torch_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def describe(self) -> dict[str, Any]:
        """What decides the scores (a cached score is reused only under the same description)."""
        return {k: v for k, v in asdict(self).items() if k not in ("enabled", "device")}


# -- data ----------------------------------------------------------------------------------------
def manifest_samples(manifest: str | Path, keep: Callable[[dict[str, Any]], bool], with_mask: bool = True) -> Iterator[Sample]:
    """Samples of the manifest's ``ok`` rows that ``keep`` accepts (row: key, source_id, split), streamed."""
    table, _ = read_manifest(manifest)
    group = ShardGroup()
    for row in table.select(["key", "shard", "source_id", "split", "status"]).to_pylist():
        if row["status"] == "ok" and keep(row):
            group.add(resolve_shard(manifest, row["shard"]), row["key"])
    return one_pass(group, epoch=0, seed=0, shuffle_buffer=0, with_mask=with_mask, split=False)


def chunks(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``n`` items (the last one shorter)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


# -- the segmenter ---------------------------------------------------------------------------------
def _inputs(images: np.ndarray, device: str) -> torch.Tensor:
    return torch.stack([to_tensor(img) for img in images]).to(device)


def train_judge(images: np.ndarray, masks: np.ndarray, num_classes: int, cfg: JudgeConfig,
                model: ModelConfig | None = None) -> nn.Module:
    """seg's DeepLabV3+ (``model``; default the tiny one from scratch) after ``cfg.steps``
    AdamW steps on random flipped batches of (images, masks); 255 in ``masks`` is ignored,
    so scribbles train it too (the label-consistency scorer)."""
    device = cfg.torch_device()
    rng = np.random.default_rng(cfg.seed)
    with torch.random.fork_rng(devices=[]):  # a seeded init and dropout without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        net = build_model(model or ModelConfig(), num_classes).to(device).train()
        opt = torch.optim.AdamW(net.parameters(), cfg.lr, weight_decay=1e-4)
        for _ in range(cfg.steps):
            idx = rng.integers(0, len(images), cfg.batch_size)
            flip = rng.random(len(idx)) < 0.5
            x = np.where(flip[:, None, None, None], images[idx][:, :, ::-1], images[idx])
            y = np.where(flip[:, None, None], masks[idx][:, :, ::-1], masks[idx])
            target = torch.from_numpy(y).long().to(device)
            loss = nn.functional.cross_entropy(net(_inputs(x, device)), target, ignore_index=UNLABELLED)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def predict(net: nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Class id per pixel, (N, H, W) uint8."""
    device = next(net.parameters()).device
    return np.concatenate([net(_inputs(images[i:i + batch_size], device)).argmax(1).to(torch.uint8).cpu().numpy()
                           for i in range(0, len(images), batch_size)])


# -- scoring ---------------------------------------------------------------------------------------
class Agreement:
    """The judge's predictions against own and mismatched masks, accumulated over batches.

    mIoU and pixel accuracy as seg reports them (:class:`seg.metrics.SegMetrics`: dataset-level
    confusion, classes absent from prediction and mask left out); ``fg_iou`` is the IoU of
    "any object" (class > 0), summed over the whole set. 255 mask pixels are ignored.
    """

    def __init__(self, num_classes: int) -> None:
        self.metrics = {"own": SegMetrics(num_classes), "mismatched": SegMetrics(num_classes)}
        self.fg = {"own": np.zeros(2, np.int64), "mismatched": np.zeros(2, np.int64)}  # intersection, union
        self.samples = 0

    def update(self, pred: np.ndarray, own: np.ndarray, mismatched: np.ndarray) -> None:
        for name, mask in (("own", own), ("mismatched", mismatched)):
            self.metrics[name].update(torch.from_numpy(pred), torch.from_numpy(mask))
            keep = mask != UNLABELLED
            p, t = (pred > 0) & keep, (mask > 0) & keep
            self.fg[name] += [(p & t).sum(), (p | t).sum()]
        self.samples += len(pred)

    def compute(self) -> dict[str, float | int]:
        own, mis = self.metrics["own"].compute(), self.metrics["mismatched"].compute()
        fg = {k: float(v[0] / max(1, v[1])) for k, v in self.fg.items()}
        return {"judge_miou": own["miou"], "judge_miou_mismatched": mis["miou"],
                "judge_margin": own["miou"] - mis["miou"], "fg_iou": fg["own"], "fg_iou_mismatched": fg["mismatched"],
                "pixel_acc": own["pixel_acc"], "pixel_acc_mismatched": mis["pixel_acc"], "samples": self.samples}


def score(net: nn.Module, images: np.ndarray, masks: np.ndarray, num_classes: int) -> dict[str, float | int]:
    """The judge on images held in memory, each against its own mask and the next one's (:func:`derangement`)."""
    result = Agreement(num_classes)
    result.update(predict(net, images), masks, masks[derangement(len(masks))])
    return result.compute()


def judge_on_real(images: np.ndarray, masks: np.ndarray, num_classes: int, cfg: JudgeConfig) -> tuple[nn.Module, dict | None]:
    """The judge trained on the first ``1 - holdout`` of the real images, and its score on the rest.

    That score is the ceiling a synthetic set can reach (real images, a judge that never saw
    them). ``None`` when the holdout has fewer than 2 images (no mismatched pairing exists).
    """
    n_hold = round(cfg.holdout * len(images))
    n_train = len(images) - n_hold if n_hold >= 2 else len(images)
    if n_train < 1:
        raise BadInputError(f"{len(images)} real image(s)", "too few to train the judge", "lower judge.holdout")
    net = train_judge(images[:n_train], masks[:n_train], num_classes, cfg)
    return net, (score(net, images[n_train:], masks[n_train:], num_classes) if n_train < len(images) else None)
