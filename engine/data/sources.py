"""What a data source is, as configuration: the built-in procedural set, VOC, a folder.

The readers (``engine.data.procedural`` / ``voc`` / ``folder``) take these configs; the
registry (``engine.data.registry.open_source``) picks the reader for ``kind``. This module
imports no reader, so readers can import it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.data.record import SourceRecord
from engine.errors import BadInputError

SOURCE_KINDS = ("procedural", "voc", "folder")


@dataclass
class TaggedRecord(SourceRecord):
    """A record with extra meta tags that ingest adds to the sample's ``json``, and the
    files it comes from so that errors found after loading (size mismatch, class out of
    range, empty scribble) can name them.

    ``meta`` is used e.g. for ``scribble_source: synthetic`` on VOC val images without a scribble.
    """

    meta: dict[str, Any] = field(default_factory=dict)
    origin: str = ""


@dataclass
class ProceduralSource:
    """Built-in dataset: counts per split, square image size and seed."""

    num_train: int = 2000
    num_val: int = 200
    num_test: int = 0  # held-out scenes for reported numbers (their own stream: never val's or train's)
    size: int = 64
    seed: int = 0

    def validate(self) -> None:
        if self.num_train < 1 or self.num_val < 0 or self.num_test < 0:
            raise BadInputError("source.procedural", "num_train must be >= 1, num_val and num_test >= 0")
        if not 16 <= self.size <= 2048:
            raise BadInputError("source.procedural.size", f"{self.size} is out of range 16..2048")


@dataclass
class VocSource:
    """PASCAL VOC 2012 + ScribbleSup; see :mod:`engine.data.voc` for the layout."""

    root: str = "data/VOC2012"
    train_list: str = "train_aug"
    val_list: str = "val"
    scribble_format: str = "png"  # "png" (pascal_2012_scribble/*.png) or "xml" (ScribbleSup polylines)
    scribble_dir: str = ""  # default: pascal_2012_scribble (png) / pascal_2012 (xml)
    stroke_width: int = 3  # line width when rendering XML polylines
    seed: int = 0  # for synthetic val scribbles

    def validate(self) -> None:
        if self.scribble_format not in ("png", "xml"):
            raise BadInputError("source.voc.scribble_format", f"{self.scribble_format!r} must be 'png' or 'xml'")
        if self.stroke_width < 1:
            raise BadInputError("source.voc.stroke_width", "must be >= 1")


@dataclass
class FolderSource:
    """Plain folder; see :mod:`engine.data.folder` for the layout."""

    root: str = "data/my_set"
    val_fraction: float = 0.1  # used when there is no val.txt
    seed: int = 0

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise BadInputError("source.folder.val_fraction", f"{self.val_fraction} must be in [0, 1)")


@dataclass
class SourceConfig:
    """Which source to read (``kind``) and the options of each kind."""

    kind: str = "procedural"
    procedural: ProceduralSource = field(default_factory=ProceduralSource)
    voc: VocSource = field(default_factory=VocSource)
    folder: FolderSource = field(default_factory=FolderSource)

    def validate(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise BadInputError("source.kind", f"{self.kind!r} is not one of {list(SOURCE_KINDS)}")
