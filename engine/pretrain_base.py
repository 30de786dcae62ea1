"""Pretrain the tiny base denoiser: the embedded default's analog of Stable Diffusion 1.5.

The paper's generator knows the world before it sees a scribble: SD 1.5 was pretrained on
web images with captions, and only the ControlNet is trained on (image, scribble) pairs.
This job makes the miniature of that: a tiny pixel-space ``UNet2DConditionModel`` with
its class-token text encoder, trained to denoise a large built-in corpus that is disjoint
from the labelled sets (the procedural ``corpus`` split) and that carries image-level
captions only -- the names of the classes present, like a web caption. Captions are
dropped with probability ``train.caption_dropout`` (SD 1.5's unconditional training).

Run it once (``python -m jobs.pretrain_base``); the result ships inside the package at
``engine/assets/tiny-base`` (``model.pretrained: builtin`` in the configs) with
``base.json`` recording its config, the command, the step count and its weights digest.

Deterministic and resumable: the corpus is a pure function of ``corpus.seed``, the batch
of step ``s`` is a per-epoch seeded permutation, and all noise comes from a generator
seeded with ``(seed, s)``, so ``--resume`` after a kill replays an uninterrupted run.
Outputs in ``out``: ``checkpoints/``, ``loss.jsonl`` and its plot ``loss.png``,
``config.yaml``, ``samples.png`` (:func:`preview_grid` of the final weights), the
bundle in ``final/`` and, with ``log.tensorboard``, the ``loss.jsonl`` numbers as
TensorBoard event files in ``tensorboard/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from engine.config import add_config_args, load_config, save_config, to_dict
from engine.data.procedural import CLASS_NAMES, make_scene
from engine.errors import BadInputError
from engine.models import BASE_FILE, FINAL_DIR, TinyArch, _replace_dir, tiny_denoiser, tiny_scheduler_config, weights_digest
from engine.tensorboard_log import LogConfig, add_record, tensorboard_writer
from engine.text import ClassTokenEncoder, names_for_ids
from engine.train_controlnet import denoising_loss, noised_and_target, pick_device, shuffled_positions
from engine.train_state import EMA, latest_checkpoint, resume_run, save_checkpoint

DEFAULT_CONFIG = "configs/base/tiny.yaml"
EXPORT_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class CorpusSection:
    """The pretraining corpus: ``num_images`` procedural ``corpus``-split scenes."""

    num_images: int = 20000
    size: int = 32
    seed: int = 0
    workers: int = 2  # processes that render the corpus once at start

    def validate(self) -> None:
        if self.num_images < 1 or self.workers < 1:
            raise BadInputError("corpus", "num_images and workers must be >= 1")


@dataclass
class BaseTrainSection:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    cooldown_steps: int = 500  # the LR falls linearly to 0 over the last steps: clean final weights
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    caption_dropout: float = 0.1  # share of captions replaced by the null prompt
    ema_decay: float = 0.0  # > 0: export an EMA of the weights instead of the final ones
    save_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # 0 = every core this process may use
    # > 0: a time box on the training loop's wall time. After ``calibrate_steps`` steps, ``steps``
    # is lowered ONCE to what fits (the step time measured after the first fifth of them, which
    # carries one-time costs such as CUDA start-up); from then on the run is the same as
    # ``--set train.steps=<that>`` (recorded in base.json), cool-down included.
    max_minutes: float = 0.0
    calibrate_steps: int = 50

    def validate(self) -> None:
        for name in ("steps", "batch_size", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise BadInputError(f"train.{name}={getattr(self, name)}", "must be >= 1")
        if self.max_minutes > 0 and self.calibrate_steps < 5:
            raise BadInputError(f"train.calibrate_steps={self.calibrate_steps}", "must be >= 5 with a time box")
        if not 0.0 <= self.caption_dropout < 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise BadInputError("train.caption_dropout / train.ema_decay", "must be in [0, 1)")


@dataclass
class PretrainBaseConfig:
    model: TinyArch = field(default_factory=TinyArch)
    resolution: int = 32
    init_seed: int = 0
    corpus: CorpusSection = field(default_factory=CorpusSection)
    train: BaseTrainSection = field(default_factory=BaseTrainSection)
    log: LogConfig = field(default_factory=LogConfig)
    export_dtype: str = "float16"  # the shipped bundle's weights (float16 halves its size)
    out: str = "runs/tiny/base"

    def validate(self) -> None:
        if self.export_dtype not in EXPORT_DTYPES:
            raise BadInputError(f"export_dtype={self.export_dtype!r}", f"must be one of {list(EXPORT_DTYPES)}")


# -- corpus -------------------------------------------------------------------------------------
def _corpus_item(index: int, seed: int, size: int) -> tuple[np.ndarray, int]:
    """Image and the bit set of object classes present (the caption) of corpus scene ``index``."""
    scene = make_scene(index, seed, size, split="corpus")
    return scene.image, sum(1 << int(c) for c in np.unique(scene.mask) if c)


def render_corpus(c: CorpusSection, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(images N x H x W x 3 uint8, class bits N)``: the whole corpus, rendered once."""
    from tqdm import tqdm

    idx = range(c.num_images)
    with ProcessPoolExecutor(c.workers) as pool:
        items = list(tqdm(pool.map(_corpus_item, idx, [c.seed] * len(idx), [c.size] * len(idx), chunksize=256),
                          total=len(idx), desc="render corpus", disable=not progress, dynamic_ncols=True))
    return np.stack([i[0] for i in items]), np.array([i[1] for i in items], np.int64)


def captions(bits: np.ndarray) -> list[list[str]]:
    """Class-name captions from class bit sets (background never named)."""
    return [names_for_ids([c for c in range(1, len(CLASS_NAMES)) if b >> c & 1], CLASS_NAMES) for b in bits]


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Indices of step ``step``'s batch: consecutive slices of a per-epoch seeded permutation."""
    return shuffled_positions(step * batch_size, (step + 1) * batch_size, n, seed)


# -- the bundle ---------------------------------------------------------------------------------
def save_base(unet: torch.nn.Module, text: ClassTokenEncoder, arch: TinyArch, folder: Path,
              provenance: dict) -> Path:
    """Write the base bundle (diffusers layout: ``unet/``, ``text_encoder/``, ``scheduler/``,
    plus ``base.json``) atomically, in ``provenance['export_dtype']``."""
    from diffusers import DDIMScheduler

    dtype = EXPORT_DTYPES[provenance["export_dtype"]]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    unet.to(dtype).save_pretrained(tmp / "unet", safe_serialization=True)
    text.to(dtype).save_pretrained(tmp / "text_encoder", safe_serialization=True)
    DDIMScheduler.from_config(tiny_scheduler_config(arch)).save_pretrained(tmp / "scheduler")
    meta = dict(provenance, kind="tiny", class_names=list(text.config.class_names),
                weights_sha256=weights_digest(tmp, length=64))
    (tmp / BASE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    _replace_dir(tmp, folder)
    return folder


def preview_grid(folder: Path, n: int = 8, seed: int = 0, lambdas: tuple[float, ...] = (0.4, 0.7, 1.0),
                 num_steps: int = 20, zoom: int = 4) -> np.ndarray:
    """What the base alone makes: one row per ``val`` scene -- the source, then a sample at each
    λ from that source with its caption (DDIM, ``paper`` spacing). A ControlNet fresh from the
    base adds exactly nothing (zero convolutions), so sampling through it samples the base."""
    from engine.models import from_base
    from engine.sampler import ScribbleSampler

    meta = json.loads((Path(folder) / BASE_FILE).read_text())
    size = meta["config"]["resolution"]
    model = from_base(folder, "tiny", meta["class_names"], size, (meta["config"]["model"]["conditioning_channels"],))
    scenes = [make_scene(i, seed, size, split="val") for i in range(n)]
    images = np.stack([s.image for s in scenes])
    scribbles = np.stack([s.scribble for s in scenes])
    names = [names_for_ids(np.unique(s.mask).tolist(), meta["class_names"]) for s in scenes]
    sampler = ScribbleSampler(model, num_steps=num_steps, spacing="paper")
    cols = [images] + [sampler.sample(images, scribbles, names, 1.0, lam, list(range(n))) for lam in lambdas]
    grid = np.concatenate([np.concatenate(list(col), 0) for col in cols], 1)
    return grid.repeat(zoom, 0).repeat(zoom, 1)


def lr_at(step: int, tc: BaseTrainSection) -> float:
    """Linear warm-up, constant, then a linear cool-down to 0 over the last ``cooldown_steps``.
    The schedule before the cool-down does not depend on ``steps``, so a run can be extended
    (``--resume --set train.steps=...``) as long as its cool-down has not begun."""
    return tc.lr * min(1.0, (step + 1) / max(1, tc.warmup_steps), (tc.steps - step) / max(1, tc.cooldown_steps))


# -- the loop -----------------------------------------------------------------------------------
def fix_steps_to_time_box(cfg: PretrainBaseConfig, done: int, elapsed: float, per_step: float, out: Path) -> None:
    """Lower ``train.steps`` once to what fits in ``train.max_minutes`` (``elapsed`` seconds
    spent, ``per_step`` seconds a step from now on, 3 % kept for the export) and re-save the
    config, so the run is exactly the fixed-step run its record names. Refuses when the
    cool-down would already have begun (the schedule so far would differ from that run's)."""
    tc = cfg.train
    fitted = min(tc.steps, done + int(0.97 * max(0.0, 60.0 * tc.max_minutes - elapsed) / per_step))
    if fitted < tc.steps and fitted - tc.cooldown_steps < done:
        raise BadInputError(f"train.max_minutes={tc.max_minutes}", f"fits only {fitted} steps, too few for a "
                            f"{tc.cooldown_steps}-step cool-down after {done} calibration steps",
                            "give it more minutes or lower train.cooldown_steps")
    tc.steps = fitted
    save_config(cfg, out / "config.yaml")


def pretrain(cfg: PretrainBaseConfig, resume: bool = False, progress: bool = True, command: str = "",
             clock: Callable[[], float] = time.perf_counter) -> Path:
    """Run (or resume) pretraining; return the final bundle folder. ``clock`` times the time box."""
    from diffusers import DDIMScheduler
    from tqdm import tqdm

    tc = cfg.train
    device = pick_device(tc.device)
    if device.type == "cpu":
        torch.set_num_threads(tc.threads or len(os.sched_getaffinity(0)))
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    if not resume and (latest_checkpoint(ckpt_dir) or (out / FINAL_DIR).exists()):
        raise BadInputError(str(out), "already holds a pretraining run", "pass --resume to continue it, or pick another out")
    images, bits = render_corpus(cfg.corpus, progress)

    unet = tiny_denoiser(cfg.model, cfg.resolution, cfg.init_seed).to(device)
    text = ClassTokenEncoder(list(CLASS_NAMES), dim=cfg.model.cross_attention_dim, max_tokens=cfg.model.text_tokens).to(device)
    params = {f"unet.{k}": p for k, p in unet.named_parameters()} | {f"text.{k}": p for k, p in text.named_parameters()}
    opt = torch.optim.AdamW(params.values(), lr=tc.lr, weight_decay=tc.weight_decay)
    ema = EMA(params, tc.ema_decay) if tc.ema_decay > 0 else None
    sched = DDIMScheduler.from_config(tiny_scheduler_config(cfg.model))
    # The corpus and its caption tokens live on the device once: a step only gathers rows
    # (on a GPU the tiny model is bound by per-step overhead, not by arithmetic).
    corpus = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    tokens = text.token_ids(captions(bits))

    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    log_path = out / "loss.jsonl"
    start = resume_run(ckpt_dir, log_path, params, opt, ema, resume)

    unet.train()
    warm = start + max(1, tc.calibrate_steps // 5)
    box_t0 = t_warm = clock() if tc.max_minutes > 0 else 0.0
    bar = tqdm(total=tc.steps, initial=start, desc="pretrain base", disable=not progress, dynamic_ncols=True)
    acc, n_acc, t0 = torch.zeros((), device=device), 0, time.perf_counter()
    with open(log_path, "a") as log, tensorboard_writer(cfg.log, out, start) as board:
        for step in range(start, tc.steps):
            gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, tc)
            idx = torch.tensor(batch_indices(step, tc.batch_size, len(corpus), tc.seed), device=device)
            x = corpus[idx].float() / 127.5 - 1.0
            if torch.rand((), generator=gen) < 0.5:  # flip the whole batch: layouts, not only left-right habits
                x = x.flip(-1)
            zt, t, target = noised_and_target(sched, x, gen)
            drop = (torch.rand(len(idx), generator=gen) < tc.caption_dropout).to(device)
            emb = torch.where(drop[:, None, None], text.null(len(idx)), text.embed(tokens[idx]))
            loss = denoising_loss(sched, unet(zt, t, encoder_hidden_states=emb).sample, target, t, 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params.values(), tc.grad_clip)
            opt.step()
            if ema is not None:
                ema.update()
            acc, n_acc, done = acc + loss.detach(), n_acc + 1, step + 1
            bar.update(1)
            if tc.max_minutes > 0 and done == warm:
                t_warm = clock()
            if tc.max_minutes > 0 and done == start + tc.calibrate_steps:
                now = clock()
                fix_steps_to_time_box(cfg, done, now - box_t0, (now - t_warm) / (done - warm), out)
                bar.total = tc.steps
            if done % tc.log_every == 0 or done == tc.steps:  # the only host sync of the loop
                mean = acc.item() / n_acc
                if not math.isfinite(mean):
                    raise RuntimeError(f"loss became {mean} by step {done}; lower train.lr")
                rec = {"step": done, "loss": mean, "lr": opt.param_groups[0]["lr"],
                       "seconds": round(time.perf_counter() - t0, 3)}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                add_record(board, rec, "train")
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                acc, n_acc = torch.zeros((), device=device), 0
            if done % tc.save_every == 0 or done == tc.steps:
                save_checkpoint(ckpt_dir, done, params, opt, ema, keep=tc.keep_checkpoints)
            if done == tc.steps:  # reached early when the time box lowered tc.steps
                break
    bar.close()
    if ema is not None:
        ema.copy_to_params()
    unet.eval()
    provenance = {"steps": tc.steps, "command": command, "config": to_dict(cfg), "export_dtype": cfg.export_dtype,
                  "corpus": f"procedural split 'corpus', seed {cfg.corpus.seed}, {cfg.corpus.num_images} scenes "
                            f"at {cfg.corpus.size} px (disjoint from train/val/test)"}
    final = save_base(unet.cpu(), text.cpu(), cfg.model, out / FINAL_DIR, provenance)
    from PIL import Image

    from engine.plots import plot_loss

    Image.fromarray(preview_grid(final)).save(out / "samples.png")
    lines = [json.loads(ln) for ln in log_path.read_text().splitlines() if ln.strip()]
    plot_loss(lines, "base pretraining loss (v-prediction MSE)", out / "loss.png")
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Pretrain the tiny base denoiser (the embedded default's SD 1.5) on the built-in corpus.",
        epilog="example: python -m jobs.pretrain_base --set train.steps=3000 --set out=runs/tiny/base; "
               "then copy <out>/final to engine/assets/tiny-base to ship it",
    )
    add_config_args(parser, DEFAULT_CONFIG)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in <out>/checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars (e.g. in CI logs)")
    args = parser.parse_args(argv)
    command = "python -m jobs.pretrain_base " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(PretrainBaseConfig, args.config, args.overrides)
        final = pretrain(cfg, resume=args.resume, progress=not args.no_progress, command=command.strip())
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"saved {final}")
    return 0
