"""Is the embedded default data-limited? Real-only mIoU against the share of labelled data.

Trains seg's default config (``configs/seg/tiny.yaml``) on real scribbles only, at each
fraction of the real training sources and each seed, and prints mIoU mean ± std per
fraction as a Markdown table (README, "learning curve"):

    python -m jobs.ingest --config configs/ingest/tiny.yaml --set out=runs/tiny/real
    python benchmarks/learning_curve.py --real runs/tiny/real/manifest.parquet --out runs/tiny/curve

The subset of a fraction is seg's ``data.real_fraction`` subset (fixed ``subset_seed``,
nested: 1/16 lies inside 1/8 ...), the same draw ingest's ``--subset`` makes
(``engine.data.subset``); seeds vary the training. ``--set data.val_split=test`` reports on
the held-out test split (ingest with ``--set source.procedural.num_test=1000``). Runs live in
``OUT/f<fraction>-seed<k>/`` and are reused or resumed as in ``benchmarks/headline.py``;
``--jobs 2`` trains two runs at a time, one thread each (the fastest use of 2 cores).
Results also go to ``OUT/curve.md`` and ``OUT/curve.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see jobs/train_controlnet.py
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headline import parse_fraction, run_one  # noqa: E402

from engine.config import add_config_args, load_config  # noqa: E402
from engine.errors import BadInputError  # noqa: E402
from seg.train import DEFAULT_CONFIG, SegConfig  # noqa: E402

FRACTIONS = ["1/16", "1/8", "1/4", "1/2", "1"]


def _run(cfg: SegConfig, manifest: str, out: Path, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    return run_one(cfg, [manifest], out)


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: one row per fraction, mIoU mean ± std (sample std over seeds), per seed."""
    first = next(iter(results.values()))[0]
    lines = [f"Real scribbles only, {first['steps']} steps, {first.get('eval_split', 'val')} images: {first['val_samples']}.", "",
             "| labelled share | images | mIoU % (mean ± std) | per seed |", "| --- | --- | --- | --- |"]
    for frac, runs in results.items():
        vals = [100 * r["miou"] for r in runs]
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lines.append(f"| {frac} | {runs[0]['real_train_samples']} | {statistics.mean(vals):.1f} ± {std:.1f} | "
                     + ", ".join(f"{v:.1f}" for v in vals) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Real-only mIoU by share of labelled data (is the task data-limited?).")
    parser.add_argument("--real", required=True, metavar="MANIFEST", help="the full real manifest (train + val), from ingest")
    parser.add_argument("--fractions", nargs="+", default=FRACTIONS, help=f"shares of the train sources (default: {' '.join(FRACTIONS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, each with 1 torch thread (default 1: all threads)")
    parser.add_argument("--out", required=True, help="folder for the runs and curve.md / curve.json")
    add_config_args(parser, str(DEFAULT_CONFIG))
    args = parser.parse_args(argv)
    try:
        plan = []
        for frac in args.fractions:
            value = parse_fraction(frac)
            for seed in args.seeds:
                cfg = load_config(SegConfig, args.config, [*args.overrides, "scheme.name=real", f"train.seed={seed}",
                                                           f"data.real_fraction={value}"])
                plan.append((frac, cfg, Path(args.out) / f"f{value:g}-seed{seed}"))
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    threads = 1 if args.jobs > 1 else len(os.sched_getaffinity(0))
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [(frac, pool.submit(_run, cfg, args.real, out, threads)) for frac, cfg, out in plan]
        results: dict[str, list[dict[str, Any]]] = {}
        for frac, fut in futures:
            results.setdefault(frac, []).append(fut.result())
    text = table(results)
    out = Path(args.out)
    (out / "curve.md").write_text(text + "\n")
    (out / "curve.json").write_text(json.dumps({f: [{k: r[k] for k in ("seed", "miou", "real_train_samples")} for r in runs]
                                                for f, runs in results.items()}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
