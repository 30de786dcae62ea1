"""Export job: ``python -m jobs.export`` or ``python jobs/export.py`` (e.g. under ``ray job submit``).

See :mod:`engine.export` for the layouts, the filters and resume.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (``python jobs/export.py``): make the repo root importable in case the
    # package is not pip-installed in this environment.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
