"""Fewer denoiser calls at the same quality? Every (scheduler, steps) setting of issue 25 on one
trained ControlNet, against the paper's DDIM 50.

Each setting is a sweep (``configs/sweeps/solvers.yaml``: w = 2, λ ∈ {0.4, 0.7, 1}, one image
per labelled source per λ, the same plan seed) in ``OUT/<scheduler>-<steps>/``, reused when
done; DDIM 50 runs again from other plan seeds (``OUT/ddim-50-seed1`` …, ``--twins``): the
largest gap between it and a twin is the seed noise that a cheaper setting must not fall behind
by more. Prints, per
setting, the denoiser calls per image against DDIM 50's and, per λ, FID, the judge margin
(own − mismatched mIoU), the mean absolute pixel difference (0–255) of its images from DDIM 50's
(same sources, seeds and λ) and the memorization check (nearest real image = own source), and
writes ``OUT/solvers.json``, ``OUT/solvers.md`` and ``OUT/grid.png`` (one source's samples:
rows settings, columns λ):

    python benchmarks/solvers.py --model runs/effect/draw-2/controlnet/final \\
        --real runs/effect/draw-2/real/manifest.parquet --out runs/solvers
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import BadInputError
from engine.manifest import iter_samples
from engine.plots import TileGrid, fmt_g
from engine.render import overlay_scribble
from experiments.sweep import REPO, load_sweep_config, run_sweep

CONFIG = REPO / "configs" / "sweeps" / "solvers.yaml"
# Run in this order (each is reused when done, so an interrupted run resumes): the reference and its
# seed-noise twin first, the candidates cheapest-to-matter next, dpmsolver++ 50 (where the solvers
# converge to, the most expensive) last.
SETTINGS = [("ddim", 50), ("dpmsolver++", 20), ("dpmsolver++", 10), ("unipc", 10), ("dpmsolver++", 5), ("unipc", 5),
            ("ddim", 20), ("ddim", 10), ("dpmsolver++", 50)]
REFERENCE = ("ddim", 50)
TARGET_SHARE = 0.4  # at most 40 % of the reference's denoiser calls


def run_setting(args: argparse.Namespace, scheduler: str, steps: int, plan_seed: int = 0) -> dict[str, Any]:
    """One setting's sweep (reused when done) and its scores per λ."""
    name = f"{scheduler}-{steps}" + (f"-seed{plan_seed}" if plan_seed else "")
    out = args.out / name
    cfg = load_sweep_config(CONFIG, [f"out={json.dumps(str(out))}", f"model_dir={json.dumps(str(args.model))}",
                                     f"real_manifest={json.dumps(str(args.real))}",
                                     f"generate.sampler.scheduler={scheduler}", f"generate.sampler.num_steps={steps}",
                                     f"generate.plan.seed={plan_seed}", *args.overrides])
    run_sweep(cfg)
    scores = {kind: json.loads((out / f"{kind}.json").read_text())["cells"] for kind in ("fid", "judge", "memorization")}
    per_lambda = {}
    for cell, fid in sorted(scores["fid"].items(), key=lambda kv: kv[1]["lambda"]):
        judge, memo = scores["judge"].get(cell, {}), scores["memorization"].get(cell, {})
        per_lambda[fmt_g(fid["lambda"])] = {"fid": fid["fid"], "judge_margin": judge.get("judge_margin"),
                                            "nearest_is_own": memo.get("nearest_is_own"), "cell": str(out / "synthetic" / cell)}
    # Every λ runs all `steps` (paper spacing); each step is one classifier-free-guidance pair.
    return {"name": name, "scheduler": scheduler, "steps": steps, "plan_seed": plan_seed, "calls": 2 * steps,
            "lambdas": per_lambda}


def images_of(cell: str) -> dict[str, np.ndarray]:
    """A cell's images by source (one a source: the config's samples_per_source is 1)."""
    return {row["source_id"]: s.image.astype(np.float32) for row, s in iter_samples(cell + "/manifest.parquet", with_mask=False)}


def l1_between(cell: str, reference: str) -> float:
    """Mean absolute pixel difference between two cells' images of the same source: the same
    seed across settings (how far a solver lands from DDIM 50), another for the seed-1 row (how
    far two samples of one scribble are)."""
    a, b = images_of(cell), images_of(reference)
    if set(a) != set(b):
        raise BadInputError(cell, f"holds other sources than {reference}", "run both with the same plan")
    return float(np.mean([np.abs(a[k] - b[k]).mean() for k in a]))


def compare(results: list[dict[str, Any]], twins: list[dict[str, Any]]) -> None:
    """Add, per setting, its differences from the reference and two readings against the seed noise
    (the largest gap between DDIM 50 and a twin, per λ and score):

    - ``within_noise``: |Δ| within the gap for FID and margin at every λ (not told apart from DDIM 50);
    - ``no_worse``: FID above and margin below DDIM 50's by no more than the gap at every λ (the
      issue's "the same quality" read one-sided: a setting that scores better is not a failure).

    The target is ``no_worse`` at <= 40 % of the calls. The bench first judged the target both-sided
    against one twin; that marked settings that beat DDIM 50 as outside the noise, and the rule was
    changed to the one-sided reading after 9 of its 10 settings were seen; more twins came after the
    verdict (docs/performance.md says so and shows each reading).
    """
    ref = next(r for r in results if (r["scheduler"], r["steps"]) == REFERENCE and not r["plan_seed"])
    gaps = {lam: tuple(max(abs(t["lambdas"][lam][k] - base[k]) for t in twins) for k in ("fid", "judge_margin"))
            for lam, base in ref["lambdas"].items()}
    for r in results:
        r["call_share"] = r["calls"] / ref["calls"]
        within, no_worse = [], []
        for lam, s in r["lambdas"].items():
            base, (gap_fid, gap_margin) = ref["lambdas"][lam], gaps[lam]
            s["d_fid"] = s["fid"] - base["fid"]
            s["d_margin"] = s["judge_margin"] - base["judge_margin"]
            s["l1_to_reference"] = l1_between(s["cell"], base["cell"])
            within.append(abs(s["d_fid"]) <= gap_fid and abs(s["d_margin"]) <= gap_margin)
            no_worse.append(s["d_fid"] <= gap_fid and -s["d_margin"] <= gap_margin)
        r["within_noise"], r["no_worse"] = all(within), all(no_worse)
        r["meets_target"] = r["no_worse"] and r["call_share"] <= TARGET_SHARE


def markdown(results: list[dict[str, Any]]) -> str:
    lams = list(results[0]["lambdas"])
    head = ["setting", "calls / image", "share of DDIM 50"] + [f"{k} λ = {lam}" for lam in lams
                                                              for k in ("FID", "margin", "L1 to DDIM 50")] + \
           ["λ = 1 nearest = own", "within seed noise", "no worse than seed noise"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        cells = [r["name"], str(r["calls"]), f"{100 * r['call_share']:.0f} %"]
        for lam in lams:
            s = r["lambdas"][lam]
            cells += [f"{s['fid']:.4f} ({s['d_fid']:+.4f})", f"{s['judge_margin']:.3f} ({s['d_margin']:+.3f})",
                      f"{s['l1_to_reference']:.1f}"]
        own = r["lambdas"].get("1", {}).get("nearest_is_own")
        cells += ["–" if own is None else f"{100 * own:.1f} %", "yes" if r["within_noise"] else "no",
                  "yes" if r["no_worse"] else "no"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def grid(results: list[dict[str, Any]], path: Path, sources: int = 2) -> None:
    """Rows settings, columns (source, λ): the same sources' samples side by side."""
    lams = list(results[0]["lambdas"])
    first = results[0]["lambdas"][lams[0]]["cell"] + "/manifest.parquet"
    ids = sorted({row["source_id"] for row, _ in iter_samples(first, with_mask=False)})[:sources]
    picture = TileGrid(len(results), sources * len(lams), left_in=1.4)
    for r, result in enumerate(results):
        picture.row_label(r, result["name"], fontsize=9)
        for c, (sid, lam) in enumerate((s, lam) for s in ids for lam in lams):
            manifest = result["lambdas"][lam]["cell"] + "/manifest.parquet"
            (sample,) = [s for _, s in iter_samples(manifest, lambda row: row["source_id"] == sid, with_mask=False)][:1]
            picture.show(r, c, overlay_scribble(sample.image, sample.scribble), f"{sid[-6:]}, λ = {lam}" if r == 0 else "",
                         fontsize=8)
    picture.title("one image per setting: the same source, seed and λ")
    picture.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a trained ControlNet bundle (its final/ folder)")
    parser.add_argument("--real", type=Path, required=True, help="the real manifest it was trained on")
    parser.add_argument("--out", type=Path, default=Path("runs/solvers"))
    parser.add_argument("--twins", type=int, default=1,
                        help="DDIM 50 reruns from plan seeds 1..N; the seed noise is the largest gap to one (default 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the sweep config (e.g. --set grid.lambdas=[1.0] for a smoke run)")
    args = parser.parse_args(argv)
    try:
        results = [run_setting(args, *REFERENCE)]
        twins = [run_setting(args, *REFERENCE, plan_seed=1)]
        results += [run_setting(args, scheduler, steps) for scheduler, steps in SETTINGS if (scheduler, steps) != REFERENCE]
        twins += [run_setting(args, *REFERENCE, plan_seed=seed) for seed in range(2, args.twins + 1)]
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    compare(results + twins, twins)
    table = markdown(results + twins)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "solvers.json").write_text(json.dumps(results + twins, indent=1))
    (args.out / "solvers.md").write_text(table + "\n")
    grid(results, args.out / "grid.png")
    print(table)
    met = [r["name"] for r in results if r["meets_target"]]
    print(f"\ntarget (no worse than DDIM 50 beyond its seed noise ({len(twins)} twin(s)) at every λ, "
          f"<= {TARGET_SHARE:.0%} of its calls): "
          + (", ".join(met) if met else "no setting meets it"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
