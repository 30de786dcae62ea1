"""Pretrain the tiny segmenter's backbone: the embedded default's analog of ImageNet.

The paper's segmenter (DeepLabV3+ on ResNet-101) starts from an ImageNet-pretrained
backbone: a network that has learned to recognise objects from image-level labels before
it sees a single mask or scribble. This job makes the miniature of that for the tiny
segmenter (``configs/seg/tiny.yaml``): exactly its backbone -- the architecture keys are
read from that config's ``model`` section, so the two cannot drift -- trained as an image
classifier on the base model's corpus (:func:`engine.data.procedural.make_scene`, split
``corpus``: a stream disjoint from the labelled ``train``/``val``/``test`` splits). The
label is the image-level caption, as a multi-label target: which of the 6 object classes
are present (background excluded). Head: global average pool of the deep (layer4)
features and one linear layer; loss: BCE-with-logits; SGD with Nesterov momentum, a
linear warm-up and a cosine decay to 0.

Inputs are normalised exactly as seg's (:func:`seg.batches.to_tensor`) and augmented with
seg's own random scale-crop-flip (:func:`seg.batches.augment`); the caption is read from
the augmented mask, so a class cropped out of view is not named. Deterministic: the
corpus is a pure function of ``corpus.seed``, the batch of step ``s`` is a slice of a
per-epoch seeded permutation, and its augmentation is drawn from a generator seeded with
``(seed, s)``. At the end the classifier is scored on ``corpus.heldout_images`` corpus
scenes after the training range (per-class average precision, exact-match accuracy, and
what a constant guess would score).

Outputs in ``out``: ``config.yaml``, ``loss.jsonl`` and its plot ``loss.png`` (with
``log.tensorboard``, also as TensorBoard event files in ``tensorboard/``), and
``final/`` holding ``backbone.safetensors`` (the backbone's state dict, seg's key names),
``head.safetensors`` (the linear classifier, for the held-out score) and
``backbone.json`` (architecture, config, command, steps, digests, held-out score,
seconds). Ship it by copying ``final/`` to ``seg/assets/tiny-backbone``; seg then loads
it with ``model.backbone_weights: builtin``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import add_config_args, from_dict, load_config, load_yaml, save_config, to_dict
from engine.data.procedural import CLASS_NAMES, make_scene
from engine.distributed import pick_device
from engine.errors import BadInputError
from engine.tensorboard_log import LogConfig, add_record, tensorboard_writer
from seg.batches import AugmentConfig, augment, to_tensor
from seg.models import BACKBONE_FILE, BACKBONE_RECORD, RANDOM, ModelConfig, ResNet, backbone_arch, build_backbone

DEFAULT_CONFIG = "configs/backbone/tiny.yaml"
HEAD_FILE = "head.safetensors"
FINAL_DIR = "final"
NUM_LABELS = len(CLASS_NAMES) - 1  # the object classes; background is never a label


@dataclass
class BackboneCorpus:
    """Training scenes ``0 .. num_images-1`` of the ``corpus`` split; the held-out score uses
    the next ``heldout_images`` (``num_images ..``), which training never sees."""

    num_images: int = 32000
    heldout_images: int = 2000
    size: int = 32
    seed: int = 0
    workers: int = 1  # 1 renders in this process; more: a process pool

    def validate(self) -> None:
        if self.num_images < 1 or self.heldout_images < 1 or self.workers < 1 or self.size < 8:
            raise BadInputError("corpus", "num_images, heldout_images and workers must be >= 1, size >= 8")


@dataclass
class BackboneTrain:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 0.6
    momentum: float = 0.9  # Nesterov
    weight_decay: float = 5e-4
    warmup_steps: int = 100  # linear warm-up, then a cosine decay to 0 at ``steps``
    log_every: int = 50
    seed: int = 0  # batch order and augmentation
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    threads: int = 1  # CPU threads (0 = every core this process may use)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise BadInputError(f"train.{name}={getattr(self, name)}", "must be >= 1")
        if self.lr <= 0 or self.warmup_steps < 0 or self.threads < 0:
            raise BadInputError("train.lr / warmup_steps / threads", "need lr > 0, warmup_steps >= 0, threads >= 0")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise BadInputError(f"train.device={self.device!r}", "choose auto, cpu, cuda or cuda:N")


@dataclass
class PretrainBackboneConfig:
    # The architecture: the ``model`` section of this seg config (its backbone keys; its
    # ``backbone_weights`` is ignored here), so the backbone is the one seg builds.
    seg_config: str = "configs/seg/tiny.yaml"
    init_seed: int = 0
    corpus: BackboneCorpus = field(default_factory=BackboneCorpus)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop=32))
    train: BackboneTrain = field(default_factory=BackboneTrain)
    log: LogConfig = field(default_factory=LogConfig)
    out: str = "runs/tiny/backbone"


def seg_model_config(seg_config: str | Path) -> ModelConfig:
    """The ``model`` section of a seg config, without its backbone weights (we make them)."""
    data = load_yaml(seg_config)
    if not isinstance(data.get("model"), dict):
        raise BadInputError(str(seg_config), "has no model section", "point seg_config at a seg config, e.g. configs/seg/tiny.yaml")
    model = from_dict(ModelConfig, {**data["model"], "backbone_weights": RANDOM}, f"{seg_config}: model")
    if model.name != "tiny":
        raise BadInputError(f"{seg_config}: model.name={model.name!r}", "only the tiny segmenter's backbone is pretrained here",
                            "ImageNet weights for the ResNet / MobileNet models load from a local file")
    return model


# -- corpus -------------------------------------------------------------------------------------
def _scene(index: int, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    scene = make_scene(index, seed, size, split="corpus")
    return scene.image, scene.mask


def render_scenes(start: int, count: int, c: BackboneCorpus, progress: bool = True, desc: str = "render corpus"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(images N x H x W x 3 uint8, masks N x H x W uint8)`` of corpus scenes ``start ..``."""
    from tqdm import tqdm

    idx = range(start, start + count)
    args = (idx, [c.seed] * count, [c.size] * count)
    if c.workers > 1:
        with ProcessPoolExecutor(c.workers) as pool:
            items = list(tqdm(pool.map(_scene, *args, chunksize=256), total=count, desc=desc, disable=not progress,
                              dynamic_ncols=True))
    else:
        items = [_scene(*a) for a in tqdm(zip(*args), total=count, desc=desc, disable=not progress, dynamic_ncols=True)]
    return np.stack([i[0] for i in items]), np.stack([i[1] for i in items])


def present(masks: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(N, 6)`` float targets: which object classes appear in each mask (0 and 255 ignored)."""
    m = torch.as_tensor(masks).long().flatten(1)
    hit = torch.zeros(len(m), 256, dtype=torch.bool).scatter_(1, m, True)
    return hit[:, 1:len(CLASS_NAMES)].float()


# The order of engine.train_controlnet.shuffled_positions, without importing that module
# (it loads diffusers and transformers, seconds of start-up the segmenter does not need).
@lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """Scenes of step ``step``'s batch: consecutive slices of a per-epoch seeded permutation."""
    pos = np.arange(step * batch_size, (step + 1) * batch_size)
    return np.array([_epoch_order(seed, int(p // n), n)[p % n] for p in pos])


def make_batch(images: np.ndarray, masks: np.ndarray, idx: np.ndarray, cfg: AugmentConfig,
               rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented, normalised images ``(B,3,crop,crop)`` and their targets ``(B,6)``."""
    xs, ys = [], []
    for i in idx:
        x, (y,) = augment(images[i], [masks[i]], cfg, rng)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), present(torch.stack(ys))


# -- model ----------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """The backbone, global average pooling of its deep features, one linear layer."""

    def __init__(self, backbone: ResNet, num_labels: int = NUM_LABELS) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_channels, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, deep = self.backbone(x)
        return self.head(deep.mean((2, 3)))


def lr_at(step: int, tc: BackboneTrain) -> float:
    """Linear warm-up over ``warmup_steps``, then a cosine decay to 0 at ``steps``."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    t = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * 0.5 * (1 + math.cos(math.pi * t))


# -- held-out score ---------------------------------------------------------------------------------
def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Average precision of one class (nan when it has no positives)."""
    order = np.argsort(-scores, kind="stable")
    hits = targets[order] > 0.5
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


@torch.no_grad()
def score(model: Classifier, images: np.ndarray, masks: np.ndarray, batch_size: int = 256,
          device: torch.device | str = "cpu") -> dict:
    """Held-out score of the classifier on un-augmented scenes: per-class AP and its mean,
    exact-match accuracy (all 6 present/absent decisions right at p = 0.5), and the same
    for a constant guess (AP = the class's prevalence; exact match = the commonest label set)."""
    model.eval()
    targets = present(masks).numpy()
    logits = torch.cat([model(torch.stack([to_tensor(im) for im in images[i:i + batch_size]]).to(device)).cpu()
                        for i in range(0, len(images), batch_size)]).numpy()
    aps = [average_precision(logits[:, c], targets[:, c]) for c in range(NUM_LABELS)]
    _, counts = np.unique(targets, axis=0, return_counts=True)
    return {
        "scenes": len(images),
        "mean_ap": float(np.nanmean(aps)),
        "per_class_ap": dict(zip(CLASS_NAMES[1:], aps)),
        "exact_match": float(((logits > 0) == (targets > 0.5)).all(1).mean()),
        "chance_mean_ap": float(targets.mean(0).mean()),
        "chance_exact_match": float(counts.max() / len(targets)),
    }


def load_classifier(folder: str | Path) -> Classifier:
    """The classifier saved in ``folder`` (``backbone.safetensors`` + ``head.safetensors``),
    built with the architecture its ``backbone.json`` records."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / BACKBONE_RECORD).read_text())
    model = Classifier(build_backbone(ModelConfig(**meta["architecture"])))
    model.backbone.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(folder / BACKBONE_FILE).items()})
    model.head.load_state_dict({k: v.float() for k, v in load_file(folder / HEAD_FILE).items()})
    return model.eval()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- the run ----------------------------------------------------------------------------------------
def save_backbone(model: Classifier, folder: Path, meta: dict) -> Path:
    """Write ``backbone.safetensors``, ``head.safetensors`` and ``backbone.json`` (fp32) to
    ``folder``, whole or not at all (a temporary sibling renamed into place)."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}, tmp / BACKBONE_FILE)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, tmp / HEAD_FILE)
    meta = dict(meta, weights_file=BACKBONE_FILE, weights_sha256=file_sha256(tmp / BACKBONE_FILE),
                head_file=HEAD_FILE, head_sha256=file_sha256(tmp / HEAD_FILE))
    (tmp / BACKBONE_RECORD).write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, folder)
    return folder


def pretrain(cfg: PretrainBackboneConfig, progress: bool = True, command: str = "") -> Path:
    """Pretrain the backbone and return the ``final`` folder (see the module docstring)."""
    from tqdm import tqdm

    t_start = time.perf_counter()
    tc, cc = cfg.train, cfg.corpus
    arch = seg_model_config(cfg.seg_config)
    device = pick_device(tc.device)
    if device.type == "cpu":
        torch.set_num_threads(tc.threads or len(os.sched_getaffinity(0)))
    out = Path(cfg.out)
    if (out / FINAL_DIR).exists():
        raise BadInputError(str(out), "already holds a pretrained backbone", "pick another out")

    images, masks = render_scenes(0, cc.num_images, cc, progress)
    t_render = time.perf_counter() - t_start
    torch.manual_seed(cfg.init_seed)
    model = Classifier(build_backbone(arch)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum, nesterov=True, weight_decay=tc.weight_decay)

    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    log_path = out / "loss.jsonl"
    model.train()
    t0, acc, n_acc = time.perf_counter(), 0.0, 0
    with (open(log_path, "w") as log, tensorboard_writer(cfg.log, out) as board,
          tqdm(total=tc.steps, desc="pretrain backbone", disable=not progress, dynamic_ncols=True) as bar):
        for step in range(tc.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, tc)
            rng = np.random.default_rng([tc.seed, step])
            x, y = make_batch(images, masks, batch_indices(step, tc.batch_size, cc.num_images, tc.seed), cfg.augment, rng)
            loss = F.binary_cross_entropy_with_logits(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            acc, n_acc, done = acc + loss.item(), n_acc + 1, step + 1
            bar.update(1)
            if done % tc.log_every == 0 or done == tc.steps:
                mean = acc / n_acc
                if not math.isfinite(mean):
                    raise RuntimeError(f"loss became {mean} by step {done}; lower train.lr")
                rec = {"step": done, "loss": round(mean, 6), "lr": opt.param_groups[0]["lr"],
                       "seconds": round(time.perf_counter() - t0, 3)}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                add_record(board, rec, "train")
                bar.set_postfix(loss=f"{mean:.4f}")
                acc, n_acc = 0.0, 0
    t_train = time.perf_counter() - t0

    t1 = time.perf_counter()
    held_images, held_masks = render_scenes(cc.num_images, cc.heldout_images, cc, progress, "render held-out")
    heldout = {"first_scene": cc.num_images, **score(model, held_images, held_masks, device=device)}
    t_score = time.perf_counter() - t1
    model.cpu()
    meta = {
        "architecture": backbone_arch(arch),
        "steps": tc.steps,
        "command": command,
        "config": to_dict(cfg),
        "dtype": "float32",
        "corpus": f"procedural split 'corpus', seed {cc.seed}, scenes 0..{cc.num_images - 1} at {cc.size} px "
                  f"(disjoint from train/val/test)",
        "labels": CLASS_NAMES[1:],
        "heldout": heldout,
        "seconds": {"render": round(t_render, 1), "train": round(t_train, 1), "score": round(t_score, 1),
                    "total": round(time.perf_counter() - t_start, 1)},
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "device": device.type,
        "torch": torch.__version__,
    }
    final = save_backbone(model, out / FINAL_DIR, meta)
    from engine.plots import plot_loss

    plot_loss([json.loads(ln) for ln in log_path.read_text().splitlines() if ln.strip()],
              "backbone pretraining loss (multi-label BCE)", out / "loss.png")
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.pretrain_backbone",
        description="Pretrain the tiny segmenter's backbone (the embedded default's ImageNet) as a multi-label "
                    "classifier of the 6 object classes on built-in corpus scenes, and score it on held-out ones. "
                    "The architecture is the model section of seg_config (configs/seg/tiny.yaml).",
        epilog="example: python -m jobs.pretrain_backbone --set out=runs/tiny/backbone; then copy <out>/final/* to "
               "seg/assets/tiny-backbone to ship it (seg loads it with model.backbone_weights=builtin)",
    )
    add_config_args(parser, DEFAULT_CONFIG)
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars (e.g. in CI logs)")
    args = parser.parse_args(argv)
    command = "python -m jobs.pretrain_backbone " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(PretrainBackboneConfig, args.config, args.overrides)
        final = pretrain(cfg, progress=not args.no_progress, command=command.strip())
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = json.loads((final / BACKBONE_RECORD).read_text())
    h = meta["heldout"]
    print(f"saved {final}: held-out mean AP {h['mean_ap']:.3f} (constant guess {h['chance_mean_ap']:.3f}), "
          f"exact match {h['exact_match']:.3f} (constant guess {h['chance_exact_match']:.3f}) on {h['scenes']} scenes")
    return 0
