"""Generate a tagged synthetic set with Ray actors (one model replica each).

Local:    python jobs/generate.py --config configs/generate/tiny.yaml
Cluster:  ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
              python jobs/generate.py --config configs/generate/tiny.yaml --set out_dir=/abs/path ...
(under ``ray job submit`` the job runs in an uploaded copy of the repo: give absolute paths;
with Ray's token auth on -- a head started while ~/.ray/auth_token exists -- export
RAY_AUTH_MODE=token for the `ray job` CLI too.)
Rerunning the same command resumes: finished, verified shards are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from any cwd

from engine.config import add_config_args, load_config  # noqa: E402
from engine import storage  # noqa: E402
from engine.errors import BadInputError  # noqa: E402
from engine.generate import GenerateConfig, run_generate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="jobs/generate.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser, "configs/generate/tiny.yaml")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs stay clean)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(GenerateConfig, args.config, args.overrides)
        summary = run_generate(cfg, progress=not args.no_progress)
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    print(f"wrote {summary['samples']} samples in {summary['shards']} shards to {storage.resolve(cfg.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
