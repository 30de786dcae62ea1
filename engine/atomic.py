"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every output that a rerun checks (manifests, summaries, checkpoints, score caches,
reports) is written to a temporary file that replaces the target only when whole
(``engine.storage.AtomicOutput``): on a filesystem a ``.tmp`` sibling renamed over it with
``os.replace`` (atomic on POSIX within one directory), on an object store one whole-object
put. A crash leaves at most a local ``.tmp`` file, which the next write replaces. This is
the project's one helper for it; targets may be local paths or URLs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.storage import TMP_SUFFIX, AtomicOutput, Location, as_location

__all__ = ["TMP_SUFFIX", "atomic_path", "write_json", "write_text"]


def atomic_path(path: Location) -> AtomicOutput:
    """Context manager yielding a local temporary file to write; it becomes ``path`` only if
    the block finishes (and is deleted if it raises)."""
    return AtomicOutput(path)


def write_text(path: Location, text: str) -> Path | str:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return as_location(path)


def write_json(path: Location, data: Any, indent: int = 1) -> Path | str:
    """Write ``data`` as JSON to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=indent))
