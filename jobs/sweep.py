"""Sweeps: ``python -m jobs.sweep --config configs/sweeps/w.yaml`` (or ``python jobs/sweep.py ...``).

The same runner as the demo (:mod:`experiments.sweep`) with a sweep config: (a) FID and mIoU
by guidance scale w, (b) by encode ratio λ, (c) fixed vs uniform vs adaptive; each in an
embedded-default and a VOC + SD 1.5 variant under ``configs/sweeps/``.
"""

import os
import sys
from pathlib import Path

# Sleeping (not spinning) OpenMP waits, before torch loads: on a small or shared CPU a
# spinning thread pool makes torch steps many times slower (see jobs/train_controlnet.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python -m jobs.sweep"))
