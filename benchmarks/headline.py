"""The headline experiment: does generative augmentation help in the low-data regime?

Trains the segmentation model with each λ scheme (real-only, fixed, uniform, adaptive)
on the same low-data subset (default 1/16 of the real training sources, the synthetic
samples restricted to those sources), with the same seeds and the same step budget,
and prints mIoU mean ± std over the seeds as a Markdown table:

    python benchmarks/headline.py --real runs/tiny/real/manifest.parquet \\
        --synthetic runs/tiny/synthetic/gen/manifest.parquet --out runs/tiny/headline

Each run lives in ``OUT/<scheme>-seed<k>/`` (the usual seg.train outputs); a finished run
(summary.json present) is reused and an interrupted one resumed, so the script can be
re-run after a crash -- but only while the identity the run recorded (its config and the
digests of its manifests, as the sweep runner records it) is today's: a folder made with
another config or other inputs is refused, naming what differs. Results also go to ``OUT/headline.md`` and ``OUT/headline.json``.
If the real manifest was already ingested with ``--subset 1/16``, pass ``--fraction 1``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

from engine.config import add_config_args, load_config
from engine.errors import BadInputError
from engine.identity import file_digest
from experiments.sweep import RUN_ONLY, stage_identity
from seg.schemes import LAMBDA_SCHEMES, SCHEMES
from seg.train import DEFAULT_CONFIG, SegConfig, format_summary, train


def parse_fraction(text: str) -> float:
    """``0.0625`` or ``1/16`` -> float in (0, 1]."""
    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise BadInputError(f"--fraction {text!r}", "not a fraction", "use e.g. 1/16 or 0.0625") from None
    if not 0.0 < value <= 1.0:
        raise BadInputError(f"--fraction {text!r}", "must be in (0, 1]")
    return value


def run_one(cfg: SegConfig, manifests: list[str], out: Path) -> dict[str, Any]:
    """Summary of one (scheme, seed) run: reused if finished, resumed if interrupted, either
    only under the identity it recorded (refused otherwise)."""
    inputs = {f"manifest{i}": file_digest(m) for i, m in enumerate(manifests)}
    stage_identity(cfg, RUN_ONLY["seg"], inputs).claim(out, "seg run")
    summary = out / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    result = train(cfg, manifests, out, resume=(out / "checkpoints" / "last.pt").exists())
    print(format_summary(result), flush=True)
    return result


def table(results: dict[str, list[dict[str, Any]]], fraction: float) -> str:
    """Markdown table: mIoU mean ± std per scheme (sample std over seeds), Δ vs real-only."""
    means = {s: statistics.mean(r["miou"] for r in runs) for s, runs in results.items()}
    base = means.get("real")
    any_runs = next(iter(results.values()))
    split = any_runs[0].get("eval_split", "val")
    lines = [
        f"Low-data regime: {fraction:g} of the real training sources ({any_runs[0]['real_train_samples']} images), "
        f"{any_runs[0]['steps']} steps, seeds {[r['seed'] for r in any_runs]}, {split} images: {any_runs[0]['val_samples']}.",
        "",
        "| scheme | mIoU (mean ± std) | per seed | Δ vs real-only |",
        "| --- | --- | --- | --- |",
    ]
    for scheme, runs in results.items():
        vals = [r["miou"] for r in runs]
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        delta = "—" if base is None or scheme == "real" else f"{100 * (means[scheme] - base):+.2f}"
        per_seed = ", ".join(f"{100 * v:.2f}" for v in vals)
        lines.append(f"| {scheme} | {100 * means[scheme]:.2f} ± {100 * std:.2f} | {per_seed} | {delta} |")
    lines.append("")
    lines.append(f"mIoU in %, on the full masks of the {split} split.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Headline: real-only vs fixed / uniform / adaptive λ in the low-data regime, mIoU ± std over seeds.")
    parser.add_argument("--real", required=True, metavar="MANIFEST", help="real manifest (train + val splits), from ingest")
    parser.add_argument("--synthetic", nargs="*", default=[], metavar="MANIFEST", help="synthetic manifest(s), from generate")
    parser.add_argument("--schemes", nargs="+", default=list(LAMBDA_SCHEMES), choices=SCHEMES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    parser.add_argument("--fraction", default="1/16", help="share of the real training sources used (default: 1/16)")
    add_config_args(parser, str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None)
    parser.add_argument("--out", required=True, help="folder for the runs and headline.md / headline.json")
    args = parser.parse_args(argv)
    try:
        fraction = parse_fraction(args.fraction)
        manifests = [args.real, *args.synthetic]
        out = Path(args.out)
        results: dict[str, list[dict[str, Any]]] = {}
        for scheme in args.schemes:
            for seed in args.seeds:
                sets = [*args.overrides, f"scheme.name={scheme}", f"train.seed={seed}", f"data.real_fraction={fraction}"]
                cfg = load_config(SegConfig, args.config, sets)
                results.setdefault(scheme, []).append(run_one(cfg, manifests, out / f"{scheme}-seed{seed}"))
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = table(results, fraction)
    out.mkdir(parents=True, exist_ok=True)
    (out / "headline.md").write_text(text + "\n")
    (out / "headline.json").write_text(json.dumps({s: [{k: r[k] for k in ("seed", "miou", "pixel_acc", "lam_counts")} for r in runs]
                                                   for s, runs in results.items()}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
