"""Training batches: real and synthetic samples mixed per batch, λ chosen by the scheme.

Each batch is built inside a DataLoader worker, which knows the global step of every
batch it makes: the DataLoader takes batches from its workers round-robin, so worker
``w`` of ``W`` makes steps ``start + w``, ``start + w + W``, ... and the scheme can be
asked for the λ values allowed at exactly that step's training progress. Per batch:
draw how many samples are synthetic, draw their λ from the scheme, then take the next
sample of the per-λ (and the real) endless stream. Augmentation (random scale, crop,
flip; optionally the classical rotation, vertical flip and colour jitter) transforms
image, scribble and mask together. The mismatched-scribble control swaps each synthetic
sample's scribble for another scene's (:class:`MismatchedScribbles`); the paper's
replacement swaps a real sample for its own source's synthetic version (:class:`SourceReplacements`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image, ImageEnhance, ImageFilter
from torch.utils.data import IterableDataset

from engine.errors import BadInputError
from engine.shards import UNLABELLED, Sample
from seg.schemes import SchemeConfig, check_available, draw_lambdas, synthetic_count
from seg.stream import DataIndex, ShardGroup, StreamError, decode_record, endless, read_records, real_scribbles

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
FILL_RGB = tuple(round(255 * m) for m in MEAN.flatten().tolist())  # pixels rotated in: the mean colour, 0 once normalised
CLASSICAL_ON = ("real", "all")
SCALE_MODES = ("factor", "short_side")


@dataclass
class AugmentConfig:
    """Random scale-crop-flip of the training samples (the usual segmentation recipe), and
    the classical augmentations that compete with generative ones (all off by default).

    ``rotate``, ``vflip`` and ``color_jitter`` are the classical ops; ``classical_on``
    says which samples get them: ``real`` (the experiment's choice: synthetic images keep
    plain scale-crop-flip) or ``all``.

    ``scale_mode`` ``factor`` scales the image's own size by U(scale_min, scale_max);
    ``short_side`` is the paper's ``RandomScaleCrop``: the short side becomes
    ``randint(int(scale_min * crop), int(scale_max * crop))`` px (256 to 1026 at crop 513;
    the paper's base size is its crop size), whatever the image's size. ``blur`` is the
    paper's ``RandomGaussianBlur`` on every sample: with p 0.5, PIL's Gaussian blur of
    radius U(0, 1) on the crop.
    """

    crop: int = 64
    scale_min: float = 0.75
    scale_max: float = 1.5
    hflip: bool = True
    rotate: float = 0.0  # max degrees: angle uniform in [-rotate, rotate]; 0 = off
    vflip: bool = False  # vertical flip with p 0.5
    color_jitter: float = 0.0  # strength s: brightness/contrast/saturation x [1-s, 1+s], hue ± s/2 turn; 0 = off
    classical_on: str = "real"  # real | all: which samples get rotate, vflip and color_jitter
    scale_mode: str = "factor"  # factor | short_side (the paper's absolute short side)
    blur: bool = False  # the paper's RandomGaussianBlur (p 0.5, radius U(0, 1))

    def validate(self) -> None:
        if self.crop < 8:
            raise BadInputError(f"augment.crop={self.crop}", "must be >= 8")
        if not 0.0 < self.scale_min <= self.scale_max:
            raise BadInputError(f"augment.scale_min/max={self.scale_min}/{self.scale_max}", "need 0 < scale_min <= scale_max")
        if not isinstance(self.rotate, (int, float)) or isinstance(self.rotate, bool) or not 0.0 <= self.rotate <= 180.0:
            raise BadInputError(f"augment.rotate={self.rotate!r}", "must be a number of degrees in [0, 180] (0 = off)")
        if not isinstance(self.vflip, bool):
            raise BadInputError(f"augment.vflip={self.vflip!r}", "must be true or false")
        if not isinstance(self.color_jitter, (int, float)) or isinstance(self.color_jitter, bool) or not 0.0 <= self.color_jitter <= 1.0:
            raise BadInputError(f"augment.color_jitter={self.color_jitter!r}",
                                "must be in [0, 1] (0 = off; the hue shift is ± half of it)")
        if self.classical_on not in CLASSICAL_ON:
            raise BadInputError(f"augment.classical_on={self.classical_on!r}", f"choose one of {list(CLASSICAL_ON)}")
        if self.scale_mode not in SCALE_MODES:
            raise BadInputError(f"augment.scale_mode={self.scale_mode!r}", f"choose one of {list(SCALE_MODES)}")
        if not isinstance(self.blur, bool):
            raise BadInputError(f"augment.blur={self.blur!r}", "must be true or false")

    @property
    def classical(self) -> bool:
        """Whether any classical op is on."""
        return bool(self.rotate or self.vflip or self.color_jitter)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float, normalised with the ImageNet statistics (pretrained backbones expect them)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    return (x - MEAN) / STD


def to_rgb255(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_tensor`` for a (B,3,H,W) batch: the 0-255 colours the DenseCRF loss compares."""
    return (x * STD.to(x.device) + MEAN.to(x.device)) * 255.0


def _resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(torch.uint8)


def color_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """torchvision's ``ColorJitter(s, s, s, s / 2)`` on an HxWx3 uint8 image, in a fixed order.

    Brightness, contrast and saturation factors are drawn uniform in [1 - s, 1 + s] and
    applied with PIL's ``ImageEnhance`` (as torchvision does for PIL images), then the hue
    is turned by a shift uniform in [-s/2, s/2] of a full turn in PIL's HSV space. The
    order is always brightness, contrast, saturation, hue (torchvision draws a random one).
    """
    b, c, sat = rng.uniform(1.0 - strength, 1.0 + strength, 3)
    hue = rng.uniform(-strength / 2, strength / 2)
    img = Image.fromarray(np.ascontiguousarray(image))
    img = ImageEnhance.Brightness(img).enhance(b)
    img = ImageEnhance.Contrast(img).enhance(c)
    img = ImageEnhance.Color(img).enhance(sat)
    h, s, v = img.convert("HSV").split()
    shift = round(hue * 255)
    h = h.point([(i + shift) % 256 for i in range(256)])  # around the hue circle
    return np.array(Image.merge("HSV", (h, s, v)).convert("RGB"))


def gaussian_blur(x: torch.Tensor, radius: float) -> torch.Tensor:
    """PIL's ``GaussianBlur(radius)`` on a normalised 3xHxW image, as the paper's
    ``RandomGaussianBlur`` applies it to its 8-bit PIL crop (so the image passes through 8-bit colours)."""
    rgb = to_rgb255(x[None])[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return to_tensor(np.array(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(radius))))


def scaled_size(h: int, w: int, cfg: AugmentConfig, rng: np.random.Generator) -> tuple[int, int]:
    """The (height, width) an ``h`` x ``w`` image is resized to before the crop (see ``scale_mode``).

    ``short_side`` transcribes the paper's ``RandomScaleCrop``: the long side is
    ``int(long * short / short_side)``, truncated as the paper's ``int()`` does.
    """
    if cfg.scale_mode == "short_side":
        short = int(rng.integers(int(cfg.scale_min * cfg.crop), int(cfg.scale_max * cfg.crop) + 1))
        return (short, int(w * short / h)) if h <= w else (int(h * short / w), short)
    s = rng.uniform(cfg.scale_min, cfg.scale_max)
    return max(1, round(h * s)), max(1, round(w * s))


def rotate(image: np.ndarray, labels: list[np.ndarray], degrees: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Rotate about the centre, same size: the image bilinear, labels nearest; pixels rotated
    in from outside are the mean colour in the image and 255 in every label map."""
    img = Image.fromarray(np.ascontiguousarray(image)).rotate(degrees, Image.Resampling.BILINEAR, fillcolor=FILL_RGB)
    ys = [np.array(Image.fromarray(np.ascontiguousarray(y)).rotate(degrees, Image.Resampling.NEAREST, fillcolor=UNLABELLED))
          for y in labels]
    return np.array(img), ys


def augment(
    image: np.ndarray, labels: list[np.ndarray], cfg: AugmentConfig, rng: np.random.Generator, classical: bool = True
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Colour jitter and rotate (if on), scale (:func:`scaled_size`), pad (labels with 255) to
    the crop size, crop, maybe flip horizontally, blur (if on), and (if on) flip vertically.

    ``labels`` are HxW uint8 class maps (scribble, and the mask when wanted); they get the
    same geometry as the image with nearest-neighbour resampling so class ids stay exact.
    ``classical`` False skips the classical ops (rotate, vflip, color_jitter) for this
    sample. An op that is off draws nothing from ``rng``, so with all of them off the
    draws (and the batches) are those of the plain scale-crop-flip recipe.
    """
    if classical and cfg.color_jitter:
        image = color_jitter(image, cfg.color_jitter, rng)
    if classical and cfg.rotate:
        image, labels = rotate(image, labels, rng.uniform(-cfg.rotate, cfg.rotate))
    x = to_tensor(image)
    ys = [torch.from_numpy(np.ascontiguousarray(y)) for y in labels]
    size = scaled_size(*x.shape[1:], cfg, rng)
    if size != tuple(x.shape[1:]):
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
    if cfg.blur and rng.random() < 0.5:
        x = gaussian_blur(x, rng.uniform(0.0, 1.0))
    if classical and cfg.vflip and rng.random() < 0.5:
        x, ys = x.flip(-2), [y.flip(-2) for y in ys]
    return x.contiguous(), [y.contiguous() for y in ys]


def derangement(n: int) -> np.ndarray:
    """Item ``i`` paired with item ``i - 1`` (mod n): with another one, never with itself.

    The one pairing of a source with another scene's scribble or mask, used by the control arm
    (:class:`MismatchedScribbles`) and by the judge's chance level (:mod:`seg.judge`).
    """
    if n < 2:
        raise BadInputError(f"{n} source(s)", "pairing each source with another one needs >= 2")
    return np.roll(np.arange(n), 1)


class MismatchedScribbles:
    """The control arm: each synthetic sample paired with ANOTHER scene's real scribble.

    The pairing is fixed: :func:`derangement` over the sorted source ids of the
    real train scribbles given (those kept in this run), so source ``ids[i]`` gets the
    scribble of ``ids[i - 1]``. ``scribbles`` maps source id -> the ``scribble.png`` bytes
    of its real sample (:func:`seg.stream.real_scribbles`), decoded only when used.
    """

    def __init__(self, scribbles: dict[str, bytes]) -> None:
        ids = sorted(scribbles)
        if len(ids) < 2:
            raise BadInputError("data.mismatched_scribbles",
                                f"needs >= 2 real train sources to pair with each other; this run keeps {len(ids)}")
        self.partner = {source: ids[other] for source, other in zip(ids, derangement(len(ids)))}
        self.scribbles = scribbles

    def check(self, sources: set[str]) -> None:
        """Fail before training when a synthetic source has no real scribble in the run."""
        missing = sorted(sources - set(self.partner))
        if missing:
            raise BadInputError(f"synthetic samples of source {missing[0]!r}", f"have no real train scribble in this run "
                                f"({len(missing)} such source(s)), so data.mismatched_scribbles cannot pair them",
                                "pass the real manifest these samples were generated from, with the same data.real_fraction")

    def __call__(self, sample: Sample) -> np.ndarray:
        """The partner's scribble, resized (nearest) to the sample's image size."""
        source = sample.meta.get("source_id", "")
        if source not in self.partner:
            raise StreamError(f"synthetic sample {sample.key}", f"its source {source!r} has no real train scribble in this run",
                              "data.mismatched_scribbles pairs only sources whose real sample is in the run")
        with Image.open(io.BytesIO(self.scribbles[self.partner[source]])) as img:
            scribble = np.array(img.convert("L"))
        size = sample.image.shape[:2]
        if scribble.shape != size:
            scribble = _resize_label(torch.from_numpy(np.ascontiguousarray(scribble)), size).numpy()
        return scribble


class SourceReplacements:
    """The paper's 'replacement' (``scheme.replace_from: source``): a real sample whose coin
    came up is swapped for one fixed synthetic sample of its own source at the λ the scheme
    drew: the one with the smallest key, a fixed pseudo-random pick (keys end in a hashed
    seed), as the paper's ``synth_data[index][0]`` is one fixed file a source.

    Those samples are read once, at start (and again on resume: every shard of each λ is read
    to pick them), and kept as raw bytes (one encoded image, scribble and json a source and λ:
    a few kB each on the embedded default, about a JPEG or PNG a source on VOC); decoded only
    when used.
    """

    def __init__(self, index: DataIndex, lambdas: list[float]) -> None:
        if not index.real_sources:
            raise BadInputError("scheme.replace_from: source", "replaces real samples by their sources' synthetic ones, "
                                "but the run has no real train samples", "pass the real manifest written by ingest")
        self.records: dict[float, dict[str, dict[str, Any]]] = {}
        for lam in lambdas:
            group = ShardGroup()
            for url, key in index.first_synthetic.get(lam, {}).values():
                group.add(url, key)
            self.records[lam] = dict(read_records(group, f"synthetic samples (λ = {lam:g})"))
            missing = sorted(index.real_sources - set(self.records[lam]))
            if missing:
                raise BadInputError(f"real train source {missing[0]!r}", f"has no synthetic sample at λ = {lam:g} "
                                    f"({len(missing)} such source(s)), so scheme.replace_from: source cannot replace it",
                                    "generate every real source at every λ of the run, or set scheme.replace_from: pool")

    def __call__(self, sample: Sample, lam: float) -> Sample:
        source = sample.meta.get("source_id") or sample.key
        record = self.records[lam].get(source)
        if record is None:
            raise StreamError(f"real sample {sample.key}", f"its source {source!r} has no synthetic sample at λ = {lam:g}",
                              "scheme.replace_from: source needs every real source generated at every λ of the run")
        return decode_record(record)


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
        mismatched_scribbles: bool = False,
    ) -> None:
        super().__init__()
        self.lambdas = check_available(scheme, index.lambdas)
        self.sizes = {lam: len(group) for lam, group in index.synthetic.items()}  # weights of the pool schemes' sets
        if (scheme.name == "real" or scheme.synth_fraction < 1.0) and len(index.real) == 0:
            raise BadInputError(f"scheme {scheme.name!r}", "needs real training samples (λ = 0, split train) but the manifests have none",
                                "pass the real manifest written by ingest")
        self.index, self.scheme = index, scheme
        self.batch_size, self.total_steps, self.start_step = batch_size, total_steps, start_step
        self.augment_cfg, self.seed, self.shuffle_buffer = augment_cfg, seed, shuffle_buffer
        self.mismatched: MismatchedScribbles | None = None
        if mismatched_scribbles:  # loaded once here; the workers get a copy of the (small) PNG bytes
            self.mismatched = MismatchedScribbles(real_scribbles(index.real))
            self.mismatched.check(index.synthetic_sources)
        self.replacements: SourceReplacements | None = None
        if scheme.name == "replacement" and scheme.replace_from == "source":  # loaded once, as above
            self.replacements = SourceReplacements(index, self.lambdas)

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
            n_synth = synthetic_count(self.batch_size, self.scheme, rng, progress)
            lams = [0.0] * (self.batch_size - n_synth) + draw_lambdas(self.scheme, self.lambdas, progress, n_synth, rng, self.sizes)
            images, scribbles, rois = [], [], []
            for lam in lams:
                drawn = 0.0 if self.replacements is not None else lam  # the paper's replacement: a real sample, swapped below
                if drawn not in streams:
                    streams[drawn] = self._stream(drawn)
                sample = next(streams[drawn])
                if self.replacements is not None and lam > 0:
                    sample = self.replacements(sample, lam)
                scribble = self.mismatched(sample) if self.mismatched and lam > 0 else sample.scribble
                # A map of ones rides along as a label: padding (and rotation) turns it to 255, which marks the roi.
                inside = np.ones_like(scribble)
                classical = lam == 0.0 or self.augment_cfg.classical_on == "all"
                x, (y, valid) = augment(sample.image, [scribble, inside], self.augment_cfg, rng, classical)
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
