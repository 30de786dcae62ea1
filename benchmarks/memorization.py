"""Memorization: are a cell's synthetic images new scenes, or copies of their own source?

The check itself is :mod:`engine.memorization` (the sweep runs it on every cell into
``memorization.json``); this prints it for any manifests:

    python benchmarks/memorization.py --real runs/headline/real/manifest.parquet \\
        --synthetic runs/headline-x8/synthetic/w2p00-l1p00/manifest.parquet
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.errors import BadInputError
from engine.manifest import read_manifest
from engine.memorization import describe, memorization, train_images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=Path, required=True, help="real manifest (its train split: the sources)")
    parser.add_argument("--synthetic", type=Path, nargs="+", required=True, help="synthetic manifest(s), one per cell")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    try:
        size = int(read_manifest(args.synthetic[0])[0].column("height")[0].as_py())
        real = train_images(args.real, size)
        results = {}
        for manifest in args.synthetic:
            results[str(manifest)] = memorization(manifest, real)
            print(f"{manifest}: {describe(results[str(manifest)])}", flush=True)
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
