"""Train the ScribbleGen ControlNet on real shards (``jobs/train_controlnet.py``).

What is trained:

- ``model.kind = sd15`` (paper): the SD 1.5 UNet, VAE and CLIP text encoder stay frozen;
  the ControlNet (initialised from the UNet) is trained, and the null hint with
  ``train.learn_null_hint`` (the paper's code keeps it fixed randn noise: sd15.yaml says false).
- ``model.kind = tiny`` with ``model.pretrained: builtin`` (embedded default): the same
  recipe on the shipped tiny base (``jobs/pretrain_base.py``), the miniature of SD 1.5:
  base UNet and class-token text frozen, ControlNet from the UNet with zero convolutions.
- ``model.kind = tiny`` with ``model.pretrained: null``: everything built from scratch
  from ``model.tiny``; a randomly initialised denoiser cannot usefully be frozen (it would
  never learn to denoise), so ``train.train_denoiser: true`` trains the UNet and the
  class-token table jointly with the ControlNet and null hint.

Loss: MSE against the model's target (ε, or v for ``prediction_type: v_prediction``) at a
uniformly drawn timestep, optionally Min-SNR-γ weighted (``train.snr_gamma``). With probability
``train.cond_dropout`` (0.1) a sample's scribble hint is replaced by the null hint
and (``train.drop_prompt``) its prompt by the null prompt, so the same network learns the
unconditional branch used by classifier-free guidance. Augmentation: random horizontal
flip (``data.hflip``; the paper flips nothing). Randomness of step ``s`` comes from a
generator seeded with ``(seed, s)``, so a
resumed in-memory run replays exactly the batches and noise of an uninterrupted one.

Outputs in ``out``: ``checkpoints/step-XXXXXXXX`` (atomic, newest ``keep_checkpoints``
kept), ``loss.jsonl``, ``config.yaml``, the finished bundle in ``final/``
(``ScribbleGenModel.save_pretrained``; EMA weights when EMA is on) and, with
``log.tensorboard``, TensorBoard event files in ``tensorboard/``: the ``loss.jsonl`` numbers
and, at each checkpoint, a few samples of fixed training scribbles (``engine.preview``).

Several GPUs: ``torchrun --nproc_per_node N -m jobs.train_controlnet ...`` runs torch DDP over
the trained parts; ``train.batch_size`` stays the global batch, each rank trains on its
``1/N`` of it with the global batch's draws, so the run does one process's math (see
:class:`engine.distributed.BatchShare`); rank 0 alone writes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache, partial
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from engine.config import add_config_args, load_config, save_config
from engine.data.geometry import DEFAULT_RESIZE, check_resize, fit_colour_hint, fit_to
from engine.distributed import (
    BatchShare, barrier, batch_share, check_same_on_all_ranks, decide_on_main, is_main, mean_over_ranks, pick_device,
    setup_distributed, shutdown_distributed,
)
from engine.errors import BadInputError
from engine.manifest import read_manifest, resolve_shard
from engine.models import (
    CHANNEL_ORDERS, FINAL_DIR, HINT_ENCODINGS, HINT_RESIZES, NULL_PROMPTS, TinyArch, ScribbleGenModel, build_tiny,
    VAE_ENCODINGS, from_base, from_stable_diffusion,
)
from engine.preview import COUNT as PREVIEW_COUNT, add_preview
from engine.shards import read_shard
from engine.tensorboard_log import LogConfig, add_record, tensorboard_writer
from engine.text import names_for_ids
from engine.train_state import EMA, latest_checkpoint, load_checkpoint, resume_run, save_checkpoint

DEFAULT_CONFIG = "configs/controlnet/tiny.yaml"


@dataclass
class ModelSection:
    kind: str = "tiny"  # "tiny" (pixel space, class tokens) or "sd15" (latent space, CLIP)
    # The pretrained denoiser: SD 1.5 diffusers folder (unet/ vae/ text_encoder/ tokenizer/
    # scheduler/) for sd15; for tiny "builtin" (the shipped base), a jobs/pretrain_base.py
    # bundle, or null to build everything from scratch from `tiny`.
    pretrained: str | None = None
    resolution: int = 32
    seed: int = 0  # init seed (ControlNet copy, null hint; the whole tiny model from scratch)
    tiny: TinyArch = field(default_factory=TinyArch)  # from scratch: all of it; on a base: conditioning_channels
    # the scribble as the ControlNet sees it: colour (rendered, the paper's) | onehot (unlabelled
    # all 0) | onehot+unlabelled (unlabelled a channel of its own: the paper's one-hot ablation)
    hint: str = "colour"

    def validate(self) -> None:
        if self.kind not in ("tiny", "sd15"):
            raise BadInputError(f"model.kind={self.kind!r}", "must be 'tiny' or 'sd15'")
        if self.kind == "sd15" and not self.pretrained:
            raise BadInputError("model.pretrained", "sd15 needs the local SD 1.5 folder",
                                "--set model.pretrained=/path/to/stable-diffusion-v1-5")
        if self.resolution < 8:
            raise BadInputError(f"model.resolution={self.resolution}", "must be >= 8")
        if self.hint not in HINT_ENCODINGS:
            raise BadInputError(f"model.hint={self.hint!r}", f"must be one of {HINT_ENCODINGS}")


@dataclass
class DataSection:
    manifest: str = "runs/tiny/real/manifest.parquet"
    split: str = "train"
    in_memory: bool = True  # decode all samples once (tiny sets); false streams shards
    shuffle_buffer: int = 512  # streaming only
    hflip: bool = True
    resize: str = DEFAULT_RESIZE  # how non-square images become square: stretch (the paper) | crop | pad
    # The colour hint at the model's resolution: nearest (the fitted scribble rendered) | cubic
    # (rendered at the source's size, then resized bicubically: the paper's data.py:187)
    hint_resize: str = "nearest"
    # What the ControlNet trains on: rgb | bgr (the paper's double channel flip, a bug its
    # generation undoes; engine.models.CHANNEL_ORDERS). The bundle records it; sampling follows.
    channel_order: str = "rgb"
    # z0 from the VAE: mean (its posterior's) | sample (a draw: the paper's); sd15 only
    vae_encode: str = "mean"

    def validate(self) -> None:
        check_resize(self.resize, "data.resize")
        for key, allowed in (("channel_order", CHANNEL_ORDERS), ("vae_encode", VAE_ENCODINGS), ("hint_resize", HINT_RESIZES)):
            if getattr(self, key) not in allowed:
                raise BadInputError(f"data.{key}={getattr(self, key)!r}", f"must be one of {allowed}")


@dataclass
class TrainSection:
    steps: int = 1000
    # > 0: train this many epochs over the train split instead of ``steps``: epochs x
    # ceil(train samples / batch_size) steps (the paper: 200 epochs at batch 16, whatever the split)
    epochs: int = 0
    batch_size: int = 16
    lr: float = 5e-4
    warmup_steps: int = 50
    weight_decay: float = 1e-2
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping (the paper's Lightning trainer clips nothing)
    cond_dropout: float = 0.1
    drop_prompt: bool = False  # false: drop the hint only (the paper); true: the prompt too (recorded as the model's uncond)
    # what a dropped prompt becomes: empty | classless (the prompt without class names: the
    # paper's drop_out_text in its no-prompt variant); recorded in the bundle, sampling follows
    null_prompt: str = "empty"
    snr_gamma: float = 0.0  # Min-SNR-γ loss weighting (e.g. 5); 0 = plain MSE
    train_denoiser: bool = True  # tiny: yes (from scratch); sd15: no (frozen UNet)
    # true: the null hint is a trained parameter (the measured tiny runs); false: it stays the
    # fixed randn noise it starts as, outside the optimizer (the paper: cldm.py never trains it)
    learn_null_hint: bool = True
    ema_decay: float = 0.0  # 0 = no EMA
    save_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads for torch; 0 = all cores
    mixed_precision: str = "no"  # no | bf16 | fp16 (autocast on GPU)
    gradient_checkpointing: bool = False
    max_minutes: float = 0.0  # stop (checkpoint + final save) after this wall time; 0 = run all steps

    def validate(self) -> None:
        for name in ("steps", "batch_size", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise BadInputError(f"train.{name}={getattr(self, name)}", "must be >= 1")
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 0:
            raise BadInputError(f"train.epochs={self.epochs!r}", "must be an integer >= 0 (0 = train.steps decides)")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise BadInputError(f"train.cond_dropout={self.cond_dropout}", "must be in [0, 1)")
        if self.null_prompt not in NULL_PROMPTS:
            raise BadInputError(f"train.null_prompt={self.null_prompt!r}", f"must be one of {NULL_PROMPTS}")
        if self.snr_gamma < 0:
            raise BadInputError(f"train.snr_gamma={self.snr_gamma}", "must be >= 0 (0 disables Min-SNR weighting)")
        if self.grad_clip < 0:
            raise BadInputError(f"train.grad_clip={self.grad_clip}", "must be >= 0 (0 disables clipping)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise BadInputError(f"train.ema_decay={self.ema_decay}", "must be in [0, 1) (0 disables EMA)")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise BadInputError(f"train.mixed_precision={self.mixed_precision!r}", "must be no, bf16 or fp16")


@dataclass
class TrainControlNetConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogConfig = field(default_factory=LogConfig)
    out: str = "runs/tiny/controlnet"

    def validate(self) -> None:
        if self.data.vae_encode == "sample" and self.model.kind != "sd15":
            raise BadInputError("data.vae_encode=sample", f"model.kind={self.model.kind!r} has no VAE (pixel space)",
                                "set data.vae_encode=mean")
        if self.data.hint_resize == "cubic" and self.model.hint != "colour":
            raise BadInputError("data.hint_resize=cubic", f"blends colours, and model.hint={self.model.hint!r} has none "
                                "(the paper resizes one-hot hints with nearest)", "set data.hint_resize=nearest")


# -- data ---------------------------------------------------------------------------------------
def planned_steps(cfg: TrainControlNetConfig) -> int:
    """The run's step count: ``train.steps``, or with ``train.epochs`` > 0 that many epochs of
    ``ceil(n / batch_size)`` steps over the ``n`` ok samples of the train split (so a
    low-data split gets the paper's 200 epochs, not the full set's step count)."""
    tc = cfg.train
    if not tc.epochs:
        return tc.steps
    table, _ = read_manifest(cfg.data.manifest)
    n = sum(1 for sp, st in zip(table.column("split").to_pylist(), table.column("status").to_pylist())
            if sp == cfg.data.split and st == "ok")
    return tc.epochs * math.ceil(n / tc.batch_size)


def _shards_of_split(manifest: str, split: str) -> tuple[list[str], list[str]]:
    table, info = read_manifest(manifest)
    rows = [r for r in table.select(["shard", "split", "status"]).to_pylist()
            if r["split"] == split and r["status"] == "ok"]
    if not rows:
        raise BadInputError(manifest, f"no '{split}' samples with status ok", "ingest real data first")
    if not info.class_names:
        raise BadInputError(manifest, "manifest has no class names in its metadata")
    shards = sorted({r["shard"] for r in rows})
    return [resolve_shard(manifest, s) for s in shards], info.class_names


def _iter_split(shards: Sequence[str], split: str, size: int, resize: str, class_names: Sequence[str],
                hint_resize: str = "nearest"):
    """``(image, scribble, class names, colour hint)`` of each sample of ``split``, fitted to
    ``size``; the colour hint is None unless ``hint_resize`` is cubic (else the model renders
    the fitted scribble)."""
    for path in shards:
        for s in read_shard(path, with_mask=False):
            if s.meta.get("split", split) != split:
                continue
            img, scr = fit_to(s.image, s.scribble, size, resize)
            colours = fit_colour_hint(s.scribble, size, resize) if hint_resize == "cubic" else None
            yield img, scr, names_for_ids(np.unique(scr).tolist(), class_names), colours


@lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of epoch ``epoch`` (cached: a batch reads one or two epochs' orders)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def shuffled_positions(start: int, stop: int, n: int, seed: int) -> list[int]:
    """The items at positions ``[start, stop)`` of an endless order that visits all ``n`` items
    once per epoch, each epoch a seeded permutation: a pure function of its arguments, so a
    resumed run draws exactly the batches of an uninterrupted one."""
    out = []
    for pos in range(start, stop):
        epoch, k = divmod(pos, n)
        out.append(int(_epoch_permutation(seed, epoch, n)[k]))
    return out


Batch = tuple[np.ndarray, np.ndarray, list[list[str]], np.ndarray | None]  # images, scribbles, names, colour hints


def stack_items(items: Sequence[tuple]) -> Batch:
    """:func:`_iter_split` items as one batch (colour hints None when the items have none)."""
    colours = None if items[0][3] is None else np.stack([i[3] for i in items])
    return np.stack([i[0] for i in items]), np.stack([i[1] for i in items]), [i[2] for i in items], colours


class InMemoryData:
    """The whole split decoded once; batches by per-epoch seeded permutation (exact resume)."""

    def __init__(self, shards: Sequence[str], split: str, size: int, resize: str, class_names: Sequence[str],
                 hint_resize: str = "nearest") -> None:
        self.images, self.scribbles, self.names, self.colours = stack_items(
            list(_iter_split(shards, split, size, resize, class_names, hint_resize)))

    def __len__(self) -> int:
        return len(self.names)

    def batch(self, step: int, share: BatchShare, seed: int) -> Batch:
        """This rank's rows of global batch ``step``: the same samples whatever the number of ranks."""
        first = step * share.total
        idx = shuffled_positions(first + share.rows.start, first + share.rows.stop, len(self), seed)
        colours = None if self.colours is None else self.colours[idx]
        return self.images[idx], self.scribbles[idx], [self.names[i] for i in idx], colours


class StreamingData:
    """Endless shuffled stream over shards (big sets): shard order per pass, shuffle buffer.
    Under several ranks each streams its own shards (``shards[rank::world]``, built by the
    caller), so no rank decodes what another trains on."""

    def __init__(self, shards: Sequence[str], split: str, size: int, resize: str, class_names: Sequence[str],
                 buffer: int, seed: int, hint_resize: str = "nearest") -> None:
        self.args = (split, size, resize, class_names, hint_resize)
        self.shards, self.buffer, self.seed = list(shards), buffer, seed
        self._it = self._stream()

    def _stream(self) -> Iterator[tuple]:
        rng = random.Random(self.seed)
        buf: list = []
        while True:
            order = self.shards[:]
            rng.shuffle(order)
            for item in _iter_split(order, *self.args):
                buf.append(item)
                if len(buf) >= self.buffer:
                    yield buf.pop(rng.randrange(len(buf)))

    def batch(self, step: int, share: BatchShare, seed: int) -> Batch:
        """The next ``share.size`` items of the stream. ``step`` and ``seed`` are ignored: a
        stream cannot jump to a step without decoding everything before it, so a resumed
        streaming run (the sd15 path) starts its data order afresh. Weights, optimizer, EMA and
        each step's noise and dropout are still restored exactly; only the order differs."""
        return stack_items([next(self._it) for _ in range(share.size)])


# -- one step ---------------------------------------------------------------------------------
def flip_rows(x: np.ndarray | None, flip: np.ndarray) -> np.ndarray | None:
    """``x`` (``B x H x W [x C]``) with the rows where ``flip`` is true mirrored left-right."""
    if x is None:
        return None
    return np.where(flip.reshape(-1, *[1] * (x.ndim - 1)), x[:, :, ::-1], x)


def dropout_mask(batch: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Which samples lose their conditioning this step (Bernoulli(p) each)."""
    return torch.rand(batch, generator=generator) < p


def apply_dropout(hint: torch.Tensor, text: torch.Tensor, null_hint: torch.Tensor, null_text: torch.Tensor,
                  drop: torch.Tensor, drop_prompt: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace dropped samples' hint by the null hint (and prompt by the null prompt)."""
    d = drop.to(hint.device)
    hint = torch.where(d[:, None, None, None], null_hint, hint)
    if drop_prompt:
        text = torch.where(d[:, None, None], null_text, text)
    return hint, text


def loss_on_batch(model: ScribbleGenModel, scheduler, images: np.ndarray, scribbles: np.ndarray,
                  names: list[list[str]], p_drop: float, drop_prompt: bool,
                  gen: torch.Generator, snr_gamma: float = 0.0, share: BatchShare | None = None,
                  colours: np.ndarray | None = None) -> tuple[torch.Tensor, int]:
    """Denoising MSE (ε or v target, per the model's scheduler) on this rank's ``share`` of the
    global batch (``images`` etc. are its rows; default: the whole batch; ``colours``: its
    bicubically fitted colour hints, see :meth:`ScribbleGenModel.hint`); returns (loss over
    the share, number of dropped samples in the whole global batch)."""
    b = len(names)
    share = share or batch_share(b)
    z0 = model.encode_images(images, lambda shape: share.keep(torch.randn((share.total, *shape[1:]), generator=gen)))
    zt, t, target = noised_and_target(scheduler, z0, gen, share)
    full_drop = dropout_mask(share.total, p_drop, gen)
    drop = share.keep(full_drop)
    with torch.set_grad_enabled(any(p.requires_grad for p in model.text.parameters())):
        text = model.text.encode(names)
        null_text = model.null_text(b)
    null_hint = model.null_hints(b, images.shape[1:3])
    hint, text = apply_dropout(model.hint(scribbles, colours), text, null_hint, null_text, drop, drop_prompt)
    out = model.predict(zt, t, hint, text.to(zt.dtype))
    return denoising_loss(scheduler, out, target, t, snr_gamma), int(full_drop.sum())


def noised_and_target(scheduler, z0: torch.Tensor, gen: torch.Generator,
                      share: BatchShare | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z_t, t, target)`` for a uniformly drawn timestep per sample: the forward diffusion
    of ``z0`` and what the model must predict there (ε, or v for ``v_prediction``). With a
    ``share``, ``z0`` holds a rank's rows, and the draws are those of the global batch's rows."""
    share = share or batch_share(z0.shape[0])
    noise = share.keep(torch.randn((share.total, *z0.shape[1:]), generator=gen)).to(z0.device, z0.dtype)
    t = share.keep(torch.randint(0, scheduler.config.num_train_timesteps, (share.total,), generator=gen)).to(z0.device)
    zt = scheduler.add_noise(z0, noise, t)
    target = scheduler.get_velocity(z0, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
    return zt, t, target


def denoising_loss(scheduler, out: torch.Tensor, target: torch.Tensor, t: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Per-sample MSE (float32), optionally Min-SNR-γ weighted, averaged over the batch."""
    per_sample = (out.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    return (per_sample * loss_weights(scheduler, t, snr_gamma)).mean()


def loss_weights(scheduler, t: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Per-sample loss weights: 1, or Min-SNR-γ (Hang et al. 2023) when ``snr_gamma > 0``.

    Min-SNR caps the weight of the nearly-clean timesteps, whose easy targets otherwise
    dominate the gradient; the diffusers training scripts use the same rule:
    ``min(SNR, γ) / SNR`` for ε-prediction, ``min(SNR, γ) / (SNR + 1)`` for v-prediction.
    """
    if snr_gamma <= 0:
        return torch.ones(t.shape, device=t.device)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, t)
    capped = snr.clamp(max=snr_gamma)
    return capped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else capped / snr


# -- the loop ---------------------------------------------------------------------------------
def build_model(cfg: TrainControlNetConfig, class_names: Sequence[str]) -> ScribbleGenModel:
    m = cfg.model
    if m.kind == "tiny" and not m.pretrained:
        return build_tiny(m.tiny, class_names, m.resolution, seed=m.seed, hint=m.hint)
    if m.kind == "sd15":
        return from_stable_diffusion(m.pretrained, class_names, m.resolution, hint=m.hint)
    return from_base(m.pretrained, m.kind, class_names, m.resolution, (m.tiny.conditioning_channels,), seed=m.seed,
                     hint=m.hint)


T = TypeVar("T")


class TrainedParts(torch.nn.Module):
    """What training updates, as one module sharing its parts with the model: the ControlNet,
    the null hint with ``train.learn_null_hint`` (the paper leaves it fixed noise), and the
    denoiser UNet (and the tiny text table) with ``train.train_denoiser``. DDP wraps this, not
    the whole model, so the frozen denoiser, VAE and text encoder are neither broadcast at
    start nor hooked for all-reduce."""

    def __init__(self, model: ScribbleGenModel, train_denoiser: bool, learn_null_hint: bool = True) -> None:
        super().__init__()
        self.controlnet = model.controlnet
        if learn_null_hint:
            self.null_hint = model.null_hint
        if train_denoiser:
            self.unet = model.unet
            if model.kind == "tiny":
                self.text = model.text

    def forward(self, run: Callable[[], T]) -> T:
        """Run the step's loss. The loss goes through the whole model, but under DDP it must be
        computed inside the wrapper's forward, which arms the gradient all-reduce."""
        return run()


def trainable_params(model: ScribbleGenModel, parts: TrainedParts) -> dict[str, torch.nn.Parameter]:
    """Freeze everything, then unfreeze the trained ``parts``; the model's names for them."""
    model.requires_grad_(False)
    parts.requires_grad_(True)
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


class StepBudget:
    """How many steps a run will actually do: ``steps``, or fewer when the time box
    ``max_minutes`` ends it first. ``total`` is the honest progress-bar length: once a few
    steps are timed it becomes the projected step count at the time box."""

    def __init__(self, steps: int, max_minutes: float, start: int = 0, clock=time.perf_counter) -> None:
        self.steps, self.limit, self.start, self.clock = steps, 60.0 * max_minutes, start, clock
        self.t0 = clock()
        self.total = steps

    def step_done(self, done: int) -> bool:
        """Record that ``done`` steps are complete; True when the time box is spent."""
        if self.limit <= 0:
            return False
        elapsed = self.clock() - self.t0
        if elapsed > self.limit:
            self.total = done
            return True
        if done - self.start >= 3:
            per_step = elapsed / (done - self.start)
            self.total = min(self.steps, done + int((self.limit - elapsed) / per_step))
        return False


def train(cfg: TrainControlNetConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) training; return the folder of the saved final bundle.

    Under ``torchrun --nproc_per_node N`` every rank runs this: DDP over the trained parts,
    each rank on its ``train.batch_size / N`` rows of every global batch, rank 0 alone
    writing files. The process group lives as long as this call.
    """
    if cfg.model.kind == "sd15" and cfg.train.device == "auto" and pick_device("auto").type == "cpu":
        raise BadInputError(  # never a silent CPU fallback for a multi-day job
            "train.device=auto", "found no GPU for SD 1.5 ControlNet training (it would run for days on CPU)",
            "run it on a GPU node (e.g. ray job submit to a cluster with GPUs), or set train.device=cpu to insist",
        )
    rank, world, device = setup_distributed(cfg.train.device)
    try:
        return _train_rank(cfg, resume, progress, rank, world, device)
    finally:
        shutdown_distributed()


def _train_rank(cfg: TrainControlNetConfig, resume: bool, progress: bool, rank: int, world: int,
                device: torch.device) -> Path:
    """One rank's part of :func:`train` (the whole of it in a one-process run)."""
    from diffusers import DDIMScheduler
    from tqdm import tqdm

    if cfg.train.epochs:  # the epochs' step count, recorded in the saved config beside the epochs
        steps = planned_steps(cfg)
        if is_main(rank) and steps != cfg.train.steps:
            print(f"train.epochs={cfg.train.epochs}: {steps} steps over the train split (train.steps={cfg.train.steps} "
                  "is not used; set train.epochs=0 to train a step count)", flush=True)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    tc = cfg.train
    share = batch_share(tc.batch_size, rank, world)
    main_rank = is_main(rank)
    if device.type == "cpu":  # cores we may use, not all cores, split between the ranks on this machine
        cores = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(tc.threads or max(1, cores))
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    if not resume and (latest_checkpoint(ckpt_dir) or (out / FINAL_DIR).exists()):
        raise BadInputError(str(out), "already holds a training run", "pass --resume to continue it, or pick another out")
    shards, class_names = _shards_of_split(cfg.data.manifest, cfg.data.split)
    res = cfg.model.resolution
    if cfg.data.in_memory:
        data = InMemoryData(shards, cfg.data.split, res, cfg.data.resize, class_names, cfg.data.hint_resize)
    elif len(shards) < world:
        raise BadInputError(cfg.data.manifest, f"{len(shards)} shards cannot feed {world} ranks (each streams its own)",
                            "set data.in_memory=true, or use fewer ranks")
    else:
        data = StreamingData(shards[rank::world], cfg.data.split, res, cfg.data.resize, class_names,
                             cfg.data.shuffle_buffer, tc.seed, cfg.data.hint_resize)

    model = build_model(cfg, class_names).to(device)
    model.uncond = "hint+prompt" if cfg.train.drop_prompt else "hint"  # what the bundle records; previews sample with it
    model.resize = cfg.data.resize
    model.hint_resize = cfg.data.hint_resize
    model.channel_order = cfg.data.channel_order
    model.null_prompt = tc.null_prompt
    model.vae_encode = cfg.data.vae_encode
    parts = TrainedParts(model, tc.train_denoiser, tc.learn_null_hint)
    params = trainable_params(model, parts)
    if tc.gradient_checkpointing:
        model.controlnet.enable_gradient_checkpointing()
        model.unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params.values(), lr=tc.lr, weight_decay=tc.weight_decay)
    ema = EMA(params, tc.ema_decay) if tc.ema_decay > 0 else None
    noise_sched = DDIMScheduler.from_config(model.scheduler_config)

    log_path = out / "loss.jsonl"
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        start = resume_run(ckpt_dir, log_path, params, opt, ema, resume)
    else:  # the same checkpoint as rank 0, without touching rank 0's files
        ckpt = latest_checkpoint(ckpt_dir) if resume else None
        start = load_checkpoint(ckpt, params, opt, ema) if ckpt else 0
    check_same_on_all_ranks(start, "the step a resumed run starts at",
                            f"put out ({out}) on storage that every rank reads (a shared filesystem)")
    net = torch.nn.parallel.DistributedDataParallel(
        parts, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else parts

    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.mixed_precision)
    scaler = torch.amp.GradScaler(enabled=amp is torch.float16 and device.type == "cuda")
    model.train()
    budget = StepBudget(tc.steps, tc.max_minutes, start)  # consulted on rank 0, which decides for all
    bar = tqdm(total=budget.total, initial=start, desc="train controlnet", disable=not (progress and main_rank),
               dynamic_ncols=True)
    acc_loss, acc_n, acc_drop, t0 = 0.0, 0, 0, time.perf_counter()
    with (open(log_path, "a") if main_rank else contextlib.nullcontext() as log,
          tensorboard_writer(cfg.log, out, start, enabled=main_rank) as board):
        previews = list(islice(_iter_split(shards, cfg.data.split, res, cfg.data.resize, class_names,
                                           cfg.data.hint_resize),
                               PREVIEW_COUNT)) if board else []
        for step in range(start, tc.steps):
            gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
            for g in opt.param_groups:  # linear warmup, then constant
                g["lr"] = tc.lr * min(1.0, (step + 1) / max(1, tc.warmup_steps))
            images, scribbles, names, colours = data.batch(step, share, tc.seed)
            if cfg.data.hflip:
                flip = share.keep(torch.rand(share.total, generator=gen) < 0.5).numpy()
                images, scribbles, colours = (flip_rows(x, flip) for x in (images, scribbles, colours))
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss, dropped = net(partial(loss_on_batch, model, noise_sched, images, scribbles, names,
                                            tc.cond_dropout, tc.drop_prompt, gen, tc.snr_gamma, share, colours))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # DDP averages the ranks' gradients: that of the global mean loss
            scaler.unscale_(opt)
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params.values(), tc.grad_clip)
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                ema.update()
            step_loss = mean_over_ranks(loss.detach()).item()
            if not math.isfinite(step_loss):
                raise RuntimeError(f"loss became {step_loss} at step {step}; lower train.lr")
            acc_loss, acc_n, acc_drop = acc_loss + step_loss, acc_n + 1, acc_drop + dropped
            done = step + 1
            out_of_time = decide_on_main(main_rank and budget.step_done(done), device)
            if bar.total != budget.total:
                bar.total = budget.total
            bar.update(1)
            if done % tc.log_every == 0 or done == tc.steps or out_of_time:
                rec = {"step": done, "loss": acc_loss / acc_n, "lr": opt.param_groups[0]["lr"],
                       "dropped": acc_drop, "samples": acc_n * tc.batch_size,
                       "seconds": round(time.perf_counter() - t0, 3)}
                if log:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                add_record(board, rec, "train")
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                acc_loss, acc_n, acc_drop = 0.0, 0, 0
            if main_rank and (done % tc.save_every == 0 or done == tc.steps or out_of_time):
                save_checkpoint(ckpt_dir, done, params, opt, ema, keep=tc.keep_checkpoints)
                if board:
                    add_preview(board, model, previews, done)
            if out_of_time:
                if main_rank:
                    bar.write(f"train.max_minutes={tc.max_minutes} reached at step {done}/{tc.steps}; --resume continues")
                break
    bar.close()
    if main_rank:
        if ema is not None:
            ema.copy_to_params()
        model.eval()
        model.save_pretrained(out / FINAL_DIR)
    barrier()  # every rank returns only once the bundle it names is there
    return out / FINAL_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train the ScribbleGen ControlNet on real shards (tiny from scratch, or SD 1.5 + ControlNet).",
        epilog="example: python jobs/train_controlnet.py --config configs/controlnet/tiny.yaml "
               "--set data.manifest=runs/tiny/real/manifest.parquet --set out=runs/tiny/controlnet",
    )
    add_config_args(parser, DEFAULT_CONFIG)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in <out>/checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar (e.g. in CI logs)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(TrainControlNetConfig, args.config, args.overrides)
        final = train(cfg, resume=args.resume, progress=not args.no_progress)
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"saved {final}")
    return 0
