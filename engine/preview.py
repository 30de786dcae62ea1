"""Sample images of a ControlNet while it trains, for TensorBoard, without disturbing training.

At every checkpoint the trainer (``engine.train_controlnet``, rank 0) samples a few fixed
training scribbles with the weights being trained (not the EMA), always from the same
seeds, so one image per checkpoint shows what the model has learned so far. It is cheap on
purpose: :data:`COUNT` samples, :data:`STEPS` DDIM steps, at the paper's guidance w = 2 and
λ = 1 (from noise, so the picture is the ControlNet's and not the source's).

Sampling must leave no trace on the run: a run with previews ends with the same weights,
bit for bit, as one without (``tests/test_tensorboard.py``). Training draws all its
randomness from per-step generators and sampling from per-sample ones
(:class:`engine.sampler.ScribbleSampler`); :func:`left_as_found` also restores the global
RNG state and every submodule's train/eval mode; the sampler runs under ``no_grad`` (and
the trainer calls it between steps, outside their autocast) and is handed the model's own
device and dtype, so it moves and casts nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

from engine.models import ScribbleGenModel
from engine.plots import upscale
from engine.render import overlay_scribble, render_scribble
from engine.sampler import ScribbleSampler

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

COUNT = 4  # training scribbles sampled at each checkpoint (the first of the train split)
STEPS = 10  # DDIM steps (paper spacing): a preview, not a result
W, LAMBDA = 2.0, 1.0
TAG = "controlnet/samples"

# image H x W x 3, scribble H x W, class names, colour hint H x W x 3 or None (hint_resize: cubic)
Source = tuple[np.ndarray, np.ndarray, list[str], np.ndarray | None]


@contextmanager
def left_as_found(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Run a side computation inside a training loop and undo what it may change: the global
    torch RNG (CPU, and ``device``'s when it is a GPU) and the train/eval mode of every
    submodule of ``model``."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        for module, training in modes:
            module.training = training


def preview_grid(model: ScribbleGenModel, sources: Sequence[Source]) -> np.ndarray:
    """One row per source: the source with its scribble over it, the scribble alone (its
    colour rendering), and the sample with the scribble over it; every
    tile enlarged like the report's. ``H x W x 3`` uint8. The model must record the
    unconditional pair its training teaches (``model.uncond``)."""
    images = np.stack([s[0] for s in sources])
    scribbles = np.stack([s[1] for s in sources])
    sampler = ScribbleSampler(model, device=model.device, num_steps=STEPS, dtype=model.dtype, uncond=model.uncond)
    colours = None if sources[0][3] is None else np.stack([s[3] for s in sources])
    samples = sampler.sample(images, scribbles, [s[2] for s in sources], W, LAMBDA, list(range(len(sources))), colours)
    rows = [np.concatenate([upscale(overlay_scribble(image, scribble)), upscale(render_scribble(scribble)),
                            upscale(overlay_scribble(sample, scribble))], axis=1)
            for image, scribble, sample in zip(images, scribbles, samples)]
    return np.concatenate(rows, axis=0)


def add_preview(writer: SummaryWriter, model: ScribbleGenModel, sources: Sequence[Source], step: int) -> None:
    """Sample :func:`preview_grid` and write it as image :data:`TAG` at ``step``, leaving the
    training as it was (:func:`left_as_found`)."""
    with left_as_found(model, model.device):
        grid = preview_grid(model, sources)
    writer.add_image(TAG, grid, step, dataformats="HWC")
