"""A set as plain files: ``python -m jobs.export --manifest M --out DIR --layout voc|folder``.

Shards and a Parquet manifest are what this project streams; other tools read image files.
Export writes a set (real or synthetic, or the part of it that ``--w``, ``--lambda``,
``--source-id`` and ``--split`` select) in one of two layouts:

``folder`` (what ``configs/ingest/folder.yaml`` reads back, lossless)::

    images/<name>.png  scribbles/<name>.png  masks/<name>.png (when the set has masks)
    classes.txt  val.txt  test.txt  tags.csv

``voc`` (PASCAL VOC + ScribbleSup, what the paper's segmentation code, mmsegmentation and
this project's VOC reader read)::

    JPEGImages/<name>.jpg  pascal_2012_scribble/<name>.png  SegmentationClassAug/<name>.png
    ImageSets/Segmentation/<split>.txt  ImageSets/SegmentationAug/train_aug.txt, val.txt
    classes.txt  tags.csv

``<name>`` is the sample's key: the source id for real samples, ``<source>__w2p00__l0p50__s7``
(source id, w, λ, seed) for synthetic ones. Label PNGs are palette PNGs (class id = palette
index, VOC colours, 255 = unlabelled / void). ``tags.csv`` holds every exported sample's tags.

A key is used as a file name only if it is a safe shard key (letters, digits, ``_``, ``-``;
:func:`engine.shards.check_key`): a manifest naming ``..``, a ``/``, an absolute path or a
NUL is refused before anything is written. Every file is written atomically (a crash leaves
no half file) and the image last, so a rerun of the same command skips the samples whose
image is there and finishes the rest; ``export.json`` records the request, and another
request into the same folder is refused unless ``--overwrite``. The manifest, its shards
and ``--out`` may be local paths or URLs (``engine.storage``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from tqdm import tqdm

from engine import storage
from engine.atomic import write_json, write_text
from engine.data.imageio import encode_image, encode_palette_png
from engine.errors import BadInputError
from engine.identity import file_digest
from engine.manifest import iter_samples, read_manifest
from engine.render import voc_palette
from engine.shards import Sample, check_key

REQUEST_FILE = "export.json"
TAG_COLUMNS = ("key", "source_id", "split", "w", "lambda", "seed", "height", "width", "classes", "model", "steps")
PALETTE = voc_palette()  # label PNGs: class c drawn in VOC colour c, as VOC and ScribbleSup ship them
MATCH_TOL = 1e-6  # w and λ are written with 2 decimals; a filter value matches within this


@dataclass(frozen=True)
class Layout:
    """Where one layout puts a sample's files, and which split lists it writes (every layout
    also writes ``classes.txt`` and ``tags.csv``)."""

    image: str  # folder/{name}.ext of the RGB image
    scribble: str
    mask: str
    image_format: str  # png (lossless) or jpg (the VOC convention)
    index: Callable[[list[dict[str, Any]]], dict[str, str]]

    def path(self, kind: str, key: str) -> str:
        return getattr(self, kind).format(name=key)


def _names(rows: list[dict[str, Any]], split: str) -> str:
    return "".join(f"{r['key']}\n" for r in rows if r["split"] == split)


def _folder_index(rows: list[dict[str, Any]]) -> dict[str, str]:
    # val.txt is written even when empty: without it the folder reader draws a val share itself.
    index = {"val.txt": _names(rows, "val")}
    if any(r["split"] == "test" for r in rows):
        index["test.txt"] = _names(rows, "test")
    return index


def _voc_index(rows: list[dict[str, Any]]) -> dict[str, str]:
    index = {f"ImageSets/Segmentation/{s}.txt": _names(rows, s) for s in sorted({r["split"] for r in rows})}
    index["ImageSets/SegmentationAug/train_aug.txt"] = _names(rows, "train")
    index["ImageSets/SegmentationAug/val.txt"] = _names(rows, "val")
    return index


LAYOUTS = {
    "folder": Layout("images/{name}.png", "scribbles/{name}.png", "masks/{name}.png", "png", _folder_index),
    "voc": Layout("JPEGImages/{name}.jpg", "pascal_2012_scribble/{name}.png", "SegmentationClassAug/{name}.png",
                  "jpg", _voc_index),
}


@dataclass
class Filters:
    """Which samples to export; an empty list keeps every value."""

    w: list[float] = field(default_factory=list)
    lambdas: list[float] = field(default_factory=list)
    source_ids: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)

    def keep(self, row: dict[str, Any]) -> bool:
        def near(value: float, wanted: list[float]) -> bool:
            return not wanted or any(abs(value - x) <= MATCH_TOL for x in wanted)

        return (row["status"] == "ok" and near(row["w"], self.w) and near(row["lambda"], self.lambdas)
                and (not self.source_ids or row["source_id"] in self.source_ids)
                and (not self.splits or row["split"] in self.splits))


@dataclass
class ExportResult:
    out: storage.Location
    exported: int  # samples in the export
    written: int  # of which this call wrote (the rest were there from an earlier call)
    masks: int
    seconds: float


def select_rows(manifest: storage.Location, filters: Filters) -> tuple[list[dict[str, Any]], list[str]]:
    """The manifest's rows that ``filters`` keep (ok samples only), in manifest order, and its class names.

    Every kept key must be a safe file name (:func:`engine.shards.check_key`); one that is not
    is refused here, before any file is written.
    """
    table, info = read_manifest(manifest)
    rows = [r for r in table.select(["shard", "status", *TAG_COLUMNS]).to_pylist() if filters.keep(r)]
    if not rows:
        raise BadInputError(str(manifest), f"no sample matches the filters {asdict(filters)}",
                            "run python -m jobs.show on the manifest to see its (w, λ, split) values")
    for row in rows:
        try:
            check_key(row["key"])
        except BadInputError as exc:
            raise BadInputError(f"{manifest}: sample key {row['key']!r}", "cannot be a file name: " + exc.problem,
                                "the manifest was not written by this project's ingest or generate; fix its keys") from None
    return rows, info.class_names


def _claim(out: storage.Location, request: dict[str, Any], overwrite: bool) -> None:
    """Record the request in ``out``; refuse a folder that holds another export (or anything else)."""
    found = storage.entries(out)
    path = storage.join(out, REQUEST_FILE)
    if REQUEST_FILE in found:
        earlier = json.loads(storage.read_text(path)).get("request")
        if earlier != request and not overwrite:
            raise BadInputError(str(out), "holds another export (a different manifest, layout or filters)",
                                "pass --overwrite to add this one over it, or pick another --out")
    elif found and not overwrite:
        raise BadInputError(str(out), f"is not empty and holds no {REQUEST_FILE} (it has {sorted(found)[0]})",
                            "pick an empty --out, or pass --overwrite to write into it anyway")
    storage.makedirs(out)
    write_json(path, {"request": request, "complete": False})


def _listing(out: storage.Location, layout: Layout, kind: str) -> set[str]:
    folder = storage.join(out, *layout.path(kind, "x").split("/")[:-1])
    return set(storage.list_files(folder))


def _write_file(out: storage.Location, relpath: str, data: bytes) -> None:
    target = storage.join(out, *relpath.split("/"))
    storage.makedirs(storage.parent(target))
    with storage.AtomicOutput(target) as tmp:
        tmp.write_bytes(data)


def write_sample(out: storage.Location, layout: Layout, sample: Sample) -> bool:
    """Write one sample's files (image last: its presence means the sample is whole); True if it had a mask."""
    if sample.mask is not None:
        _write_file(out, layout.path("mask", sample.key), encode_palette_png(sample.mask, PALETTE))
    _write_file(out, layout.path("scribble", sample.key), encode_palette_png(sample.scribble, PALETTE))
    _write_file(out, layout.path("image", sample.key), encode_image(sample.image, layout.image_format))
    return sample.mask is not None


def tags_csv(rows: list[dict[str, Any]], layout: Layout, masks: set[str]) -> str:
    """One line per exported sample: its files (relative to the export) and its tags."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "scribble", "mask", *TAG_COLUMNS])
    for r in rows:
        mask = layout.path("mask", r["key"]) if r["key"] in masks else ""
        tags = [" ".join(map(str, r["classes"])) if c == "classes" else r[c] for c in TAG_COLUMNS]
        writer.writerow([layout.path("image", r["key"]), layout.path("scribble", r["key"]), mask, *tags])
    return buf.getvalue()


def run_export(manifest: storage.Location, out: storage.Location, layout_name: str, filters: Filters | None = None,
               overwrite: bool = False, progress: bool = True) -> ExportResult:
    """Export the selected samples of ``manifest`` into ``out`` in layout ``layout_name``."""
    t0 = time.perf_counter()
    if layout_name not in LAYOUTS:
        raise BadInputError(f"--layout {layout_name}", f"unknown layout; expected one of {sorted(LAYOUTS)}")
    layout, filters = LAYOUTS[layout_name], filters or Filters()
    rows, class_names = select_rows(manifest, filters)
    out = storage.as_location(out)
    request = {"manifest": str(storage.resolve(manifest)), "manifest_digest": file_digest(manifest),
               "layout": layout_name, "filters": asdict(filters)}
    with storage.reached(out):
        _claim(out, request, overwrite)
    done = _listing(out, layout, "image")
    todo = {r["key"] for r in rows if storage.name(layout.path("image", r["key"])) not in done}
    with tqdm(total=len(rows), initial=len(rows) - len(todo), desc=f"export {layout_name}", unit="img",
              mininterval=0.5, disable=not progress) as bar:
        for _, sample in iter_samples(manifest, lambda r: r["key"] in todo):
            write_sample(out, layout, sample)
            bar.update()
    masks = {n.rsplit(".", 1)[0] for n in _listing(out, layout, "mask")} & {r["key"] for r in rows}
    index = {**layout.index(rows), "classes.txt": "".join(f"{n}\n" for n in class_names),
             "tags.csv": tags_csv(rows, layout, masks)}
    for relpath, text in index.items():
        target = storage.join(out, *relpath.split("/"))
        storage.makedirs(storage.parent(target))
        write_text(target, text)
    write_json(storage.join(out, REQUEST_FILE), {"request": request, "complete": True, "samples": len(rows),
                                                 "masks": len(masks)})
    return ExportResult(out, len(rows), len(todo), len(masks), time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.export",
        description="Write a set (real or synthetic, or a filter of it) as image files: the VOC + ScribbleSup "
                    "layout or the plain folder that ingest reads. Rerunning the same command resumes.",
        epilog="example: python -m jobs.export --manifest runs/demo/synthetic/w2p00-l1p00/manifest.parquet "
               "--out exports/w2-l1 --layout voc",
    )
    parser.add_argument("--manifest", required=True, help="a manifest.parquet (path or URL) from ingest or generate")
    parser.add_argument("--out", required=True, help="folder (path or URL) to write into; empty, or an earlier export of the same request")
    parser.add_argument("--layout", required=True, choices=sorted(LAYOUTS), help="voc: JPEGImages + ScribbleSup scribbles + ImageSets; folder: what configs/ingest/folder.yaml reads")
    parser.add_argument("--w", type=float, action="append", default=[], help="keep samples with this guidance scale (repeatable)")
    parser.add_argument("--lambda", dest="lambdas", type=float, action="append", default=[], help="keep samples with this encode ratio λ (repeatable)")
    parser.add_argument("--source-id", dest="source_ids", action="append", default=[], help="keep samples of this source (repeatable)")
    parser.add_argument("--split", dest="splits", action="append", default=[], help="keep this split: train, val or test (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that holds another export or other files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        result = run_export(args.manifest, args.out, args.layout,
                            Filters(args.w, args.lambdas, args.source_ids, args.splits), args.overwrite, not args.no_progress)
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{result.out}: {result.exported} samples ({result.written} written now, {result.masks} with masks) "
          f"in the {args.layout} layout, {result.seconds:.1f} s")
    return 0
