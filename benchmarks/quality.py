"""Quality of the embedded default after its default training budget: agreement and FID vs w.

Pipeline (all on CPU, reusing what already exists under ``--out``):

1. real data: the built-in procedural set, ingested with ``jobs/ingest.py`` (64 px shards);
2. the tiny ScribbleGen model trained with ``configs/controlnet/tiny.yaml`` (its default
   budget, 3000 steps; ``--minutes`` time-boxes it instead), or ``--model DIR``;
3. a judge segmenter (seg's tiny DeepLabV3+) trained on REAL train images with their full masks;
4. synthetic images for the val sources at each (w, λ), N DDIM steps, seed = source index.

Reported per (w, λ):

- agreement: mIoU / pixel accuracy of the judge's prediction on the synthetic image
  against the SOURCE mask, next to the same score against a MISMATCHED mask (another
  source's, a fixed derangement). "matched > mismatched" means the image follows its
  scribble; the real val images give the ceiling, mismatched the chance level;
- FID (``engine.fid``: torchmetrics ``FrechetInceptionDistance``) between the real val
  sources and the synthetic images, with the same offline random-feature extractor as the
  demo's FID (``--inception PATH`` uses local FID-Inception weights instead; needs
  torch-fidelity). Lower is better; with guidance working it falls from w = 1 to w ~ 2-3.
  "real val" (against real train) is the floor.

    python benchmarks/quality.py                         # ~40 min on 2 cores (most of it training)
    python benchmarks/quality.py --model runs/tiny/controlnet --out runs/quality
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see jobs/train_controlnet.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from engine.config import load_config  # noqa: E402
from engine.fid import FIDConfig, FIDScorer  # noqa: E402
from engine.manifest import read_manifest, resolve_shard  # noqa: E402
from engine.models import FINAL_DIR, ScribbleGenModel  # noqa: E402
from engine.sampler import ScribbleSampler  # noqa: E402
from engine.shards import UNLABELLED, read_shard  # noqa: E402
from engine.text import names_for_ids  # noqa: E402
from engine.train_controlnet import TrainControlNetConfig, fit_to, train  # noqa: E402
from seg.batches import to_tensor  # noqa: E402
from seg.metrics import SegMetrics  # noqa: E402
from seg.models import ModelConfig, build_model  # noqa: E402


# -- data -------------------------------------------------------------------------------------
def ensure_real(out: Path, num_train: int) -> Path:
    manifest = out / "real" / "manifest.parquet"
    if not manifest.is_file():
        from engine.ingest import main as ingest_main

        rc = ingest_main(["--out", str(out / "real"), "--set", f"source.procedural.num_train={num_train}"])
        if rc:
            raise SystemExit(rc)
    return manifest


def load_split(manifest: Path, split: str, size: int, limit: int | None = None):
    """(images, scribbles, masks) of a split, fitted to ``size`` like the trainer does."""
    table, info = read_manifest(manifest)
    shards = sorted({r["shard"] for r in table.to_pylist() if r["split"] == split and r["status"] == "ok"})
    images, scribbles, masks = [], [], []
    for shard in shards:
        for s in read_shard(resolve_shard(manifest, shard)):
            if s.meta.get("split") != split:
                continue
            img, scr = fit_to(s.image, s.scribble, size)
            masks.append(fit_to(s.image, s.mask, size)[1])
            images.append(img)
            scribbles.append(scr)
            if limit and len(images) >= limit:
                return np.stack(images), np.stack(scribbles), np.stack(masks), info.class_names
    return np.stack(images), np.stack(scribbles), np.stack(masks), info.class_names


# -- judge segmenter --------------------------------------------------------------------------
def _to_input(images: np.ndarray) -> torch.Tensor:
    return torch.stack([to_tensor(img) for img in images])


def train_judge(images: np.ndarray, masks: np.ndarray, num_classes: int, seconds: float, seed: int = 0) -> nn.Module:
    """seg's tiny DeepLabV3+ trained on REAL images with FULL masks: only a measuring instrument."""
    torch.manual_seed(seed)
    net = build_model(ModelConfig(), num_classes)
    opt = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        idx = rng.integers(0, len(images), 32)
        x, y = images[idx], masks[idx]
        flip = rng.random(len(idx)) < 0.5
        x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
        y = np.where(flip[:, None, None], y[:, :, ::-1], y)
        loss = nn.functional.cross_entropy(net(_to_input(x)), torch.from_numpy(y).long(), ignore_index=UNLABELLED)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    print(f"judge: {step} steps in {seconds:.0f} s, last loss {loss.item():.3f}")
    return net.eval()


@torch.no_grad()
def predict(net: nn.Module, images: np.ndarray) -> np.ndarray:
    return np.concatenate([net(_to_input(images[i:i + 64])).argmax(1).numpy() for i in range(0, len(images), 64)])


def fg_iou(pred: np.ndarray, target: np.ndarray) -> float:
    """IoU of "any object" (class > 0) between prediction and mask: shape placement, class-blind."""
    keep = target != UNLABELLED
    p, t = (pred > 0) & keep, (target > 0) & keep
    return float((p & t).sum() / max(1, (p | t).sum()))


def miou_acc(pred: np.ndarray, target: np.ndarray, num_classes: int) -> tuple[float, float]:
    """Dataset-level mIoU and pixel accuracy, as seg reports them (seg.metrics.SegMetrics)."""
    metrics = SegMetrics(num_classes)
    metrics.update(torch.from_numpy(pred), torch.from_numpy(target))
    out = metrics.compute()
    return out["miou"], out["pixel_acc"]


# -- FID --------------------------------------------------------------------------------------
def fid_scorer(reference: np.ndarray, inception: str | None) -> FIDScorer:
    """engine.fid's scorer (random features offline, or local Inception weights) on ``reference``."""
    cfg = FIDConfig(feature="inception", inception_weights=inception) if inception else FIDConfig()
    cfg.validate()
    scorer = FIDScorer(cfg, reference.shape[1])
    scorer.set_reference(reference)
    return scorer


# -- main -------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/quality", help="work folder (data, model, results.json)")
    p.add_argument("--model", help="trained model folder; default: train one into <out>/controlnet")
    p.add_argument("--config", default="configs/controlnet/tiny.yaml")
    p.add_argument("--minutes", type=float, help="override train.max_minutes of the config")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=200, help="val sources to generate from")
    p.add_argument("--w", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    p.add_argument("--lam", type=float, nargs="+", default=[1.0, 0.5])
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--batch", type=int, default=50, help="sampler batch size")
    p.add_argument("--judge-seconds", type=float, default=150)
    p.add_argument("--inception", help="local FID-Inception weights (torch-fidelity format); default random conv")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads or len(os.sched_getaffinity(0)))
    out = Path(a.out)
    manifest = ensure_real(out, a.num_train)

    if a.model:
        model_dir = Path(a.model)
    else:
        over = [f"data.manifest={manifest}", f"out={out / 'controlnet'}"]
        if a.minutes is not None:
            over.append(f"train.max_minutes={a.minutes}")
        cfg = load_config(TrainControlNetConfig, a.config, over)
        model_dir = out / "controlnet"
        if not (model_dir / FINAL_DIR).is_dir():
            t0 = time.perf_counter()
            train(cfg, resume=True)
            print(f"trained in {time.perf_counter() - t0:.0f} s")
    model = ScribbleGenModel.from_pretrained(model_dir)
    size = model.resolution
    tr_img, _, tr_mask, class_names = load_split(manifest, "train", size)
    va_img, va_scr, va_mask, _ = load_split(manifest, "val", size, a.num_val)
    k = len(class_names)
    judge = train_judge(tr_img, tr_mask, k, a.judge_seconds)
    mismatch = np.roll(np.arange(len(va_img)), 1)  # derangement: each image vs its neighbour's mask

    rows = []
    # Real val is scored against real train (the floor); synthetic sets against their real sources.
    fid_train, fid_val = fid_scorer(tr_img, a.inception), fid_scorer(va_img, a.inception)

    def score(name: str, images: np.ndarray, seconds: float = 0.0) -> None:
        pred = predict(judge, images)
        m, acc = miou_acc(pred, va_mask, k)
        mm, macc = miou_acc(pred, va_mask[mismatch], k)
        scorer = fid_train if name == "real val" else fid_val
        rows.append({"set": name, "miou": m, "acc": acc, "mismatched_miou": mm, "mismatched_acc": macc,
                     "fg_iou": fg_iou(pred, va_mask), "mismatched_fg_iou": fg_iou(pred, va_mask[mismatch]),
                     "fid": scorer.score(images)[0], "s_per_img": seconds})
        r = rows[-1]
        print(f"{name:>16} | {r['miou']:.3f} {r['fg_iou']:.3f} {r['acc']:.3f} | {r['mismatched_miou']:.3f} "
              f"{r['mismatched_fg_iou']:.3f} {r['mismatched_acc']:.3f} | {r['fid']:9.3f} | {seconds:.3f}", flush=True)

    print(f"model {model.model_id} ({size} px), {len(va_img)} val sources, {a.steps} DDIM steps")
    print(f"{'set':>16} | source mask: mIoU fgIoU acc | mismatched: mIoU fgIoU acc | FID | s/img")
    score("real val", va_img)
    sampler = ScribbleSampler(model, num_steps=a.steps)
    names = [names_for_ids(np.unique(s).tolist(), class_names) for s in va_scr]
    n = len(va_img)
    for lam in a.lam:
        for w in a.w:
            t0 = time.perf_counter()
            fake = np.concatenate([
                sampler.sample(va_img[i:j], va_scr[i:j], names[i:j], w, lam, list(range(i, j)))
                for i in range(0, n, a.batch) for j in [min(n, i + a.batch)]
            ])
            score(f"w={w:g} lam={lam:g}", fake, (time.perf_counter() - t0) / len(fake))
    (out / "results.json").write_text(json.dumps({"model": model.model_id, "rows": rows}, indent=2))
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
