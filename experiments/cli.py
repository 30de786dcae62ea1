"""The sweep command line: ``python -m jobs.sweep`` and ``python -m jobs.demo`` parse here.

One sweep (:func:`experiments.sweep.run_sweep`) or, when the config names ``draws.seeds``, the
whole sweep once per labelled draw (:func:`experiments.draws.run_draws`). It sits apart from both
so that neither imports the other's caller.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from engine.config import find_config
from engine.errors import BadInputError
from engine.generate.distributor import check_job_paths
from experiments.draws import run_draws
from experiments.sweep import FAST_OVERLAY, REPO, load_sweep_config, run_sweep


def main(argv: list[str] | None = None, default_config: str | None = None, prog: str = "python -m jobs.sweep") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a ScribbleGen experiment end to end: ingest -> ControlNet -> Ray generation over a "
                    "(w, λ) grid -> FID, judge -> segmentation schemes -> report. Rerunning resumes.",
        epilog="examples: python -m jobs.demo | python -m jobs.sweep --config configs/sweeps/w.yaml | "
               "python -m jobs.demo --fast --out runs/demo-fast",
    )
    parser.add_argument("--config", default=default_config, required=default_config is None,
                        help=f"sweep YAML (default: {default_config})" if default_config else "sweep YAML, e.g. configs/sweeps/w.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, dotted path (e.g. --set controlnet.train.steps=100); repeatable")
    parser.add_argument("--out", help="run folder (overrides config 'out')")
    parser.add_argument("--fast", action="store_true",
                        help=f"a much smaller budget (merges {FAST_OVERLAY.relative_to(REPO)} over the config): a smoke run")
    parser.add_argument("--draws", type=int, nargs="+", metavar="SEED",
                        help="run only these of the config's draws.seeds this time (e.g. one draw a session); "
                             "the summary still covers every draw as it stands")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"out={json.dumps(args.out)}"] if args.out else [])
    t0 = time.perf_counter()
    try:
        cfg = load_sweep_config(args.config, overrides, [FAST_OVERLAY] if args.fast else [])
        check_job_paths({"out": str(cfg.out)}, {})
        if args.draws and not cfg.draws.seeds:
            raise BadInputError(f"--draws {' '.join(map(str, args.draws))}", f"{args.config} has no draws.seeds",
                                "leave --draws out, or use a config with draws (configs/sweeps/headline.yaml)")
        if cfg.draws.seeds:
            index = run_draws(cfg, find_config(args.config), args.draws)
        else:
            index = run_sweep(cfg)
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    beside = "headline.json beside it, each draw's report in its folder" if cfg.draws.seeds else "index.html beside it"
    print(f"\nreport: {index} ({beside}); total {time.perf_counter() - t0:.1f} s")
    return 0
