"""Train a scribble-supervised segmentation model on streamed real + synthetic shards.

    python -m seg.train --shards runs/x/real/manifest.parquet runs/x/synthetic/g/manifest.parquet \\
        --scheme adaptive --config configs/seg/tiny.yaml --out runs/x/seg/adaptive-seed0

Training is measured in steps (a fixed budget, so schemes compare at equal compute), or
in the paper's epochs over real + synthetic samples (``train.budget``, :mod:`seg.budget`);
the learning rate follows the poly schedule; partial cross-entropy on scribbles is the
loss; the validation split's full masks give mIoU. Outputs in ``--out``: config.yaml,
metrics.jsonl (train entries: step, loss, lr, λ stats; eval entries: mIoU...),
checkpoints/last.pt (atomic, ``--resume`` continues from it), summary.json and, with
``log.tensorboard``, the metrics.jsonl numbers as TensorBoard event files in tensorboard/.
Under ``torchrun`` each rank streams its own share of the shards (DDP).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine.atomic import atomic_path, write_text
from engine.config import add_config_args, load_config, save_config, to_dict
from engine.distributed import is_main, setup_distributed, shutdown_distributed
from engine.errors import BadInputError
from engine.tensorboard_log import LogConfig, add_record, tensorboard_writer
from seg.batches import AugmentConfig, MixedBatches, to_rgb255
from seg.best import best_keys
from seg.budget import Budget, plan_budget
from seg.evaluate import PROTOCOLS, evaluate, read_checkpoint
from seg.loss import LossConfig, training_loss
from seg.models import ModelConfig, build_model
from seg.schemes import SCHEMES, SchemeConfig, lr_progress
from seg.stream import DataIndex, index_manifests

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "seg" / "tiny.yaml"


@dataclass
class DataConfig:
    """Which samples: splits, the low-data subset, and how they are streamed."""

    train_split: str = "train"
    val_split: str = "val"  # the split every eval reports on: val to choose, test (held out) to report
    real_fraction: float = 1.0  # < 1: low-data regime, a fixed subset of the real train sources
    subset_seed: int = 0  # which subset; fixed across training seeds on purpose
    workers: int = 2
    shuffle_buffer: int = 256
    synthetic_per_source: int = 0  # > 0: at most N synthetic samples per (source, λ), the smallest keys; 0 = all
    mismatched_scribbles: bool = False  # the control: each synthetic sample gets another scene's real scribble
    min_label_score: float = 0.0  # > 0: drop synthetic samples whose label_score (seg.label_scores) is below it

    def validate(self) -> None:
        if not 0.0 < self.real_fraction <= 1.0:
            raise BadInputError(f"data.real_fraction={self.real_fraction}", "must be in (0, 1]")
        if self.workers < 0 or self.shuffle_buffer < 0:
            raise BadInputError("data.workers / data.shuffle_buffer", "must be >= 0")
        if not isinstance(self.synthetic_per_source, int) or isinstance(self.synthetic_per_source, bool) or self.synthetic_per_source < 0:
            raise BadInputError(f"data.synthetic_per_source={self.synthetic_per_source!r}", "must be an integer >= 0 (0 = all)")
        if not 0.0 <= self.min_label_score <= 1.0:
            raise BadInputError(f"data.min_label_score={self.min_label_score}", "must be in [0, 1] (0 = keep every sample)")
        if not isinstance(self.mismatched_scribbles, bool):
            raise BadInputError(f"data.mismatched_scribbles={self.mismatched_scribbles!r}", "must be true or false")


@dataclass
class OptimConfig:
    """SGD with momentum (the DeepLab recipe) or AdamW; poly learning-rate decay."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    head_lr_mult: float = 1.0  # 10 with a pretrained backbone, as DeepLab does

    def validate(self) -> None:
        if self.name not in ("sgd", "adamw"):
            raise BadInputError(f"optim.name={self.name!r}", "choose 'sgd' or 'adamw'")
        if self.lr <= 0:
            raise BadInputError(f"optim.lr={self.lr}", "must be > 0")


BUDGETS = ("steps", "paper_epochs")


@dataclass
class LoopConfig:
    """Budget and bookkeeping of the training loop.

    ``budget: steps`` trains ``steps`` steps whatever the data (schemes compare at equal
    compute; the tiny config's measured budget); ``paper_epochs`` trains ``epochs`` of the
    paper's epochs, one pass over the real and the synthetic samples the scheme uses
    (:mod:`seg.budget`). ``eval_every_epochs`` > 0 also evaluates every that many paper
    epochs and reports the best of those evaluations beside the last step's number, as the
    paper's protocol (its ``best_pred``; chosen on the split it reports).
    """

    steps: int = 300
    budget: str = "steps"  # steps | paper_epochs
    epochs: int = 60  # paper_epochs: the run's length in paper epochs
    eval_every_epochs: int = 0  # > 0: the paper's best-val protocol (the paper: 2); 0 = off
    batch_size: int = 8
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    checkpoint_every: int = 100
    eval_batch_size: int = 16
    eval_protocol: str = "full"  # full (every pixel, own size) | fixscalecrop (the paper's centre crop of eval_crop)
    eval_crop: int = 513
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = False  # bfloat16 autocast on CUDA
    channels_last: bool = False  # NHWC convolutions: 1.75x faster DeepLabV3+ R101 steps with amp on an H200

    def validate(self) -> None:
        if self.steps < 1:
            raise BadInputError(f"train.steps={self.steps}", "must be >= 1")
        if self.budget not in BUDGETS:
            raise BadInputError(f"train.budget={self.budget!r}", f"choose one of {list(BUDGETS)}")
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 1:
            raise BadInputError(f"train.epochs={self.epochs!r}", "must be an integer >= 1")
        if not isinstance(self.eval_every_epochs, int) or isinstance(self.eval_every_epochs, bool) or self.eval_every_epochs < 0:
            raise BadInputError(f"train.eval_every_epochs={self.eval_every_epochs!r}", "must be an integer >= 0 (0 = off)")
        if self.batch_size < 2:
            raise BadInputError(f"train.batch_size={self.batch_size}", "must be >= 2 (batch norm needs more than one sample)")
        if self.eval_protocol not in PROTOCOLS:
            raise BadInputError(f"train.eval_protocol={self.eval_protocol!r}", f"choose one of {list(PROTOCOLS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise BadInputError(f"train.device={self.device!r}", "choose auto, cpu or cuda")


@dataclass
class SegConfig:
    """Everything one segmentation run needs; saved as config.yaml beside its outputs."""

    scheme: SchemeConfig = field(default_factory=SchemeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        """The step curriculum's epochs must be the run's when the run is counted in epochs."""
        ad = self.scheme.adaptive
        if self.train.budget == "paper_epochs" and self.scheme.name == "adaptive" and ad.schedule == "step" and ad.epochs != self.train.epochs:
            raise BadInputError(f"scheme.adaptive.epochs={ad.epochs} with train.epochs={self.train.epochs}",
                                "the curriculum's epochs and the run's differ under train.budget=paper_epochs",
                                "set both to the same number of epochs (the paper: 60)")


def _atomic_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class MetricsLog:
    """JSON-lines log; on resume, entries past the checkpoint's step are dropped (they
    belong to the interrupted run and will be written again)."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            write_text(path, "".join(ln + "\n" for ln in kept))
        elif path.exists():
            path.unlink()

    def write(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")


def _optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = model.param_groups(cfg.lr, cfg.head_lr_mult)
    for g in groups:
        g["initial_lr"] = g["lr"]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _set_poly_lr(opt: torch.optim.Optimizer, progress: float, power: float) -> float:
    """Poly decay at ``progress`` of its schedule (:func:`seg.schemes.lr_progress`)."""
    factor = (1.0 - progress) ** power
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * factor
    return opt.param_groups[0]["lr"]


def _mean_parts(parts: list[dict[str, float]]) -> dict[str, float]:
    """Per-term means of the loss parts (e.g. rloss's pce and crf) over a logging window."""
    return {f"loss_{k}": sum(p[k] for p in parts) / len(parts) for k in (parts[0] if parts else {})}


def _lam_stats(lams: list[float]) -> dict[str, float]:
    synth = [x for x in lams if x > 0]
    return {
        "synth_share": len(synth) / max(1, len(lams)),
        "lam_mean": sum(synth) / len(synth) if synth else 0.0,
        "lam_max": max(synth) if synth else 0.0,
    }


def _best_keys(cfg: SegConfig, manifests: list[str]) -> set[str] | None:
    """The synthetic keys the ``best_k`` scheme keeps (:mod:`seg.best`); None (all) for the other schemes."""
    if cfg.scheme.name != "best_k":
        return None
    return best_keys(cfg.scheme.best_dict, cfg.scheme.best_k, manifests, cfg.data.train_split)


def run_budget(cfg: SegConfig, index: DataIndex, world: int) -> Budget:
    """This run's steps, paper-epoch length and synthetic share (:mod:`seg.budget`)."""
    synthetic = {lam: len(group) for lam, group in index.synthetic.items()}
    return plan_budget(cfg.scheme, cfg.train.budget, cfg.train.steps, cfg.train.epochs, cfg.train.batch_size * world,
                       len(index.real), synthetic)


def _paper_protocol(cfg: SegConfig, budget: Budget, paper_best: dict[str, Any] | None) -> dict[str, Any]:
    """The summary's record of the paper's options when one is on (nothing otherwise, so
    summaries of runs without them stay as they were)."""
    record: dict[str, Any] = {}
    if cfg.train.budget != "steps" or cfg.scheme.synth_share != "fraction":
        record["paper_epoch"] = {"budget": cfg.train.budget, "steps_per_epoch": budget.steps_per_epoch,
                                 "synth_fraction": budget.synth_fraction, "synth_share": cfg.scheme.synth_share}
    if cfg.train.eval_every_epochs:
        record["paper_best"] = {**(paper_best or {}), "every_epochs": cfg.train.eval_every_epochs,
                                "protocol": "the paper's: best of the evaluations every N epochs, chosen on the split it "
                                            "reports; 'miou' (the last step) is this project's number"}
    return record


def train(cfg: SegConfig, manifests: list[str], out: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run one training; returns (and on rank 0 writes) the summary."""
    out = Path(out)
    ckpt_path = out / "checkpoints" / "last.pt"
    if ckpt_path.exists() and not resume:
        raise BadInputError(str(out), "already holds a checkpoint", "pass --resume to continue it, or a new --out")
    cfg.validate()  # the sweep sets scheme.name after loading: check the sections agree for this run
    rank, world, device = setup_distributed(cfg.train.device)
    main_rank = is_main(rank)
    torch.manual_seed(cfg.train.seed)
    index: DataIndex = index_manifests(manifests, cfg.data.train_split, cfg.data.val_split, cfg.data.real_fraction, cfg.data.subset_seed,
                                       cfg.data.synthetic_per_source, _best_keys(cfg, manifests), cfg.data.min_label_score)
    num_classes = len(index.class_names)
    budget = run_budget(cfg, index, world)
    total = budget.steps
    paper_every = cfg.train.eval_every_epochs * budget.steps_per_epoch  # 0: the paper's best-val protocol is off
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = build_model(cfg.model, num_classes).to(device, memory_format=fmt)
    opt = _optimizer(model, cfg.optim)
    start_step, lam_counts, best, paper_best = 0, Counter(), float("-inf"), None
    if resume and ckpt_path.exists():
        ckpt = read_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start_step, best, paper_best = ckpt["step"], ckpt["best_miou"], ckpt.get("paper_best")
        lam_counts = Counter({float(k): v for k, v in ckpt["lam_counts"].items()})
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    scheme = dataclasses.replace(cfg.scheme, synth_fraction=budget.synth_fraction)
    batches = MixedBatches(index, scheme, cfg.train.batch_size, total, cfg.augment, start_step,
                           cfg.train.seed, cfg.data.shuffle_buffer, cfg.data.mismatched_scribbles)
    loader = DataLoader(batches, batch_size=None, num_workers=cfg.data.workers)
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        ckpt_path.parent.mkdir(exist_ok=True)
        save_config(cfg, out / "config.yaml")
    log = MetricsLog(out / "metrics.jsonl", start_step if resume else None) if main_rank else None

    with tensorboard_writer(cfg.log, out, start_step, enabled=main_rank) as board:
        def run_eval(step: int) -> dict[str, Any]:
            nonlocal best, paper_best
            result = evaluate(model, index.val, num_classes, device, cfg.train.eval_batch_size, cfg.data.workers,
                              cfg.train.eval_protocol, cfg.train.eval_crop)
            best = max(best, result["miou"])
            if paper_every and step % paper_every == 0 and (paper_best is None or result["miou"] > paper_best["miou"]):
                paper_best = {"miou": result["miou"], "step": step, "epoch": step // budget.steps_per_epoch}
            if log:
                log.write({"step": step, "eval": result})
            add_record(board, {"step": step, **result}, "eval")
            return result

        def save(step: int) -> None:
            if main_rank:
                _atomic_save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(), "config": to_dict(cfg),
                              "class_names": index.class_names, "lam_counts": {str(k): v for k, v in lam_counts.items()},
                              "best_miou": best, **({"paper_best": paper_best} if paper_every else {})}, ckpt_path)

        t0 = time.perf_counter()
        window: dict[str, list] = {"loss": [], "lam": [], "parts": []}
        bar = tqdm(total=total, initial=start_step, desc=f"seg {cfg.scheme.name}", disable=not main_rank, dynamic_ncols=True)
        try:  # close the bar however the loop ends, so an error message gets a line of its own
            net.train()
            for batch in loader:
                step = batch["step"]
                lr = _set_poly_lr(opt, lr_progress(cfg.scheme, step / total), cfg.optim.poly_power)
                image = batch["image"].to(device, non_blocking=True, memory_format=fmt)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.amp and device.type == "cuda"):
                    logits = net(image)
                loss, parts = training_loss(cfg.loss, logits.float(), batch["scribble"].to(device, non_blocking=True),
                                            to_rgb255(image), batch["roi"].to(device, non_blocking=True))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                lams = batch["lam"].tolist()
                lam_counts.update(lams)
                window["loss"].append(loss.item())
                window["parts"].append(parts)
                window["lam"] += lams
                done = step + 1
                bar.update(1)
                if done % cfg.train.log_every == 0 or done == total:
                    mean_loss = sum(window["loss"]) / len(window["loss"])
                    bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}")
                    entry = {"step": done, "loss": mean_loss, "lr": lr, "progress": step / total,
                             **_mean_parts(window["parts"]), **_lam_stats(window["lam"])}
                    if log:
                        log.write(entry)
                    add_record(board, entry, "train")
                    window = {"loss": [], "lam": [], "parts": []}
                due = (cfg.train.eval_every and done % cfg.train.eval_every == 0) or (paper_every and done % paper_every == 0)
                if due and done < total:
                    run_eval(done)
                if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0:
                    save(done)
        finally:
            bar.close()
        final = run_eval(total)
        save(total)
    summary = {
        "scheme": cfg.scheme.name,
        "seed": cfg.train.seed,
        "steps": total,
        "resumed_from": start_step,
        "seconds": time.perf_counter() - t0,
        "miou": final["miou"],
        "best_miou": best,
        "pixel_acc": final["pixel_acc"],
        "eval_protocol": final["protocol"],
        "per_class_iou": dict(zip(index.class_names, final["per_class_iou"])),
        "lam_counts": {str(k): v for k, v in sorted(lam_counts.items())},
        "real_train_samples": len(index.real),
        "synthetic_samples": {str(k): len(g) for k, g in index.synthetic.items()},
        "synthetic_per_source": cfg.data.synthetic_per_source,
        "min_label_score": cfg.data.min_label_score,
        "mismatched_scribbles": cfg.data.mismatched_scribbles,
        "classical_augment": ({k: getattr(cfg.augment, k) for k in ("rotate", "vflip", "color_jitter", "classical_on")}
                              if cfg.augment.classical else None),
        "val_samples": len(index.val),
        "eval_split": cfg.data.val_split,
        "manifests": [str(m) for m in manifests],
        "device": str(device),
        "world_size": world,
        **_paper_protocol(cfg, budget, paper_best),
    }
    if main_rank:
        write_text(out / "summary.json", json.dumps(summary, indent=2))
    shutdown_distributed()
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable end-of-run report."""
    lines = [
        f"scheme {summary['scheme']}  seed {summary['seed']}  steps {summary['steps']}  ({summary['seconds']:.1f} s on {summary['device']})",
        f"mIoU {summary['miou']:.4f}  pixel acc {summary['pixel_acc']:.4f}  ({summary.get('eval_split', 'val')} samples: {summary['val_samples']}, "
        f"{summary['eval_protocol']} evaluation)",
        "per-class IoU: " + ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in summary["per_class_iou"].items()),
        "training samples by λ: " + ", ".join(f"{k}: {v}" for k, v in summary["lam_counts"].items()),
    ]
    if summary.get("paper_best", {}).get("miou") is not None:
        pb = summary["paper_best"]
        lines.append(f"the paper's protocol (best of the evaluations every {pb['every_epochs']} epochs): mIoU {pb['miou']:.4f} "
                     f"at epoch {pb['epoch']} (step {pb['step']}); the number above (last step) is this project's")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a scribble-supervised segmentation model on streamed real (λ=0) and synthetic shards.",
        epilog="Example: python -m seg.train --shards runs/demo/real/manifest.parquet runs/demo/synthetic/g/manifest.parquet "
        "--scheme adaptive --out runs/demo/seg/adaptive-seed0",
    )
    parser.add_argument("--shards", nargs="+", required=True, metavar="MANIFEST",
                        help="manifest.parquet files: the real one (train + val splits) and any synthetic ones")
    parser.add_argument("--scheme", choices=list(SCHEMES),
                        help="λ sampling scheme (overrides scheme.name of the config)")
    parser.add_argument("--curriculum", metavar="EPOCHS",
                        help="the paper's curriculum list, e.g. 0,20,40: the epoch at which each λ set (increasing λ) "
                        "takes over; sets scheme.adaptive.schedule=step (use with --scheme adaptive)")
    add_config_args(parser, str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None)
    parser.add_argument("--out", required=True, help="run folder for config.yaml, metrics.jsonl, checkpoints/, summary.json")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt if it exists")
    args = parser.parse_args(argv)
    try:
        overrides = args.overrides + ([f"scheme.name={args.scheme}"] if args.scheme else [])
        if args.curriculum:
            overrides += ["scheme.adaptive.schedule=step", f"scheme.adaptive.curriculum='{args.curriculum}'"]
        cfg = load_config(SegConfig, args.config, overrides)
        summary = train(cfg, args.shards, args.out, resume=args.resume)
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
        print(f"wrote {Path(args.out) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
