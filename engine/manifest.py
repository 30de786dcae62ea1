"""The Parquet manifest: one row per sample, the index every other part reads.

Columns (docs/design.md): key, shard (path relative to the manifest's folder, or a URL),
source_id, split, w, lambda, seed, height, width, classes (ids present), model, steps,
seconds (generation time of the sample), status ("ok" or "skipped"), error (why a
sample was skipped), and per shard: shard_samples, shard_bytes, shard_sha256.
Dataset-level facts (class names, the config, the kind) go in the Parquet schema
metadata under ``scribblegen``. Writes are atomic (temp file + rename, or one whole put
on an object store). A manifest and its shards may live at a local path or a URL
(``engine.storage``); shards are named relative to the manifest, so a set can be copied
or moved as a whole (to another folder, bucket or store) and still resolve.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from engine import storage
from engine.atomic import atomic_path
from engine.errors import BadInputError
from engine.shards import Sample, ShardInfo, decode_sample, iter_records

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("source_id", pa.string()),
        ("split", pa.string()),
        ("w", pa.float64()),
        ("lambda", pa.float64()),
        ("seed", pa.int64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("classes", pa.list_(pa.int32())),
        ("model", pa.string()),
        ("steps", pa.int32()),
        ("seconds", pa.float64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("shard_samples", pa.int64()),
        ("shard_bytes", pa.int64()),
        ("shard_sha256", pa.string()),
    ]
)
META_KEY = b"scribblegen"
# Optional column added after generation (:func:`annotate`): a sample's agreement with its own
# scribble, written by ``python -m seg.label_scores``, read by seg's ``data.min_label_score``.
LABEL_SCORE = "label_score"


@dataclass
class DatasetInfo:
    """Dataset-level facts stored in the manifest's schema metadata."""

    class_names: list[str]
    kind: str = "real"  # "real" or "synthetic"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps({"class_names": self.class_names, "kind": self.kind, "extra": self.extra}).encode()

    @classmethod
    def from_json(cls, raw: bytes | None) -> "DatasetInfo":
        data = json.loads(raw) if raw else {}
        return cls(class_names=data.get("class_names", []), kind=data.get("kind", "real"), extra=data.get("extra", {}))


def sample_row(sample: Sample, shard: str = "", status: str = "ok", error: str = "") -> dict[str, Any]:
    """Manifest row of one sample (shard totals are filled in by :func:`shard_rows`)."""
    m = sample.meta
    h, w = sample.scribble.shape
    return {
        "key": sample.key,
        "shard": shard,
        "source_id": str(m.get("source_id", sample.key)),
        "split": str(m.get("split", "train")),
        "w": float(m.get("w", 0.0)),
        "lambda": float(m.get("lambda", 0.0)),
        "seed": int(m.get("seed", 0)),
        "height": int(h),
        "width": int(w),
        "classes": [int(c) for c in m.get("classes", [])],
        "model": str(m.get("model", "")),
        "steps": int(m.get("steps", 0)),
        "seconds": float(m.get("seconds", 0.0)),
        "status": status,
        "error": error,
        "shard_samples": 0,
        "shard_bytes": 0,
        "shard_sha256": "",
    }


def skip_row(source_id: str, split: str, error: str) -> dict[str, Any]:
    """Row recording a bad input that ``--skip-bad`` skipped instead of stopping."""
    row = {name: None for name in SCHEMA.names}
    row.update(key=source_id, shard="", source_id=source_id, split=split, status="skipped", error=error, classes=[])
    return row


def shard_rows(rows: list[dict[str, Any]], info: ShardInfo, root: storage.Location) -> list[dict[str, Any]]:
    """Attach a finished shard's path relative to the manifest's folder ``root``, count, size
    and checksum to its rows."""
    rel = storage.relative(info.path, root)
    for row in rows:
        row.update(shard=rel, shard_samples=len(info.keys), shard_bytes=info.num_bytes, shard_sha256=info.sha256)
    return rows


def write_manifest(rows: Iterable[dict[str, Any]], path: storage.Location, info: DatasetInfo) -> storage.Location:
    """Write rows to ``path`` atomically with the dataset info in the schema metadata."""
    storage.makedirs(storage.parent(path))
    table = pa.Table.from_pylist(list(rows), schema=SCHEMA).replace_schema_metadata({META_KEY: info.to_json()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return storage.as_location(path)


def read_table(path: storage.Location, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file (manifest or part) from a path or URL; local files are read directly."""
    if storage.is_local(path):
        return pq.read_table(storage.local_path(path), columns=columns)
    with storage.open_read(path) as fh:
        return pq.read_table(fh, columns=columns)


def read_manifest(path: storage.Location) -> tuple[pa.Table, DatasetInfo]:
    """Read a manifest; a missing or non-Parquet file raises naming it."""
    with storage.reached(path):
        found = storage.is_file(path)
    if not found:
        raise BadInputError(str(path), "manifest not found", "pass the manifest.parquet written by ingest or generate")
    try:
        table = read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BadInputError(str(path), f"not a readable Parquet manifest: {exc}") from None
    missing = set(SCHEMA.names) - set(table.column_names)
    if missing:
        raise BadInputError(str(path), f"manifest lacks column(s) {sorted(missing)}")
    meta = (table.schema.metadata or {}).get(META_KEY)
    return table, DatasetInfo.from_json(meta)


def merge_parts(parts: Iterable[storage.Location], path: storage.Location, info: DatasetInfo) -> storage.Location:
    """Merge per-shard manifest parts (written as shards finish) into one manifest."""
    tables = [read_table(p).select(SCHEMA.names).cast(SCHEMA) for p in sorted(parts, key=str)]
    rows = [r for t in tables for r in t.to_pylist()]
    return write_manifest(rows, path, info)


def annotate(manifest: storage.Location, column: str, values: dict[str, float], out: storage.Location | None = None,
             note: dict[str, Any] | None = None) -> storage.Location:
    """Write ``manifest`` with a float ``column`` of per-key ``values`` (null for rows not in
    ``values``) to ``out`` (default: in place), atomically; ``note`` goes into the dataset
    info's ``extra[column]`` (who computed the values, how).

    A step after generation (a per-sample score, for example) adds what it learned to the
    index every reader already reads, instead of a side file to keep in step. ``out`` in
    another folder gets shard paths relative to it, so the copy resolves the same shards.
    """
    if column in SCHEMA.names:
        raise BadInputError(f"column {column!r}", "is one of the manifest's own columns", "choose another name")
    table, info = read_manifest(manifest)
    out = manifest if out is None else out
    shards = table.column("shard").to_pylist()
    if storage.parent(storage.resolve(out)) != storage.parent(storage.resolve(manifest)):
        shards = [s and storage.relative(resolve_shard(manifest, s), storage.parent(storage.resolve(out))) for s in shards]
    keys = table.column("key").to_pylist()
    table = table.set_column(table.column_names.index("shard"), "shard", pa.array(shards, pa.string()))
    if column in table.column_names:
        table = table.drop_columns([column])
    table = table.append_column(pa.field(column, pa.float64()), pa.array([values.get(k) for k in keys], pa.float64()))
    info.extra = {**info.extra, column: note or {}}
    storage.makedirs(storage.parent(out))
    with atomic_path(out) as tmp:
        pq.write_table(table.replace_schema_metadata({META_KEY: info.to_json()}), tmp)
    return storage.as_location(out)


def resolve_shard(manifest_path: storage.Location, shard: str) -> str:
    """Absolute path (or URL) of a shard named in a manifest row (relative to the manifest)."""
    if "://" in shard or os.path.isabs(shard):
        return shard
    return str(storage.join(storage.parent(storage.resolve(manifest_path)), shard))


def iter_samples(manifest: storage.Location, keep: Callable[[dict[str, Any]], bool] = lambda row: True,
                 with_mask: bool = True) -> Iterator[tuple[dict[str, Any], Sample]]:
    """(row, sample) for each ``ok`` row of ``manifest`` that ``keep`` accepts, streamed.

    Only the shards holding such rows are read, each once, in sorted order, samples in shard
    order; a listed key its shard lacks raises naming both (``engine.verify`` says more).
    """
    table, _ = read_manifest(manifest)
    wanted: dict[str, dict[str, dict[str, Any]]] = {}
    for row in table.to_pylist():
        if row["status"] == "ok" and keep(row):
            wanted.setdefault(row["shard"], {})[row["key"]] = row
    for shard, rows in sorted(wanted.items()):
        location = resolve_shard(manifest, shard)
        left = dict(rows)
        for record in iter_records(location):
            row = left.pop(record["__key__"], None)
            if row is not None:
                yield row, decode_sample(record, with_mask=with_mask)
        if left:
            raise BadInputError(location, f"does not hold {len(left)} key(s) {manifest} lists, e.g. {sorted(left)[0]!r}",
                                f"run python -m engine.verify {manifest}")


def missing_shards(locations: Iterable[str]) -> list[str]:
    """The shard locations that do not exist, sorted; one listing per folder, not one
    request per shard (an object store answers a listing as fast as one lookup)."""
    listings: dict[str, dict[str, int]] = {}
    missing = []
    for loc in sorted(set(locations)):
        folder = str(storage.parent(loc))
        if folder not in listings:
            listings[folder] = storage.list_files(folder)
        if storage.name(loc) not in listings[folder]:
            missing.append(loc)
    return missing
