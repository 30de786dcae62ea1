"""Show job: ``python -m jobs.show`` or ``python jobs/show.py``.

See :mod:`engine.show` for what it prints and draws.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (``python jobs/show.py``): make the repo root importable in case the
    # package is not pip-installed in this environment.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.show import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
