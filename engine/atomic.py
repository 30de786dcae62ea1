"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every output that a rerun checks (manifests, summaries, checkpoints, score caches,
reports) is written to a temporary sibling and renamed over the target with
``os.replace`` (atomic on POSIX within one directory). A crash leaves at most a ``.tmp``
file, which the next write replaces. This is the project's one helper for it.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

TMP_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` only if the block
    finishes (and is deleted if it raises)."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, data: Any, indent: int = 1) -> Path:
    """Write ``data`` as JSON to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=indent))
