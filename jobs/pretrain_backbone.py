"""Backbone pretraining job: ``python -m jobs.pretrain_backbone`` or ``python jobs/pretrain_backbone.py``.
See :mod:`seg.pretrain_backbone` for what it trains, its options and outputs.
"""

import os
import sys
from pathlib import Path

# Threads that sleep instead of spin while waiting (a small shared CPU; see jobs/pretrain_base.py);
# must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if __package__ in (None, ""):
    # Run as a file: make the repo root importable in case the package is not pip-installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seg.pretrain_backbone import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
