"""Quality of the embedded default after its default training budget: agreement and FID vs w.

Pipeline (all on CPU, reusing what already exists under ``--out``):

1. real data: the built-in procedural set, ingested with ``jobs/ingest.py`` (32 px shards):
   the full labelled set, and its low-data subset (``--subset``, default 1/16);
2. the ScribbleGen model trained with ``configs/controlnet/tiny.yaml`` (ControlNet on the
   shipped frozen base, its default budget; ``--minutes`` time-boxes it instead) on the
   low-data subset only, as in the paper's setting, or ``--model DIR``;
3. the judge (``seg.judge``: seg's tiny DeepLabV3+) trained on the FULL set's real train
   images with their full masks (an instrument, like FID's feature net);
4. synthetic images for the val sources at each (w, λ), N DDIM steps, seed = source index.

Reported per (w, λ):

- agreement (``seg.judge.score``): mIoU / fg IoU / pixel accuracy of the judge's prediction
  on the synthetic image against the SOURCE mask, next to the same score against a
  MISMATCHED mask (another source's, ``seg.judge.derangement``). "matched > mismatched"
  means the image follows its scribble; the real val images give the ceiling, mismatched
  the chance level;
- FID (``engine.fid``: torchmetrics ``FrechetInceptionDistance``) between the real val
  sources and the synthetic images, with the same offline random-feature extractor as the
  demo's FID (``--inception PATH`` uses local FID-Inception weights instead; needs
  torch-fidelity). Lower is better; with guidance working it falls from w = 1 to w ~ 2-3.
  "real val" (against real train) is the floor.

    python benchmarks/quality.py                         # ~25 min on 2 cores (most of it training)
    python benchmarks/quality.py --model runs/tiny/controlnet --out runs/quality
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from itertools import islice
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see jobs/train_controlnet.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.config import load_config  # noqa: E402
from engine.fid import FIDConfig, FIDScorer  # noqa: E402
from engine.manifest import read_manifest  # noqa: E402
from engine.models import FINAL_DIR, ScribbleGenModel  # noqa: E402
from engine.sampler import ScribbleSampler  # noqa: E402
from engine.text import names_for_ids  # noqa: E402
from engine.train_controlnet import TrainControlNetConfig, train  # noqa: E402
from engine.data.geometry import fit_sample  # noqa: E402
from seg.judge import JudgeConfig, manifest_samples, score, train_judge  # noqa: E402


# -- data -------------------------------------------------------------------------------------
def ensure_real(out: Path, num_train: int, subset: str = "1") -> Path:
    """The built-in set ingested into ``out/real-<subset>`` (once), e.g. ``subset="1/16"``."""
    folder = out / f"real-{subset.replace('/', 'of')}"
    manifest = folder / "manifest.parquet"
    if not manifest.is_file():
        from engine.ingest import main as ingest_main

        rc = ingest_main(["--out", str(folder), "--subset", subset, "--set", f"source.procedural.num_train={num_train}"])
        if rc:
            raise SystemExit(rc)
    return manifest


def load_split(manifest: Path, split: str, size: int, limit: int | None = None):
    """(images, scribbles, masks, class names) of a split, fitted to ``size`` like the trainer does."""
    samples = [fit_sample(s, size) for s in islice(manifest_samples(manifest, lambda r: r["split"] == split), limit)]
    return (np.stack([s.image for s in samples]), np.stack([s.scribble for s in samples]),
            np.stack([s.mask for s in samples]), read_manifest(manifest)[1].class_names)


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
    p.add_argument("--num-train", type=int, default=2048, help="labelled train scenes (the judge's training set)")
    p.add_argument("--subset", default="1/16", help="share of them the ControlNet is trained on (default 1/16)")
    p.add_argument("--num-val", type=int, default=200, help="val sources to generate from")
    p.add_argument("--w", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    p.add_argument("--lam", type=float, nargs="+", default=[1.0, 0.5])
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--batch", type=int, default=50, help="sampler batch size")
    p.add_argument("--judge-steps", type=int, default=1500,
                   help="judge training steps (seg.judge; more than the sweep's default: the train split is larger)")
    p.add_argument("--inception", help="local FID-Inception weights (torch-fidelity format); default random conv")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads or len(os.sched_getaffinity(0)))
    out = Path(a.out)
    manifest = ensure_real(out, a.num_train)
    low = ensure_real(out, a.num_train, a.subset)

    if a.model:
        model_dir = Path(a.model)
    else:
        over = [f"data.manifest={low}", f"out={out / 'controlnet'}"]
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
    t0 = time.perf_counter()
    judge = train_judge(tr_img, tr_mask, k, JudgeConfig(steps=a.judge_steps))
    print(f"judge: {a.judge_steps} steps in {time.perf_counter() - t0:.0f} s")

    rows = []
    # Real val is scored against real train (the floor); synthetic sets against their real sources.
    fid_train, fid_val = fid_scorer(tr_img, a.inception), fid_scorer(va_img, a.inception)

    def report(name: str, images: np.ndarray, seconds: float = 0.0) -> None:
        scorer = fid_train if name == "real val" else fid_val
        r = {"set": name, **score(judge, images, va_mask, k), "fid": scorer.score(images)[0], "s_per_img": seconds}
        rows.append(r)
        print(f"{name:>16} | {r['judge_miou']:.3f} {r['fg_iou']:.3f} {r['pixel_acc']:.3f} | "
              f"{r['judge_miou_mismatched']:.3f} {r['fg_iou_mismatched']:.3f} {r['pixel_acc_mismatched']:.3f} | "
              f"{r['fid']:9.3f} | {seconds:.3f}", flush=True)

    print(f"model {model.model_id} ({size} px), {len(va_img)} val sources, {a.steps} DDIM steps")
    print(f"{'set':>16} | source mask: mIoU fgIoU acc | mismatched: mIoU fgIoU acc | FID | s/img")
    report("real val", va_img)
    sampler = ScribbleSampler(model, num_steps=a.steps, spacing="paper", uncond=model.uncond or "hint")
    names = [names_for_ids(np.unique(s).tolist(), class_names) for s in va_scr]
    n = len(va_img)
    for lam in a.lam:
        for w in a.w:
            t0 = time.perf_counter()
            fake = np.concatenate([
                sampler.sample(va_img[i:j], va_scr[i:j], names[i:j], w, lam, list(range(i, j)))
                for i in range(0, n, a.batch) for j in [min(n, i + a.batch)]
            ])
            report(f"w={w:g} lam={lam:g}", fake, (time.perf_counter() - t0) / len(fake))
    (out / "results.json").write_text(json.dumps({"model": model.model_id, "rows": rows}, indent=2))
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
