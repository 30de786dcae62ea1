"""Load the repo's stand-alone scripts (benchmarks/, tools/) as modules, so tests can call
their functions: they are files, not parts of an installed package."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """The module of ``REPO / relative`` (e.g. ``benchmarks/headline.py``), freshly executed."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
