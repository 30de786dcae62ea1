"""Ingest job: ``python -m jobs.ingest`` or ``python jobs/ingest.py`` (e.g. under ``ray job submit``).

See :mod:`engine.ingest` for the options and the output layout.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (``python jobs/ingest.py``): make the repo root importable in case the
    # package is not pip-installed in this environment.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.ingest import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
