"""Which reader reads which ``source.kind``: the one place that knows every reader.

Readers import their configs from ``engine.data.sources`` and their file helpers from
``engine.data.imageio``; nothing imports the readers except this registry, so adding a
source is one reader module plus one entry here, with no import cycle.
"""

from __future__ import annotations

from typing import Any, Callable

from engine.data.folder import folder_records
from engine.data.procedural import CLASS_NAMES, procedural_records
from engine.data.record import SourceRecord
from engine.data.sources import ProceduralSource, SourceConfig
from engine.data.voc import voc_records

Reader = Callable[[Any], tuple[list[SourceRecord], list[str]]]


def _procedural(cfg: ProceduralSource) -> tuple[list[SourceRecord], list[str]]:
    return procedural_records(cfg.num_train, cfg.num_val, cfg.size, cfg.seed, cfg.num_test), list(CLASS_NAMES)


READERS: dict[str, Reader] = {"procedural": _procedural, "voc": voc_records, "folder": folder_records}


def open_source(cfg: SourceConfig) -> tuple[list[SourceRecord], list[str]]:
    """Records (lazy, train then val) and class names (index = id) of the configured source."""
    cfg.validate()
    return READERS[cfg.kind](getattr(cfg, cfg.kind))
