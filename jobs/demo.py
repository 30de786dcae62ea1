"""The main job: ``python -m jobs.demo`` or ``python jobs/demo.py`` (e.g. under ``ray job submit``).

Runs the embedded default end to end (ingest -> ControlNet -> Ray generation over a
(w, λ) grid -> FID, judge -> segmentation schemes -> report in ``runs/demo/report/``);
rerunning resumes. ``--fast`` is a smoke-sized budget; see :mod:`experiments.sweep`.
"""

import os
import sys
from pathlib import Path

# Sleeping (not spinning) OpenMP waits, before torch loads: on a small or shared CPU a
# spinning thread pool makes torch steps many times slower (see jobs/train_controlnet.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if __package__ in (None, ""):
    # Run as a file: make the repo root importable in case the package is not pip-installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.cli import main
from experiments.sweep import REPO  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "demo" / "tiny.yaml"

if __name__ == "__main__":
    sys.exit(main(default_config=str(DEFAULT_CONFIG), prog="python -m jobs.demo"))
