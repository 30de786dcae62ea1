"""ControlNet training job: ``python -m jobs.train_controlnet`` or ``python jobs/train_controlnet.py``
(e.g. under ``ray job submit``), or on several GPUs ``torchrun --nproc_per_node N -m jobs.train_controlnet``.
See :mod:`engine.train_controlnet` for options and outputs.
"""

import os
import sys
from pathlib import Path

# Threads that sleep instead of spin while waiting: on a small shared CPU (2 cores, other
# processes such as Ray actors or a seg run beside us) spinning OpenMP threads made a
# training step ~20x slower (41.7 s vs 2.0 s measured); must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if __package__ in (None, ""):
    # Run as a file: make the repo root importable in case the package is not pip-installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.train_controlnet import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
