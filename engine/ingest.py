"""Ingest: turn a real scribble-labelled source into real shards (λ = 0) and a manifest.

Output folder (``out``)::

    real-train-000000.tar ...   train split, ``samples_per_shard`` samples per shard
    real-val-000000.tar ...     val split (kept whole by ``--subset``)
    real-test-000000.tar ...    held-out test split, where the source has one (kept whole)
    ingest.yaml                 the resolved config
    manifest.parquet            one row per sample (and per skipped input), written last

Every shard is written to a temp name and renamed when whole, and the manifest appears
only at the very end, so an interrupted run never leaves a half-written dataset: there
is no manifest, and the shards present are complete. A non-empty ``out`` is refused
unless ``--overwrite`` is given, which deletes the previous ingest outputs first (and
refuses if the folder holds anything else). ``out`` may be a local path or a URL
(``engine.storage``): on an object store each shard is put as one whole object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial
from typing import Any, Iterable, Iterator

from tqdm import tqdm

from engine import storage
from engine.atomic import atomic_path
from engine.config import add_config_args, load_config, save_config, to_dict
from engine.data.record import SourceRecord, to_sample
from engine.data.registry import open_source
from engine.data.subset import draw_subset
from engine.data.sources import SourceConfig
from engine.errors import BadInputError
from engine.identity import IDENTITY_FILE
from engine.manifest import DatasetInfo, read_manifest, sample_row, shard_rows, skip_row, write_manifest
from engine.shards import Sample, ShardWriter, shard_name

SPLITS = ("train", "val", "test")  # test: held out for reported numbers, never used to choose anything

DEFAULT_CONFIG = "configs/ingest/tiny.yaml"
MANIFEST = "manifest.parquet"
CONFIG_COPY = "ingest.yaml"
SHARD_PREFIX = "real"


def parse_fraction(value: float | int | str) -> float:
    """``0.0625``, ``"0.0625"`` or ``"1/16"`` -> 0.0625; must be in (0, 1]."""
    try:
        frac = float(Fraction(str(value).strip()))
    except (ValueError, ZeroDivisionError):
        raise BadInputError(f"subset {value!r}", "not a fraction", "use e.g. 0.0625 or 1/16") from None
    if not 0.0 < frac <= 1.0:
        raise BadInputError(f"subset {value!r}", "must be in (0, 1]")
    return frac


@dataclass
class IngestConfig:
    """One ingest run: which source, where to, which train subset, how to shard."""

    source: SourceConfig = field(default_factory=SourceConfig)
    out: str = "runs/tiny/real"
    subset: Any = 1.0  # fraction of the train split kept: 0.0625 or "1/16"; val and test are kept whole
    subset_seed: int = 0
    samples_per_shard: int = 256
    image_format: str = "png"  # "png" (lossless) or "jpg"
    skip_bad: bool = False  # record bad inputs as skipped rows instead of stopping
    overwrite: bool = False  # replace a previous ingest in `out`
    workers: int = 1  # >1: decode/generate samples in that many processes (writing stays in order)

    def validate(self) -> None:
        self.subset = parse_fraction(self.subset)
        if self.workers < 1:
            raise BadInputError("workers", f"{self.workers} must be >= 1")
        if self.samples_per_shard < 1:
            raise BadInputError("samples_per_shard", f"{self.samples_per_shard} must be >= 1")
        if self.image_format not in ("png", "jpg"):
            raise BadInputError("image_format", f"{self.image_format!r} must be 'png' or 'jpg'")


def select_subset(records: list[SourceRecord], fraction: float, seed: int) -> list[SourceRecord]:
    """The records of the seeded low-data draw of the train split (``engine.data.subset``,
    the same draw seg's ``data.real_fraction`` makes); every other split kept whole, order kept."""
    if fraction >= 1.0:
        return records
    keep = draw_subset((r.source_id for r in records if r.split == "train"), fraction, seed)
    return [r for r in records if r.split != "train" or r.source_id in keep]


def prepare_out(out: storage.Location, overwrite: bool) -> None:
    """Refuse a non-empty ``out``; with ``overwrite`` remove only earlier ingest outputs."""
    with storage.reached(out):
        entries = storage.entries(out)
    if not entries:
        storage.makedirs(out)
        return
    if not overwrite:
        raise BadInputError(str(out), "output folder is not empty", "pass --overwrite to replace it, or pick another --out")
    ours = [n for n in entries if n in (MANIFEST, CONFIG_COPY, IDENTITY_FILE) or (n.startswith(f"{SHARD_PREFIX}-") and n.endswith((".tar", ".tmp")))]
    others = sorted(set(entries) - set(ours))
    if others:
        raise BadInputError(str(out), f"--overwrite only replaces ingest outputs, but it also holds {others[0]}", "pick an empty --out")
    # Manifest first: if we are interrupted now, no stale manifest points at deleted shards.
    for n in sorted(ours, key=lambda n: n != MANIFEST):
        storage.remove(storage.join(out, n))


def _load_one(record: SourceRecord, num_classes: int) -> Sample | tuple[str, str, str]:
    """Load one record into a Sample, or the (what, problem, hint) of its BadInputError.

    Errors travel as tuples because they may cross a process boundary. Checks made after
    loading name only the source id, so the record's files are added to them.
    """
    try:
        sample = to_sample(record, num_classes)
    except BadInputError as exc:
        origin = getattr(record, "origin", "")
        what = f"{record.source_id} ({origin})" if origin and exc.what == record.source_id else exc.what
        return what, exc.problem, exc.hint
    sample.meta.update(getattr(record, "meta", {}))
    return sample


def _samples(records: list[SourceRecord], num_classes: int, workers: int) -> Iterator[tuple[SourceRecord, Any]]:
    """(record, Sample or BadInputError), in order; loaded in ``workers`` processes if > 1."""
    load = partial(_load_one, num_classes=num_classes)
    if workers > 1 and len(records) > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results: Iterable[Any] = pool.imap(load, records, chunksize=8)
            yield from _pair(records, results)
    else:
        yield from _pair(records, map(load, records))


def _pair(records: list[SourceRecord], results: Iterable[Any]) -> Iterator[tuple[SourceRecord, Any]]:
    for record, result in zip(records, results):
        yield record, BadInputError(*result) if isinstance(result, tuple) else result


def write_split(
    records: list[SourceRecord], split: str, cfg: IngestConfig, out: storage.Location, num_classes: int
) -> list[dict[str, Any]]:
    """Write one split's shards; return its manifest rows (skips included)."""
    rows: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    writer: ShardWriter | None = None
    shards = 0
    seen: set[str] = set()
    try:
        with tqdm(total=len(records), desc=f"ingest {split}", unit="img", mininterval=0.5) as bar:
            for record, result in _samples(records, num_classes, cfg.workers):
                bar.update()
                if isinstance(result, BadInputError):
                    if not cfg.skip_bad:
                        raise result
                    rows.append(skip_row(record.source_id, split, str(result)))
                    continue
                if result.key in seen:
                    raise BadInputError(f"source id {result.key}", "occurs twice", "source ids must be unique")
                seen.add(result.key)
                if writer is None:
                    writer = ShardWriter(storage.join(out, shard_name(f"{SHARD_PREFIX}-{split}", shards)), cfg.image_format)
                    shards += 1
                writer.write(result)
                pending.append(sample_row(result))
                if len(writer.keys) == cfg.samples_per_shard:
                    rows += shard_rows(pending, writer.close(), out)
                    writer, pending = None, []
        if writer is not None:
            rows += shard_rows(pending, writer.close(), out)
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    return rows


def run_ingest(cfg: IngestConfig) -> storage.Location:
    """Ingest the configured source into ``cfg.out`` (a path or URL); return the manifest's location."""
    records, class_names = open_source(cfg.source)
    records = select_subset(records, cfg.subset, cfg.subset_seed)
    out = storage.as_location(cfg.out)
    prepare_out(out, cfg.overwrite)
    rows: list[dict[str, Any]] = []
    for split in SPLITS:
        in_split = [r for r in records if r.split == split]
        if in_split or split != "test":  # a source without a test split writes no empty bar for it
            rows += write_split(in_split, split, cfg, out, len(class_names))
    with atomic_path(storage.join(out, CONFIG_COPY)) as tmp:
        save_config(cfg, tmp)
    info = DatasetInfo(class_names=class_names, kind="real", extra={"source": cfg.source.kind, "config": to_dict(cfg)})
    return write_manifest(rows, storage.join(out, MANIFEST), info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.ingest",
        description="Ingest a scribble-labelled source (procedural | voc | folder) into real shards + manifest.parquet.",
    )
    add_config_args(parser, DEFAULT_CONFIG)
    parser.add_argument("--out", help="output folder (overrides config 'out')")
    parser.add_argument("--subset", help="keep this fraction of the train split, e.g. 0.0625 or 1/16 (seeded, engine.data.subset; val and test kept whole)")
    parser.add_argument("--skip-bad", action="store_true", help="record bad inputs as skipped manifest rows instead of stopping")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier ingest in the output folder")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out={json.dumps(args.out)}")  # JSON strings are YAML strings
    if args.subset:
        overrides.append(f"subset={json.dumps(args.subset)}")
    if args.skip_bad:
        overrides.append("skip_bad=true")
    if args.overwrite:
        overrides.append("overwrite=true")
    t0 = time.perf_counter()
    try:
        cfg = load_config(IngestConfig, args.config, overrides)
        manifest = run_ingest(cfg)
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table, _ = read_manifest(manifest)
    status = table.column("status").to_pylist()
    splits = table.column("split").to_pylist()
    counts = {s: sum(1 for st, sp in zip(status, splits) if st == "ok" and sp == s) for s in SPLITS}
    print(
        f"{manifest}: " + " + ".join(f"{n} {s}" for s, n in counts.items() if n or s != "test") + " samples, "
        f"{status.count('skipped')} skipped, in {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
