"""Where does an arm gain or lose? Each arm's per-class IoU minus the baseline's, over draws.

Reads the seg runs' ``summary.json`` (``seg/arm-<arm>-seed<k>/``) of the draw folders given,
averages each arm over its seg seeds within a draw, subtracts the baseline's (the same seeds),
and prints per class the mean of those differences over the draws (IoU points), with the
per-draw values. Only runs scored on the baseline's split count (a tuning run on val in the
same folder is left out, and said so). Exploratory: it reads the headline's runs, and is not
part of its pre-registered verdict.

    python benchmarks/per_class.py runs/effect/draw-2 runs/effect/draw-3 --json runs/effect/per_class.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from engine.errors import BadInputError

RUN_DIR = re.compile(r"arm-(?P<arm>.+)-seed(?P<seed>\d+)$")


def draw_runs(folder: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """arm -> seed -> summary of every finished arm run in a draw folder."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted((folder / "seg").glob("arm-*-seed*/summary.json")):
        match = RUN_DIR.match(path.parent.name)
        if match:
            runs.setdefault(match["arm"], {})[int(match["seed"])] = json.loads(path.read_text())
    if not runs:
        raise BadInputError(str(folder), "holds no finished arm run (seg/arm-*-seed*/summary.json)",
                            "name a headline draw folder, e.g. runs/effect/draw-2")
    return runs


def per_class_differences(folders: list[Path], baseline: str) -> tuple[dict[str, dict[str, list[float]]], list[str]]:
    """arm -> class -> one difference (IoU points, arm − baseline, seed means) per draw that
    has both; and the runs left out (another split than the baseline's, or seeds the baseline lacks)."""
    diffs: dict[str, dict[str, list[float]]] = {}
    left_out: list[str] = []
    for folder in folders:
        runs = draw_runs(folder)
        if baseline not in runs:
            raise BadInputError(str(folder), f"has no run of the baseline arm {baseline!r}", "pass --baseline <arm>")
        base = runs[baseline]
        split = {s["eval_split"] for s in base.values()}
        for arm, seeds in runs.items():
            if arm == baseline:
                continue
            if {s["eval_split"] for s in seeds.values()} != split or not set(seeds) <= set(base):
                left_out.append(f"{folder.name}/{arm}")
                continue
            for cls in base[next(iter(base))]["per_class_iou"]:
                diff = _seed_mean(seeds, set(seeds), cls) - _seed_mean(base, set(seeds), cls)
                diffs.setdefault(arm, {}).setdefault(cls, []).append(100 * diff)
    return diffs, left_out


def _seed_mean(summaries: dict[int, dict[str, Any]], seeds: set[int], cls: str) -> float:
    """A class's IoU averaged over ``seeds`` (the arm's: the baseline is taken at the same seeds)."""
    return statistics.mean(summaries[k]["per_class_iou"][cls] for k in sorted(seeds))


def table(diffs: dict[str, dict[str, list[float]]], baseline: str) -> str:
    classes = list(next(iter(diffs.values())))
    lines = [f"Per-class IoU of each arm minus {baseline}'s (points; mean over draws, per draw in brackets).", "",
             "| arm | " + " | ".join(classes) + " |", "| --- |" + " --- |" * len(classes)]
    for arm, by_class in diffs.items():
        cells = [f"{statistics.mean(v):+.1f} ({', '.join(f'{x:+.1f}' for x in v)})" for v in by_class.values()]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("draws", type=Path, nargs="+", help="draw folders (runs/effect/draw-<seed>)")
    parser.add_argument("--baseline", default="real_classical", help="the arm the others are compared with")
    parser.add_argument("--json", type=Path, default=None, help="also write the differences here")
    args = parser.parse_args(argv)
    try:
        diffs, left_out = per_class_differences(args.draws, args.baseline)
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(diffs, args.baseline))
    if left_out:
        print(f"\nleft out (another split than {args.baseline}'s, or seeds it lacks): {', '.join(left_out)}")
    if args.json:
        args.json.write_text(json.dumps({"baseline": args.baseline, "draws": [str(d) for d in args.draws],
                                         "differences": diffs, "left_out": left_out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
